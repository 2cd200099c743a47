"""The things txfaas stores and queues: functions, calls and call records.

Pure: JSON in, JSON out, validation with messages that name the field.
The OpenFaaS shapes (faas-provider's ``FunctionDeployment`` and
``FunctionStatus``) are kept on the wire so faas-cli works unchanged.
"""

from __future__ import annotations

import base64
import functools
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson

from txfaas.config import parse_duration, parse_http_url
from txfaas.retry import RetryConfigError, RetryPolicy

NAME_RULE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")  # \Z: "$" would accept a trailing newline
MAX_NAME = 63
MAX_REPLICAS = 2**31 - 1  # Kubernetes's replicas are an int32

URL_ANNOTATION = "txfaas.url"
TIMEOUT_ANNOTATION = "txfaas.timeout"
QUEUE_ANNOTATION = "com.openfaas.queue"
DEFAULT_QUEUE = "faas-request"
#: OpenFaaS's default function namespace.  Records and messages written before namespaces
#: existed carry none and belong to it; its functions keep the keys they had then.
DEFAULT_NAMESPACE = "openfaas-fn"


class ValidationError(ValueError):
    """Bad input.  ``str()`` is one short line naming the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


def check_name(name: str, field: str = "service") -> str:
    """A function name must be a DNS-1123 label of at most 63 characters."""
    if not isinstance(name, str) or not name:
        raise ValidationError(field, "a function name is required")
    if len(name) > MAX_NAME:
        raise ValidationError(field, f"function name longer than {MAX_NAME} characters")
    if not NAME_RULE.match(name):
        raise ValidationError(
            field,
            f"invalid function name {name!r}: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    return name


def check_namespace(namespace: str, field: str = "namespace") -> str:
    """A namespace name must be a DNS-1123 label of at most 63 characters, as in Kubernetes."""
    if not isinstance(namespace, str) or not namespace:
        raise ValidationError(field, "a namespace name is required")
    if len(namespace) > MAX_NAME or not NAME_RULE.match(namespace):
        raise ValidationError(
            field,
            f"invalid namespace {namespace!r}: use at most {MAX_NAME} lower-case letters, digits "
            "and '-', starting and ending with a letter or digit",
        )
    return namespace


def function_ref(name: str, namespace: str) -> str:
    """``name.namespace``: a function's full name (metrics labels, ``X-Function-Name``, logs)."""
    return f"{name}.{namespace}"


def split_ref(ref: str, default_namespace: str, field: str = "function name") -> tuple[str, str]:
    """``name`` or ``name.namespace`` (as in ``/function/{ref}``) -> (name, namespace), both checked."""
    name, dot, namespace = ref.partition(".")
    check_name(name, field)
    if not dot:
        return name, default_namespace
    return name, check_namespace(namespace, field)


def store_key(name: str, namespace: str) -> str:
    """Where a function is kept: the default namespace's under the bare name, as before
    namespaces existed (so their records are still found), any other's under ``name.namespace``."""
    return name if namespace == DEFAULT_NAMESPACE else f"{name}.{namespace}"


def ref_key(ref: str) -> str:
    """The :func:`store_key` of ``name.namespace`` (or of a bare name: the default namespace's)."""
    name, _, namespace = ref.partition(".")
    return store_key(name, namespace or DEFAULT_NAMESPACE)


def key_namespace(key: str) -> str:
    """The namespace :func:`store_key` put in ``key``."""
    return key.partition(".")[2] or DEFAULT_NAMESPACE


def _namespace_or(data: Mapping[str, Any], default: str) -> str:
    """A body's ``namespace``: absent or empty means ``default``."""
    value = data.get("namespace")
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ValidationError("namespace", "must be a string")
    return check_namespace(value)


@attrs.frozen
class Namespace:
    """A function namespace: faas-provider's ``FunctionNamespace``."""

    name: str
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, data: Any, name: str | None = None) -> Namespace:
        """Validate a ``{name, labels, annotations}`` body; ``name`` is the URL's, if it has one."""
        if not isinstance(data, dict):
            raise ValidationError("", "the body must be a JSON object")
        given = data.get("name")
        if given is None or given == "":
            if name is None:
                raise ValidationError("name", "missing")
            given = name
        if not isinstance(given, str):
            raise ValidationError("name", "must be a string")
        check_namespace(given, "name")
        if name is not None and given != name:
            raise ValidationError("name", f"{given!r} does not match the URL's {name!r}")
        return cls(given, _str_map(data, "labels"), _str_map(data, "annotations"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels), "annotations": dict(self.annotations)}


def check_queue_name(name: str, field: str = "annotations.com.openfaas.queue") -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}", name):
        raise ValidationError(field, f"invalid queue name {name!r}")
    return name


@attrs.frozen
class ReservedQueues:
    """Queue names a function may not take: RabbitMQ's own (``amq.*``: 403 on declare) and the
    worker's internal ones -- its dead-letter and callback queues, and everything under its
    retry prefix (``<prefix>.retry``, ``<prefix>.delay.<ms>``).  Gateway and worker read the
    same flags (--retry-prefix, --dead-letter-queue, --callback-queue)."""

    prefix: str = "txfaas"
    dead_letter_queue: str = "txfaas.dead-letter"
    callback_queue: str = "txfaas.callbacks"

    def refusal(self, name: str) -> str | None:
        """Why ``name`` may not be a function's queue, or None."""
        if name.lower().startswith("amq."):
            return f"queue {name!r}: names starting with 'amq.' are reserved by RabbitMQ"
        if name == self.dead_letter_queue:
            return f"queue {name!r} is the worker's dead-letter queue (--dead-letter-queue)"
        if name == self.callback_queue:
            return f"queue {name!r} is the worker's callback queue (--callback-queue)"
        if name.startswith(self.prefix + "."):
            return (
                f"queue {name!r}: names under {self.prefix + '.'!r} are the worker's retry exchange "
                "and delay queues (--retry-prefix)"
            )
        return None

    def check(self, name: str, field: str = f"annotations.{QUEUE_ANNOTATION}") -> str:
        reason = self.refusal(name)
        if reason is not None:
            raise ValidationError(field, reason)
        return name


def _str_map(data: Mapping[str, Any], key: str) -> dict[str, str]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationError(key, "must be an object of strings")
    return dict(value)


def _str_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(key, "must be a list of strings")
    return list(value)


def _str(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValidationError(key, "must be a string")
    return value


def _resources(data: Mapping[str, Any], key: str) -> dict[str, str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(key, 'must be an object like {"memory": "128Mi", "cpu": "100m"}')
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValidationError(f"{key}.{k}", "must be a string")
        out[k] = v
    return out


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class FunctionSpec:
    """A deployed function: OpenFaaS's FunctionDeployment plus ``url`` and bookkeeping."""

    service: str
    image: str = ""
    namespace: str = DEFAULT_NAMESPACE
    env_process: str = ""
    env_vars: dict[str, str] = attrs.field(factory=dict)
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)
    constraints: list[str] = attrs.field(factory=list)
    secrets: list[str] = attrs.field(factory=list)
    limits: dict[str, str] | None = None
    requests: dict[str, str] | None = None
    read_only_root_filesystem: bool = False
    url: str | None = None
    replicas: int = 1
    created_at: float = 0.0

    @classmethod
    def from_json(
        cls,
        data: Any,
        *,
        created_at: float | None = None,
        default_namespace: str = DEFAULT_NAMESPACE,
    ) -> FunctionSpec:
        """Validate a FunctionDeployment body; raise :class:`ValidationError` naming the field.

        No ``namespace`` (or an empty one) means ``default_namespace``."""
        if not isinstance(data, dict):
            raise ValidationError("", "the body must be a JSON object")
        if "service" not in data:
            raise ValidationError("service", "missing")
        service = check_name(_str(data, "service"))
        annotations = _str_map(data, "annotations")
        url = data.get("url")
        if url is None:
            url = annotations.get(URL_ANNOTATION)
            url_field = f"annotations.{URL_ANNOTATION}"
        else:
            url_field = "url"
        if url is not None:
            if not isinstance(url, str):
                raise ValidationError(url_field, "must be a string")
            try:
                url = parse_http_url(url)
            except ValueError as e:
                raise ValidationError(url_field, str(e)) from None
        rorf = data.get("readOnlyRootFilesystem", False)
        if not isinstance(rorf, bool):
            raise ValidationError("readOnlyRootFilesystem", "must be true or false")
        spec = cls(
            service=service,
            image=_str(data, "image"),
            namespace=_namespace_or(data, default_namespace),
            env_process=_str(data, "envProcess"),
            env_vars=_str_map(data, "envVars"),
            labels=_str_map(data, "labels"),
            annotations=annotations,
            constraints=_str_list(data, "constraints"),
            secrets=_str_list(data, "secrets"),
            limits=_resources(data, "limits"),
            requests=_resources(data, "requests"),
            read_only_root_filesystem=rorf,
            url=url,
            created_at=time.time() if created_at is None else created_at,
        )
        # Validate derived settings now, so a bad value is a 400 at deploy time.
        spec.timeout  # noqa: B018
        spec.queue  # noqa: B018
        spec.check_retry_annotations()
        return spec

    @functools.cached_property
    def ref(self) -> str:
        """``name.namespace`` (:func:`function_ref`)."""
        return function_ref(self.service, self.namespace)

    @property
    def key(self) -> str:
        """Where the store keeps it (:func:`store_key`)."""
        return store_key(self.service, self.namespace)

    # Both are read on every call (the proxy, the async accept): computed once per record.
    @functools.cached_property
    def timeout(self) -> float | None:
        """The function's own time limit: annotation ``txfaas.timeout``, else envVars ``exec_timeout``."""
        for field, raw in (
            (f"annotations.{TIMEOUT_ANNOTATION}", self.annotations.get(TIMEOUT_ANNOTATION)),
            ("envVars.exec_timeout", self.env_vars.get("exec_timeout")),
        ):
            if raw is not None:
                try:
                    value = parse_duration(raw)
                except ValueError as e:
                    raise ValidationError(field, str(e)) from None
                return value or None
        return None

    @functools.cached_property
    def queue(self) -> str:
        """The queue its async calls go to (OpenFaaS's ``com.openfaas.queue`` annotation)."""
        name = self.annotations.get(QUEUE_ANNOTATION)
        return DEFAULT_QUEUE if name is None else check_queue_name(name)

    def check_retry_annotations(self) -> None:
        """Refuse bad ``com.openfaas.retry.*`` annotations (400 at deploy time, not a surprise later)."""
        try:
            RetryPolicy().for_function(self.annotations)
        except RetryConfigError as e:
            raise ValidationError(f"annotations.{e.field}", e.problem) from None

    def base_url(self, template: str) -> str:
        """Where the function answers: its own ``url``, else the operator's template."""
        if self.url:
            return self.url
        return template.format(name=self.service, namespace=self.namespace).rstrip("/")

    def to_record(self) -> dict[str, Any]:
        """What the store keeps."""
        data = self.deployment_json()
        data["url"] = self.url
        data["replicas"] = self.replicas
        data["createdAt"] = self.created_at
        return data

    @classmethod
    def from_record(cls, data: Mapping[str, Any], key: str | None = None) -> FunctionSpec:
        """A stored record.  The key it was found under decides its namespace: a record of the
        releases before namespaces (kept under the bare name, whatever ``namespace`` it
        carried, often none) is the default namespace's."""
        data = dict(data)
        if key is not None:
            data["namespace"] = key_namespace(key)
        spec = cls.from_json(data, created_at=float(data.get("createdAt") or 0.0))
        return attrs.evolve(spec, replicas=int(data.get("replicas", 1)))

    def deployment_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "image": self.image,
            "namespace": self.namespace,
            "envProcess": self.env_process,
            "envVars": dict(self.env_vars),
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "constraints": list(self.constraints),
            "secrets": list(self.secrets),
            "limits": self.limits,
            "requests": self.requests,
            "readOnlyRootFilesystem": self.read_only_root_filesystem,
        }

    def status_json(self, invocation_count: int = 0) -> dict[str, Any]:
        """OpenFaaS's FunctionStatus shape (what ``faas-cli list/describe`` read)."""
        data = self.deployment_json()
        del data["service"]
        return {
            "name": self.service,
            **data,
            "url": self.url,
            "replicas": self.replicas,
            "availableReplicas": self.replicas,
            "invocationCount": invocation_count,
            "createdAt": rfc3339(self.created_at),
        }


def parse_scale_request(data: Any, name: str, default_namespace: str = DEFAULT_NAMESPACE) -> tuple[str, int]:
    """``{"serviceName": name, "namespace": ns, "replicas": n}`` -> (namespace, n)."""
    if not isinstance(data, dict):
        raise ValidationError("", "the body must be a JSON object")
    service = data.get("serviceName", name)
    if service != name:
        raise ValidationError("serviceName", f"{service!r} does not match the URL's {name!r}")
    namespace = _namespace_or(data, default_namespace)
    replicas = data.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
        raise ValidationError("replicas", f"must be a whole number from 0 to {MAX_REPLICAS}")
    return namespace, replicas


# --- asynchronous calls ------------------------------------------------------------------------

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
