"""The synchronous path, /function/{name}: what reaches the function and what comes back."""

from __future__ import annotations

import gzip

import pytest
import treq
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from tests.fakes import RefusingAgent
from tests.unit.gateway_fixtures import GatewayTestCase, set_up


@pytest.fixture
def gateway() -> GatewayTestCase:
    return set_up(GatewayTestCase())


class _Forwarding(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")


@pytest.fixture
def forwarding_gateway() -> _Forwarding:
    return set_up(_Forwarding())


def test_every_method_reaches_the_function_with_subpath_and_query_unchanged(
    forwarding_gateway: _Forwarding,
) -> None:
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]:
        response, _ = forwarding_gateway.call(method, "/function/echo/a/b%20c?x=1&y=%2F")
        assert response.code == 200, method
        seen = forwarding_gateway.function.seen[-1]
        assert seen["method"] == method.encode()
        assert seen["uri"] == b"/a/b%20c?x=1&y=%2F"


def test_trace_and_connect_are_405_and_never_reach_a_function(forwarding_gateway: _Forwarding) -> None:
    for method, path in [
        ("TRACE", "/function/echo"),
        ("CONNECT", "/function/echo/x"),
        ("TRACE", "/%66unction/echo"),
        ("TRACE", "/system/functions"),
        ("CONNECT", "/healthz"),
    ]:
        response, body = forwarding_gateway.call(method, path, headers={"Authorization": ["Basic c2VjcmV0"]})
        assert response.code == 405, (method, path)
        assert response.headers.getRawHeaders("Allow") == ["GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"]
        assert method.encode() in body
        assert b"c2VjcmV0" not in body
    assert forwarding_gateway.function.seen == []


def test_connect_to_an_authority_is_405(forwarding_gateway: _Forwarding) -> None:
    channel = forwarding_gateway.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"CONNECT echo.fn:8080 HTTP/1.1\r\nHost: echo.fn:8080\r\n\r\n")
    forwarding_gateway.flush()
    assert transport.value().startswith(b"HTTP/1.1 405 "), transport.value()[:60]
    assert forwarding_gateway.function.seen == []


def test_bare_function_path_is_root_for_the_function(forwarding_gateway: _Forwarding) -> None:
    forwarding_gateway.call("GET", "/function/echo")
    assert forwarding_gateway.function.seen[-1]["uri"] == b"/"


def test_request_body_is_forwarded_byte_for_byte(forwarding_gateway: _Forwarding) -> None:
    body = bytes(range(256)) * 1000  # over 100 kB: spooled to a file by twisted.web
    forwarding_gateway.call("POST", "/function/echo", data=body)
    assert forwarding_gateway.function.seen[-1]["body"] == body
    forwarding_gateway.call("POST", "/function/echo", data=b"small")
    assert forwarding_gateway.function.seen[-1]["body"] == b"small"


def test_hop_by_hop_headers_and_those_named_in_connection_are_dropped(
    forwarding_gateway: _Forwarding,
) -> None:
    headers = Headers(
        {
            "Connection": ["keep-alive, X-Secret-Hop"],
            "X-Secret-Hop": ["1"],
            "Keep-Alive": ["timeout=5"],
            "TE": ["trailers"],
            "Upgrade": ["websocket"],
            "Proxy-Authorization": ["Basic eA=="],
            "X-Keep-Me": ["yes", "twice"],
        }
    )
    forwarding_gateway.call("GET", "/function/echo", headers=headers)
    names = {k for k, _ in forwarding_gateway.function.seen[-1]["headers"]}
    for dropped in [b"x-secret-hop", b"keep-alive", b"te", b"upgrade", b"proxy-authorization"]:
        assert dropped not in names
    assert forwarding_gateway.function.header(b"x-keep-me") == [b"yes", b"twice"]


def test_a_connection_token_that_is_no_header_name_is_ignored_not_an_error(
    forwarding_gateway: _Forwarding,
) -> None:
    headers = Headers({"Connection": ["bad token, x-SECRET-hop, ()"], "X-Secret-Hop": ["1"], "X-A": ["a"]})
    response, _ = forwarding_gateway.call("GET", "/function/echo", headers=headers)
    assert response.code == 200
    names = {k for k, _ in forwarding_gateway.function.seen[-1]["headers"]}
    assert b"x-secret-hop" not in names
    assert forwarding_gateway.function.header(b"x-a") == [b"a"]


def test_forwarded_for_is_appended_not_replaced_and_forwarded_host_set(
    forwarding_gateway: _Forwarding,
) -> None:
    forwarding_gateway.call(
        "GET",
        "/function/echo",
        headers={"X-Forwarded-For": ["203.0.113.9"], "Host": ["gw.example"]},
    )
    xff = forwarding_gateway.function.header(b"x-forwarded-for")
    assert len(xff) == 1
    assert xff[0].startswith(b"203.0.113.9, "), xff
    assert forwarding_gateway.function.header(b"x-forwarded-host") == [b"gw.example"]


def test_call_id_generated_forwarded_and_echoed(forwarding_gateway: _Forwarding) -> None:
    response, _ = forwarding_gateway.call("GET", "/function/echo")
    sent = forwarding_gateway.function.header(b"x-call-id")
    assert len(sent) == 1
    assert response.headers.getRawHeaders(b"x-call-id") == sent
    assert len(sent[0]) == 36


def test_client_call_id_is_forwarded_and_echoed(forwarding_gateway: _Forwarding) -> None:
    response, _ = forwarding_gateway.call("GET", "/function/echo", headers={"X-Call-Id": ["my-id-1"]})
    assert forwarding_gateway.function.header(b"x-call-id") == [b"my-id-1"]
    assert response.headers.getRawHeaders(b"x-call-id") == [b"my-id-1"]


def test_invalid_client_call_id_is_refused(forwarding_gateway: _Forwarding) -> None:
    response, body = forwarding_gateway.call("GET", "/function/echo", headers={"X-Call-Id": ["bad id"]})
    assert response.code == 400
    assert b"X-Call-Id" in body
    assert forwarding_gateway.function.seen == []


def test_start_time_sent_to_function_and_returned(forwarding_gateway: _Forwarding) -> None:
    response, _ = forwarding_gateway.call("GET", "/function/echo")
    sent = forwarding_gateway.function.header(b"x-start-time")
    assert len(sent) == 1
    assert sent[0].isdigit()
    assert response.headers.getRawHeaders(b"x-start-time") == sent
    assert response.headers.getRawHeaders(b"x-duration-seconds") is not None


class _Response(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")


@pytest.fixture
def response_gateway() -> _Response:
    return set_up(_Response())


def test_status_headers_and_body_come_back_unchanged(response_gateway: _Response) -> None:
    response_gateway.function.answer = (
        418,
        [(b"X-Fn", b"1"), (b"Content-Type", b"application/x-thing"), (b"Set-Cookie", b"a=b")],
        b"teapot",
    )
    response, body = response_gateway.call("POST", "/function/echo", data=b"x")
    assert response.code == 418
    assert body == b"teapot"
    assert response.headers.getRawHeaders(b"x-fn") == [b"1"]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/x-thing"]
    assert response.headers.getRawHeaders(b"set-cookie") == [b"a=b"]


def test_the_functions_content_length_comes_back_and_the_body_is_not_chunked(
    response_gateway: _Response,
) -> None:
    response_gateway.function.answer = (200, [], b"teapot")  # twisted.web gives it a Content-Length
    response, body = response_gateway.call("GET", "/function/echo")
    assert (response.length, body) == (6, b"teapot")
    response, body = response_gateway.call("HEAD", "/function/echo")
    assert (response.code, body) == (200, b"")


def test_redirects_are_not_followed(response_gateway: _Response) -> None:
    response_gateway.function.answer = (302, [(b"Location", b"http://elsewhere/")], b"")
    response, _ = response_gateway.call("GET", "/function/echo")
    assert response.code == 302
    assert response.headers.getRawHeaders(b"location") == [b"http://elsewhere/"]
    assert len(response_gateway.function.seen) == 1


def test_compressed_body_passes_through_undecoded(response_gateway: _Response) -> None:
    packed = gzip.compress(b"a" * 1000)
    response_gateway.function.answer = (200, [(b"Content-Encoding", b"gzip")], packed)
    response, body = response_gateway.call("GET", "/function/echo", headers={"Accept-Encoding": ["gzip, br"]})
    assert body == packed
    assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    # The client's Accept-Encoding reached the function, and nothing was added to it.
    assert response_gateway.function.header(b"accept-encoding") == [b"gzip, br"]


def test_no_accept_encoding_is_invented_and_no_empty_content_encoding_returned(
    response_gateway: _Response,
) -> None:
    response, _ = response_gateway.call("GET", "/function/echo")
    assert response_gateway.function.header(b"accept-encoding") == []
    assert response.headers.getRawHeaders(b"content-encoding") is None


def test_function_cookies_are_not_replayed_to_the_next_caller(response_gateway: _Response) -> None:
    response_gateway.function.answer = (200, [(b"Set-Cookie", b"session=alice; Path=/")], b"")
    response_gateway.call("GET", "/function/echo")
    response_gateway.call("GET", "/function/echo")
    assert response_gateway.function.header(b"cookie") == []


def test_no_default_content_type_is_added(response_gateway: _Response) -> None:
    response_gateway.function.answer = (204, [], b"")
    response, _ = response_gateway.call("GET", "/function/echo")
    assert response.headers.getRawHeaders(b"content-type") is None


def test_unknown_function_is_404_naming_it(gateway: GatewayTestCase) -> None:
    response, body = gateway.call("GET", "/function/nope")
    assert response.code == 404
    assert b"'nope'" in body


def test_invalid_name_is_400(gateway: GatewayTestCase) -> None:
    for path in ["/function/Bad", "/function/a_b", "/function/-a", "/function/" + "a" * 64]:
        response, body = gateway.call("GET", path)
        assert response.code == 400, path
        assert b"invalid function name" in body


def test_dangerous_subpath_segments_are_400(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    for path in [
        "/function/echo/%2e%2e/x",
        "/function/echo/a%2Fb",
        "/function/echo/a%5Cb",
        "/function/echo/%00",
    ]:
        response, _ = gateway.call("GET", path)
        assert response.code == 400, path
    assert gateway.function.seen == []


def test_registry_unavailable_is_503_not_404(gateway: GatewayTestCase) -> None:
    gateway.store.available = False
    response, body = gateway.call("GET", "/function/echo")
    assert response.code == 503
    assert b"registry unavailable" in body


def test_timeout_is_504_and_aborts_the_upstream_request(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.function.hang = True
    d = gateway.start("GET", "/function/echo")
    gateway.assertNoResult(d)
    gateway.clock.advance(gateway.upstream_timeout + 0.1)
    gateway.flush()
    response = gateway.successResultOf(d)
    assert response.code == 504
    body = gateway.successResultOf(treq.content(response))
    assert b"did not answer within 10s" in body
    assert gateway.function.lost == 1


def test_function_timeout_from_its_record_is_used_when_shorter(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo", annotations={"txfaas.timeout": "2s"})
    gateway.function.hang = True
    d = gateway.start("GET", "/function/echo")
    gateway.clock.advance(2.1)
    gateway.flush()
    assert gateway.successResultOf(d).code == 504


def test_client_disconnect_cancels_the_upstream_request(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.function.hang = True
    d = gateway.start("GET", "/function/echo")
    assert len(gateway.function.seen) == 1
    d.cancel()
    gateway.flush()
    gateway.failureResultOf(d)
    assert gateway.function.lost == 1


def test_connection_refused_is_502_naming_the_function(gateway: GatewayTestCase) -> None:
    gateway.build(function_client=RefusingAgent())
    gateway.deploy("echo")
    response, body = gateway.call("GET", "/function/echo")
    assert response.code == 502
    assert body == b"function 'echo.openfaas-fn' unreachable: connection refused\n"


def test_invocations_counted_by_function_and_code(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.call("GET", "/function/echo")
    gateway.call("GET", "/function/echo")
    registry = gateway.metrics.registry
    assert (
        registry.get_sample_value(
            "gateway_function_invocation_total", {"function_name": "echo.openfaas-fn", "code": "200"}
        )
    ) == 2.0
    assert (
        registry.get_sample_value(
            "gateway_function_invocation_started", {"function_name": "echo.openfaas-fn"}
        )
    ) == 2.0


def test_invocation_counts_reach_the_store_in_batches(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.functions.start()
    gateway.call("GET", "/function/echo")
    gateway.call("GET", "/function/echo")
    assert gateway.store.invocations.get("echo", 0) == 0
    gateway.clock.advance(1.0)
    assert gateway.store.invocations["echo"] == 2
    gateway.successResultOf(defer.Deferred.fromCoroutine(gateway.functions.stop()))


def test_endpoints_are_made_once_per_host_and_reused() -> None:
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.internet.task import Clock
    from twisted.web.client import URI
    from twisted.web.error import SchemeNotSupported

    from txfaas.http.client import CachingEndpointFactory

    factory = CachingEndpointFactory(Clock())
    first = factory.endpointForURI(URI.fromBytes(b"http://fn.local:8080/a"))
    again = factory.endpointForURI(URI.fromBytes(b"http://fn.local:8080/b?x"))
    other = factory.endpointForURI(URI.fromBytes(b"http://fn.local:8081/a"))
    assert first is again
    assert first is not other
    assert isinstance(first, HostnameEndpoint)
    tls = factory.endpointForURI(URI.fromBytes(b"https://fn.local/a"))
    assert not isinstance(tls, HostnameEndpoint)  # wrapped in TLS
    with pytest.raises(SchemeNotSupported):
        factory.endpointForURI(URI.fromBytes(b"ftp://fn.local/a"))


def test_an_ip_address_gets_a_plain_tcp_endpoint() -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
    from twisted.internet.task import Clock
    from twisted.web.client import URI

    from txfaas.http.client import CachingEndpointFactory

    factory = CachingEndpointFactory(Clock())
    v4 = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.7:8080/a"))
    assert isinstance(v4, TCP4ClientEndpoint)
    assert (v4._host, v4._port) == ("10.0.0.7", 8080)
    v6 = factory.endpointForURI(URI.fromBytes(b"http://[fd00::7]:8080/a"))
    assert isinstance(v6, TCP6ClientEndpoint)
    assert (v6._host, v6._port) == ("fd00::7", 8080)


class _Endpoints:
    """Counts the endpoints asked for."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def endpointForURI(self, uri):
        self.asked.append(uri.toBytes())
        return ("endpoint", uri.scheme, uri.host, uri.port)


class _Pool:
    """Hands out real HTTP11Connections over StringTransports, one per getConnection."""

    persistent = True

    def __init__(self) -> None:
        self.keys: list[tuple] = []
        self.transports: list = []

    def getConnection(self, key, endpoint):
        from twisted.internet.testing import StringTransport

        from txfaas._accel.http11 import HTTP11Connection

        self.keys.append((key, endpoint))
        protocol = HTTP11Connection()
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return defer.succeed(protocol)


class _PoolAgent(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        from twisted.web.client import Agent

        self.endpoints = _Endpoints()
        self.pool = _Pool()
        self.agent = Agent.usingEndpointFactory(self.clock, self.endpoints, pool=self.pool)

    def sent(self, url: bytes, headers: Headers | None = None, method: bytes = b"GET") -> bytes:
        self.agent.request(method, url, headers if headers is not None else Headers(), None)
        return self.pool.transports[-1].value()


@pytest.fixture
def pool_agent_gateway() -> _PoolAgent:
    return set_up(_PoolAgent())


def test_writes_the_target_and_host_as_agent_would(pool_agent_gateway: _PoolAgent) -> None:
    wire = pool_agent_gateway.sent(b"http://fn.local:8080/a/b?x=1", Headers({b"X-Custom": [b"v"]}))
    head = wire.split(b"\r\n")
    assert head[0] == b"GET /a/b?x=1 HTTP/1.1"
    assert b"Host: fn.local:8080" in head
    assert b"X-Custom: v" in head
    assert pool_agent_gateway.pool.keys[0][0] == (b"http", b"fn.local", 8080)


def test_default_ports_are_left_out_of_host_and_an_empty_path_is_slash(
    pool_agent_gateway: _PoolAgent,
) -> None:
    assert b"\r\nHost: fn.local\r\n" in pool_agent_gateway.sent(b"http://fn.local")
    assert pool_agent_gateway.sent(b"http://fn.local:80").startswith(b"GET / HTTP/1.1\r\n")
    assert b"\r\nHost: tls.local\r\n" in pool_agent_gateway.sent(b"https://tls.local:443/x")
    assert b"\r\nHost: tls.local:8443\r\n" in pool_agent_gateway.sent(b"https://tls.local:8443/x")


def test_a_host_header_given_is_kept(pool_agent_gateway: _PoolAgent) -> None:
    wire = pool_agent_gateway.sent(b"http://fn.local:8080/", Headers({b"Host": [b"other.example"]}))
    assert b"\r\nHost: other.example\r\n" in wire
    assert b"fn.local" not in wire


def test_the_headers_the_proxy_sets_directly_have_twisteds_canonical_names() -> None:
    """The proxy writes these into ``Headers._rawHeaders`` without Twisted's encoder: a name
    that is not in Twisted's canonical case would be a second entry beside the real one."""
    from txfaas import headers as hdr

    for name in (hdr.CALL_ID, hdr.START_TIME, hdr.DURATION, hdr.FORWARDED_FOR, hdr.FORWARDED_HOST):
        assert list(Headers({name.lower(): [b"x"]}).getAllRawHeaders()) == [(name, [b"x"])]
    assert Headers()._rawHeaders == {}  # the attribute the proxy relies on


class _Endpoint:
    """Connects the pool's factory over a StringTransport, and remembers the connections."""

    def __init__(self) -> None:
        self.connections: list = []

    def connect(self, factory):
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return defer.succeed(protocol)


class _KeptConnection(GatewayTestCase):
    """The proxy's agent over its pool: an idle connection is used as it is, and a request
    that fails on it before any answer is sent again on a new connection when that is safe."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def setUp(self) -> None:
        super().setUp()
        from twisted.internet.task import Clock
        from twisted.web.client import Agent

        from txfaas.http.pool import quiet_pool

        self.endpoint = _Endpoint()
        endpoints = _Endpoints()
        endpoints.endpointForURI = lambda uri: self.endpoint  # type: ignore[method-assign]
        self.pool = quiet_pool(Clock())
        self.agent = Agent.usingEndpointFactory(Clock(), endpoints, pool=self.pool)
        self.key = (b"http", b"fn.local", 8080)

    def kept(self):
        """A connection that answered once and went back to the pool."""
        first = self.agent.request(b"GET", b"http://fn.local:8080/warm")
        [connection] = self.endpoint.connections
        connection.dataReceived(self.OK)
        self.successResultOf(first)
        self.assertEqual(self.pool._connections[self.key], [connection])
        connection.transport.clear()
        return connection


@pytest.fixture
def kept_connection_gateway() -> _KeptConnection:
    return set_up(_KeptConnection())


def test_an_idle_connection_is_used_again_and_its_idle_timer_dropped(
    kept_connection_gateway: _KeptConnection,
) -> None:
    connection = kept_connection_gateway.kept()
    d = kept_connection_gateway.agent.request(b"GET", b"http://fn.local:8080/again")
    assert connection.transport.value().startswith(b"GET /again HTTP/1.1")
    assert (
        kept_connection_gateway.pool._connections[kept_connection_gateway.key],
        kept_connection_gateway.pool._timeouts,
    ) == ([], {})
    connection.dataReceived(kept_connection_gateway.OK)
    assert kept_connection_gateway.successResultOf(d).code == 200
    assert len(kept_connection_gateway.endpoint.connections) == 1


def test_a_get_on_a_connection_closed_meanwhile_goes_out_again_on_a_new_one(
    kept_connection_gateway: _KeptConnection,
) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    stale = kept_connection_gateway.kept()
    d = kept_connection_gateway.agent.request(b"GET", b"http://fn.local:8080/again")
    stale.connectionLost(Failure(ConnectionDone()))
    fresh = kept_connection_gateway.endpoint.connections[-1]
    assert fresh is not stale
    assert fresh.transport.value().startswith(b"GET /again HTTP/1.1")
    fresh.dataReceived(kept_connection_gateway.OK)
    assert kept_connection_gateway.successResultOf(d).code == 200


def test_a_request_with_a_body_or_a_cancelled_one_is_not_sent_twice(
    kept_connection_gateway: _KeptConnection,
) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    from txfaas.http.client import BytesProducer

    stale = kept_connection_gateway.kept()
    d = kept_connection_gateway.agent.request(
        b"DELETE", b"http://fn.local:8080/", None, BytesProducer(b"once")
    )
    stale.connectionLost(Failure(ConnectionDone()))
    kept_connection_gateway.failureResultOf(d, ResponseNeverReceived)
    assert len(kept_connection_gateway.endpoint.connections) == 1

    kept_connection_gateway.endpoint.connections.clear()
    kept = kept_connection_gateway.kept()
    d = kept_connection_gateway.agent.request(b"GET", b"http://fn.local:8080/")
    d.cancel()
    kept_connection_gateway.failureResultOf(d, ResponseNeverReceived)
    assert kept_connection_gateway.endpoint.connections == [kept]


def test_a_proxied_call_leaves_no_reference_cycle(
    gateway: GatewayTestCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exchange and its relay let go of each other when the call is done, so a call's
    objects are freed at once, not by the cyclic GC (a sixth of the CPU under load)."""
    import gc
    import weakref

    from txfaas.gateway import proxy

    gateway.deploy("echo")
    made: list = []
    init = proxy._Exchange.__init__

    def tracked(exchange, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(exchange, *args, **kwargs)
        made.append(weakref.ref(exchange))

    monkeypatch.setattr(proxy._Exchange, "__init__", tracked)
    gc.collect()
    gc.disable()
    try:
        response, body = gateway.call("GET", "/function/echo")
        assert (response.code, len(made)) == (200, 1)
        del response, body
        assert made[0]() is None
    finally:
        gc.enable()
