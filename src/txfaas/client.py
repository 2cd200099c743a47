"""The HTTP client parts shared by the gateway's proxy and the worker: an ``Agent`` that does the
per-origin work once (:class:`PoolAgent`) and endpoints made once per function host
(:class:`CachingEndpointFactory`)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web._newclient import Request as _ClientRequest
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, _RetryingHTTP11ClientProtocol
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
#: Twisted's own rule for sending a request again on a new connection (idempotent methods, no
#: body, no answer yet, not cancelled), as its pool's retrying wrapper applies it.
_should_retry = _RetryingHTTP11ClientProtocol(None, None)._shouldRetry
#: Longest wait for a new connection to a function (Twisted's endpoints default to 30 s too).
CONNECT_TIMEOUT = 30


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """TCP (http) or TLS (https) endpoints, made once per function host and reused.

    ``Agent`` otherwise builds a ``HostnameEndpoint`` for every request, IDNA-encoding
    the host each time (~10% of a proxied call).  The endpoints hold no connection
    state: the pool still decides which connection a request uses.
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
                # One address: a plain TCP connect, without HostnameEndpoint's resolution and
                # staggered attempts (a third of a new connection's cost, seen in a burst of calls).
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


@implementer(IAgent)
class PoolAgent:
    """An ``Agent`` for the proxy: Twisted's request path over an ``HTTPConnectionPool``, with
    the per-request work that depends only on the function's origin done once per origin.

    ``Agent.request`` parses the whole URL (``URI.fromBytes``), asks the endpoint factory
    and computes the Host header for every request, and copies the caller's ``Headers`` to
    add Host.  Here the origin (``scheme://host[:port]``) is split off the URL and looked up
    in a cache holding the pool key, the endpoint and the Host value; the rest of the URL is
    the request target as given.  Host is added to ``headers`` in place: the proxy builds a
    fresh ``Headers`` for each call.  Method and target are still checked when the request is
    written (``_ensureValidMethod`` / ``_ensureValidURI``).

    An idle connection is taken from a :class:`txfaas.http.pool.RecentFirstPool` directly
    (``cached``), without the Deferred and the retrying wrapper of ``getConnection``; the
    retry those give (an idempotent request failed on a connection the function had closed)
    is :meth:`_again`.
    """

    def __init__(self, pool: Any, endpoints: IAgentEndpointFactory, limit: int = 4096) -> None:
        self._pool = pool
        # RecentFirstPool hands out an idle connection without a Deferred (see above).
        self._cached = getattr(pool, "cached", None)
        self._endpoints = endpoints
        self._limit = limit
        self._origins: dict[bytes, tuple[tuple[bytes, bytes, int], IStreamClientEndpoint, bytes]] = {}

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
        try:
            target = self._origins.get(origin) or self._origin(origin)
            key, endpoint, host = target
            if headers is None:
                headers = Headers()
            raw = headers._rawHeaders  # names in Twisted's Header-Case, whoever set them
            if b"Host" not in raw:
                raw[b"Host"] = [host]
            request = _ClientRequest(method, path, headers, bodyProducer, persistent=self._pool.persistent)
        except Exception:
            return defer.fail()
        connection = self._cached(key) if self._cached is not None else None
        if connection is None:
            return self._pool.getConnection(key, endpoint).addCallback(_send, request)
        d = connection.request(request)
        if self._pool.retryAutomatically:
            d.addErrback(self._again, request, key, endpoint)
        return d

    def _again(self, failure: Failure, request: _ClientRequest, key: Any, endpoint: Any) -> Any:
        """A request that failed on a kept connection before any answer came (the function closed
        it while idle), sent once more on a new one, as Twisted's pool does: only idempotent
        methods without a body, and never after a cancel."""
        if _should_retry(request.method, failure.value, request.bodyProducer):
            return self._pool.getConnection(key, endpoint).addCallback(_send, request)
        return failure

    def _origin(self, origin: bytes) -> tuple[tuple[bytes, bytes, int], IStreamClientEndpoint, bytes]:
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


def _send(protocol: Any, request: _ClientRequest) -> defer.Deferred[IResponse]:
    return protocol.request(request)
