"""No HTML anywhere: every error of every route is a short plain-text or JSON message."""

from __future__ import annotations

import base64

from treq.testing import RequestTraversalAgent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

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


class WalkTests(GatewayTestCase):
    auth = ("admin", "pw")

    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo", url="http://echo.fn:8080")
        token = base64.b64encode(b"admin:pw").decode()
        self.authorized = {"Authorization": [f"Basic {token}"]}

    def walk(self, headers: dict | None) -> int:
        seen = 0
        for path in PATHS:
            for method in METHODS:
                response, body = self.call(method, path, headers=headers, data=b"{}")
                where = f"{method} {path} -> {response.code}"
                self.assertFalse(looks_like_html(body), f"{where}: {body[:200]!r}")
                self.assertNotEqual(response.code, 500, f"{where}: {body[:200]!r}")
                if response.code >= 400 and method != "HEAD":
                    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
                    self.assertTrue(
                        kind.startswith((b"text/plain", b"application/json")), f"{where}: {kind!r}"
                    )
                    self.assertTrue(body.strip(), f"{where}: an empty error")
                    self.assertLess(len(body), 300, f"{where}: {body!r}")
                seen += 1
        return seen

    def test_no_path_and_method_answers_html_with_credentials(self) -> None:
        self.assertEqual(self.walk(self.authorized), len(PATHS) * len(METHODS))

    def test_no_path_and_method_answers_html_without_credentials(self) -> None:
        self.walk(None)

    def call_authorized(self, method: str, path: str) -> tuple:
        return self.call(method, path, headers=self.authorized)

    def test_unknown_paths_are_404_naming_method_and_path(self) -> None:
        for path in ["/nope", "/system/nothing", "/system/dead-letters/x/y"]:
            response, body = self.call_authorized("GET", path)
            self.assertEqual((response.code, body), (404, f"no route GET {path}\n".encode()))

    def test_a_wrong_method_is_405_with_allow(self) -> None:
        response, body = self.call_authorized("PATCH", "/system/info")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(body, b"method PATCH not allowed on /system/info: use GET, HEAD\n")

    def test_a_redirect_to_the_slash_ended_path_is_plain_text(self) -> None:
        response, body = self.call_authorized("GET", "/ui")
        self.assertEqual(response.code, 308)
        self.assertTrue(response.headers.getRawHeaders(b"location")[0].endswith(b"/ui/"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(body, b"Permanent Redirect: /ui\n")

    def test_openfaas_routes_txfaas_lacks_are_501_naming_the_feature(self) -> None:
        response, body = self.call_authorized("POST", "/system/alert")
        self.assertEqual(response.code, 501)
        self.assertIn(b"alert-driven autoscaling", body)
        for path in ["/", "/ui/", "/ui/index.html"]:
            response, body = self.call_authorized("GET", path)
            self.assertEqual(response.code, 501, path)
            self.assertIn(b"OpenFaaS web UI", body)

    def test_an_unexpected_error_in_a_route_is_a_plain_500(self) -> None:
        async def broken(*args: object) -> list:
            raise RuntimeError("boom")

        self.store.list_functions = broken
        response, body = self.call_authorized("GET", "/system/functions")
        self.assertEqual((response.code, body), (500, b"internal error\n"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class Raising(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        raise RuntimeError("boom")


class GetOnly(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"got\n"


class PlainErrorsSiteTests(SynchronousTestCase):
    """What Twisted itself would answer with an HTML page is plain text on every txfaas site."""

    def setUp(self) -> None:
        root = resource.Resource()
        root.putChild(b"raise", Raising())
        root.putChild(b"get", GetOnly())
        self.client = RequestTraversalAgent(root)
        self.client._serverFactory = PlainErrorsSite(root)

    def call(self, method: bytes, path: bytes) -> tuple:
        import treq

        response = self.successResultOf(self.client.request(method, b"http://x.test" + path))
        body = self.successResultOf(treq.content(response))
        return response, body

    def test_no_resource_is_a_plain_404(self) -> None:
        response, body = self.call(b"GET", b"/missing/thing")
        self.assertEqual((response.code, body), (404, b"no such resource: /missing/thing\n"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])

    def test_an_unsupported_method_is_a_plain_405_with_allow(self) -> None:
        for method in (b"POST", b"BREW"):
            response, body = self.call(method, b"/get")
            self.assertEqual(response.code, 405)
            self.assertIn(b"GET", response.headers.getRawHeaders(b"allow")[0])
            self.assertFalse(looks_like_html(body))
            self.assertTrue(body.startswith(b"method " + method + b" not allowed here"), body)

    def test_head_of_a_get_resource_still_works(self) -> None:
        response, body = self.call(b"HEAD", b"/get")
        self.assertEqual((response.code, body), (200, b""))

    def test_a_failure_while_rendering_is_a_plain_500(self) -> None:
        response, body = self.call(b"GET", b"/raise")
        self.assertEqual((response.code, body), (500, b"internal error\n"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_the_workers_web_resource_answers_plain_text(self) -> None:
        async def health() -> list[str]:
            return []

        root = worker_resource(health, None)
        client = RequestTraversalAgent(root)
        client._serverFactory = PlainErrorsSite(root)
        self.client = client
        for method, path, code in [(b"GET", b"/nope", 404), (b"POST", b"/healthz", 405), (b"GET", b"/", 404)]:
            response, body = self.call(method, path)
            self.assertEqual(response.code, code, path)
            self.assertFalse(looks_like_html(body), body)
