"""``/system/calls/{id}`` (status, cancel, result, retry) and ``/system/dead-letters``."""

from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from txfaas import headers as hdr
from txfaas.gateway.answers import json
from txfaas.gateway.errors import HTTPError
from txfaas.gateway.namespaces import Namespaces
from txfaas.gateway.settings import AppSettings
from txfaas.gateway.web import check_call_id, int_arg, query_arg
from txfaas.model import (
    Call,
    CallbackState,
    CallRecord,
    CallStatus,
    DeadLetter,
    DeadReason,
    outcome_status,
    split_ref,
    store_key,
)
from txfaas.queue import CallQueue
from txfaas.store import AsyncCallStore, NotFound, StoreUnavailable

DEAD_LETTER_PAGE = 100
DEAD_LETTER_PAGE_MAX = 1000
DEAD_LETTER_OFFSET_MAX = 2**31 - 1  # Redis's LRANGE takes 64-bit indexes: far below them

log = Logger()


def no_call(call_id: str) -> HTTPError:
    return HTTPError(404, f"no call {call_id!r} (unknown, or older than the status TTL)")


def no_dead_letter(call_id: str) -> HTTPError:
    return HTTPError(404, f"no dead letter for call {call_id!r}")


async def settle(calls: AsyncCallStore, claim: CallRecord, record: CallRecord | None) -> CallRecord | None:
    """Replace our claim with ``record`` (None: release it); the record found instead when
    the claim moved on (a worker started the call).  A store that is down leaves the
    claim to lapse (a worker that gets the message moves it on)."""
    try:
        return await calls.settle_claim(claim, record)
    except StoreUnavailable as e:
        log.warn(
            "[{call_id}] could not {what} its claim: {error}",
            call_id=claim.call_id,
            what="release" if record is None else "confirm",
            error=e,
        )
        return None


def not_final(request: IRequest, record: CallRecord, clock: Any) -> bytes:
    """409 for a call with no final result yet (a retrying call's last answer is not its result).

    Not 404 (the call exists and will have a result), not 202 (a client that only checks for
    success would take the body for the result): the state conflicts with the request, and the
    body says which state; ``Retry-After`` says when the next attempt is due.
    """
    if record.next_attempt_at is not None and record.status == CallStatus.RETRYING:
        now = clock.seconds() if clock is not None else time.time()
        wait = max(0, int(record.next_attempt_at - now + 0.999))
        request.setHeader(b"Retry-After", str(wait).encode())
    body: dict[str, Any] = {
        "callId": record.call_id,
        "status": record.status,
        "attempts": record.attempts,
        "error": f"call {record.call_id!r} has no final result yet: it is {record.status}",
    }
    if record.status == CallStatus.RETRYING:
        body["nextAttemptAt"] = record.next_attempt_at
        body["lastStatusCode"] = record.status_code
    return json(request, 409, body)


def replayed(
    letter: DeadLetter, record: CallRecord | None, replay: int, now: float
) -> tuple[Call, CallRecord]:
    """The call to queue again for a dead letter, and its fresh record.

    A call dead-lettered for its callback is queued to deliver the kept answer again,
    without running the function."""
    dead = letter.call
    if dead.callback_job is None:
        call = attrs.evolve(dead, dead=None, not_before=0.0, attempt=1, replay=replay, accepted_at=now)
        return call, CallRecord.for_call(call)
    job = attrs.evolve(dead.callback_job, attempt=1, first_at=now)
    call = attrs.evolve(dead, dead=None, not_before=0.0, replay=replay, callback_job=job)
    fresh = attrs.evolve(
        record or CallRecord.for_call(call),
        status=outcome_status(job.status_code),
        status_code=job.status_code,
        dead_reason=None,
        error=None,
        callback_url=call.callback_url,
        callback_state=CallbackState.RETRYING,
        callback_attempts=0,
        callback_next_attempt_at=now,
        callback_error=None,
        replays=replay,
    )
    return call, fresh


class CallsAPI:
    """The records of asynchronous calls, their results, and the dead letters."""

    def __init__(
        self,
        calls: AsyncCallStore,
        queue: CallQueue | None,
        namespaces: Namespaces,
        settings: AppSettings,
        clock: Any,
    ) -> None:
        self._calls = calls
        self._queue = queue
        self._namespaces = namespaces
        self._settings = settings
        self._clock = clock

    async def status(self, request: IRequest, call_id: str) -> bytes:
        record = await self._calls.get_call(check_call_id(call_id))
        if record is None:
            raise no_call(call_id)
        return json(request, 200, record.to_json())

    async def cancel(self, request: IRequest, call_id: str) -> bytes:
        """Cancel a call that is queued or waiting for a retry: it never runs (or runs no more)."""
        check_call_id(call_id)
        record = await self._calls.get_call(call_id)
        if record is None:
            raise no_call(call_id)
        refusal = f"call {call_id!r} is {{status}}: only a queued or retrying call can be cancelled"
        if record.status not in CallStatus.CANCELLABLE:
            raise HTTPError(409, refusal.format(status=record.status))
        cancelled = attrs.evolve(
            record,
            status=CallStatus.CANCELLED,
            finished_at=time.time(),
            next_attempt_at=None,
            callback_state=None,
            error="cancelled (DELETE /system/calls/{id})",
        )
        try:
            found = await self._calls.transition_call(cancelled, CallStatus.CANCELLABLE)
        except NotFound:
            raise no_call(call_id) from None
        if found is not None:  # started (or finished) since we read it
            raise HTTPError(409, refusal.format(status=found.status))
        log.info("[{call_id}] cancelled (was {status})", call_id=call_id, status=record.status)
        return json(request, 202, {"callId": call_id, "status": CallStatus.CANCELLED})

    async def result(self, request: IRequest, call_id: str) -> bytes:
        """The function's answer, as it gave it, once the call is final (409 before)."""
        check_call_id(call_id)
        record = await self._calls.get_call(call_id)
        if record is None:
            raise no_call(call_id)
        if record.status not in CallStatus.FINAL:
            return not_final(request, record, self._clock)
        result = await self._calls.get_result(call_id)
        if result is None:
            raise HTTPError(404, f"call {call_id!r} has no result (status: {record.status})")
        request.setResponseCode(200)
        for name, value in hdr.end_to_end(hdr.to_bytes_pairs(result.headers), frozenset({b"content-length"})):
            request.responseHeaders.addRawHeader(name, value)
        request.setHeader(hdr.FUNCTION_STATUS, str(result.status_code).encode())
        request.setHeader(hdr.CALL_ID, call_id.encode())
        if result.truncated:
            request.setHeader(b"X-Result-Truncated", b"true")
        return result.body

    async def retry(self, request: IRequest, call_id: str) -> bytes:
        """Re-queue a dead-lettered call: the same call id and body, attempts from 1 again.

        The record is claimed first (with the higher replay number: a late duplicate of the
        dead letter is then ignored), so a worker never sees the message before it, and two
        retries at once cannot both publish; then the message, confirmed; the dead letter
        goes last, so a failure anywhere leaves it to retry again."""
        check_call_id(call_id)
        if self._queue is None:
            raise HTTPError(404, "asynchronous calls are not enabled on this gateway")
        letter = await self._calls.get_dead_letter(call_id)
        if letter is None:
            raise no_dead_letter(call_id)
        if not letter.function or letter.mark.reason == DeadReason.UNDECODABLE:
            raise HTTPError(409, f"dead letter {call_id!r} is not a txfaas call: it cannot be re-queued")
        record = await self._calls.get_call(call_id)
        replay = max(letter.call.replay, record.replays if record is not None else 0) + 1
        call, fresh = replayed(letter, record, replay, time.time())
        await self._requeue(call_id, call, fresh, record, replay)
        try:
            await self._calls.remove_dead_letter(call_id)
        except StoreUnavailable as e:
            log.warn(
                "[{call_id}] re-queued, but the dead letter could not be removed ({error}): it is still listed",
                call_id=call_id,
                error=e,
            )
        log.info(
            "[{call_id}] re-queued from the dead letters ({reason}), replay {replay}",
            call_id=call_id,
            reason=letter.mark.reason,
            replay=replay,
        )
        location = f"/system/calls/{call_id}"
        request.setHeader(hdr.CALL_ID, call_id.encode())
        request.setHeader(b"Location", location.encode())
        body = {"callId": call_id, "status": fresh.status, "phase": letter.phase, "replay": replay}
        return json(request, 202, {**body, "location": location})

    async def _requeue(
        self, call_id: str, call: Call, fresh: CallRecord, record: CallRecord | None, replay: int
    ) -> None:
        """Claim the record for this replay, publish, then settle the claim."""
        assert self._queue is not None
        claim, found = await self._calls.claim_call(
            fresh,
            self._settings.claim_window,
            replace={CallStatus.DEAD_LETTERED},
            replays_below=replay,
        )
        if claim is None:
            assert found is not None
            if found.status == CallStatus.ACCEPTING:
                raise HTTPError(409, f"call {call_id!r} is being re-queued by another request")
            raise HTTPError(
                409,
                f"call {call_id!r} is {found.status} (replay {found.replays}): it was re-queued already "
                f"(DELETE /system/dead-letters/{call_id} discards the stale dead letter)",
            )
        try:
            await self._queue.publish(call)
        except Exception:
            await settle(self._calls, claim, record)
            raise
        await settle(self._calls, claim, fresh)

    async def dead_letters(self, request: IRequest) -> bytes:
        """The dead letters, oldest first: ``?function=`` (``name`` or ``name.namespace``, or
        ``name`` and ``?namespace=``) filters, ``?limit=`` and ``?offset=`` page."""
        function = query_arg(request, b"function")
        if function is not None:
            name, namespace = split_ref(function, self._namespaces.of(request), "function")
            function = store_key(name, namespace)
        limit = int_arg(request, b"limit", DEAD_LETTER_PAGE, 1, DEAD_LETTER_PAGE_MAX)
        offset = int_arg(request, b"offset", 0, 0, DEAD_LETTER_OFFSET_MAX)
        letters = await self._calls.list_dead_letters(function, offset, limit)
        total = await self._calls.count_dead_letters(function)
        request.setHeader(b"X-Total-Count", str(total).encode())
        return json(request, 200, [letter.summary_json() for letter in letters])

    async def dead_letter(self, request: IRequest, call_id: str) -> bytes:
        letter = await self._calls.get_dead_letter(check_call_id(call_id))
        if letter is None:
            raise no_dead_letter(call_id)
        return json(request, 200, letter.summary_json())

    async def discard_dead_letter(self, request: IRequest, call_id: str) -> bytes:
        """Discard a dead letter: it is no longer listed nor can be re-queued (its record stays)."""
        if not await self._calls.remove_dead_letter(check_call_id(call_id)):
            raise no_dead_letter(call_id)
        log.info("[{call_id}] dead letter discarded", call_id=call_id)
        request.setResponseCode(204)
        return b""
