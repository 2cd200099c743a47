"""Calls: the queued message, its record and result in the store, and dead letters."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from txfaas.model.base import DEFAULT_NAMESPACE, DEFAULT_QUEUE, ValidationError, function_ref, store_key
from txfaas.model.functions import rfc3339

Headers = list[tuple[str, str]]


@attrs.frozen
class DeadMark:
    """Why and when a message was dead-lettered (travels with it to the dead-letter queue)."""

    reason: str
    at: float
    error: str | None = None
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "at": self.at, "error": self.error, "attempts": self.attempts}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeadMark:
        error = data.get("error")
        return cls(
            reason=str(data["reason"]),
            at=float(data.get("at", 0.0)),
            error=None if error is None else str(error),
            attempts=int(data.get("attempts", 0)),
        )


@attrs.frozen
class CallbackJob:
    """A callback still to deliver: the function's answer, kept so delivery never needs the function.

    A :class:`Call` carrying one is on the callback queue, and its ``body`` is the
    function's response body (the request body is no longer needed)."""

    status_code: int
    headers: Headers = attrs.field(factory=list)
    duration: float = 0.0
    #: The callback attempt this message is for (1 = the first delivery).
    attempt: int = 1
    #: When the first delivery was tried (``--callback-max-age`` counts from it).
    first_at: float = 0.0
    #: ``X-Retry`` and ``X-Retry-Max`` of the function's call.
    retries: int = 0
    max_retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "statusCode": self.status_code,
            "headers": [list(h) for h in self.headers],
            "duration": self.duration,
            "attempt": self.attempt,
            "firstAt": self.first_at,
            "retries": self.retries,
            "maxRetries": self.max_retries,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallbackJob:
        return cls(
            status_code=int(data["statusCode"]),
            headers=[(str(k), str(v)) for k, v in data.get("headers", [])],
            duration=float(data.get("duration", 0.0)),
            attempt=int(data.get("attempt", 1)),
            first_at=float(data.get("firstAt", 0.0)),
            retries=int(data.get("retries", 0)),
            max_retries=int(data.get("maxRetries", 0)),
        )


@attrs.frozen
class Call:
    """One queued invocation: everything the worker needs to run it, body kept raw."""

    call_id: str
    function: str
    method: str = "POST"
    path: str = "/"
    query: str = ""
    headers: Headers = attrs.field(factory=list)
    body: bytes = b""
    callback_url: str | None = None
    accepted_at: float = 0.0
    queue: str = DEFAULT_QUEUE
    #: The attempt this message is for (1 = the first; a retry is a new message with the next number).
    attempt: int = 1
    #: Not to run before this time (a retry waiting in a delay queue); 0 = at once.
    not_before: float = 0.0
    #: How many times the call was re-queued from the dead letters (``POST /system/calls/{id}/retry``).
    replay: int = 0
    #: Set on messages in the dead-letter queue.
    dead: DeadMark | None = None
    #: Set on messages in the callback queue.
    callback_job: CallbackJob | None = None
    namespace: str = DEFAULT_NAMESPACE

    @property
    def ref(self) -> str:
        """``name.namespace`` (:func:`function_ref`)."""
        return function_ref(self.function, self.namespace)

    def meta(self) -> dict[str, Any]:
        """Everything but the body, as JSON-able data (the body travels as the raw payload)."""
        meta: dict[str, Any] = {
            "v": 1,
            "callId": self.call_id,
            "function": self.function,
            "namespace": self.namespace,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "callbackUrl": self.callback_url,
            "acceptedAt": self.accepted_at,
            "queue": self.queue,
            "attempt": self.attempt,
        }
        # Only when set, so a plain first attempt looks as it always did.
        if self.not_before:
            meta["notBefore"] = self.not_before
        if self.replay:
            meta["replay"] = self.replay
        if self.dead is not None:
            meta["dead"] = self.dead.to_json()
        if self.callback_job is not None:
            meta["callbackJob"] = self.callback_job.to_json()
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], body: bytes) -> Call:
        try:
            dead = meta.get("dead")
            job = meta.get("callbackJob")
            return cls(
                call_id=str(meta["callId"]),
                function=str(meta["function"]),
                method=str(meta.get("method", "POST")),
                path=str(meta.get("path", "/")),
                query=str(meta.get("query", "")),
                headers=[(str(k), str(v)) for k, v in meta.get("headers", [])],
                body=body,
                callback_url=meta.get("callbackUrl"),
                accepted_at=float(meta.get("acceptedAt", 0.0)),
                queue=str(meta.get("queue", DEFAULT_QUEUE)),
                attempt=int(meta.get("attempt", 1)),
                not_before=float(meta.get("notBefore", 0.0)),
                replay=int(meta.get("replay", 0)),
                dead=None if dead is None else DeadMark.from_json(dead),
                callback_job=None if job is None else CallbackJob.from_json(job),
                # A message queued before namespaces existed has none: the default namespace's.
                namespace=str(meta.get("namespace") or DEFAULT_NAMESPACE),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValidationError("message", f"not a txfaas call: {e}") from None

    def encode_meta(self) -> bytes:
        return orjson.dumps(self.meta())

    @classmethod
    def decode(cls, meta: bytes | str, body: bytes) -> Call:
        try:
            data = orjson.loads(meta)
        except ValueError as e:
            raise ValidationError("message", f"bad call metadata: {e}") from None
        if not isinstance(data, dict):
            raise ValidationError("message", "call metadata is not an object")
        return cls.from_meta(data, body)


class CallStatus:
    #: Claimed by a gateway that is publishing it (until ``acceptingUntil``): not confirmed yet.
    ACCEPTING = "accepting"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"

    FINAL = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, DEAD_LETTERED})
    #: What ``DELETE /system/calls/{id}`` may cancel: nothing runs now, and nothing will.
    CANCELLABLE = frozenset({QUEUED, RETRYING})


class CallbackState:
    PENDING = "pending"  # not tried yet (or the worker died while trying)
    RETRYING = "retrying"  # failed; the next attempt waits in the callback queue
    DELIVERED = "delivered"
    FAILED = "failed"  # given up: 410, a status that is not retried, or attempts/age exhausted


class DeadReason:
    """Why a call ended in the dead letters (``deadLetterReason`` on the record)."""

    ATTEMPTS = "attempts_exhausted"  # the function kept answering a retry code
    MAX_AGE = "max_age"  # older than --max-age when a worker picked it up
    CALLBACK = "callback_failed"  # the function answered; the callback never got through
    DELIVERY_LIMIT = "delivery_limit"  # delivered too often: it keeps killing workers
    REJECTED = "rejected"  # rejected without requeue (broker-side dead-lettering)
    UNDECODABLE = "undecodable"  # not a txfaas message


def outcome_status(status_code: int) -> str:
    """The record status for a function's HTTP status (504 is our exec_timeout status)."""
    if status_code == 504:
        return CallStatus.TIMED_OUT
    if 200 <= status_code < 400:
        return CallStatus.SUCCEEDED
    return CallStatus.FAILED


@attrs.frozen
class CallRecord:
    """The status of one async call, as ``GET /system/calls/{id}`` shows it."""

    call_id: str
    function: str
    status: str = CallStatus.QUEUED
    status_code: int | None = None
    attempts: int = 0
    max_attempts: int | None = None
    accepted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    next_attempt_at: float | None = None
    callback_url: str | None = None
    callback_state: str | None = None  # None (no callback), pending, delivered, failed
    callback_attempts: int = 0
    callback_status: int | None = None
    error: str | None = None
    queue: str = DEFAULT_QUEUE
    callback_next_attempt_at: float | None = None
    callback_error: str | None = None
    #: One of :class:`DeadReason` once the call is in the dead letters.
    dead_reason: str | None = None
    #: Times a worker died (or lost its broker connection) while running this attempt.
    interruptions: int = 0
    #: Times the call was re-queued from the dead letters.
    replays: int = 0
    #: While ``accepting``: when the gateway's claim lapses (on the store's clock).
    accepting_until: float | None = None
    namespace: str = DEFAULT_NAMESPACE

    @property
    def final(self) -> bool:
        return self.status in CallStatus.FINAL

    def to_json(self) -> dict[str, Any]:
        return {
            "callId": self.call_id,
            "function": self.function,
            "namespace": self.namespace,
            "status": self.status,
            "statusCode": self.status_code,
            "attempts": self.attempts,
            "maxAttempts": self.max_attempts,
            "acceptedAt": self.accepted_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "durationSeconds": self.duration,
            "nextAttemptAt": self.next_attempt_at,
            "callbackUrl": self.callback_url,
            "callbackState": self.callback_state,
            "callbackAttempts": self.callback_attempts,
            "callbackStatus": self.callback_status,
            "error": self.error,
            "queue": self.queue,
            "callbackNextAttemptAt": self.callback_next_attempt_at,
            "callbackError": self.callback_error,
            "deadLetterReason": self.dead_reason,
            "interruptions": self.interruptions,
            "replays": self.replays,
            "acceptingUntil": self.accepting_until if self.status == CallStatus.ACCEPTING else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallRecord:
        return cls(
            call_id=data["callId"],
            function=data["function"],
            status=data.get("status", CallStatus.QUEUED),
            status_code=data.get("statusCode"),
            attempts=data.get("attempts", 0),
            max_attempts=data.get("maxAttempts"),
            accepted_at=data.get("acceptedAt", 0.0),
            started_at=data.get("startedAt"),
            finished_at=data.get("finishedAt"),
            duration=data.get("durationSeconds"),
            next_attempt_at=data.get("nextAttemptAt"),
            callback_url=data.get("callbackUrl"),
            callback_state=data.get("callbackState"),
            callback_attempts=data.get("callbackAttempts", 0),
            callback_status=data.get("callbackStatus"),
            error=data.get("error"),
            queue=data.get("queue", DEFAULT_QUEUE),
            callback_next_attempt_at=data.get("callbackNextAttemptAt"),
            callback_error=data.get("callbackError"),
            dead_reason=data.get("deadLetterReason"),
            interruptions=data.get("interruptions", 0),
            replays=data.get("replays", 0),
            accepting_until=data.get("acceptingUntil"),
            # A record written before namespaces existed has none: the default namespace's.
            namespace=data.get("namespace") or DEFAULT_NAMESPACE,
        )

    @classmethod
    def for_call(cls, call: Call) -> CallRecord:
        return cls(
            call_id=call.call_id,
            function=call.function,
            accepted_at=call.accepted_at,
            callback_url=call.callback_url,
            callback_state="pending" if call.callback_url else None,
            queue=call.queue,
            replays=call.replay,
            namespace=call.namespace,
        )


@attrs.frozen
class CallResult:
    """A function's response, kept so callers may poll instead of receiving callbacks."""

    status_code: int
    headers: Headers = attrs.field(factory=list)
    body: bytes = b""
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "statusCode": self.status_code,
            "headers": [list(h) for h in self.headers],
            "body": base64.b64encode(self.body).decode("ascii"),
            "truncated": self.truncated,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallResult:
        return cls(
            status_code=int(data["statusCode"]),
            headers=[(str(k), str(v)) for k, v in data.get("headers", [])],
            body=base64.b64decode(data.get("body", "")),
            truncated=bool(data.get("truncated", False)),
        )


@attrs.frozen
class DeadLetter:
    """A dead-lettered message as the dead-letter store keeps it: the whole call, body included."""

    call: Call

    def __attrs_post_init__(self) -> None:
        if self.call.dead is None:
            raise ValueError("a dead letter needs the call's dead mark")

    @property
    def mark(self) -> DeadMark:
        assert self.call.dead is not None
        return self.call.dead

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def function(self) -> str:
        return self.call.function

    @property
    def namespace(self) -> str:
        return self.call.namespace

    @property
    def key(self) -> str:
        """The function's :func:`store_key` (the dead letters are indexed by it)."""
        return store_key(self.call.function, self.call.namespace)

    @property
    def phase(self) -> str:
        """``call`` (re-queued to run again) or ``callback`` (re-queued to deliver the kept answer)."""
        return "callback" if self.call.callback_job is not None else "call"

    def summary_json(self) -> dict[str, Any]:
        """What ``GET /system/dead-letters`` lists."""
        mark = self.mark
        return {
            "callId": self.call.call_id,
            "function": self.call.function,
            "namespace": self.call.namespace,
            "queue": self.call.queue,
            "phase": self.phase,
            "reason": mark.reason,
            "error": mark.error,
            "deadAt": mark.at,
            "deadAtTime": rfc3339(mark.at),
            "attempts": mark.attempts,
            "replay": self.call.replay,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary_json(),
            "message": self.call.meta(),
            "body": base64.b64encode(self.call.body).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeadLetter:
        body = base64.b64decode(data.get("body", ""))
        return cls(Call.from_meta(data["message"], body))
