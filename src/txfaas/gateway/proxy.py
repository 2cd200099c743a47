"""The synchronous hot path: ``/function/{name}[/{path}]`` proxied to the function with treq.

A plain twisted.web resource (Klein's routing is not on this path).  treq is
the client, used so that it adds nothing a proxy must not do:

- no cookie jar that keeps state between callers (a jar that refuses every cookie);
- no redirect following (``allow_redirects=False``);
- no content decoding: treq always wraps its agent in a ``ContentDecoderAgent``
  (it asks for gzip and decodes); :class:`TransparentAgent` sits under it,
  removes the ``Accept-Encoding`` it added and hides ``Content-Encoding`` from
  it, so bytes pass through untouched and the client's own ``Accept-Encoding``
  reaches the function;
- the body is streamed both ways: the request body from Twisted's spool
  (memory below 100 kB, a temporary file above), the response body chunk by
  chunk with back-pressure to the function.
"""

from __future__ import annotations

import re
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from io import BytesIO
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web._newclient import ResponseDone, ResponseFailed
from twisted.web.client import FileBodyProducer
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from txfaas import headers as hdr
from txfaas.gateway.functions import FunctionCache
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.model import MAX_NAME
from txfaas.store import StoreUnavailable

_HIDDEN_ENCODING = b"X-Txfaas-Content-Encoding"
_REQUEST_DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-call-id",
        b"x-start-time",
    }
)
# Content-Encoding here is always treq's ContentDecoderAgent's (the function's real one
# travels as _HIDDEN_ENCODING past it), so it is dropped and the hidden one restored.
_RESPONSE_DROP = frozenset({b"x-call-id", b"x-duration-seconds", b"content-encoding"})
BAD_CALL_ID = "X-Call-Id: invalid (use 1-128 characters of A-Z a-z 0-9 . _ : @ + = -)"
_NAME_BYTES = re.compile(rb"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def refusing_cookie_jar() -> CookieJar:
    """A jar that never stores a cookie: a proxy must not carry one caller's cookies to the next."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class TransparentAgent:
    """Sits under treq's ``ContentDecoderAgent`` so that nothing is decoded or re-encoded."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> defer.Deferred:
        if headers is not None:
            values = headers.getRawHeaders(b"accept-encoding")
            if values:
                # ContentDecoderAgent appended exactly one value: drop it, keep the client's.
                del values[-1]
                if values:
                    headers.setRawHeaders(b"accept-encoding", values)
                else:
                    headers.removeHeader(b"accept-encoding")
        d = self._agent.request(method, uri, headers, bodyProducer)
        d.addCallback(self._hide_encoding)
        return d

    @staticmethod
    def _hide_encoding(response: Any) -> Any:
        encoding = response.headers.getRawHeaders(b"content-encoding")
        if encoding is not None:
            response.headers.removeHeader(b"content-encoding")
            response.headers.setRawHeaders(_HIDDEN_ENCODING, encoding)
        return response


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written in one go (no Cooperator round trips)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(request: server.Request, cooperator: Any) -> IBodyProducer | None:
    """The request's body as a producer: ``None`` when the client sent no body at all."""
    headers = request.requestHeaders
    if not headers.hasHeader(b"content-length") and not headers.hasHeader(b"transfer-encoding"):
        return None
    content = request.content
    if isinstance(content, BytesIO):
        return BytesProducer(content.getvalue())
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    producer = FileBodyProducer(content, cooperator=cooperator)
    producer.length = size
    return producer


class _Relay(Protocol):
    """Copies the function's response body to the client, with back-pressure both ways.

    ``done`` fires when the body is complete; cancelling it (the client went away)
    stops the function's response, which aborts that upstream connection.
    """

    def __init__(self, request: server.Request) -> None:
        self._request = request
        self.done: defer.Deferred[None] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        # Pause the function when the client cannot keep up.
        self._request.registerProducer(_ProducerProxy(self.transport), True)

    def dataReceived(self, data: bytes) -> None:
        if not self._request._disconnected:
            self._request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._request.unregisterProducer()
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _cancel(self, _d: defer.Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


def _copy_response_headers(incoming: Headers, out: Headers) -> None:
    """The function's end-to-end headers replace ours (its Date, Server, Content-Type...)."""
    pairs = [(k, v) for k, vs in incoming.getAllRawHeaders() for v in vs]
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in hdr.end_to_end(pairs, _RESPONSE_DROP):
        if name == _HIDDEN_ENCODING:
            name = b"Content-Encoding"
        grouped.setdefault(name, []).append(value)
    for name, values in grouped.items():
        out.setRawHeaders(name, values)


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


class FunctionProxy(resource.Resource):
    """``/function/{name}[/{path}]``: every method is proxied to the function."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        clock: Any,
        client: Any,
        functions: FunctionCache,
        settings: ProxySettings,
        metrics: GatewayMetrics,
        cooperator: Any = None,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._client = client
        self._functions = functions
        self._settings = settings
        self._metrics = metrics
        # File-spooled bodies are streamed by a Cooperator on our own clock.
        self._cooperator = cooperator or Cooperator(scheduler=lambda f: clock.callLater(0, f))

    def render(self, request: server.Request) -> Any:
        if not request.postpath or not request.postpath[0]:
            return _error(request, 404, "no function named in the path: use /function/{name}")
        name_b = request.postpath[0]
        if len(name_b) > MAX_NAME or not _NAME_BYTES.fullmatch(name_b):
            return _error(request, 400, f"invalid function name {name_b.decode('latin-1')!r}")
        rest = request.postpath[1:]
        try:
            hdr.check_subpath(rest)
        except hdr.BadPath as e:
            return _error(request, 400, str(e))
        given = request.requestHeaders.getRawHeaders(hdr.CALL_ID)
        if given:
            if not hdr.valid_call_id(given[0]):
                return _error(
                    request, 400, "X-Call-Id: invalid (1-128 characters of A-Z a-z 0-9 . _ : @ + = -)"
                )
            call_id = given[0]
        else:
            call_id = hdr.new_call_id().encode("ascii")
        request.setHeader(hdr.CALL_ID, call_id)
        request.defaultContentType = None  # the function's Content-Type, or none
        d = defer.Deferred.fromCoroutine(self._proxy(request, name_b.decode("ascii"), rest, call_id))
        # A client that goes away cancels the upstream request (and its connection).
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._unexpected, request, call_id)
        return server.NOT_DONE_YET

    async def _proxy(self, request: server.Request, name: str, rest: list[bytes], call_id: bytes) -> None:
        started = time.monotonic()
        try:
            spec = await self._functions.get(name)
        except StoreUnavailable as e:
            self.log.warn("function registry unavailable for {function}: {error}", function=name, error=e)
            _error(request, 503, f"function registry unavailable: {e}", finish=True)
            return
        except defer.CancelledError:
            return
        if spec is None:
            _error(request, 404, f"function {name!r} not found", finish=True)
            return
        metrics = self._metrics
        metrics.started(name)
        timeout = min(spec.timeout or self._settings.upstream_timeout, self._settings.upstream_timeout)
        base = spec.base_url(self._settings.function_url_template)
        url = base.encode() + b"/" + b"/".join(rest)
        query = request.uri.partition(b"?")
        if query[1]:
            url += b"?" + query[2]
        start_ns = str(time.time_ns()).encode()
        code = 0
        # One deadline for the whole exchange: headers and body.  When it passes, the
        # step in progress is cancelled, which aborts the upstream connection.
        step: list[defer.Deferred] = []
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            for d in step:
                d.cancel()

        deadline = self._clock.callLater(timeout, expire)
        try:
            step[:] = [self._request(request, url, call_id, start_ns)]
            response = await step[0]
            code = response.code
            request.setResponseCode(code, response.phrase)
            _copy_response_headers(response.headers, request.responseHeaders)
            out = request.responseHeaders
            out.setRawHeaders(hdr.CALL_ID, [call_id])
            out.setRawHeaders(hdr.START_TIME, [start_ns])
            out.setRawHeaders(hdr.DURATION, [b"%.6f" % (time.monotonic() - started)])
            relay = _Relay(request)
            response.deliverBody(relay)
            step[:] = [relay.done]
            try:
                await relay.done
            except Exception as e:
                if not expired and isinstance(e, defer.CancelledError):
                    raise
                # Headers are out: all we can do is cut the connection so the client sees a short body.
                self.log.warn(
                    "[{call_id}] function {function} failed mid-response: {error}",
                    call_id=call_id.decode(),
                    function=name,
                    error=_describe(e),
                )
                request.channel.transport.abortConnection() if request.channel else None
                return
            request.finish()
        except Exception as e:
            if expired:
                code = 504
                self.log.info(
                    "[{call_id}] function {function} timed out after {timeout}s",
                    call_id=call_id.decode(),
                    function=name,
                    timeout=timeout,
                )
                _error(request, 504, f"function {name!r} did not answer within {timeout:g}s", finish=True)
            elif isinstance(e, defer.CancelledError) or request._disconnected:
                code = 499  # the client went away; nothing to answer
            else:
                code = 502
                self.log.info(
                    "[{call_id}] function {function} unreachable: {error}",
                    call_id=call_id.decode(),
                    function=name,
                    error=_describe(e),
                )
                _error(request, 502, f"function {name!r} unreachable: {_describe(e)}", finish=True)
        finally:
            if deadline.active():
                deadline.cancel()
            metrics.finished(name, code, time.monotonic() - started)
            self._functions.count_invocation(name)

    def _request(
        self, request: server.Request, url: bytes, call_id: bytes, start_ns: bytes
    ) -> defer.Deferred:
        incoming = request.requestHeaders
        pairs = [(k, v) for k, vs in incoming.getAllRawHeaders() for v in vs]
        out = Headers()
        for k, v in hdr.end_to_end(pairs, _REQUEST_DROP):
            out.addRawHeader(k, v)
        client_ip = request.getClientAddress()
        host = getattr(client_ip, "host", "") or ""
        out.setRawHeaders(
            hdr.FORWARDED_FOR,
            [hdr.append_forwarded_for(incoming.getRawHeaders(hdr.FORWARDED_FOR, []), host.encode())],
        )
        host_header = incoming.getRawHeaders(b"host")
        if host_header:
            out.setRawHeaders(hdr.FORWARDED_HOST, host_header[:1])
        out.setRawHeaders(hdr.CALL_ID, [call_id])
        out.setRawHeaders(hdr.START_TIME, [start_ns])
        d = self._client.request(
            request.method.decode("ascii"),
            url,
            headers=out,
            data=body_producer(request, self._cooperator),
            allow_redirects=False,
            unbuffered=True,
        )
        return d

    def _unexpected(self, failure: Failure, request: server.Request, call_id: bytes) -> None:
        self.log.failure("[{call_id}] proxy failed", failure, call_id=call_id.decode())
        if not request.finished and not request._disconnected:
            if request.startedWriting:
                request.channel.transport.abortConnection()
            else:
                _error(request, 500, "internal error", finish=True)


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


def _error(request: server.Request, code: int, message: str, finish: bool = False) -> bytes:
    """A one-line text error; ``finish`` for asynchronous callers (else return the body)."""
    body = message.encode("utf-8", "replace") + b"\n"
    if request.finished or request._disconnected:
        return b""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if finish:
        request.write(body)
        request.finish()
        return b""
    return body
