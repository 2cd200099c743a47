"""No HTML anywhere: every error of every route is a short plain-text or JSON message."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import treq
from treq.testing import RequestTraversalAgent
from twisted.logger import capturedLogs
from twisted.web import resource, server

from tests.support import successResultOf
from tests.unit.gateway_fixtures import GatewayTestCase
from txfaas.web.server import PlainErrorsSite
from txfaas.worker.web import worker_resource

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "BREW"]
PATHS = [
    "/",
    "/nope",
    "/nope/deeper/still",
    "/ui",
    "/ui/",
    "/ui/index.html",
    "/system",
    "/system/",
    "/system/nothing",
    "/system/functions",
    "/system/functions/",
    "/system/function/",
    "/system/function/echo",
    "/system/function/Bad_Name",
    "/system/function/echo/extra",
    "/system/scale-function/echo",
    "/system/info",
    "/system/info/",
    "/system/alert",
    "/system/calls/",
    "/system/calls/nope",
    "/system/calls/nope/result",
    "/system/calls/nope/retry",
    "/system/calls/bad%20id",
    "/system/dead-letters",
    "/system/dead-letters?limit=x",
    "/system/dead-letters/nope",
    "/healthz",
    "/healthz/x",
    "/metrics",
    "/metrics/x",
    "/function/",
    "/function/nope",
    "/function/bad%2Fname",
    "/function/echo/%2e%2e",
    "/async-function/",
    "/async-function/nope",
    "/async-function/echo/%2e%2e",
    "//system/functions",
    "/%2Fsystem/functions",
]


def looks_like_html(body: bytes) -> bool:
    lowered = body.lower()
    return b"<html" in lowered or b"<!doctype" in lowered or b"<body" in lowered


def logged_failures(events: list[dict], kind: type[BaseException]) -> list[dict]:
    return [e for e in events if e.get("log_failure") is not None and e["log_failure"].check(kind)]


TOKEN = base64.b64encode(b"admin:pw").decode()
AUTHORIZED = {"Authorization": [f"Basic {TOKEN}"]}


@pytest.fixture
def gateway() -> Any:
    """A gateway with basic auth (admin/pw) and one function, ``echo``."""
    gateway = GatewayTestCase()
    gateway.auth = ("admin", "pw")
    gateway.setUp()
    gateway.deploy("echo", url="http://echo.fn:8080")
    return gateway


def walk(gateway: Any, headers: dict | None) -> int:
    """Call every path with every method; check no answer is HTML or a 500, and every error is
    a short plain-text or JSON message. Returns the number of requests made."""
    seen = 0
    for path in PATHS:
        for method in METHODS:
            response, body = gateway.call(method, path, headers=headers, data=b"{}")
            where = f"{method} {path} -> {response.code}"
            assert not looks_like_html(body), f"{where}: {body[:200]!r}"
            assert response.code != 500, f"{where}: {body[:200]!r}"
            if response.code >= 400 and method != "HEAD":
                kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
                assert kind.startswith((b"text/plain", b"application/json")), f"{where}: {kind!r}"
                assert body.strip(), f"{where}: an empty error"
                assert len(body) < 300, f"{where}: {body!r}"
            seen += 1
    return seen


def test_no_path_and_method_answers_html_with_credentials(gateway: Any) -> None:
    assert walk(gateway, AUTHORIZED) == len(PATHS) * len(METHODS)


def test_no_path_and_method_answers_html_without_credentials(gateway: Any) -> None:
    assert walk(gateway, None) == len(PATHS) * len(METHODS)


def test_unknown_paths_are_404_naming_method_and_path(gateway: Any) -> None:
    for path in ["/nope", "/system/nothing", "/system/dead-letters/x/y"]:
        response, body = gateway.call("GET", path, headers=AUTHORIZED)
        assert (response.code, body) == (404, f"no route GET {path}\n".encode())


def test_a_wrong_method_is_405_with_allow(gateway: Any) -> None:
    response, body = gateway.call("PATCH", "/system/info", headers=AUTHORIZED)
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert body == b"method PATCH not allowed on /system/info: use GET, HEAD\n"


def test_a_redirect_to_the_slash_ended_path_is_plain_text(gateway: Any) -> None:
    response, body = gateway.call("GET", "/ui", headers=AUTHORIZED)
    assert response.code == 308
    assert response.headers.getRawHeaders(b"location")[0].endswith(b"/ui/")
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert body == b"Permanent Redirect: /ui\n"


def test_openfaas_routes_txfaas_lacks_are_501_naming_the_feature(gateway: Any) -> None:
    response, body = gateway.call("POST", "/system/alert", headers=AUTHORIZED)
    assert response.code == 501
    assert b"alert-driven autoscaling" in body
    for path in ["/", "/ui/", "/ui/index.html"]:
        response, body = gateway.call("GET", path, headers=AUTHORIZED)
        assert response.code == 501, path
        assert b"OpenFaaS web UI" in body


def test_an_unexpected_error_in_a_route_is_a_plain_500(gateway: Any) -> None:
    async def broken(*args: object) -> list:
        raise RuntimeError("boom")

    gateway.store.list_functions = broken
    with capturedLogs() as events:
        response, body = gateway.call("GET", "/system/functions", headers=AUTHORIZED)
    assert (response.code, body) == (500, b"internal error\n")
    assert len(logged_failures(events, RuntimeError)) == 1


# --- PlainErrorsSite: what Twisted itself would answer with an HTML page is plain text ----------


class Raising(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        raise RuntimeError("boom")


class GetOnly(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"got\n"


def plain_client(root: resource.Resource) -> RequestTraversalAgent:
    """A client of ``root`` served by a :class:`PlainErrorsSite`, as every txfaas process serves."""
    client = RequestTraversalAgent(root)
    client._serverFactory = PlainErrorsSite(root)
    return client


def call(client: RequestTraversalAgent, method: bytes, path: bytes) -> tuple[Any, bytes]:
    response = successResultOf(client.request(method, b"http://x.test" + path))
    return response, successResultOf(treq.content(response))


@pytest.fixture
def site_client() -> RequestTraversalAgent:
    root = resource.Resource()
    root.putChild(b"raise", Raising())
    root.putChild(b"get", GetOnly())
    return plain_client(root)


def test_no_resource_is_a_plain_404(site_client: RequestTraversalAgent) -> None:
    response, body = call(site_client, b"GET", b"/missing/thing")
    assert (response.code, body) == (404, b"no such resource: /missing/thing\n")
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]


def test_an_unsupported_method_is_a_plain_405_with_allow(site_client: RequestTraversalAgent) -> None:
    for method in (b"POST", b"BREW"):
        response, body = call(site_client, method, b"/get")
        assert response.code == 405
        assert b"GET" in response.headers.getRawHeaders(b"allow")[0]
        assert not looks_like_html(body)
        assert body.startswith(b"method " + method + b" not allowed here"), body


def test_head_of_a_get_resource_still_works(site_client: RequestTraversalAgent) -> None:
    response, body = call(site_client, b"HEAD", b"/get")
    assert (response.code, body) == (200, b"")


def test_a_failure_while_rendering_is_a_plain_500(site_client: RequestTraversalAgent) -> None:
    with capturedLogs() as events:
        response, body = call(site_client, b"GET", b"/raise")
    assert (response.code, body) == (500, b"internal error\n")
    assert len(logged_failures(events, RuntimeError)) == 1


def test_the_workers_web_resource_answers_plain_text() -> None:
    async def health() -> list[str]:
        return []

    client = plain_client(worker_resource(health, None))
    for method, path, code in [(b"GET", b"/nope", 404), (b"POST", b"/healthz", 405), (b"GET", b"/", 404)]:
        response, body = call(client, method, path)
        assert response.code == code, path
        assert not looks_like_html(body), body


def _serve(root: resource.Resource, request: bytes) -> bytes:
    from twisted.internet.testing import StringTransport

    site = PlainErrorsSite(root)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    return transport.value()


def test_a_twisted_web_pages_error_page_is_answered_in_plain_text() -> None:
    from twisted.web import pages

    root = resource.Resource()
    root.putChild(b"gone", pages.errorPage(410, "Gone For Good", "<b>html</b>"))
    root.putChild(b"missing", pages.notFound())
    out = _serve(root, b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\nGET /missing HTTP/1.1\r\nHost: t\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 410 Gone\r\n") and b"\r\n\r\ngone\n" in out
    assert b"HTTP/1.1 404 Not Found\r\n" in out and out.endswith(b"\r\n\r\nnot found: /missing\n")
    assert not looks_like_html(out)


def test_a_request_says_when_its_connection_was_lost() -> None:
    from twisted.python.failure import Failure
    from twisted.web.server import NOT_DONE_YET

    requests: list = []

    class Wait(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> object:
            requests.append(request)
            return NOT_DONE_YET

    _serve(Wait(), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    request = requests[0]
    assert request.disconnected is False
    request.connectionLost(Failure(ConnectionError("gone")))
    assert request.disconnected is True
