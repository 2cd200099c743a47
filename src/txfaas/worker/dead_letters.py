"""Dead letters: published to the dead-letter queue, then kept in the store by the worker.

Every dead letter is published with confirms before its original is acked: a crash in
between makes a duplicate (the store keeps one per call id), never a loss.  The keeper takes
the worker's own dead letters and any the broker dead-letters under an operator's policy.
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from txfaas.model import Call, CallRecord, CallStatus, DeadLetter, DeadMark, DeadReason
from txfaas.queue import Delivery
from txfaas.worker.context import Context
from txfaas.worker.jobs import DEAD


class DeadLetters:
    """Publishes calls to the dead-letter queue and keeps what arrives there."""

    log = Logger()

    def __init__(self, context: Context) -> None:
        self._ctx = context

    async def send(
        self, call: Call, reason: str, error: str | None, at: float, attempts: int | None = None
    ) -> None:
        """Publish ``call`` to the dead-letter queue (confirmed), marked with why and when."""
        mark = DeadMark(reason, at, error, call.attempt if attempts is None else attempts)
        await self._ctx.queue.dead_letter(attrs.evolve(call, dead=mark, not_before=0.0))
        self._ctx.metrics.dead_letters.labels(reason).inc()

    async def keep(self, call: Call, delivery: Delivery) -> None:
        """Write a dead letter to the store and mark its record; the caller then acks it."""
        ctx = self._ctx
        mark = call.dead
        if mark is None:
            mark = DeadMark(
                DeadReason.REJECTED, ctx.clock.seconds(), "in the dead-letter queue, no reason given"
            )
            call = attrs.evolve(call, dead=mark)
        read = await ctx.store.get_call(call.call_id) if call.function else None
        if read is not None and call.replay < read.replays:
            ctx.stale(DEAD, call, f"replay {call.replay} was re-queued already (record: {read.replays})")
            return
        await ctx.store.put_dead_letter(DeadLetter(call))
        ctx.metrics.kept.labels(mark.reason).inc()
        self.log.info(
            "call {call_id}: kept in the dead letters ({reason})", call_id=call.call_id, reason=mark.reason
        )
        if not call.function:
            return  # not a txfaas message: there is no record to mark
        record = read if read is not None else CallRecord.for_call(call)
        if record.status == CallStatus.DEAD_LETTERED and record.dead_reason == mark.reason:
            return
        marked = attrs.evolve(
            record,
            status=CallStatus.DEAD_LETTERED,
            dead_reason=mark.reason,
            error=mark.error or record.error,
            finished_at=record.finished_at or mark.at,
            next_attempt_at=None,
        )
        await ctx.records.kept(marked, read)
