"""Callbacks as jobs of their own, on the callback queue.

A finished call's callback is published (confirmed) to the callback queue, with the
function's answer in the message, before the call is acked.  Deliveries are made from there,
with their own concurrency and at most --callback-host-concurrency to one host, so a slow
receiver never holds a call slot.  A failure worth another attempt goes to a delay queue as
the next attempt: the function never runs again for its callback.  The answers carried count
in --max-answer-memory; while they fill it, the callback consumer pauses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from txfaas.headers import to_bytes_pairs, to_str_pairs
from txfaas.model import (
    Call,
    CallbackJob,
    CallbackState,
    CallRecord,
    CallResult,
    CallStatus,
    DeadReason,
    outcome_status,
)
from txfaas.queue import Delivery
from txfaas.worker.callback import Callback, CallbackDelivery, CallbackOutcome
from txfaas.worker.config import CALLBACK_WAIT, MAX_FUNCTION_RESPONSE
from txfaas.worker.context import Context
from txfaas.worker.dead_letters import DeadLetters
from txfaas.worker.invoke import FunctionResponse
from txfaas.worker.jobs import CALLBACK, JobTable


class NoRoom(Exception):
    """A callback's body does not fit in --max-answer-memory now: give its message back."""


class CallbackJobs:
    """Queues finished calls' callbacks, delivers them from the callback queue, records the outcome.

    ``handler`` is the callback queue's delivery handler (the worker's).  While the worker
    drains (``draining``), a call's first callback attempt is made at once instead of queued;
    once it stops taking callbacks (``stopping``), the consumer is never resumed."""

    log = Logger()

    def __init__(
        self,
        context: Context,
        delivery: CallbackDelivery,
        dead_letters: DeadLetters,
        table: JobTable,
        handler: Callable[[Delivery], None],
    ) -> None:
        self._ctx = context
        self._delivery = delivery
        self._dead_letters = dead_letters
        self._table = table
        self._handler = handler
        self.draining = False
        self.stopping = False
        self._paused = False
        self._prefetch = context.config.callback_concurrency
        self._biggest = 0  # the largest callback body seen since the consumer started

    # --- the callback consumer -----------------------------------------------------------------

    def start(self) -> None:
        """Consume: until callbacks show their size, as many as the budget holds at the largest answer."""
        self._consume(self._prefetch_for(self._ctx.config.max_answer_memory, MAX_FUNCTION_RESPONSE))

    def tune(self) -> None:
        """Resume a paused consumer, or raise its prefetch, to what the room left holds at the
        largest body seen since it started (a new consumer; the old one ends)."""
        answers = self._table.answers
        if self.stopping or answers.full:
            return
        room = answers.capacity - answers.held
        if self._paused:
            self._paused = False
            self._consume(self._prefetch_for(room, self._biggest or MAX_FUNCTION_RESPONSE))
        elif self._biggest and self._prefetch < self._ctx.config.callback_concurrency:
            prefetch = self._prefetch_for(room, self._biggest)
            if prefetch >= 2 * self._prefetch:
                self._stop_consuming("restarting")
                self._consume(prefetch)

    def _pause(self) -> None:
        if self._paused or self.stopping:
            return
        self._paused = True
        self.log.info(
            "the answers held fill --max-answer-memory ({n} bytes): taking no callbacks until some are released",
            n=self._table.answers.capacity,
        )
        self._stop_consuming("pausing")

    def _stop_consuming(self, what: str) -> None:
        d = defer.Deferred.fromCoroutine(self._ctx.queue.stop_consuming([self._ctx.config.callback_queue]))
        d.addErrback(lambda f: self.log.failure("{what} the callback consumer failed", f, what=what))

    def _consume(self, prefetch: int) -> None:
        self._prefetch = prefetch
        self._biggest = 0
        self._ctx.queue.consume([self._ctx.config.callback_queue], prefetch, self._handler)

    def _prefetch_for(self, room: int, size: int) -> int:
        return max(1, min(self._ctx.config.callback_concurrency, room // max(1, size)))

    # --- queueing a finished call's callback ---------------------------------------------------

    async def queue(self, call: Call, record: CallRecord, response: FunctionResponse | None) -> None:
        """Queue a finished call's callback (confirmed), before the call's ack.

        ``response`` None: a redelivery of a finished call; the answer the store kept is sent
        (its body may be cut short)."""
        url = record.callback_url or call.callback_url
        if not url or record.callback_state not in (CallbackState.PENDING, None):
            return
        if response is None:
            stored = await self._ctx.store.get_result(call.call_id)
            if stored is None:
                stored = CallResult(record.status_code or 502)
            response = FunctionResponse(stored.status_code, to_bytes_pairs(stored.headers), stored.body)
        job = CallbackJob(
            status_code=response.status_code,
            headers=to_str_pairs(response.headers),
            duration=record.duration or 0.0,
            attempt=1,
            first_at=self._ctx.clock.seconds(),
            retries=max(0, (record.attempts or 1) - 1),
            max_retries=max(0, (record.max_attempts or 1) - 1),
        )
        message = Call(
            call_id=call.call_id,
            function=call.function,
            namespace=call.namespace,
            body=response.body,
            callback_url=url,
            accepted_at=call.accepted_at,
            queue=self._ctx.config.callback_queue,
            replay=call.replay,
            callback_job=job,
        )
        if self.draining:
            # No new call needs the slot, and a queued callback might not come back to this
            # worker before it stops.  (Still unacked: durable all the same.)
            await self._deliver(message, job, record, record)
        else:
            await self._ctx.queue.publish(message)

    # --- a delivery from the callback queue ----------------------------------------------------

    async def run(self, call: Call, delivery: Delivery) -> None:
        """Deliver one callback-queue message: stale or parked, or one attempt made and recorded."""
        job = call.callback_job
        if job is None or not call.callback_url:
            self.log.error(
                "call {call_id}: a callback-queue message without a callback; dropped", call_id=call.call_id
            )
            return
        self._hold_body(call)
        if await self._ctx.early(call):
            return
        read = await self._ctx.store.get_call(call.call_id)
        record = self._current(call, job, read)
        if record is None:
            return
        host = (urlsplit(call.callback_url).hostname or "").lower()
        if not await self._slot(call, host):
            return
        try:
            await self._deliver(call, job, record, read)
        finally:
            self._table.callback_slots.release(host)

    def _current(self, call: Call, job: CallbackJob, read: CallRecord | None) -> CallRecord | None:
        """The record this attempt builds on; None when the message is stale."""
        if read is None:
            return attrs.evolve(
                CallRecord.for_call(call),
                status=outcome_status(job.status_code),
                status_code=job.status_code,
                duration=job.duration,
            )
        if call.replay < read.replays:
            self._ctx.stale(CALLBACK, call, f"replay {call.replay} is older than the record's {read.replays}")
            return None
        record = read
        if call.replay > read.replays:
            # Re-queued from the dead letters, and the record was not reset: this message wins.
            record = attrs.evolve(
                read,
                status=outcome_status(job.status_code),
                status_code=job.status_code,
                error=None,
                callback_state=CallbackState.RETRYING,
                callback_attempts=0,
                dead_reason=None,
                replays=call.replay,
            )
        if record.callback_state in (CallbackState.DELIVERED, CallbackState.FAILED) or (
            record.callback_attempts >= job.attempt
        ):
            self._ctx.stale(
                CALLBACK,
                call,
                f"callback attempt {job.attempt} is over (record: {record.callback_state}, "
                f"{record.callback_attempts} attempt(s))",
            )
            return None
        return record

    async def _slot(self, call: Call, host: str) -> bool:
        """Take one of the host's slots; False when the callback was parked instead.

        The host has all its slots: wait a little here (a busy fast receiver frees one soon),
        unless this is the last delivery the callback queue's prefetch lets in, or the wait is
        too long: then park it in the broker, so that slow receivers never fill the prefetch and
        hold up every other host's callbacks."""
        slot = self._table.callback_slots.acquire(host)
        if slot.called:
            return True
        if self._table.callback_jobs >= self._prefetch:
            slot.addErrback(lambda f: f.trap(defer.CancelledError))
            slot.cancel()
        else:
            slot.addTimeout(CALLBACK_WAIT, self._ctx.clock)
            try:
                await slot
                return True
            except defer.TimeoutError:
                pass
        await self._park(call, f"callback host {host} has all its slots")
        return False

    def _hold_body(self, call: Call) -> None:
        """Count a callback's body (the answer it carries) in --max-answer-memory, or refuse it.

        Refused (:class:`NoRoom`): the message goes straight back to the broker, which frees it
        here, and the consumer pauses until answers are released (see :meth:`tune`)."""
        size = len(call.body)
        self._biggest = max(self._biggest, size, 1)
        answers = self._table.answers
        if size > answers.capacity:
            return  # from before the bound was lowered: it can never fit, so it is just sent
        if not answers.try_reserve(size):
            self._pause()
            raise NoRoom()
        self._table.hold(size)

    async def _park(self, call: Call, why: str) -> None:
        """Put a callback back in the broker for the smallest delay tier (the same attempt)."""
        ctx = self._ctx
        wait = ctx.config.delay_tiers[0] if ctx.config.delay_tiers else 1.0
        await ctx.queue.publish_delayed(attrs.evolve(call, not_before=ctx.clock.seconds() + wait), wait)
        ctx.metrics.callbacks_parked.inc()
        self.log.debug(
            "call {call_id}: {why}; its callback is tried again in {wait:g}s",
            call_id=call.call_id,
            why=why,
            wait=wait,
        )

    # --- one attempt ---------------------------------------------------------------------------

    async def _deliver(
        self, message: Call, job: CallbackJob, record: CallRecord, read: CallRecord | None
    ) -> None:
        """One attempt; then the next one queued, or the end recorded (and dead-lettered).

        The outcome is written over ``read``, the record as it was read (None: there was
        none), so a record that moved on meanwhile is never overwritten."""
        assert message.callback_url is not None
        outcome = await self._delivery.deliver(
            Callback(
                url=message.callback_url,
                call_id=message.call_id,
                function=message.ref,
                status_code=job.status_code,
                headers=to_bytes_pairs(job.headers),
                body=message.body,
                duration=job.duration,
                retries=job.retries,
                max_retries=job.max_retries,
            )
        )
        self._ctx.metrics.callbacks.labels(outcome.state).inc()
        changes = await self._after(message, job, outcome)
        # Besides the record read, this outcome may land over what another writer recorded
        # meanwhile and it completes: the gateway settling its claim of a re-queued callback,
        # or the dead-letter keeper marking the dead letter this attempt published.
        also = {CallStatus.DEAD_LETTERED} if changes.get("status") == CallStatus.DEAD_LETTERED else set()
        if record.status == CallStatus.ACCEPTING:
            # A re-queued callback whose gateway did not record the confirm: the call's outcome.
            changes.setdefault("status", outcome_status(job.status_code))
            also.add(outcome_status(job.status_code))
        updated = attrs.evolve(record, **changes)
        found = await self._ctx.records.callback_outcome(updated, read, also)
        if found is not None and found != updated:
            self.log.info(
                "call {call_id}: callback attempt {n} made, but the record moved on ({status}); "
                "its outcome is not recorded",
                call_id=message.call_id,
                n=job.attempt,
                status=found.status,
            )

    async def _after(self, message: Call, job: CallbackJob, outcome: CallbackOutcome) -> dict[str, Any]:
        """What follows an attempt (the next one queued, or a dead letter): the record's changes."""
        ctx = self._ctx
        now = ctx.clock.seconds()
        changes: dict[str, Any] = {
            "callback_url": message.callback_url,
            "callback_attempts": job.attempt,
            "callback_status": outcome.status,
            "callback_error": outcome.error,
            "callback_next_attempt_at": None,
            "callback_state": CallbackState.FAILED,
        }
        policy = ctx.config.callback_retry
        dead = outcome.retryable  # attempts or age exhausted, unless retried below; a 4xx just stops
        if outcome.delivered:
            changes["callback_state"] = CallbackState.DELIVERED
            dead = False
        elif outcome.retryable and policy.should_retry(outcome.status, job.attempt, job.first_at, now):
            wait = policy.wait(job.attempt, ctx.random, job.first_at, now)
            if wait is not None:
                await self._again(message, job, now, wait)
                changes.update(callback_state=CallbackState.RETRYING, callback_next_attempt_at=now + wait)
                dead = False
        if dead:
            error = f"callback failed {job.attempt} time(s), the last: {outcome.error}"
            changes.update(status=CallStatus.DEAD_LETTERED, dead_reason=DeadReason.CALLBACK, error=error)
            # The dead letter keeps the answer: re-queuing it delivers the callback, never runs the call.
            await self._dead_letters.send(message, DeadReason.CALLBACK, error, now, attempts=job.attempt)
        return changes

    async def _again(self, message: Call, job: CallbackJob, now: float, wait: float) -> None:
        """Publish the next attempt to a delay queue, due in ``wait`` seconds."""
        await self._ctx.queue.publish_delayed(
            attrs.evolve(
                message,
                callback_job=attrs.evolve(job, attempt=job.attempt + 1),
                not_before=now + wait,
                dead=None,
            ),
            wait,
        )
        self._ctx.metrics.callback_retries.inc()
        self.log.info(
            "call {call_id}: callback attempt {n} of {m} in {wait:.3f}s",
            call_id=message.call_id,
            n=job.attempt + 1,
            m=self._ctx.config.callback_retry.max_attempts,
            wait=wait,
        )
