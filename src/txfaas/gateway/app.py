"""The gateway's Klein app (``/system/*``, ``/healthz``, ``/metrics``) and ``/async-function/*``.

State comes in through ``__init__`` (store, queue, clock, resolver, metrics); routes
are methods; exceptions become status codes in one place (:class:`HTTPError` and
the ``handle_errors`` handlers).  The two hot routes are plain twisted.web resources
mounted beside the Klein app by :class:`GatewayRoot`: ``/async-function/`` is
:class:`AsyncCalls` (here, over :meth:`GatewayApp._accept`), ``/function/`` is
:mod:`txfaas.gateway.proxy`.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from importlib import resources as package_files
from typing import Any

import attrs
import orjson
import werkzeug.exceptions
from cryptography.fernet import Fernet
from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from txfaas import __version__
from txfaas import headers as hdr
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.gateway.proxy import PROXIED_METHODS, REFUSED_METHODS
from txfaas.logs import LogEntry, LogQuery
from txfaas.model import (
    DEFAULT_NAMESPACE,
    DEFAULT_QUEUE,
    QUEUE_ANNOTATION,
    Call,
    CallbackState,
    CallRecord,
    CallStatus,
    DeadReason,
    FunctionSpec,
    Namespace,
    ReservedQueues,
    ValidationError,
    check_name,
    check_namespace,
    function_ref,
    outcome_status,
    parse_scale_request,
    split_ref,
    store_key,
)
from txfaas.queue import CallQueue, QueueRefused, QueueUnavailable
from txfaas.secrets import SecretBox, SecretRequest
from txfaas.ssrf import AddressPolicy, CallbackRefused, check_callback_url
from txfaas.store import (
    AlreadyExists,
    AsyncCallStore,
    NamespaceNotEmpty,
    NotFound,
    StoreUnavailable,
    UnknownNamespace,
)
from txfaas.store.cache import FunctionCache
from txfaas.web.server import LimitedSite, Route

SYSTEM_BODY_LIMIT = 1024 * 1024
#: This gateway's OpenAPI document (packaged beside this module), served as it is.
OPENAPI_DOCUMENT = package_files.files(__package__).joinpath("openapi.json").read_bytes()
#: Log lines read from the store at a time.
LOG_PAGE = 1000
DEAD_LETTER_PAGE = 100
DEAD_LETTER_PAGE_MAX = 1000
DEAD_LETTER_OFFSET_MAX = 2**31 - 1  # Redis's LRANGE takes 64-bit indexes: far below them
# Set by the gateway itself, or of no use to the function.
_ASYNC_DROP = hdr.canonical_names(
    hdr.HOP_BY_HOP | frozenset({b"host", b"content-length", b"x-callback-url", b"x-call-id"})
)


class HTTPError(Exception):
    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


@attrs.frozen
class AppSettings:
    provider: str = "txfaas"
    orchestration: str = "process"
    async_enabled: bool = True
    callback_policy: AddressPolicy = attrs.field(factory=AddressPolicy)
    retry_after: int = 5
    resolve_timeout: float = 5.0
    #: How long a gateway's claim on a call id holds before another may take it over: longer
    #: than a publish can take (the broker's confirm timeout), with a margin.
    claim_window: float = 10.0
    reserved_queues: ReservedQueues = attrs.field(factory=ReservedQueues)
    #: The namespace of requests that name none (``--default-namespace``).
    default_namespace: str = DEFAULT_NAMESPACE
    #: Where the async calls of a function without a ``com.openfaas.queue`` annotation go.
    default_queue: str = DEFAULT_QUEUE
    #: Most ``/system/logs?follow=true`` streams open at once (503 past it).
    log_followers: int = 64
    #: How often a follower looks for new lines.
    log_poll: float = 0.5


class GatewayApp:
    """The Klein half of the gateway."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        functions: FunctionCache,
        calls: AsyncCallStore,
        queue: CallQueue | None,
        resolver: Any,
        metrics: GatewayMetrics,
        settings: AppSettings = AppSettings(),
        clock: Any = None,
        secret_box: SecretBox | None = None,
    ) -> None:
        self._clock = clock
        # Without a key of its own (tests, an embedded app) a key that lives as long as the process.
        self._secret_box = secret_box if secret_box is not None else SecretBox(Fernet.generate_key())
        self.followers = 0
        self._functions = functions
        self._store = functions.store
        self._calls = calls
        self._queue = queue
        self._resolver = resolver
        self._metrics = metrics
        self._settings = settings
        #: Queue name -> why it cannot be used (the broker refused it, or it is reserved): a
        #: function's record from before the rule.  Its async calls are 503; nothing else is.
        self.refused_queues: dict[str, str] = {}
        # Namespaces that always exist and cannot be deleted.
        self._builtin = frozenset({DEFAULT_NAMESPACE, settings.default_namespace})

    def resource(self) -> resource.IResource:
        return self.app.resource()

    # --- errors, in one place ---------------------------------------------------------------

    @app.handle_errors(HTTPError)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        error: HTTPError = failure.value
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return _text(request, error.code, error.message)

    @app.handle_errors(ValidationError)
    def _validation_error(self, request: IRequest, failure: Failure) -> bytes:
        return _text(request, 400, str(failure.value))

    @app.handle_errors(StoreUnavailable)
    def _store_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        self.log.warn("store unavailable: {error}", error=failure.value)
        request.setHeader(b"Retry-After", str(self._settings.retry_after).encode())
        return _text(request, 503, f"function registry unavailable: {failure.value}")

    @app.handle_errors(QueueUnavailable)
    def _queue_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        self.log.warn("queue unavailable: {error}", error=failure.value)
        request.setHeader(b"Retry-After", str(self._settings.retry_after).encode())
        return _text(request, 503, f"queue unavailable, call not accepted: {failure.value}")

    @app.handle_errors(defer.CancelledError)
    def _cancelled(self, request: IRequest, failure: Failure) -> bytes:
        return b""  # the client went away

    @app.handle_errors(werkzeug.exceptions.NotFound)
    def _no_route(self, request: IRequest, failure: Failure) -> bytes:
        return _text(request, 404, f"no route {_method(request)} {_path(request)}")

    @app.handle_errors(werkzeug.exceptions.MethodNotAllowed)
    def _wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = ", ".join(sorted(failure.value.valid_methods or ()))
        request.setHeader(b"Allow", allowed.encode())
        return _text(
            request, 405, f"method {_method(request)} not allowed on {_path(request)}: use {allowed}"
        )

    @app.handle_errors(werkzeug.exceptions.HTTPException)
    def _routing(self, request: IRequest, failure: Failure) -> bytes:
        """Werkzeug's other answers (a redirect to the slash-ended path, ...), without its HTML."""
        error = failure.value
        for name, value in error.get_response({}).headers.items():
            if name.lower() not in ("content-type", "content-length"):
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return _text(request, error.code or 500, f"{error.name}: {_path(request)}")

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("{method} {uri} failed", failure, method=_method(request), uri=request.uri)
        return _text(request, 500, "internal error")

    # --- OpenFaaS routes txfaas does not implement ------------------------------------------

    @app.route("/system/alert")
    def alert(self, request: IRequest) -> bytes:
        return _text(request, 501, "not implemented: alert-driven autoscaling (AlertManager's /system/alert)")

    @app.route("/")
    @app.route("/ui/", branch=True)
    def ui(self, request: IRequest) -> bytes:
        return _text(
            request,
            501,
            "not implemented: the OpenFaaS web UI (/ui/); use faas-cli or the /system API",
        )

    # --- health and metrics -----------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self, request: IRequest) -> bytes:
        problems = []
        try:
            await self._store.ping()
        except StoreUnavailable as e:
            problems.append(f"redis: {e}")
        if self._queue is not None:
            try:
                await self._queue.ping()
            except QueueUnavailable as e:
                problems.append(f"rabbitmq: {e}")
        if problems:
            return _text(request, 503, "unhealthy: " + "; ".join(problems))
        return _text(request, 200, "OK")

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self._metrics.render()

    # --- functions --------------------------------------------------------------------------

    def _namespace_arg(self, request: IRequest) -> str:
        """``?namespace=``, else the default namespace."""
        given = _query_arg(request, b"namespace")
        return self._settings.default_namespace if not given else check_namespace(given)

    async def _namespace_exists(self, name: str) -> bool:
        return name in self._builtin or await self._store.get_namespace(name) is not None

    async def _known_namespace(self, name: str) -> str:
        """``name`` if it exists; a 400 naming it otherwise."""
        if not await self._namespace_exists(name):
            raise HTTPError(400, _no_namespace(name))
        return name

    @app.route("/system/functions", methods=["GET"])
    async def list_functions(self, request: IRequest) -> bytes:
        """The functions of ``?namespace=`` (the default namespace without it), as OpenFaaS lists them."""
        namespace = await self._known_namespace(self._namespace_arg(request))
        specs = await self._store.list_functions(namespace)
        counts = await self._store.invocation_counts([s.ref for s in specs])
        for spec in specs:
            self._metrics.service_count.labels(spec.ref).set(spec.replicas)
        return _json(request, 200, [s.status_json(counts.get(s.ref, 0)) for s in specs])

    def _spec(self, request: IRequest) -> FunctionSpec:
        spec = FunctionSpec.from_json(_read_json(request), default_namespace=self._settings.default_namespace)
        if spec.env_process and spec.url is None:
            # faas-cli deploy --fprocess: nothing here runs processes yet, so the call would 502.
            raise HTTPError(
                400,
                f"envProcess {spec.env_process!r}: txfaas does not run function processes yet, so "
                f"{spec.service!r} would have no endpoint; give its address as annotation txfaas.url",
            )
        return spec

    @app.route("/system/functions", methods=["POST"])
    async def deploy(self, request: IRequest) -> bytes:
        spec = self._spec(request)
        await self._known_namespace(spec.namespace)
        await self._check_secrets(spec)
        await self._declare_queue(spec)
        try:
            await self._store.create_function(spec, check_namespace=spec.namespace not in self._builtin)
        except AlreadyExists:
            raise HTTPError(
                409,
                f"function {spec.service!r} already exists in namespace {spec.namespace!r}: use PUT to update it",
            ) from None
        except UnknownNamespace:  # deleted since we looked
            raise HTTPError(400, _no_namespace(spec.namespace)) from None
        self._functions.forget(spec.ref)
        self.log.info("deployed function {function}", function=spec.ref)
        return _text(request, 202, f"function {spec.service!r} deployed in namespace {spec.namespace!r}")

    @app.route("/system/functions", methods=["PUT"])
    async def update(self, request: IRequest) -> bytes:
        spec = self._spec(request)
        await self._known_namespace(spec.namespace)
        await self._check_secrets(spec)
        await self._declare_queue(spec)
        try:
            await self._store.update_function(spec)
        except NotFound:
            raise HTTPError(404, _no_function(spec.service, spec.namespace)) from None
        self._functions.forget(spec.ref)
        self.log.info("updated function {function}", function=spec.ref)
        return _text(request, 202, f"function {spec.service!r} updated in namespace {spec.namespace!r}")

    @app.route("/system/functions", methods=["DELETE"])
    async def remove(self, request: IRequest) -> bytes:
        """``{"functionName": name, "namespace": ns}`` (faas-provider's DeleteFunctionRequest)."""
        data = _read_json(request)
        if not isinstance(data, dict) or "functionName" not in data:
            raise ValidationError("functionName", "missing")
        name = check_name(data["functionName"], "functionName")
        namespace = data.get("namespace")
        if namespace is None or namespace == "":  # not any false value: {} or 0 is a mistake
            namespace = self._settings.default_namespace
        if not isinstance(namespace, str):
            raise ValidationError("namespace", "must be a string")
        check_namespace(namespace)
        try:
            await self._store.delete_function(name, namespace)
        except NotFound:
            raise HTTPError(404, _no_function(name, namespace)) from None
        ref = function_ref(name, namespace)
        self._functions.forget(ref)
        try:
            await self._store.delete_logs(name, namespace)
        except StoreUnavailable as e:
            self.log.warn("function {function} removed, but not its log: {error}", function=ref, error=e)
        self.log.info("removed function {function}", function=ref)
        return _text(request, 202, f"function {name!r} removed from namespace {namespace!r}")

    @app.route("/system/functions", methods=["PATCH", "OPTIONS", "HEAD"])
    def functions_other(self, request: IRequest) -> bytes:
        request.setHeader(b"Allow", b"GET, POST, PUT, DELETE")
        return _text(request, 405, "method not allowed on /system/functions: use GET, POST, PUT or DELETE")

    @app.route("/system/function/<name>", methods=["GET"])
    async def function_status(self, request: IRequest, name: str) -> bytes:
        check_name(name, "name")
        namespace = self._namespace_arg(request)
        spec = await self._store.get_function(name, namespace)
        if spec is None:
            raise HTTPError(404, _no_function(name, namespace))
        counts = await self._store.invocation_counts([spec.ref])
        return _json(request, 200, spec.status_json(counts.get(spec.ref, 0)))

    @app.route("/system/scale-function/<name>", methods=["POST"])
    async def scale(self, request: IRequest, name: str) -> bytes:
        """``{"serviceName", "namespace", "replicas"}`` (faas-provider's ScaleServiceRequest)."""
        check_name(name, "name")
        namespace, replicas = parse_scale_request(_read_json(request), name, self._settings.default_namespace)
        try:
            await self._store.scale_function(name, replicas, namespace)
        except NotFound:
            raise HTTPError(404, _no_function(name, namespace)) from None
        ref = function_ref(name, namespace)
        self._functions.forget(ref)
        self._metrics.service_count.labels(ref).set(replicas)
        return _text(request, 202, f"function {name!r} in namespace {namespace!r} scaled to {replicas}")

    # --- namespaces (faas-provider's FunctionNamespace: {name, labels, annotations}) -----------

    @app.route("/system/namespaces", methods=["GET"])
    async def list_namespaces(self, request: IRequest) -> bytes:
        """The names, as a JSON list (what ``faas-cli namespaces`` reads)."""
        stored = {ns.name for ns in await self._store.list_namespaces()}
        return _json(request, 200, sorted(stored | self._builtin))

    @app.route("/system/namespace/", methods=["POST"])
    async def create_namespace(self, request: IRequest) -> bytes:
        """faas-cli posts to ``/system/namespace/`` with the name in the body."""
        return await self._create_namespace(request, None)

    @app.route("/system/namespace/<name>", methods=["POST"])
    async def create_named_namespace(self, request: IRequest, name: str) -> bytes:
        return await self._create_namespace(request, check_namespace(name, "name"))

    async def _create_namespace(self, request: IRequest, name: str | None) -> bytes:
        namespace = Namespace.from_json(_read_json(request), name)
        exists = HTTPError(409, f"namespace {namespace.name!r} already exists: use PUT to update it")
        if namespace.name in self._builtin:
            raise exists
        try:
            await self._store.create_namespace(namespace)
        except AlreadyExists:
            raise exists from None
        self.log.info("created namespace {namespace}", namespace=namespace.name)
        return _text(request, 201, f"namespace {namespace.name!r} created")

    @app.route("/system/namespace/<name>", methods=["GET"])
    async def get_namespace(self, request: IRequest, name: str) -> bytes:
        check_namespace(name, "name")
        namespace = await self._store.get_namespace(name)
        if namespace is None:
            if name not in self._builtin:
                raise HTTPError(404, f"namespace {name!r} not found")
            namespace = Namespace(name, {"openfaas": "1"})
        return _json(request, 200, namespace.to_json())

    @app.route("/system/namespace/<name>", methods=["PUT"])
    async def update_namespace(self, request: IRequest, name: str) -> bytes:
        """Replace its labels and annotations."""
        check_namespace(name, "name")
        namespace = Namespace.from_json(_read_json(request), name)
        if not await self._namespace_exists(name):
            raise HTTPError(404, f"namespace {name!r} not found")
        await self._store.put_namespace(namespace)
        self.log.info("updated namespace {namespace}", namespace=name)
        return _text(request, 202, f"namespace {name!r} updated")

    @app.route("/system/namespace/<name>", methods=["DELETE"])
    async def delete_namespace(self, request: IRequest, name: str) -> bytes:
        check_namespace(name, "name")
        if name in self._builtin:
            raise HTTPError(400, f"namespace {name!r} is built in: it cannot be deleted")
        try:
            await self._store.delete_namespace(name)
        except NotFound:
            raise HTTPError(404, f"namespace {name!r} not found") from None
        except NamespaceNotEmpty:
            raise HTTPError(409, f"namespace {name!r} still holds functions: remove them first") from None
        self.log.info("deleted namespace {namespace}", namespace=name)
        return _text(request, 202, f"namespace {name!r} deleted")

    @app.route("/system/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        return OPENAPI_DOCUMENT

    # --- logs -------------------------------------------------------------------------------

    @app.route("/system/logs", methods=["GET"])
    async def logs(self, request: IRequest) -> bytes:
        """faas-provider's log stream: ``application/x-ndjson``, one ``logs.Message`` a line.

        With ``follow=true`` new lines are sent as they come (the store is polled on the
        clock) until the client leaves: Klein then cancels this coroutine, which ends the
        poll where it waits, and the follower's place is given back.
        """
        query = LogQuery.from_args(request.args, self._settings.default_namespace)
        await self._known_namespace(query.namespace)
        spec = await self._store.get_function(query.name, query.namespace)
        if spec is None:
            raise HTTPError(404, _no_function(query.name, query.namespace))
        if query.follow and self.followers >= self._settings.log_followers:
            raise HTTPError(
                503,
                f"too many log streams open ({self._settings.log_followers}): try again later",
                {b"Retry-After": str(self._settings.retry_after).encode()},
            )
        entries, cursor = await self._log_history(query)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        request.setHeader(b"Cache-Control", b"no-cache")
        name, namespace = query.name, query.namespace
        request.write(b"".join(entry.message(name, namespace) for entry in entries))
        if not query.follow:
            return b""
        # As long as the client stays: no response deadline (--write-timeout) for this one.
        unbounded = getattr(getattr(request, "channel", None), "unbounded", None)
        if unbounded is not None:
            unbounded()
        self.followers += 1
        try:
            await self._follow(request, query, cursor)
        finally:
            self.followers -= 1
        return b""

    async def _log_history(self, query: LogQuery) -> tuple[list[LogEntry], str | None]:
        """The lines asked for, and the id of the last line read (where following goes on)."""
        store, name, namespace = self._store, query.name, query.namespace
        if query.tail is not None and query.instance is None and query.since is None:
            entries = await store.last_logs(name, namespace, query.tail)
            return entries, entries[-1].id if entries else None
        kept: deque[LogEntry] = deque(maxlen=query.tail)
        cursor = None
        while True:
            page = await store.read_logs(
                name, namespace, after=cursor, since=query.since if cursor is None else None, count=LOG_PAGE
            )
            if page:
                cursor = page[-1].id
            kept.extend(e for e in page if query.instance is None or e.instance == query.instance)
            if len(page) < LOG_PAGE:
                return list(kept), cursor

    async def _follow(self, request: IRequest, query: LogQuery, cursor: str | None) -> None:
        name, namespace, instance = query.name, query.namespace, query.instance
        failing = False
        while not request._disconnected:
            await deferLater(self._clock, self._settings.log_poll)
            try:
                page = await self._store.read_logs(
                    name,
                    namespace,
                    after=cursor,
                    since=query.since if cursor is None else None,
                    count=LOG_PAGE,
                )
            except StoreUnavailable as e:
                if not failing:
                    self.log.warn("log stream of {function}: {error}", function=name, error=e)
                failing = True
                continue
            failing = False
            if page:
                cursor = page[-1].id
                lines = [
                    e.message(name, namespace) for e in page if instance is None or e.instance == instance
                ]
                if lines:
                    request.write(b"".join(lines))

    @app.route("/system/logs", methods=["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def logs_other(self, request: IRequest) -> bytes:
        request.setHeader(b"Allow", b"GET")
        return _text(request, 405, "method not allowed on /system/logs: use GET")

    @app.route("/system/info", methods=["GET"])
    def info(self, request: IRequest) -> bytes:
        s = self._settings
        release = __version__
        return _json(
            request,
            200,
            {
                "provider": {
                    "provider": s.provider,
                    "orchestration": s.orchestration,
                    "version": {"sha": "", "release": release},
                },
                "version": {"commit_message": "", "sha": "", "release": release},
                "arch": _arch(),
            },
        )

    async def _check_secrets(self, spec: FunctionSpec) -> None:
        """A function may only name secrets that exist in its namespace (400 otherwise, as OpenFaaS)."""
        if not spec.secrets:
            return
        namespace = spec.namespace
        missing = await self._store.missing_secrets(namespace, spec.secrets)
        if missing:
            names = ", ".join(repr(name) for name in missing)
            raise HTTPError(
                400,
                f"secrets: {names} not found in namespace {namespace!r} "
                "(create with: faas-cli secret create NAME)",
            )

    # --- secrets ----------------------------------------------------------------------------

    def _box(self) -> SecretBox:
        return self._secret_box

    async def _secret_request(self, request: IRequest, *, value_required: bool) -> SecretRequest:
        secret = SecretRequest.from_json(
            _read_json(request),
            value_required=value_required,
            default_namespace=self._settings.default_namespace,
        )
        await self._known_namespace(secret.namespace)
        return secret

    @app.route("/system/secrets", methods=["GET"])
    async def list_secrets(self, request: IRequest) -> bytes:
        """Names only, never values (faas-provider's ``Secret`` with ``value`` left out)."""
        self._box()
        namespace = await self._known_namespace(self._namespace_arg(request))
        names = await self._store.list_secrets(namespace)
        return _json(request, 200, [{"name": name, "namespace": namespace} for name in names])

    @app.route("/system/secrets", methods=["POST"])
    async def create_secret(self, request: IRequest) -> bytes:
        box = self._box()
        secret = await self._secret_request(request, value_required=True)
        sealed = box.seal(secret.namespace, secret.name, secret.value or b"")
        # The first secret marks the store with this key: a later start with another is refused.
        kept = await self._store.secrets_key_check(box.check_token())
        if kept is not None and not box.opens(kept):
            raise HTTPError(503, "secrets unavailable: the store's secrets were sealed with another key")
        try:
            await self._store.create_secret(secret.namespace, secret.name, sealed)
        except AlreadyExists:
            raise HTTPError(
                409,
                f"secret {secret.name!r} already exists in namespace {secret.namespace!r}: "
                "use PUT to update it",
            ) from None
        self.log.info("created secret {namespace}/{name}", namespace=secret.namespace, name=secret.name)
        return _text(request, 201, f"secret {secret.name!r} created")

    @app.route("/system/secrets", methods=["PUT"])
    async def update_secret(self, request: IRequest) -> bytes:
        box = self._box()
        secret = await self._secret_request(request, value_required=True)
        sealed = box.seal(secret.namespace, secret.name, secret.value or b"")
        try:
            await self._store.update_secret(secret.namespace, secret.name, sealed)
        except NotFound:
            raise HTTPError(
                404, f"secret {secret.name!r} not found in namespace {secret.namespace!r}"
            ) from None
        self.log.info("updated secret {namespace}/{name}", namespace=secret.namespace, name=secret.name)
        return _text(request, 200, f"secret {secret.name!r} updated")

    @app.route("/system/secrets", methods=["DELETE"])
    async def remove_secret(self, request: IRequest) -> bytes:
        self._box()
        secret = await self._secret_request(request, value_required=False)
        try:
            await self._store.delete_secret(secret.namespace, secret.name)
        except NotFound:
            raise HTTPError(
                404, f"secret {secret.name!r} not found in namespace {secret.namespace!r}"
            ) from None
        self.log.info("removed secret {namespace}/{name}", namespace=secret.namespace, name=secret.name)
        return _text(request, 200, f"secret {secret.name!r} removed")

    @app.route("/system/secrets", methods=["PATCH", "OPTIONS", "HEAD"])
    def secrets_other(self, request: IRequest) -> bytes:
        request.setHeader(b"Allow", b"GET, POST, PUT, DELETE")
        return _text(request, 405, "method not allowed on /system/secrets: use GET, POST, PUT or DELETE")

    async def _declare_queue(self, spec: FunctionSpec) -> None:
        """Check a function's named queue and declare it: a reserved name, or one the broker
        refuses, is a 400; a broker that is down does not block the deploy (the queue is
        remembered and declared as soon as the broker is back)."""
        self._settings.reserved_queues.check(spec.queue)
        queue = self._queue_of(spec)
        if self._queue is not None and queue != self._settings.default_queue:
            try:
                await self._queue.declare(queue)
            except QueueRefused as e:
                raise ValidationError(
                    f"annotations.{QUEUE_ANNOTATION}", f"the broker refused it: {e}"
                ) from None
            except QueueUnavailable as e:
                self.log.warn(
                    "queue {queue} of {function} not declared yet (it will be on reconnection): {error}",
                    queue=queue,
                    function=spec.ref,
                    error=e,
                )
                return
            self.refused_queues.pop(spec.queue, None)

    def _queue_of(self, spec: FunctionSpec) -> str:
        """The queue of a function's async calls: its annotation's, else the gateway's default."""
        return spec.queue if QUEUE_ANNOTATION in spec.annotations else self._settings.default_queue

    # --- asynchronous calls -----------------------------------------------------------------

    def accept_resource(self) -> resource.IResource:
        """``/async-function/{name}[/{path}]``: a plain resource, not a Klein route (the hot
        asynchronous path: Klein's routing would be most of its cost)."""
        return AsyncCalls(self)

    def _label(self, ref: str) -> str:
        """A metric label for a function that exists; "-" for any other name (unknown names
        from clients must not create a new time series each)."""
        return ref if self._functions.cached(ref) is not None else "-"

    async def _accept(self, request: IRequest, ref: str) -> bytes:
        """``ref`` is ``name.namespace`` (:class:`AsyncCalls` adds the default namespace)."""
        if self._queue is None or not self._settings.async_enabled:
            raise HTTPError(404, "asynchronous calls are not enabled on this gateway")
        try:
            name, namespace = split_ref(ref, self._settings.default_namespace)
        except ValidationError as e:
            raise HTTPError(400, str(e)) from None
        # As the client sent it (Klein's postpath is percent-decoded: not for forwarding).
        subpath = hdr.raw_subpath(request.path, 3)
        try:
            hdr.check_subpath(subpath)
        except hdr.BadPath as e:
            raise HTTPError(400, str(e)) from None
        call_id = _call_id(request)
        callback = request.getHeader(hdr.CALLBACK_URL)
        callback_url = None
        if callback is not None:  # an empty one is refused, not taken as none
            callback_url = callback.decode("latin-1")
            check = defer.Deferred.fromCoroutine(
                check_callback_url(callback_url, self._resolver, self._settings.callback_policy)
            )
            if self._clock is not None:
                check.addTimeout(self._settings.resolve_timeout, self._clock)
            try:
                await check
            except defer.TimeoutError:
                raise HTTPError(
                    400,
                    f"X-Callback-Url refused: its host did not resolve within {self._settings.resolve_timeout:g}s",
                ) from None
            except CallbackRefused as e:
                raise HTTPError(400, f"X-Callback-Url refused: {e}") from None
        spec = await self._functions.get(ref)
        if spec is None:
            raise HTTPError(404, _no_function(name, namespace))
        if self.refused_queues and spec.queue in self.refused_queues:
            raise QueueUnavailable(
                f"function {spec.ref!r}'s queue cannot be used ({self.refused_queues[spec.queue]}); "
                f"redeploy it with another {QUEUE_ANNOTATION} annotation"
            )

        if request._disconnected:
            raise _ClientGone()
        forwarded = [(k, v) for k, vs in hdr.end_to_end_raw(request.requestHeaders, _ASYNC_DROP) for v in vs]
        forwarded.append((b"X-Call-Id", call_id.encode()))
        path = b"/" + b"/".join(subpath)
        call = Call(
            call_id=call_id,
            function=name,
            method="POST",
            path=path.decode("latin-1"),
            query=request.uri.partition(b"?")[2].decode("latin-1"),
            headers=hdr.to_str_pairs(forwarded),
            body=request.content.read(),
            callback_url=callback_url,
            accepted_at=time.time(),
            queue=self._queue_of(spec),
            namespace=namespace,
        )
        record = CallRecord.for_call(call)
        if request.getHeader(hdr.CALL_ID) is not None:
            return await self._accept_once(request, call, record)
        # An id the gateway just made up cannot exist: publish first, then record (a 202 is
        # only sent once the broker confirmed the message; a record that could not be
        # written is created by the worker).
        await self._queue.publish(call)
        try:
            found = await self._calls.create_call(record)
        except StoreUnavailable as e:
            self.log.warn(
                "[{call_id}] queued, but its status record could not be written yet: {error}",
                call_id=call_id,
                error=e,
            )
            found = None
        return _accepted(request, found or record, duplicate=False)

    async def _accept_once(self, request: IRequest, call: Call, record: CallRecord) -> bytes:
        """Queue a call under the id its client chose, at most once however often it is posted.

        The id is claimed (``accepting``, with a deadline) before the publish and becomes
        ``queued`` once the broker confirmed it.  A claim whose gateway died before the
        confirm lapses at its deadline; the client's retry then takes it and publishes again."""
        claim, found = await self._calls.claim_call(record, self._settings.claim_window)
        if claim is None:
            assert found is not None
            return self._duplicate(request, found, call)
        try:
            await self._queue.publish(call)
        except QueueUnavailable:
            # Not queued (as far as we know): give the id back so that a retry can queue it.
            await self._settle(claim, None)
            raise
        found = await self._settle(claim, record)
        if found is None or found.status == CallStatus.ACCEPTING:
            found = record  # (ACCEPTING: our claim lapsed and was taken over, yet ours is confirmed)
        return _accepted(request, found, duplicate=False)

    async def _settle(self, claim: CallRecord, record: CallRecord | None) -> CallRecord | None:
        """Replace our claim with ``record`` (None: release it); the record found instead when
        the claim moved on (a worker started the call).  A store that is down leaves the
        claim to lapse (a worker that gets the message moves it on)."""
        try:
            return await self._calls.settle_claim(claim, record)
        except StoreUnavailable as e:
            self.log.warn(
                "[{call_id}] could not {what} its claim: {error}",
                call_id=claim.call_id,
                what="release" if record is None else "confirm",
                error=e,
            )
            return None

    def _duplicate(self, request: IRequest, found: CallRecord, call: Call) -> bytes:
        if (found.function, found.namespace) != (call.function, call.namespace):
            # Someone else's call: its status is none of this caller's business.
            raise HTTPError(409, f"call id {found.call_id!r} is taken by another call: choose another id")
        if found.status == CallStatus.ACCEPTING:
            # The IETF Idempotency-Key draft: a retry while the first request is in progress is 409.
            left = (found.accepting_until or 0.0) - time.time()
            wait = min(max(1, math.ceil(left)), max(1, math.ceil(self._settings.claim_window)))
            raise HTTPError(
                409,
                f"call {found.call_id!r} is being accepted by another request: retry in {wait}s",
                {b"Retry-After": str(wait).encode()},
            )
        return _accepted(request, found, duplicate=True)

    # --- call status ------------------------------------------------------------------------

    @app.route("/system/calls/<call_id>", methods=["GET"])
    async def call_status(self, request: IRequest, call_id: str) -> bytes:
        record = await self._calls.get_call(_check_call_id(call_id))
        if record is None:
            raise HTTPError(404, f"no call {call_id!r} (unknown, or older than the status TTL)")
        return _json(request, 200, record.to_json())

    @app.route("/system/calls/<call_id>", methods=["DELETE"])
    async def cancel_call(self, request: IRequest, call_id: str) -> bytes:
        """Cancel a call that is queued or waiting for a retry: it never runs (or runs no more)."""
        _check_call_id(call_id)
        record = await self._calls.get_call(call_id)
        if record is None:
            raise HTTPError(404, f"no call {call_id!r} (unknown, or older than the status TTL)")
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
            raise HTTPError(404, f"no call {call_id!r} (unknown, or older than the status TTL)") from None
        if found is not None:  # started (or finished) since we read it
            raise HTTPError(409, refusal.format(status=found.status))
        self.log.info("[{call_id}] cancelled (was {status})", call_id=call_id, status=record.status)
        return _json(request, 202, {"callId": call_id, "status": CallStatus.CANCELLED})

    @app.route("/system/calls/<call_id>/retry", methods=["POST"])
    async def retry_call(self, request: IRequest, call_id: str) -> bytes:
        """Re-queue a dead-lettered call: the same call id and body, attempts from 1 again.

        A call dead-lettered for its callback is re-queued to deliver the kept answer again,
        without running the function."""
        _check_call_id(call_id)
        if self._queue is None:
            raise HTTPError(404, "asynchronous calls are not enabled on this gateway")
        letter = await self._calls.get_dead_letter(call_id)
        if letter is None:
            raise HTTPError(404, f"no dead letter for call {call_id!r}")
        if not letter.function or letter.mark.reason == DeadReason.UNDECODABLE:
            raise HTTPError(409, f"dead letter {call_id!r} is not a txfaas call: it cannot be re-queued")
        record = await self._calls.get_call(call_id)
        replay = max(letter.call.replay, record.replays if record is not None else 0) + 1
        now = time.time()
        dead = letter.call
        if dead.callback_job is not None:
            job = attrs.evolve(dead.callback_job, attempt=1, first_at=now)
            call = attrs.evolve(dead, dead=None, not_before=0.0, replay=replay, callback_job=job)
            base = record or CallRecord.for_call(call)
            fresh = attrs.evolve(
                base,
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
        else:
            call = attrs.evolve(dead, dead=None, not_before=0.0, attempt=1, replay=replay, accepted_at=now)
            fresh = CallRecord.for_call(call)
        # The record is claimed first (with the higher replay number: a late duplicate of the
        # dead letter is then ignored), so a worker never sees the message before it, and two
        # retries at once cannot both publish; then the message, confirmed; the dead letter
        # goes last, so a failure anywhere leaves it to retry again.
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
            await self._settle(claim, record)
            raise
        await self._settle(claim, fresh)
        try:
            await self._calls.remove_dead_letter(call_id)
        except StoreUnavailable as e:
            self.log.warn(
                "[{call_id}] re-queued, but the dead letter could not be removed ({error}): it is still "
                "listed",
                call_id=call_id,
                error=e,
            )
        self.log.info(
            "[{call_id}] re-queued from the dead letters ({reason}), replay {replay}",
            call_id=call_id,
            reason=letter.mark.reason,
            replay=replay,
        )
        location = f"/system/calls/{call_id}"
        request.setHeader(hdr.CALL_ID, call_id.encode())
        request.setHeader(b"Location", location.encode())
        return _json(
            request,
            202,
            {
                "callId": call_id,
                "status": fresh.status,
                "phase": letter.phase,
                "replay": replay,
                "location": location,
            },
        )

    @app.route("/system/dead-letters", methods=["GET"])
    async def dead_letters(self, request: IRequest) -> bytes:
        """The dead letters, oldest first: ``?function=`` (``name`` or ``name.namespace``, or
        ``name`` and ``?namespace=``) filters, ``?limit=`` and ``?offset=`` page."""
        function = _query_arg(request, b"function")
        if function is not None:
            name, namespace = split_ref(function, self._namespace_arg(request), "function")
            function = store_key(name, namespace)
        limit = _int_arg(request, b"limit", DEAD_LETTER_PAGE, 1, DEAD_LETTER_PAGE_MAX)
        offset = _int_arg(request, b"offset", 0, 0, DEAD_LETTER_OFFSET_MAX)
        letters = await self._calls.list_dead_letters(function, offset, limit)
        total = await self._calls.count_dead_letters(function)
        request.setHeader(b"X-Total-Count", str(total).encode())
        return _json(request, 200, [letter.summary_json() for letter in letters])

    @app.route("/system/dead-letters/<call_id>", methods=["GET"])
    async def dead_letter(self, request: IRequest, call_id: str) -> bytes:
        letter = await self._calls.get_dead_letter(_check_call_id(call_id))
        if letter is None:
            raise HTTPError(404, f"no dead letter for call {call_id!r}")
        return _json(request, 200, letter.summary_json())

    @app.route("/system/dead-letters/<call_id>", methods=["DELETE"])
    async def discard_dead_letter(self, request: IRequest, call_id: str) -> bytes:
        """Discard a dead letter: it is no longer listed nor can be re-queued (its record stays)."""
        if not await self._calls.remove_dead_letter(_check_call_id(call_id)):
            raise HTTPError(404, f"no dead letter for call {call_id!r}")
        self.log.info("[{call_id}] dead letter discarded", call_id=call_id)
        request.setResponseCode(204)
        return b""

    @app.route("/system/calls/<call_id>/result", methods=["GET"])
    async def call_result(self, request: IRequest, call_id: str) -> bytes:
        _check_call_id(call_id)
        record = await self._calls.get_call(call_id)
        if record is None:
            raise HTTPError(404, f"no call {call_id!r} (unknown, or older than the status TTL)")
        if record.status not in CallStatus.FINAL:
            return _not_final(request, record, self._clock)
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


# --- helpers ------------------------------------------------------------------------------------


def _no_function(name: str, namespace: str) -> str:
    return f"function {name!r} not found in namespace {namespace!r}"


def _no_namespace(name: str) -> str:
    return f"namespace {name!r} does not exist: create it first (POST /system/namespace/)"


def _text(request: IRequest, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return message.encode("utf-8", "replace") + b"\n"


def _method(request: IRequest) -> str:
    return request.method.decode("latin-1")


def _path(request: IRequest) -> str:
    return request.path.decode("utf-8", "replace")


def _json(request: IRequest, code: int, data: Any) -> bytes:
    request.setResponseCode(code)
    request.responseHeaders._rawHeaders[b"Content-Type"] = [b"application/json"]  # as setHeader would
    return orjson.dumps(data)  # compact, as OpenFaaS's Go encoder writes it


def _read_json(request: IRequest) -> Any:
    raw = request.content.read(SYSTEM_BODY_LIMIT + 1)
    if len(raw) > SYSTEM_BODY_LIMIT:
        raise HTTPError(413, f"request body over {SYSTEM_BODY_LIMIT} bytes")
    if not raw.strip():
        raise ValidationError("", "a JSON body is required")
    try:
        # orjson: strict JSON (no NaN), nesting at most 1024 deep, no lone surrogate, and an
        # integer past 64 bits read as a float -- what it cannot store later is refused now.
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValidationError("", f"the body is not valid JSON: {e}") from None


def _call_id(request: IRequest) -> str:
    given = request.getHeader(hdr.CALL_ID)
    if given is None:
        return hdr.new_call_id()
    if not hdr.valid_call_id(given):
        raise HTTPError(400, hdr.BAD_CALL_ID)
    return given.decode("ascii")


def _query_arg(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def _int_arg(request: IRequest, name: bytes, default: int, low: int, high: int | None) -> int:
    raw = _query_arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name.decode(), f"not a whole number: {raw!r}") from None
    if value < low or (high is not None and value > high):
        limits = f"from {low}" + (f" to {high}" if high is not None else "")
        raise ValidationError(name.decode(), f"must be {limits}")
    return value


def _check_call_id(call_id: str) -> str:
    if not hdr.valid_call_id(call_id):
        raise HTTPError(400, f"invalid call id {call_id!r}")
    return call_id


def _accepted(request: IRequest, record: CallRecord, duplicate: bool) -> bytes:
    location = f"/system/calls/{record.call_id}"
    # Straight into the raw headers (canonical names; a call id has no CR or LF: valid_call_id).
    raw = request.responseHeaders._rawHeaders
    raw[hdr.CALL_ID] = [record.call_id.encode()]
    raw[b"Location"] = [location.encode()]
    body = {"callId": record.call_id, "status": record.status, "location": location}
    if duplicate:
        body["duplicate"] = True
    return _json(request, 202, body)


def _not_final(request: IRequest, record: CallRecord, clock: Any) -> bytes:
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
    return _json(request, 409, body)


def _arch() -> str:
    import platform

    machine = platform.machine().lower()
    return {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


class AsyncCalls(resource.Resource):
    """``/async-function/{name}[.{namespace}][/{path}]``: POST queues the call (:meth:`GatewayApp._accept`).

    A client that goes away does not cancel the work: once a call is being published, its
    publish and its record are completed (the call will run); only the answer is dropped.
    """

    isLeaf = True

    def __init__(self, app: GatewayApp) -> None:
        super().__init__()
        self._app = app
        self._suffix = "." + app._settings.default_namespace

    def render(self, request: server.Request) -> Any:
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            return _text(request, 405, "asynchronous calls must use POST")
        postpath = request.postpath
        if not postpath or not postpath[0]:
            return _text(request, 404, "no function named in the path: use /async-function/{name}")
        name = postpath[0].decode("utf-8", "replace")
        if "." not in name:
            name += self._suffix  # name.namespace from here on: labels, the cache
        d = defer.Deferred.fromCoroutine(self._app._accept(request, name))
        d.addCallbacks(self._accepted, self._refused, (request, name), None, (request, name))
        d.addErrback(self._unexpected, request)
        return server.NOT_DONE_YET

    def _accepted(self, body: bytes, request: server.Request, name: str) -> None:
        self._app._metrics.async_answer(name, 202)
        _finish(request, body)

    def _refused(self, failure: Failure, request: server.Request, name: str) -> None:
        """The answer the Klein app's ``handle_errors`` handlers give for the same error."""
        if failure.check(_ClientGone):
            return
        app = self._app
        handlers = (
            (HTTPError, app._http_error),
            (ValidationError, app._validation_error),
            (StoreUnavailable, app._store_unavailable),
            (QueueUnavailable, app._queue_unavailable),
        )
        handle = next((h for kind, h in handlers if failure.check(kind)), None)
        if handle is None:
            failure.raiseException()
        body = handle(request, failure)
        app._metrics.async_answer(app._label(name), request.code)
        _finish(request, body)

    def _unexpected(self, failure: Failure, request: server.Request) -> None:
        self._app.log.failure("asynchronous call to {uri} failed", failure, uri=request.uri)
        _finish(request, _text(request, 500, "internal error"))


class _ClientGone(Exception):
    """The client went away before anything was queued: nothing to do, nobody to answer."""


def _finish(request: server.Request, body: bytes) -> None:
    if request.finished or request._disconnected:
        return
    request.responseHeaders._rawHeaders[b"Content-Length"] = [b"%d" % len(body)]
    request.write(body)
    request.finish()


class RefusedMethod(resource.Resource):
    """405 for TRACE and CONNECT, whatever the path."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Allow", PROXIED_METHODS)
        return _text(request, 405, f"{request.method.decode('latin-1')} is not allowed here")


class Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Basic realm="Restricted"')
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"authentication required\n"


@attrs.frozen
class BasicAuth:
    user: str
    password: str

    def check(self, request: server.Request) -> bool:
        """Both user and password compared in constant time."""
        given_user = request.getUser() or b""
        given_password = request.getPassword() or b""
        user_ok = hmac.compare_digest(given_user, self.user.encode())
        password_ok = hmac.compare_digest(given_password, self.password.encode())
        return user_ok & password_ok


class GatewayRoot(resource.Resource):
    """``/function/`` goes to the proxy, ``/async-function/`` to :class:`AsyncCalls`; everything else to the Klein app (behind auth where due).

    With basic auth on, every path needs it except the open ones (deny by default): a
    protected route must not be reachable by another spelling (``//system/...``,
    ``/%2Fsystem/...``) that routes to the same Klein handler.
    """

    _OPEN = frozenset({b"function", b"async-function", b"healthz"})

    def __init__(
        self,
        proxy: resource.IResource,
        app: GatewayApp,
        auth: BasicAuth | None,
        *,
        max_body: int | None = None,
        max_async_body: int | None = None,
    ) -> None:
        super().__init__()
        self._proxy = proxy
        self._calls = app.accept_resource()
        self._app = app.resource()
        self._auth = auth
        self._unauthorized = Unauthorized()
        self._refused = RefusedMethod()
        #: The hot routes and their body limits (everything else: SYSTEM_BODY_LIMIT).
        self.routes = {
            b"function": Route(b"function", self._proxy, max_body or None),
            b"async-function": Route(b"async-function", self._calls, max_async_body or None),
        }

    def site(self, clock: Any, **settings: Any) -> LimitedSite:
        """The site that serves this root: one route decision per request (:meth:`LimitedSite.route`)
        gives both the leaf and the body limit, and the hot routes skip the walk of the tree."""
        return LimitedSite(self, clock, body_limit=SYSTEM_BODY_LIMIT, routes=self.routes, **settings)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.IResource:
        if request.method in REFUSED_METHODS:
            return self._refused
        route = self.routes.get(path)  # the decision LimitedSite.route makes, on the same segment
        if route is not None and route.leaf is not None:
            return route.leaf
        if self._auth is not None and path not in self._OPEN and not self._auth.check(request):
            return self._unauthorized
        # Hand the whole path to Klein.
        request.postpath.insert(0, request.prepath.pop())
        return self._app

    def render(self, request: server.Request) -> Any:
        return self._app.render(request)
