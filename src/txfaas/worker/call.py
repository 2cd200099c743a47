"""One call's run, from a work-queue delivery to its recorded outcome.

1. A retry that came out of its delay tier before its due time is sent round again.
2. The record decides whether this message runs: one of an older attempt or replay is
   stale (dropped); a final record is not run again, only what may be missing is redone (its
   dead letter, its callback); a ``cancelled`` call never runs.
3. A call older than --max-age, or found ``running`` for this very attempt (its worker died
   mid-call) more than --delivery-limit times, is dead-lettered instead.
4. ``running`` is recorded (a cancel that came first wins) and the function invoked.
5. A retry code with attempts left: the answer kept, the next attempt published to a delay
   queue (confirmed), then ``retrying`` recorded.  The wait lives in the broker, so a worker
   restart loses nothing.
6. Otherwise the outcome and the answer are recorded in one write; attempts exhausted also
   make a dead letter; then the callback is queued.

The caller acks only once this returns: everything the run started is confirmed by then.
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from txfaas.config import format_duration
from txfaas.headers import to_str_pairs
from txfaas.invocation_log import InvocationLog
from txfaas.model import (
    Call,
    CallbackState,
    CallRecord,
    CallResult,
    CallStatus,
    DeadReason,
    FunctionSpec,
    outcome_status,
)
from txfaas.queue import Delivery
from txfaas.retry import RetryConfigError, RetryPolicy, parse_retry_after
from txfaas.worker.callback_jobs import CallbackJobs
from txfaas.worker.context import Context
from txfaas.worker.dead_letters import DeadLetters
from txfaas.worker.invoke import FunctionResponse, Invoker
from txfaas.worker.jobs import CALL


@attrs.frozen
class _Attempt:
    """One attempt of a call that ran: what it ran with and what the function answered."""

    call: Call
    spec: FunctionSpec | None
    policy: RetryPolicy
    running: CallRecord
    response: FunctionResponse
    result: CallResult
    finished: float
    duration: float


class CallRuns:
    """Runs calls from the work queues (see the module's docstring for the steps)."""

    log = Logger()

    def __init__(
        self,
        context: Context,
        invoker: Invoker,
        callbacks: CallbackJobs,
        dead_letters: DeadLetters,
        invocations: InvocationLog | None = None,
    ) -> None:
        self._ctx = context
        self._invoker = invoker
        self._callbacks = callbacks
        self._dead_letters = dead_letters
        self.invocations = invocations

    def retry_policy_for(self, spec: FunctionSpec | None) -> RetryPolicy:
        """The worker's retry policy, with the function's ``com.openfaas.retry.*`` annotations."""
        config = self._ctx.config
        if spec is None:
            return config.retry
        try:
            return config.retry.for_function(spec.annotations)
        except RetryConfigError as e:
            self.log.warn(
                "function {name}: {error}; using the worker's retry settings", name=spec.service, error=e
            )
            return config.retry

    async def run(self, call: Call, delivery: Delivery) -> None:
        """Handle one work-queue message, up to (not including) its ack."""
        ctx = self._ctx
        if await ctx.early(call):
            return
        record = await self._runnable(call)
        if record is None or await self._too_late(call, record):
            return
        spec = await ctx.store.get_function(call.function, call.namespace)
        policy = self.retry_policy_for(spec)
        started = ctx.clock.seconds()
        running = await self._start(call, record, policy, started)
        if running is None:
            return
        response = await self._invoker.invoke(call, spec)
        finished = ctx.clock.seconds()
        duration = max(0.0, finished - started)
        self._log_invocation(call, spec, response, duration)
        ctx.metrics.duration.labels(call.ref).observe(duration)
        attempt = _Attempt(call, spec, policy, running, response, self._result(response), finished, duration)
        if spec is not None and policy.should_retry(response.status_code, call.attempt):
            await self._retry(attempt)
        else:
            await self._finish(attempt)

    async def _runnable(self, call: Call) -> CallRecord | None:
        """The record this message runs over; None when it is stale or the call finished."""
        record = await self._ctx.store.get_call(call.call_id)
        if record is None:
            self.log.warn("call {call_id}: no record in the store; creating one", call_id=call.call_id)
            record = CallRecord.for_call(call)
        if call.replay < record.replays:
            self._ctx.stale(CALL, call, f"replay {call.replay} is older than the record's {record.replays}")
            return None
        if call.replay > record.replays:
            # Re-queued from the dead letters, and the record was not reset: this message wins.
            record = CallRecord.for_call(call)
        if record.final:
            await self._redelivered_final(call, record)
            return None
        if record.attempts > call.attempt or (
            record.attempts == call.attempt and record.status == CallStatus.RETRYING
        ):
            self._ctx.stale(
                CALL, call, f"attempt {call.attempt} is over (record: {record.status} {record.attempts})"
            )
            return None
        return record

    async def _too_late(self, call: Call, record: CallRecord) -> bool:
        """Dead-letter a call too old to run, or interrupted too often; say whether it was."""
        config = self._ctx.config
        now = self._ctx.clock.seconds()
        if call.accepted_at and now - call.accepted_at > config.max_age:
            age = format_duration(round(now - call.accepted_at))
            why = f"{age} old when picked up (--max-age {format_duration(config.max_age)})"
            await self._dead_letter(
                call, record, DeadReason.MAX_AGE, f"attempt {call.attempt} not run: {why}"
            )
            return True
        if not _interrupted(call, record):
            return False
        interruptions = record.interruptions + 1
        if interruptions > config.delivery_limit:
            await self._dead_letter(
                call,
                record,
                DeadReason.DELIVERY_LIMIT,
                f"attempt {call.attempt} was cut short {interruptions} times (the worker running it "
                f"died or lost its broker connection; --delivery-limit {config.delivery_limit})",
            )
            return True
        self.log.info(
            "call {call_id}: attempt {n} was interrupted ({i} time(s)); running it again",
            call_id=call.call_id,
            n=call.attempt,
            i=interruptions,
        )
        return False

    async def _start(
        self, call: Call, record: CallRecord, policy: RetryPolicy, started: float
    ) -> CallRecord | None:
        """Record ``running``; None when a cancel, a finish or a newer attempt came first."""
        running = attrs.evolve(
            record,
            status=CallStatus.RUNNING,
            started_at=started,
            attempts=call.attempt,
            max_attempts=policy.max_attempts,
            finished_at=None,
            duration=None,
            status_code=None,
            error=None,
            next_attempt_at=None,
            interruptions=record.interruptions + (1 if _interrupted(call, record) else 0),
            replays=call.replay,
        )
        # Retried like every other write: a start whose reply was lost (it landed) would otherwise
        # give the message back, and its redelivery would count an interruption that never was.
        found = await self._ctx.records.start(running, call.attempt)
        if found is None:
            return running
        if found.final:
            await self._redelivered_final(call, found)
        else:
            self._ctx.stale(CALL, call, f"the record moved on ({found.status}, attempt {found.attempts})")
        return None

    def _log_invocation(
        self, call: Call, spec: FunctionSpec | None, response: FunctionResponse, duration: float
    ) -> None:
        if self.invocations is None or spec is None:
            return
        self.invocations.call(
            spec.service,
            spec.namespace,
            call.call_id,
            b"async",
            call.method,
            call.path,
            response.status_code,
            duration,
            call.attempt,
            response.error,
        )

    def _result(self, response: FunctionResponse) -> CallResult:
        """The answer as stored: its body cut at --max-result-size."""
        limit = self._ctx.config.max_result_size
        return CallResult(
            status_code=response.status_code,
            headers=to_str_pairs(response.headers),
            body=response.body[:limit],
            truncated=len(response.body) > limit,
        )

    async def _retry(self, attempt: _Attempt) -> None:
        """Keep this attempt's answer, publish the next attempt to a delay queue (confirmed), then
        record ``retrying`` (refused once the next attempt has started).

        The answer is written before the next attempt exists, so that attempt's answer, written
        by whichever worker runs it, always lands after this one and is the one kept."""
        ctx = self._ctx
        call, response = attempt.call, attempt.response
        retry_after = parse_retry_after(response.header(b"retry-after"), attempt.finished)
        wait = attempt.policy.wait(call.attempt, ctx.random, retry_after)
        due = attempt.finished + wait
        await ctx.records.keep_result(call.call_id, attempt.result)
        await ctx.queue.publish_delayed(
            attrs.evolve(call, attempt=call.attempt + 1, not_before=due, dead=None), wait
        )
        record = attrs.evolve(
            attempt.running,
            status=CallStatus.RETRYING,
            status_code=response.status_code,
            finished_at=attempt.finished,
            duration=attempt.duration,
            error=response.error or f"function answered {response.status_code}",
            next_attempt_at=due,
        )
        await ctx.records.retrying(record, call.attempt)
        ctx.metrics.retries.labels(call.ref).inc()
        self.log.info(
            "call {call_id}: {function} answered {code}; attempt {n} of {m} in {wait:.3f}s",
            call_id=call.call_id,
            function=call.ref,
            code=response.status_code,
            n=call.attempt + 1,
            m=attempt.policy.max_attempts,
            wait=wait,
        )

    async def _finish(self, attempt: _Attempt) -> None:
        """Record the final outcome with its answer; dead-letter exhausted retries; queue the callback."""
        ctx = self._ctx
        call, response, policy = attempt.call, attempt.response, attempt.policy
        code = response.status_code
        # Retries ran out (with --max-attempts 1 there are none: the outcome is just final).
        exhausted = attempt.spec is not None and policy.max_attempts > 1 and policy.retryable(code)
        error = response.error
        if exhausted:
            error = f"{policy.max_attempts} attempt(s), the last answered {code}" + (
                f": {response.error}" if response.error else ""
            )
        record = attrs.evolve(
            attempt.running,
            status=CallStatus.DEAD_LETTERED if exhausted else outcome_status(code),
            status_code=code,
            finished_at=attempt.finished,
            duration=attempt.duration,
            error=error,
            dead_reason=DeadReason.ATTEMPTS if exhausted else None,
        )
        found = await ctx.records.finish(record, attempt.result, call.attempt)
        if found is not None and not _same_outcome(found, record):
            ctx.stale(CALL, call, f"another run already recorded the outcome ({found.status})")
            return
        # (found == this run's record: a write whose reply was lost, e.g. to a paused Redis,
        # landed all the same; the outcome is ours and its callback still to be delivered.)
        ctx.metrics.calls.labels(call.ref, record.status).inc()
        self._log_outcome(call, record, code, attempt.duration, policy)
        if exhausted:
            await self._dead_letters.send(call, DeadReason.ATTEMPTS, record.error, attempt.finished)
        await self._callbacks.queue(call, record, response)

    def _log_outcome(
        self, call: Call, record: CallRecord, code: int, duration: float, policy: RetryPolicy
    ) -> None:
        # One line per call, made here: the event's format has a single field, as
        # twisted.logger's formatting is costly per field.  The fields stay in the event for
        # structured (JSON) observers.
        self.log.info(
            "{outcome}",
            outcome=f"call {call.call_id}: {call.ref} -> {record.status} ({code}) in {duration:.3f}s, "
            f"attempt {call.attempt} of {policy.max_attempts}",
            call_id=call.call_id,
            function=call.ref,
            status=record.status,
            code=code,
            duration=duration,
            n=call.attempt,
            m=policy.max_attempts,
        )

    async def _redelivered_final(self, call: Call, record: CallRecord) -> None:
        """A call that finished already: redo only what may be missing, never the call."""
        ctx = self._ctx
        ctx.metrics.skipped.inc()
        self.log.info(
            "call {call_id}: already {status}; not running it again",
            call_id=call.call_id,
            status=record.status,
        )
        if record.status == CallStatus.CANCELLED:
            return
        if record.status == CallStatus.DEAD_LETTERED and record.dead_reason != DeadReason.CALLBACK:
            # The worker may have died between recording it and publishing the dead letter.
            await self._dead_letters.send(
                call,
                record.dead_reason or DeadReason.ATTEMPTS,
                record.error,
                record.finished_at or ctx.clock.seconds(),
                attempts=record.attempts,
            )
        if (
            record.dead_reason in (DeadReason.MAX_AGE, DeadReason.DELIVERY_LIMIT)
            and record.status_code is None
        ):
            return  # no answer to call back with
        await self._callbacks.queue(call, record, None)

    async def _dead_letter(self, call: Call, record: CallRecord, reason: str, error: str) -> None:
        """Record ``dead_lettered`` and publish the call to the dead-letter queue (before the ack).

        A call an earlier attempt of which answered (it was waiting for a retry) still gets
        that answer as its callback; one that never answered gets none."""
        ctx = self._ctx
        now = ctx.clock.seconds()
        answered = record.status_code is not None
        pending = record.callback_state in (CallbackState.PENDING, None) and bool(record.callback_url)
        record = attrs.evolve(
            record,
            status=CallStatus.DEAD_LETTERED,
            dead_reason=reason,
            error=error,
            finished_at=now,
            next_attempt_at=None,
            callback_state=(CallbackState.PENDING if answered else CallbackState.FAILED)
            if pending
            else record.callback_state,
            callback_error=record.callback_error
            if answered or not pending
            else "no callback: the call was dead-lettered before it answered",
        )
        found = await ctx.records.dead_lettered(record)
        if found is not None and not _same_outcome(found, record):
            # Cancelled (or finished) meanwhile: nothing to dead-letter.  (Found equal to this
            # run's record: the write landed, only its reply was lost; the rest is still to do.)
            ctx.stale(CALL, call, f"the record moved on ({found.status})")
            return
        ctx.metrics.calls.labels(call.ref, record.status).inc()
        self.log.warn(
            "call {call_id}: dead-lettered ({reason}): {error}",
            call_id=call.call_id,
            reason=reason,
            error=error,
        )
        await self._dead_letters.send(call, reason, error, now)
        if answered:
            await self._callbacks.queue(call, record, None)


def _interrupted(call: Call, record: CallRecord) -> bool:
    """A record found ``running`` for this very attempt: the worker running it died mid-call."""
    return record.status == CallStatus.RUNNING and record.attempts == call.attempt


def _same_outcome(found: CallRecord, ours: CallRecord) -> bool:
    """Whether the final record found is the one this run wrote (its finish time is this run's)."""
    return (
        found.status == ours.status
        and found.finished_at == ours.finished_at
        and found.attempts == ours.attempts
        and found.status_code == ours.status_code
        and found.dead_reason == ours.dead_reason
    )
