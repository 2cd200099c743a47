"""The job table: the messages a worker holds now, and what they hold.

A *job* is one message's handling (a call, a callback or a dead letter).  The table knows
which jobs run, which deliveries wait for one, the answer memory they hold
(--max-answer-memory, a :class:`ByteBudget`) and the callback slots per host
(:class:`KeyedSlots`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextvars import ContextVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.model import Call
from txfaas.queue import Delivery
from txfaas.worker.budget import ByteBudget
from txfaas.worker.metrics import WorkerMetrics
from txfaas.worker.slots import KeyedSlots

CALL, CALLBACK, DEAD = "call", "callback", "dead"

log = Logger()


@attrs.define(eq=False)
class Job:
    """One message being handled, and every delivery that is settled with it."""

    kind: str
    call: Call
    deliveries: list[Delivery]
    #: which deliveries join this job (see :func:`job_key`)
    key: tuple[str, str, bytes]
    deferred: defer.Deferred[None] | None = None
    settled: bool = False
    #: deliveries of other messages of the same call, waiting for this job to be settled
    followers: list[Delivery] = attrs.field(factory=list)
    #: given back at the drain limit: settled by the give-back, not when its work ends
    returning: bool = False


def job_key(kind: str, call: Call) -> tuple[str, str, bytes]:
    """Which job a delivery belongs to: only a redelivery of the very same message joins one.

    The next attempt, a replay or a callback retry of the same call id is a message of its
    own (it differs in its metadata), and must never be acked unrun with the one before it."""
    return (kind, call.call_id, call.encode_meta())


@attrs.define
class _Holding:
    """Bytes of --max-answer-memory a job holds (its function's answer, or its callback's body)."""

    bytes: int = 0


_holding: ContextVar[_Holding | None] = ContextVar("txfaas_worker_holding", default=None)


def settle(delivery: Delivery, ack: bool) -> None:
    """Ack or requeue; a delivery whose channel is gone is already back on the queue."""
    try:
        if ack:
            delivery.ack()
        else:
            delivery.nack(requeue=True)
    except Exception as e:
        log.warn(
            "call {call_id}: could not {what} the message: {error}",
            call_id=delivery.call.call_id,
            what="ack" if ack else "requeue",
            error=e,
        )


class JobTable:
    """The jobs in flight, by message and by call; the answer budget; the callback slots.

    ``restart(kind, delivery)`` is called (on the next turn) for each delivery that waited
    behind a job once that job is settled."""

    def __init__(
        self,
        clock: IReactorTime,
        metrics: WorkerMetrics,
        *,
        answer_memory: int,
        callback_host_concurrency: int,
        restart: Callable[[str, Delivery], None],
        on_free: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._restart = restart
        self._jobs: dict[tuple[str, str, bytes], Job] = {}
        self._by_call: dict[tuple[str, str], Job] = {}  # the latest job of each call
        #: callback-queue deliveries held here (at most that consumer's prefetch)
        self.callback_jobs = 0
        #: calls not started while answers fill the budget
        self.held_back: deque[Delivery] = deque()
        self.answers = ByteBudget(answer_memory, on_free=on_free)
        self.callback_slots = KeyedSlots(callback_host_concurrency)

    def __len__(self) -> int:
        return len(self._jobs)

    def jobs(self) -> list[Job]:
        """Every job in flight."""
        return list(self._jobs.values())

    def join(self, key: tuple[str, str, bytes], delivery: Delivery) -> bool:
        """Add a redelivery of a message running here (``key``: :func:`job_key`) to its job, to be
        settled with it; say if it was one."""
        running = self._jobs.get(key)
        if running is None:
            return False
        log.info(
            "call {call_id}: redelivered while running here; it will be settled with the running call",
            call_id=delivery.call.call_id,
        )
        running.deliveries.append(delivery)
        return True

    def open(self, key: tuple[str, str, bytes], kind: str, delivery: Delivery) -> Job | None:
        """A new job for ``delivery``; None when it waits behind the job of the call's message before."""
        call = delivery.call
        earlier = self._by_call.get((kind, call.call_id))
        if earlier is not None and not earlier.settled:
            # Another message of this call (its next attempt, a callback retry) while the one
            # before still records its outcome: it starts once that one is settled, so it reads
            # what that one wrote and neither overwrites the other's record.
            earlier.followers.append(delivery)
            return None
        job = Job(kind, call, [delivery], key)
        self._jobs[key] = job
        self._by_call[(kind, call.call_id)] = job
        if kind == CALLBACK:
            self.callback_jobs += 1
        self._metrics.in_flight.inc()
        return job

    def settle(self, job: Job, ack: bool) -> None:
        """Ack or requeue every delivery of the job, once; the job stops being in flight first,
        so a requeued message that comes straight back starts a job of its own."""
        if job.settled:
            return
        job.settled = True
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
            self._metrics.in_flight.dec()
            if job.kind == CALLBACK:
                self.callback_jobs -= 1
        if self._by_call.get((job.kind, job.call.call_id)) is job:
            del self._by_call[(job.kind, job.call.call_id)]
        for delivery in job.deliveries:
            settle(delivery, ack)
        for delivery in job.followers:
            self._clock.callLater(0, self._restart, job.kind, delivery)

    def running(self, which: Callable[[Job], bool]) -> list[defer.Deferred[None]]:
        """The work of the jobs ``which`` selects that is still going on."""
        return [
            job.deferred
            for job in self._jobs.values()
            if job.deferred is not None and not job.deferred.called and which(job)
        ]

    def hold_answers(self) -> _Holding:
        """Start counting what the job running in this context holds of the answer budget."""
        holding = _Holding()
        _holding.set(holding)
        return holding

    def release_answers(self, holding: _Holding) -> None:
        """The job's work is done (or failed): its answer is no longer needed."""
        self.answers.release(holding.bytes)
        holding.bytes = 0

    def hold(self, n: int) -> None:
        """Count ``n`` reserved bytes as the running job's (released when its work ends)."""
        holding = _holding.get()
        if holding is not None:
            holding.bytes += n
        else:  # not within a job (a test calling in directly): nobody would release it
            self.answers.release(n)
