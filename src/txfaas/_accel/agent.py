"""An ``Agent`` that does the per-origin work of Twisted's once per origin.

``Agent.request`` parses the whole URL (``URI.fromBytes``), asks the endpoint factory, computes
the Host header and copies the caller's ``Headers`` on every request.  :class:`OriginAgent` splits
the origin (``scheme://host[:port]``) off the URL and looks up the pool key, endpoint and Host value
made for it the first time; the rest of the URL is the request target as given (callers send no
fragment).  Host is added to ``headers`` in place (callers give fresh ones).  An idle connection
is taken from :class:`txfaas._accel.pool.RecentFirstPool` without a Deferred, and a request that
fails on it before any answer is sent once more on a new connection by Twisted's own rule.

Private names: ``twisted.web._newclient.Request``, ``Headers._rawHeaders`` and
``_RetryingHTTP11ClientProtocol._shouldRetry``.  :func:`probe` checks it writes what ``Agent``
writes; ``tests/unit/test_accel_agent.py`` compares the two on generated URLs and headers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web._newclient import Request
from twisted.web.client import URI, _RetryingHTTP11ClientProtocol
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
#: Twisted's rule for sending a request again on a new connection (idempotent methods, no body,
#: no answer yet, not cancelled), as its pool's retrying wrapper applies it.
_should_retry = _RetryingHTTP11ClientProtocol(None, None)._shouldRetry

Origin = tuple[tuple[bytes, bytes, int], IStreamClientEndpoint, bytes]


@implementer(IAgent)
class OriginAgent:
    """``Agent``'s request path over ``pool``, the origin's share of it done once per origin."""

    def __init__(self, pool: Any, endpoints: IAgentEndpointFactory, limit: int = 4096) -> None:
        self._pool = pool
        self._cached = getattr(pool, "cached", None)
        self._endpoints = endpoints
        self._limit = limit
        self._origins: dict[bytes, Origin] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        start = uri.find(b"//") + 2
        cut = len(uri)
        for mark in (b"/", b"?"):
            at = uri.find(mark, start)
            if 0 <= at < cut:
                cut = at
        origin = uri[:cut]
        path = uri[cut:] or b"/"
        if path[:1] == b"?":
            path = b"/" + path
        if path.find(b"?") == len(path) - 1:
            path = path[:-1]  # an empty query is no query (as ``URI.fromBytes`` reads it)
        try:
            key, endpoint, host = self._origins.get(origin) or self._origin(origin)
            if headers is None:
                headers = Headers()
            raw = headers._rawHeaders  # names in Twisted's Header-Case, whoever set them
            if b"Host" not in raw:
                raw[b"Host"] = [host]
            request = Request(method, path, headers, bodyProducer, persistent=self._pool.persistent)
        except Exception:
            return defer.fail()
        connection = self._cached(key) if self._cached is not None else None
        if connection is None:
            return self._pool.getConnection(key, endpoint).addCallback(_send, request)
        d = connection.request(request)
        if self._pool.retryAutomatically:
            d.addErrback(self._again, request, key, endpoint)
        return d

    def _again(self, failure: Failure, request: Request, key: Any, endpoint: Any) -> Any:
        if _should_retry(request.method, failure.value, request.bodyProducer):
            return self._pool.getConnection(key, endpoint).addCallback(_send, request)
        return failure

    def _origin(self, origin: bytes) -> Origin:
        parsed = URI.fromBytes(origin)
        if not parsed.host:
            raise ValueError(f"no host in {origin!r}")
        endpoint = self._endpoints.endpointForURI(parsed)
        host = parsed.host
        if b":" in host:  # an IPv6 literal
            host = b"[" + host + b"]"
        if _DEFAULT_PORTS.get(parsed.scheme) != parsed.port:
            host += b":%d" % parsed.port
        if len(self._origins) >= self._limit:
            self._origins.clear()
        target = self._origins[origin] = ((parsed.scheme, parsed.host, parsed.port), endpoint, host)
        return target


def _send(protocol: Any, request: Request) -> defer.Deferred[IResponse]:
    return protocol.request(request)


def written(agent: IAgent, method: bytes, url: bytes, headers: Headers) -> tuple[Any, bytes]:
    """The pool key ``agent`` asked for and the request it wrote (over an in-memory connection)."""
    from twisted.internet.testing import StringTransport
    from twisted.web._newclient import HTTP11ClientProtocol

    class Pool:
        persistent = True
        retryAutomatically = False

        def __init__(self) -> None:
            self.keys: list[Any] = []
            self.transport = StringTransport()

        def getConnection(self, key: Any, endpoint: Any) -> defer.Deferred[Any]:
            self.keys.append(key)
            protocol = HTTP11ClientProtocol()
            protocol.makeConnection(self.transport)
            return defer.succeed(protocol)

    pool = Pool()
    agent._pool = pool  # type: ignore[attr-defined]
    agent.request(method, url, headers).addErrback(lambda _: None)
    return (pool.keys, pool.transport.value())


def probe() -> bool:
    """True when an :class:`OriginAgent` writes what Twisted's ``Agent`` writes for a few URLs."""
    from twisted.internet.task import Clock
    from twisted.web.client import Agent

    class Endpoints:
        def endpointForURI(self, uri: URI) -> Any:
            return None

    try:
        for url in (b"http://fn.local:8080/a/b?c=d", b"https://[fd00::1]/x", b"http://10.0.0.1"):
            endpoints: Any = Endpoints()
            ours = written(OriginAgent(None, endpoints), b"POST", url, Headers({b"x-a": [b"1"]}))
            stock = Agent.usingEndpointFactory(Clock(), Endpoints())
            if ours != written(stock, b"POST", url, Headers({b"x-a": [b"1"]})) or not ours[1]:
                return False
        return _should_retry(b"GET", Exception(), None) is False
    except Exception:
        return False
