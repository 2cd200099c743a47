"""The synchronous hot path: ``/function/{name}[.{namespace}][/{path}]`` proxied to the function.

A plain twisted.web resource (Klein's routing is not on this path), driven by callbacks.
It is transparent: nothing is decoded or re-encoded, no cookie kept, no redirect followed;
bodies stream both ways with back-pressure; one deadline covers a call's headers and body,
and when it passes, or the client goes away, the upstream request is cancelled.
"""

from __future__ import annotations

import re
import time
from io import BytesIO
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from txfaas import headers as hdr
from txfaas.gateway.answers import finish, text
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.gateway.web import when_gone
from txfaas.http.client import BytesProducer
from txfaas.invocation_log import InvocationLog
from txfaas.model import DEFAULT_NAMESPACE, MAX_NAME, FunctionSpec
from txfaas.store import StoreUnavailable
from txfaas.store.cache import FunctionCache
from txfaas.timers import QueuedTimer, TimerQueue

# Set by the gateway itself (or by the Agent, for Host and Content-Length).
_REQUEST_DROP = hdr.canonical_names(
    hdr.HOP_BY_HOP
    | frozenset(
        {b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-host", b"x-call-id", b"x-start-time"}
    )
)
_RESPONSE_DROP = hdr.canonical_names(hdr.HOP_BY_HOP | frozenset({b"x-call-id", b"x-duration-seconds"}))
_NAME_BYTES = re.compile(rb"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: TRACE would echo the caller's headers (credentials too) back; CONNECT asks for a tunnel.
REFUSED_METHODS = frozenset({b"TRACE", b"CONNECT"})
PROXIED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# name.namespace: two DNS-1123 labels (their lengths are checked apart).
_REF_BYTES = re.compile(rb"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CLIENT_GONE = 499  # the client went away: nothing to answer (nginx's code, for the metrics)
log = Logger()


def body_producer(request: server.Request, cooperator: Any) -> IBodyProducer | None:
    """The request's body as a producer: ``None`` when the client sent no body at all."""
    headers = request.requestHeaders
    if not headers.hasHeader(b"Content-Length") and not headers.hasHeader(b"Transfer-Encoding"):
        return None
    content = request.content
    assert content is not None  # the channel made it when the body's framing arrived
    if isinstance(content, BytesIO):
        return BytesProducer(content.getvalue())
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    producer = FileBodyProducer(content, cooperator=cooperator)
    producer.length = size
    return producer


@implementer(IPushProducer)
class _ProducerProxy:
    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()


@attrs.frozen
class ProxySettings:
    function_url_template: str = "http://{name}:8080"
    upstream_timeout: float = 60.0
    #: What a bare ``/function/{name}`` means.
    default_namespace: str = DEFAULT_NAMESPACE


@attrs.frozen
class Upstream:
    """What every proxied call uses, built once by :class:`FunctionProxy`."""

    clock: Any
    client: IAgent
    functions: FunctionCache
    settings: ProxySettings
    metrics: GatewayMetrics
    #: Streams file-spooled request bodies on our own clock.
    cooperator: Any
    invocations: InvocationLog | None
    #: ``(headers, name, values)``: a canonical name's clean values set (:func:`headers.writers`).
    set_raw: Any = hdr.set_raw
    #: ``(headers, pairs)``: :attr:`set_raw` for each pair.
    update_raw: Any = hdr.update_raw
    #: Calls' deadlines, one queue (and one reactor timer) per distinct timeout.
    deadlines: dict[float, TimerQueue] = attrs.field(factory=dict)

    def deadline(self, timeout: float, expire: Any) -> QueuedTimer:
        queue = self.deadlines.get(timeout)
        if queue is None:
            if len(self.deadlines) >= 256:
                self.deadlines.clear()  # the queues dropped still fire what they hold
            queue = self.deadlines[timeout] = TimerQueue(self.clock, timeout)
        return queue.add(expire)


class FunctionProxy(resource.Resource):
    """``/function/{name}[.{namespace}][/{path}]``: every method is proxied to the function."""

    isLeaf = True

    def __init__(
        self,
        clock: Any,
        client: IAgent,
        functions: FunctionCache,
        settings: ProxySettings,
        metrics: GatewayMetrics,
        cooperator: Any = None,
        invocations: InvocationLog | None = None,
    ) -> None:
        super().__init__()
        cooperator = cooperator or Cooperator(scheduler=lambda f: clock.callLater(0, f))
        set_raw, update_raw = hdr.writers()
        self._upstream = Upstream(
            clock, client, functions, settings, metrics, cooperator, invocations, set_raw, update_raw
        )
        self._suffix = "." + settings.default_namespace

    def render(self, request: server.Request) -> Any:
        if request.method in REFUSED_METHODS:
            request.setHeader(b"Allow", PROXIED_METHODS)
            return _error(request, 405, f"{request.method.decode('latin-1')} is not passed to functions")
        ref = self._ref(request)
        if isinstance(ref, bytes):
            return ref  # an error's body
        # The sub-path as the client sent it (postpath is percent-decoded: not for forwarding).
        rest = hdr.raw_subpath(request.path, 3)
        if rest:
            try:
                hdr.check_subpath(rest)
            except hdr.BadPath as e:
                return _error(request, 400, str(e))
        given = request.requestHeaders.getRawHeaders(hdr.CALL_ID)
        if given:
            if not hdr.valid_call_id(given[0]):
                return _error(request, 400, hdr.BAD_CALL_ID)
            call_id = given[0]
        else:
            call_id = hdr.new_call_id().encode("ascii")
        self._upstream.set_raw(request.responseHeaders, hdr.CALL_ID, [call_id])
        request.defaultContentType = None  # the function's Content-Type, or none
        spec = self._upstream.functions.cached(ref)
        if spec is not None:
            _Exchange(self._upstream, request, spec, rest, call_id).start()
        else:
            _Lookup(self._upstream, request, ref, rest, call_id).start()
        return server.NOT_DONE_YET

    def _ref(self, request: server.Request) -> str | bytes:
        """The function's ``name.namespace`` from the path; an error's body if there is none.

        One regular expression either way; the cache is keyed by ``name.namespace`` (what
        faas-cli sends: no work for it)."""
        postpath = request.postpath
        if not postpath or not postpath[0]:
            return _error(request, 404, "no function named in the path: use /function/{name}")
        ref_b = postpath[0]
        dot = ref_b.find(b".")
        if dot < 0:
            if len(ref_b) > MAX_NAME or not _NAME_BYTES.fullmatch(ref_b):
                return _error(request, 400, f"invalid function name {ref_b.decode('latin-1')!r}")
            return ref_b.decode("ascii") + self._suffix
        if dot > MAX_NAME or len(ref_b) - dot - 1 > MAX_NAME or not _REF_BYTES.fullmatch(ref_b):
            return _error(request, 400, f"invalid function name or namespace {ref_b.decode('latin-1')!r}")
        return ref_b.decode("ascii")


class _Lookup:
    """A function not in the cache, looked up in the store; a client that leaves stops the wait."""

    def __init__(
        self, upstream: Upstream, request: server.Request, ref: str, rest: list[bytes], call_id: bytes
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.ref = ref
        self.rest = rest
        self.call_id = call_id
        self.gone = False

    def start(self) -> None:
        lookup = defer.Deferred.fromCoroutine(self.upstream.functions.get(self.ref))
        self.request.notifyFinish().addErrback(self._left, lookup)
        lookup.addCallbacks(self._found, self._failed)
        lookup.addErrback(_unexpected, self.request, self.call_id, self)

    def _left(self, _reason: Failure, lookup: defer.Deferred) -> None:
        self.gone = True
        lookup.cancel()

    def _found(self, spec: FunctionSpec | None) -> None:
        if self.gone:
            return
        if spec is None:
            name, _, namespace = self.ref.partition(".")
            _send_error(self.request, 404, f"function {name!r} not found in namespace {namespace!r}")
        else:
            _Exchange(self.upstream, self.request, spec, self.rest, self.call_id).start()

    def _failed(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            log.warn(
                "[{call_id}] function registry unavailable for {function}: {error}",
                call_id=self.call_id.decode(),
                function=self.ref,
                error=failure.value,
            )
            if not self.gone:
                _send_error(self.request, 503, f"function registry unavailable: {failure.value}")
        elif not failure.check(defer.CancelledError):
            failure.raiseException()


def _unexpected(failure: Failure, request: server.Request, call_id: bytes, call: _Lookup | _Exchange) -> None:
    log.failure("[{call_id}] proxy failed", failure, call_id=call_id.decode())
    if not request.finished and not call.gone:
        if request.startedWriting:
            transport: Any = request.channel.transport  # a TCP transport
            transport.abortConnection()
        else:
            _send_error(request, 500, "internal error")


class _Exchange:
    """One proxied call: request out, response relayed back, one deadline over both."""

    def __init__(
        self,
        upstream: Upstream,
        request: server.Request,
        spec: FunctionSpec,
        rest: list[bytes],
        call_id: bytes,
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.name = spec.ref
        self.service = spec.service
        self.namespace = spec.namespace
        self.rest = rest
        self.call_id = call_id
        self.error: str | None = None
        settings = upstream.settings
        self.timeout = min(spec.timeout or settings.upstream_timeout, settings.upstream_timeout)
        url = spec.base_url(settings.function_url_template).encode() + b"/" + b"/".join(rest)
        uri = request.uri
        q = uri.find(b"?")
        self.url = url if q < 0 else url + uri[q:]
        self.started = time.monotonic()
        self.code = 0
        self.expired = False
        self.gone = False
        self.finished = False
        self.step: defer.Deferred | None = None
        self.relay: _Relay | None = None
        self.deadline: QueuedTimer | None = None

    def start(self) -> None:
        upstream = self.upstream
        request = self.request
        upstream.metrics.started(self.name)
        start_ns = b"%d" % time.time_ns()
        self.start_ns = start_ns
        incoming = request.requestHeaders
        set_raw = upstream.set_raw
        out = Headers()
        upstream.update_raw(out, hdr.end_to_end_raw(incoming, _REQUEST_DROP))
        client = request.getClientAddress()
        forwarded_for = hdr.append_forwarded_for(
            incoming.getRawHeaders(hdr.FORWARDED_FOR, []), (getattr(client, "host", "") or "").encode()
        )
        set_raw(out, hdr.FORWARDED_FOR, [forwarded_for])
        host = incoming.getRawHeaders(b"Host")
        if host:
            set_raw(out, hdr.FORWARDED_HOST, host[:1])
        set_raw(out, hdr.CALL_ID, [self.call_id])
        set_raw(out, hdr.START_TIME, [start_ns])
        self.deadline = upstream.deadline(self.timeout, self._expire)
        when_gone(request, self._client_gone)
        d = self.step = defer.maybeDeferred(  # (Agent raises a bad method or URL at once)
            upstream.client.request,
            request.method,
            self.url,
            out,
            body_producer(request, upstream.cooperator),
        )
        d.addCallbacks(self._response, self._failed)
        d.addErrback(_unexpected, request, self.call_id, self)

    def _response(self, response: IResponse) -> None:
        self.step = None
        request = self.request
        self.code = response.code
        if self.gone:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        headers = request.responseHeaders
        set_raw = self.upstream.set_raw
        # The function's end-to-end headers replace ours (its Date, Server, Content-Type...).
        self.upstream.update_raw(headers, hdr.end_to_end_raw(response.headers, _RESPONSE_DROP))
        set_raw(headers, hdr.START_TIME, [self.start_ns])
        set_raw(headers, hdr.DURATION, [b"%.6f" % (time.monotonic() - self.started)])
        length = response.length
        if length is not UNKNOWN_LENGTH and response.code not in NO_BODY_CODES and request.method != b"HEAD":
            # The function's length, as it gave it (else twisted.web would chunk the body).
            set_raw(headers, b"Content-Length", [b"%d" % length])
        self.relay = _Relay(self)
        response.deliverBody(self.relay)

    def body_done(self, reason: Failure | None) -> None:
        """The relay saw the end of the function's body (``reason`` None when complete)."""
        if reason is None:
            if not self.gone:
                self.request.finish()
        elif not self.gone:
            # Headers are out: all we can do is cut the connection so the client sees a short body.
            if self.expired:
                self.code = 504
            self.error = "mid-response: " + ("deadline passed" if self.expired else _describe(reason.value))
            log.warn(
                "[{call_id}] function {function} failed {error}",
                call_id=self.call_id.decode(),
                function=self.name,
                error=self.error,
            )
            transport: Any = self.request.channel and self.request.channel.transport
            if transport is not None:
                transport.abortConnection()
        self._done()

    def _failed(self, failure: Failure) -> None:
        self.step = None
        if self.expired:
            self.code = 504
            self.error = f"no answer within {self.timeout:g}s"
            log.info(
                "[{call_id}] function {function} timed out after {timeout}s",
                call_id=self.call_id.decode(),
                function=self.name,
                timeout=self.timeout,
            )
            if not self.gone:
                _send_error(
                    self.request, 504, f"function {self.name!r} did not answer within {self.timeout:g}s"
                )
        elif self.gone or failure.check(defer.CancelledError):
            self.code = _CLIENT_GONE
        else:
            self.code = 502
            reason = self.error = _describe(failure.value)
            log.info(
                "[{call_id}] function {function} unreachable: {error}",
                call_id=self.call_id.decode(),
                function=self.name,
                error=reason,
            )
            _send_error(self.request, 502, f"function {self.name!r} unreachable: {reason}")
        self._done()

    def _expire(self) -> None:
        self.deadline = None
        self.expired = True
        self._abort()

    def _client_gone(self, _reason: Failure) -> None:
        if not self.finished:
            self.gone = True
            self.code = _CLIENT_GONE
            self._abort()

    def _abort(self) -> None:
        if self.step is not None:
            self.step.cancel()  # aborts the upstream connection
        elif self.relay is not None and self.relay.transport is not None:
            self.relay.transport.stopProducing()  # aborts the upstream connection

    def _done(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        # No reference cycle left behind (the relay holds this exchange): the call's objects are
        # freed by reference counting now, not by a run of the cyclic GC later.
        self.deadline = self.relay = None
        upstream = self.upstream
        duration = time.monotonic() - self.started
        upstream.metrics.finished(self.name, self.code, duration)
        upstream.functions.count_invocation(self.name)
        if upstream.invocations is not None:
            upstream.invocations.call(
                self.service,
                self.namespace,
                self.call_id,
                b"sync",
                self.request.method,
                self.rest,  # joined only when the line is written
                self.code,
                duration,
                1,
                self.error,
            )


class _Relay(Protocol):
    """Copies the function's response body to the client, with back-pressure both ways."""

    #: A TCP transport (ITCPTransport and IPushProducer); Twisted types it ITransport | None.
    transport: Any

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange
        self._request = exchange.request

    def connectionMade(self) -> None:
        # Pause the function when the client cannot keep up.
        self._request.registerProducer(_ProducerProxy(self.transport), True)

    def dataReceived(self, data: bytes) -> None:
        if not self._exchange.gone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._request.unregisterProducer()
        # isinstance, not Failure.check: that one builds the qualified names of the MRO.
        complete = reason is None or isinstance(reason.value, (ResponseDone, PotentialDataLoss))
        # (A body without a length that we cut at its deadline also ends in PotentialDataLoss.)
        complete = complete and not self._exchange.expired
        # (A body without a length that we cut at its deadline also ends in PotentialDataLoss.)
        complete = complete and not self._exchange.expired
        self._exchange.body_done(None if complete else reason)


class _Discard(Protocol):
    #: A TCP transport (ITCPTransport and IPushProducer); Twisted types it ITransport | None.
    transport: Any

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _describe(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, DNSLookupError):
        return "host name does not resolve"
    if isinstance(error, ConnectError):
        return f"cannot connect ({error.__class__.__name__})"
    if isinstance(error, ResponseFailed):
        reasons = ", ".join(r.getErrorMessage() or r.type.__name__ for r in error.reasons)
        return f"response failed ({reasons})"
    return str(error) or error.__class__.__name__


def _error(request: server.Request, code: int, message: str) -> bytes:
    """Set ``code`` and a one-line text ``message`` as the response; return the body."""
    return text(request, code, message)


def _send_error(request: server.Request, code: int, message: str) -> None:
    """:func:`_error`, written and finished (for a request whose client is still there)."""
    finish(request, text(request, code, message))
