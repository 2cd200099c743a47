"""One route decision per request (``LimitedSite.route``), on the percent-decoded path: whatever the
spelling of a path, it reaches the route of its decoded form, with that route's body limit."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from tests.unit.gateway_fixtures import GatewayTestCase
from txfaas.gateway.app import SYSTEM_BODY_LIMIT


class Limited(GatewayTestCase):
    max_body = 1000
    max_async_body = 2000


def _gateway() -> Limited:
    case = Limited()
    case.setUp()
    case.deploy("echo")
    return case


def _post(case: Limited, target: bytes, body: bytes, length: int | None = None) -> bytes:
    channel = case.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    size = len(body) if length is None else length
    channel.dataReceived(
        b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (target, size, body)
    )
    case.flush()
    return transport.value()


def test_an_escaped_async_route_has_the_async_body_limit() -> None:
    case = _gateway()
    for target in (b"/async-function/echo", b"/%61sync-function/echo", b"/async%2Dfunction/echo"):
        assert _post(case, target, b"x" * 2001).startswith(b"HTTP/1.1 413 "), target
        assert b"over the limit of 2000 bytes" in _post(case, target, b"x" * 2001)
        assert _post(case, target, b"x" * 2000).startswith(b"HTTP/1.1 202 "), target
    assert case.queue.pending("faas-request") == 3


def test_an_escaped_function_route_has_the_sync_body_limit() -> None:
    case = _gateway()
    for target in (b"/function/echo", b"/%66unction/echo", b"/%66%75%6E%63%74%69%6F%6E/echo/a"):
        assert _post(case, target, b"x" * 1001).startswith(b"HTTP/1.1 413 "), target
        assert _post(case, target, b"x" * 1000).startswith(b"HTTP/1.1 200 "), target
    assert [len(seen["body"]) for seen in case.function.seen] == [1000, 1000, 1000]


# --- any spelling of a path ------------------------------------------------------------------

_SAFE = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
_FIRST = st.sampled_from(["function", "async-function", "system", "healthz", "metrics", "", "other"])
_SEGMENT = st.text(_SAFE, max_size=8)


def _spell(segment: str, escape: list[bool], upper: bool) -> str:
    """``segment`` with the characters ``escape`` picks percent-encoded (either case of hex)."""
    out = []
    for char, esc in zip(segment, escape + [False] * len(segment), strict=False):
        if esc:
            code = f"%{ord(char):02X}"
            out.append(code if upper else code.lower())
        else:
            out.append(char)
    return "".join(out)


_GATEWAY = _gateway()


@settings(max_examples=300, deadline=None)
@given(
    first=_FIRST,
    rest=st.lists(_SEGMENT, max_size=3),
    query=st.sampled_from(["", "?", "?a=1", "?x=%2F"]),
    escapes=st.lists(st.lists(st.booleans(), max_size=16), min_size=4, max_size=4),
    upper=st.booleans(),
)
def test_any_spelling_of_a_path_reaches_the_route_of_its_decoded_form(
    first: str, rest: list[str], query: str, escapes: list[list[bool]], upper: bool
) -> None:
    site = _GATEWAY.site
    segments = [first, *rest]
    plain = ("/" + "/".join(segments) + query).encode()
    spelled = (
        "/" + "/".join(_spell(s, e, upper) for s, e in zip(segments, escapes, strict=False)) + query
    ).encode()
    route = site.route(spelled)
    assert route is site.route(plain)
    expected = {"function": 1000, "async-function": 2000}.get(first, SYSTEM_BODY_LIMIT)
    assert route.limit == expected
    # And served: both spellings refused over that limit, before any body is read.
    for target in (plain, spelled):
        answer = _post(_GATEWAY, target, b"", length=expected + 1)
        assert answer.startswith(b"HTTP/1.1 413 "), (target, answer[:80])
        assert f"over the limit of {expected} bytes".encode() in answer
