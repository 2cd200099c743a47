"""txfaas's one HTTP client: stock ``Agent``s over pooled connections, and one way to read an answer.

The gateway's proxy sends through :func:`function_agent` and streams the answer back; the worker's
function calls and callbacks (:func:`txfaas.http.ssrf.callback_agent`) send with :func:`fetch`,
which reads the whole answer within a limit.  Both use ``twisted.web.client.Agent`` directly, not
treq: treq's ``HTTPClient.request`` always adds ``Accept-Encoding: gzip`` and gunzips the answer, and
re-encodes each URL, where a proxy must pass the function's bytes on as sent.  Cancelling a request
aborts its connection, whether the response head has arrived or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, ResponseDone, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from txfaas.http.ssrf import literal_first

if TYPE_CHECKING:
    from txfaas.worker.budget import ByteBudget

#: Longest wait for a new connection (Twisted's endpoints default to 30 s too).
CONNECT_TIMEOUT = 30

Pairs = list[tuple[bytes, bytes]]


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        if self.body:
            consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """TCP (http) or TLS (https) endpoints, made once per function host and reused.

    ``Agent`` otherwise builds a ``HostnameEndpoint`` for every request, IDNA-encoding the host
    each time.  The endpoints hold no connection state: the pool still decides which connection a
    request uses.  An IP address gets a plain TCP endpoint (no resolution, no staggered attempts).
    """

    def __init__(self, reactor: Any, policy: Any = None, limit: int = 4096) -> None:
        self._reactor = reactor
        self._policy = policy or BrowserLikePolicyForHTTPS()
        self._limit = limit
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            host = uri.host.decode("ascii")
            if isIPAddress(host):
                endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
            elif isIPv6Address(host):
                endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
            else:
                endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
            if len(self._endpoints) >= self._limit:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint


def function_agent(reactor: Any, pool: Any, tls: Any = None) -> IAgent:
    """The stock ``Agent`` for functions: over ``pool``, endpoints made once per function host,
    IP addresses connected without the resolver's thread pool.  With accelerations on, an
    :class:`txfaas._accel.agent.OriginAgent` does the same."""
    from txfaas import _accel

    endpoints = CachingEndpointFactory(literal_first(reactor), tls)
    if _accel.enabled():
        from txfaas._accel import agent

        if agent.probe():
            return agent.OriginAgent(pool, endpoints)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)


@attrs.frozen
class Answer:
    """A whole answer, as :func:`fetch` read it."""

    code: int
    headers: Pairs
    body: bytes
    #: Bytes of ``budget`` the body holds: the caller's to release.
    reserved: int = 0


def make_headers(pairs: Pairs) -> Headers:
    """``Headers`` of ``pairs`` (``InvalidHeaderName`` for a name that is not a token; a CR or
    LF in a value becomes a space)."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def header_pairs(headers: Headers) -> Pairs:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class BodyTooLarge(Exception):
    """The answer's body went over the reader's limit (the connection was aborted)."""


class _BodyReader(Protocol):
    """Collects a body within ``limit`` bytes (and, with ``budget``, within its room)."""

    #: A TCP transport (ITCPTransport and IPushProducer); Twisted types it ITransport | None.
    transport: Any

    def __init__(
        self,
        done: defer.Deferred[bytes],
        limit: int | None = None,
        keep_head: bool = False,
        budget: ByteBudget | None = None,
    ) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._keep_head = keep_head
        # With a budget, every byte kept is reserved first; past it, reading pauses.
        self._budget = budget
        self.reserved = 0
        self._waiting: defer.Deferred[None] | None = None
        self._backlog: list[bytes] = []  # arrived while a reservation was waiting
        self._ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._budget is not None and not (self._limit is not None and self._size > self._limit):
            if self._waiting is not None:
                self._backlog.append(data)
                return
            if not self._budget.try_reserve(len(data)):
                self._backlog.append(data)
                self.transport.pauseProducing()
                self._wait()
                return
            self.reserved += len(data)
        if self._limit is not None and self._size > self._limit:
            # Stop reading: a peer may not make us hold an unbounded body in memory.
            if self._keep_head:
                self._parts.append(data[: max(0, len(data) - (self._size - self._limit))])
                self._done.callback(b"".join(self._parts))
            else:
                self._done.errback(BodyTooLarge(f"response body over {self._limit} bytes"))
            _abort(self.transport)
            return
        self._parts.append(data)

    def _wait(self) -> None:
        assert self._budget is not None
        n = sum(len(b) for b in self._backlog)
        self._waiting = self._budget.reserve(n)
        self._waiting.addCallbacks(self._granted, lambda f: None, callbackArgs=(n,))

    def _granted(self, _: object, n: int) -> None:
        self._waiting = None
        self.reserved += n
        taken = 0
        while taken < n:
            chunk = self._backlog.pop(0)
            self._parts.append(chunk)
            taken += len(chunk)
        if self._done.called:
            return
        if self._backlog:
            self._wait()
        elif self._ended is not None:
            self._end(self._ended)
        else:
            self.transport.resumeProducing()

    def give_up(self) -> None:
        """Failed or cancelled: stop waiting and give back what was reserved."""
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if self._budget is not None:
            self._budget.release(self.reserved)
        self.reserved = 0
        self._parts = []
        self._backlog = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if self._waiting is not None:
            self._ended = reason  # the end is read once the bytes before it are reserved
            return
        self._end(reason)

    def _end(self, reason: Failure) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: no length was given and the connection ended: that is the end.
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def _abort(transport: Any) -> None:
    """Stop a body arriving: its connection is closed (and never reused)."""
    if transport is not None:
        transport.stopProducing()


def read_body(
    response: IResponse, limit: int | None = None, keep_head: bool = False
) -> defer.Deferred[bytes]:
    """The whole body; cancelling closes the connection.

    Over ``limit`` bytes the connection is closed and the Deferred fails with
    :class:`BodyTooLarge` -- or, with ``keep_head``, fires with the first ``limit`` bytes.
    """
    done: defer.Deferred[bytes] = defer.Deferred(lambda _: _abort(reader.transport))
    reader = _BodyReader(done, limit, keep_head)
    response.deliverBody(reader)
    return done


async def _fetch(
    agent: IAgent,
    method: bytes,
    url: bytes,
    headers: Pairs,
    body: bytes | None,
    limit: int | None,
    keep_head: bool,
    budget: ByteBudget | None = None,
) -> Answer:
    producer = None if body is None else BytesProducer(body)
    response = await agent.request(method, url, make_headers(headers), producer)
    if budget is None:
        data = await read_body(response, limit, keep_head)
        return Answer(response.code, header_pairs(response.headers), data)
    length = response.length
    if isinstance(length, int) and limit is not None and length > limit:
        _abort_response(response)
        raise BodyTooLarge(f"response body of {length} bytes is over {limit}")
    reserved = 0
    if isinstance(length, int) and length > 0:
        # The whole answer at once, before a byte is read (the transport stays paused until
        # the body is delivered): answers of known length never hold part of the budget.
        wait = budget.reserve(length)
        try:
            await wait
        except BaseException:
            _abort_response(response)
            raise
        reserved = length
    done: defer.Deferred[bytes] = defer.Deferred(lambda _: _abort(reader.transport))
    reader = _BodyReader(done, limit, keep_head, None if reserved else budget)
    response.deliverBody(reader)
    try:
        data = await done
    except BaseException:
        reader.give_up()
        budget.release(reserved)
        raise
    # A body shorter than its Content-Length (the connection ended early) fails above.
    return Answer(response.code, header_pairs(response.headers), data, reserved + reader.reserved)


def _abort_response(response: IResponse) -> None:
    """Abort the connection of a response whose body will not be read."""

    class _Discard(Protocol):
        def connectionMade(self) -> None:
            _abort(self.transport)

    response.deliverBody(_Discard())


def fetch(
    agent: IAgent,
    method: bytes,
    url: bytes,
    headers: Pairs,
    body: bytes | None,
    limit: int | None = None,
    keep_head: bool = False,
    budget: ByteBudget | None = None,
) -> defer.Deferred[Answer]:
    """Send one request and read the whole answer.

    ``body=None`` sends no body (and no ``Content-Length``); ``limit``/``keep_head``
    bound the answer's body (see :func:`read_body`).  With ``budget``, the body's bytes are
    reserved in it before they are kept (reading waits for room; see :class:`ByteBudget`) and
    the result's ``reserved`` must be released by the caller.  Cancelling the
    Deferred aborts the connection and always fails it with ``CancelledError``
    (the agent itself would report ``ResponseNeverReceived``), so ``addTimeout``
    turns it into ``TimeoutError`` and callers can tell cancellation from a
    broken function.
    """
    inner = defer.Deferred.fromCoroutine(_fetch(agent, method, url, headers, body, limit, keep_head, budget))
    cancelled = False

    def cancel(_: defer.Deferred[Answer]) -> None:
        nonlocal cancelled
        cancelled = True
        inner.cancel()

    outer: defer.Deferred[Answer] = defer.Deferred(cancel)

    def relay(result: Any) -> None:
        if cancelled:
            if budget is not None and isinstance(result, Answer):
                budget.release(result.reserved)  # finished as it was cancelled: nobody takes it
            return None  # outer fails with CancelledError; whatever the abort caused is moot
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)
        return None

    inner.addBoth(relay)
    return outer


def describe(error: BaseException) -> str:
    """One line saying why a request failed (``ResponseFailed`` hides its reasons in a list)."""
    if isinstance(error, ResponseFailed):
        reasons: list[Any] = error.reasons
        return "; ".join(describe(r.value) for r in reasons) or "response failed"
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name
