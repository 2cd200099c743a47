"""The one writer of call records: every state the worker records goes through here.

Each write is a compare-and-set (the store's ``transition_call``): a record moves on only
from the statuses its step expects, so a cancel, a newer attempt or a replay that came first
is never overwritten; the refusing record is returned instead.

While the store does not answer, a write is retried.  All the writes of one message share one
:data:`~txfaas.worker.config.RECORD_PATIENCE` (what ``WorkerConfig.exec_timeout_limit``
budgets, once, below the broker's consumer timeout): a call that ran is recorded rather than
given back and run again.  Past it, :class:`~txfaas.store.StoreUnavailable` is raised and the
message goes back to the broker.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

import attrs
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.model import CallRecord, CallResult, CallStatus
from txfaas.store import StoreUnavailable
from txfaas.worker.config import RECORD_PATIENCE, WorkerConfig

T = TypeVar("T")

#: Statuses a starting attempt may replace (a cancel, or a finish, that came first wins).  An
#: ``accepting`` claim is one whose gateway had the broker's confirm but did not record it.
STARTABLE = frozenset({CallStatus.ACCEPTING, CallStatus.QUEUED, CallStatus.RETRYING, CallStatus.RUNNING})
_RUNNING = frozenset({CallStatus.RUNNING})


@attrs.define
class _Patience:
    """Seconds a message has lost so far to a store that would not take its writes."""

    spent: float = 0.0


_patience: ContextVar[_Patience | None] = ContextVar("txfaas_worker_patience", default=None)


def new_patience() -> None:
    """Give the job running in this context (one message's handling) its own RECORD_PATIENCE."""
    _patience.set(_Patience())


class RecordWriter:
    """Writes call records and results to ``store`` (a ``CallStore``), patiently."""

    log = Logger()

    def __init__(self, clock: IReactorTime, store: Any, config: WorkerConfig) -> None:
        self._clock = clock
        self._store = store
        self._config = config

    async def start(self, running: CallRecord, attempt: int) -> CallRecord | None:
        """Record an attempt ``running``, unless a cancel, a finish or a newer attempt came first."""
        return await self._patiently(
            running.call_id, STARTABLE, running, create=True, attempts_at_most=attempt
        )

    async def finish(self, record: CallRecord, result: CallResult, attempt: int) -> CallRecord | None:
        """Record an attempt's outcome and its answer in one write (kept only if the outcome is)."""
        return await self._patiently(
            record.call_id, _RUNNING, record, create=True, attempts_at_most=attempt, result=result
        )

    async def retrying(self, record: CallRecord, attempt: int) -> CallRecord | None:
        """Record ``retrying``; refused once the next attempt has started."""
        return await self._patiently(record.call_id, _RUNNING, record, create=True, attempts_at_most=attempt)

    async def keep_result(self, call_id: str, result: CallResult) -> None:
        """Keep an answer on its own (an attempt that will be retried)."""
        await self._retrying(call_id, lambda: self._store.put_result(call_id, result))

    async def dead_lettered(self, record: CallRecord) -> CallRecord | None:
        """Record a call dead-lettered before it ran (too old, or interrupted too often)."""
        return await self._patiently(record.call_id, STARTABLE, record, create=True)

    async def callback_outcome(
        self, record: CallRecord, read: CallRecord | None, also: Collection[str] = ()
    ) -> CallRecord | None:
        """Record a callback attempt's outcome over the record as it was read (``None``: missing),
        or over one in a status of ``also`` (what another writer may have recorded meanwhile).

        A record that moved on otherwise (the call was re-queued or cancelled, say) is kept."""
        if read is None:
            return await self._patiently(record.call_id, (), record, create=True)
        statuses = {read.status, *also}
        return await self._patiently(record.call_id, statuses, record, attempts_at_most=read.attempts)

    async def kept(self, record: CallRecord, read: CallRecord | None) -> CallRecord | None:
        """Mark a call whose dead letter was kept, over the record as read, without patience.

        Whoever dead-lettered the call may still be writing its own, fuller record; and a
        dead letter that cannot be marked now just goes back to its queue to be kept again."""
        return await self._store.transition_call(
            record, {read.status} if read is not None else (), create=read is None
        )

    async def given_back(self, call_id: str, attempt: int) -> None:
        """Record a call given back unfinished as ``queued`` again, once, without patience.

        A worker that stops on purpose did not crash: the call's next run must not count as an
        interruption toward --delivery-limit, which a ``running`` record left behind would say."""
        try:
            record = await self._store.get_call(call_id)
            if record is None or record.status != CallStatus.RUNNING or record.attempts != attempt:
                return
            queued = attrs.evolve(record, status=CallStatus.QUEUED, started_at=None)
            found = await self._store.transition_call(queued, _RUNNING, attempts_at_most=attempt)
        except StoreUnavailable as e:
            self.log.warn(
                "call {call_id}: given back, but its record still says running ({error}): its next "
                "run counts as an interruption",
                call_id=call_id,
                error=e,
            )
            return
        if found is None:
            self.log.info("call {call_id}: given back to the queue unfinished", call_id=call_id)

    async def _patiently(
        self, call_id: str, from_statuses: Collection[str], record: CallRecord, **options: Any
    ) -> CallRecord | None:
        return await self._retrying(
            call_id, lambda: self._store.transition_call(record, from_statuses, **options)
        )

    async def _retrying(self, call_id: str, write: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Retry ``write`` while the store is down, within the message's RECORD_PATIENCE."""
        budget = _patience.get()
        if budget is None:  # not within a job (a test calling in directly): a budget of its own
            budget = _Patience()
        failures = 0
        while True:
            began = self._clock.seconds()
            try:
                return await write()
            except StoreUnavailable as e:
                budget.spent += self._clock.seconds() - began
                delay = self._config.backoff(failures)
                failures += 1
                if budget.spent + delay > RECORD_PATIENCE:
                    raise
                self.log.warn(
                    "call {call_id}: cannot record the outcome ({error}); retrying in {delay:g}s",
                    call_id=call_id,
                    error=e,
                    delay=delay,
                )
                await task.deferLater(self._clock, delay, lambda: None)
                budget.spent += delay
