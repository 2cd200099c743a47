"""``LimitedSite.route``: a request whose first path segment names a route with a leaf goes straight to
its leaf, without Twisted's walk from the root.  Every request here is served twice -- by a site
with the direct route and by the same site without it -- and the resource must see the same
request (which resource, ``prepath``, ``postpath``, ``sitepath``, ``args``) and the client get the
same bytes.  And the gateway's direct routes are the leaves its tree gives for those segments."""

from __future__ import annotations

import re

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server
from twisted.web.http import datetimeToString
from twisted.web.test.requesthelper import DummyRequest

from txfaas.web import server as web_server
from txfaas.web.server import LimitedSite, Route, http_date


class Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, name: str, seen: list[tuple]) -> None:
        super().__init__()
        self.name = name
        self.seen = seen

    def render(self, request: server.Request) -> bytes:
        self.seen.append(
            (self.name, request.prepath, request.postpath, request.sitepath, request.path, request.args)
        )
        if request.postpath[:1] == [b"boom"]:
            raise RuntimeError("boom")
        return b"%s %r" % (self.name.encode(), request.postpath)


class Root(resource.Resource):
    """A root that routes like the gateway's: ``fn`` to a leaf, everything else to another."""

    def __init__(self, seen: list[tuple]) -> None:
        super().__init__()
        self.fn = Leaf("fn", seen)
        self.rest = Leaf("rest", seen)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.IResource:
        if path == b"fn":
            return self.fn
        request.postpath.insert(0, request.prepath.pop())
        return self.rest

    def render(self, request: server.Request) -> bytes:
        return self.rest.render(request)


_DATE = re.compile(rb"Date: [^\r]*\r\n")


def serve(data: bytes, direct: bool) -> tuple[list[tuple], bytes, int]:
    """(what the resources saw, what the client got, times the tree was walked)."""
    seen: list[tuple] = []
    root = Root(seen)
    site = LimitedSite(root, Clock(), routes={b"fn": Route(b"fn", root.fn, None)} if direct else None)
    walks = 0
    walk = site.getResourceFor

    def counting(request: server.Request) -> resource.IResource:
        nonlocal walks
        walks += 1
        return walk(request)

    site.getResourceFor = counting  # type: ignore[method-assign]
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return seen, _DATE.sub(b"Date: -\r\n", transport.value()), walks


DIRECT = [
    "/fn/echo",
    "/fn/echo/",
    "/fn/echo/a/b",
    "/fn/echo/a%2Fb/c%20d",
    "/fn/echo?x=1&y=2",
    "/fn/echo/sub?x=%41",
    "/fn",
    "/fn/",
    "/fn//echo",
    "/fn/%00",
    "/fn/boom",
    "/%66n/echo",  # an escaped first segment: decoded, as Twisted's walk decodes it
    "/%66%6E?x",
]
WALKED = [
    "/fn%2Fecho",  # %2F is no separator: "fn/echo" is no route of ours
    "/other/x",
    "/",
    "//fn/echo",
    "/fnx/echo",
    "/FN/echo",
]


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


@pytest.mark.parametrize("path", DIRECT + WALKED)
def test_direct_route_serves_the_same_request_as_the_walk(path: str) -> None:
    direct = serve(_get(path), direct=True)
    walked = serve(_get(path), direct=False)
    assert direct[0] and direct[0] == walked[0]
    assert direct[1] == walked[1]
    assert walked[2] == 1
    assert direct[2] == (0 if path in DIRECT else 1)


def test_direct_route_for_every_request_on_a_connection() -> None:
    data = b"".join(_get(p) for p in ["/fn/a", "/other", "/fn/b?c=d", "/%66n/e"])
    direct, walked = serve(data, direct=True), serve(data, direct=False)
    assert len(direct[0]) == 4 and direct[0] == walked[0]
    assert direct[1] == walked[1]
    assert direct[2] == 1


def test_star_and_absolute_form_take_twisteds_way() -> None:
    for data in (
        b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET http://t/fn/echo HTTP/1.1\r\nHost: t\r\n\r\n",
    ):
        direct, walked = serve(data, direct=True), serve(data, direct=False)
        assert direct[:2] == walked[:2]
        assert direct[2] == walked[2]


def test_a_render_that_raises_is_a_500_either_way() -> None:
    direct = serve(_get("/fn/boom"), direct=True)
    assert direct[1].startswith(b"HTTP/1.1 500 ")


def test_server_and_date_headers_are_set() -> None:
    seen: list[tuple] = []
    root = Root(seen)
    site = LimitedSite(root, Clock(), routes={b"fn": Route(b"fn", root.fn, None)})
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(_get("/fn/x"))
    head = transport.value().split(b"\r\n\r\n")[0]
    assert re.search(rb"\r\nServer: TwistedWeb/[^\r]+\r\n", head + b"\r\n")
    date = re.search(rb"\r\nDate: ([^\r]+)", head).group(1)
    assert re.fullmatch(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT", date)


def test_http_date_is_formatted_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_800_000_000.25]
    monkeypatch.setattr(web_server.time, "time", lambda: now[0])
    first = http_date()
    assert first == datetimeToString(1_800_000_000)
    now[0] = 1_800_000_000.99
    assert http_date() is first  # the same second: not formatted again
    now[0] = 1_800_000_001.0
    assert http_date() == datetimeToString(1_800_000_001)


def test_gateway_direct_routes_are_where_its_tree_leads() -> None:
    from tests.unit.gateway_fixtures import GatewayTestCase

    case = GatewayTestCase()
    case.setUp()
    root = case.root
    routes = {segment: route.leaf for segment, route in root.routes.items() if route.leaf is not None}
    assert set(routes) == {b"function", b"async-function"}
    for segment, leaf in routes.items():
        request = DummyRequest([b"x"])
        request.prepath = [segment]
        assert root.getChildWithDefault(segment, request) is leaf
        assert leaf.isLeaf
