"""txfaas._accel.first_write: a response's first write, head and bytes in one transport write.  Every
case is served twice -- by LimitedRequest and by a LimitedRequest that writes as Twisted does -- and
the client must get the same bytes (and the connection close or stay open alike)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from txfaas import _accel
from txfaas._accel import first_write
from txfaas.web.server import LimitedRequest, LimitedSite


@pytest.fixture(autouse=True)
def _accelerated(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin the accelerated path: on whatever TXFAAS_ACCEL says."""
    monkeypatch.setattr(_accel, "_enabled", True)


class TwistedWrites(LimitedRequest):
    def write(self, data: bytes) -> None:
        server.Request.write(self, data)


class Scripted(resource.Resource):
    isLeaf = True

    def __init__(self, script: Callable[[server.Request], Any]) -> None:
        super().__init__()
        self.script = script

    def render_GET(self, request: server.Request) -> Any:
        return self.script(request)

    render_POST = render_GET


def _later(*writes: bytes, finish: bool = True, **headers: bytes) -> Callable[[server.Request], Any]:
    def script(request: server.Request) -> Any:
        for name, value in headers.items():
            request.setHeader(name.replace("_", "-"), value)
        for data in writes:
            request.write(data)
        if finish:
            request.finish()
        return server.NOT_DONE_YET

    return script


def _coded(code: int, *writes: bytes, **headers: bytes) -> Callable[[server.Request], Any]:
    inner = _later(*writes, **headers)

    def script(request: server.Request) -> Any:
        request.setResponseCode(code)
        return inner(request)

    return script


def _with(setup: Callable[[server.Request], None], body: bytes = b"hello") -> Callable[[server.Request], Any]:
    def script(request: server.Request) -> Any:
        setup(request)
        return body

    return script


def _no_type(request: server.Request) -> Any:
    request.defaultContentType = None
    request.write(b"x")
    request.finish()
    return server.NOT_DONE_YET


CASES: dict[str, tuple[Callable[[server.Request], Any], bytes]] = {
    "rendered bytes": (lambda r: b"hello", b"GET"),
    "rendered nothing": (lambda r: b"", b"GET"),
    "writes, no length: chunked": (_later(b"a", b"bc"), b"GET"),
    "writes with a length": (_later(b"abc", content_length=b"3"), b"GET"),
    "an empty first write": (_later(b"", b"abc"), b"GET"),
    "finish without a write": (_later(), b"GET"),
    "Content-Length 0": (_later(content_length=b"0"), b"GET"),
    "a Content-Type of its own": (_later(b"{}", content_type=b"application/json"), b"GET"),
    "no default Content-Type": (_no_type, b"GET"),
    "204 with a write": (_coded(204, b"dropped"), b"GET"),
    "304 with a write": (_coded(304, b"dropped"), b"GET"),
    "404 with a body": (_coded(404, b"nope"), b"GET"),
    "a HEAD the resource fakes": (lambda r: b"hello", b"HEAD"),
    "a cookie": (_with(lambda r: r.addCookie(b"k", b"v")), b"GET"),
    "Last-Modified": (_with(lambda r: r.setLastModified(1_800_000_000)), b"GET"),
    "an ETag": (_with(lambda r: r.setETag(b"abc")), b"GET"),
    "a POST": (_later(b"posted"), b"POST"),
}

_DATE = re.compile(rb"Date: [^\r]*\r\n")


def serve(script: Callable[[server.Request], Any], method: bytes, version: bytes, twisted: bool) -> tuple:
    site = LimitedSite(Scripted(script), Clock())
    site.requestFactory = TwistedWrites if twisted else LimitedRequest
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    body = b"Content-Length: 2\r\n\r\nhi" if method == b"POST" else b"\r\n"
    channel.dataReceived(method + b" /x HTTP/" + version + b"\r\nHost: t\r\n" + body)
    return _DATE.sub(b"Date: -\r\n", transport.value()), transport.disconnecting


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_first_write_gives_what_twisted_gives(name: str, version: bytes) -> None:
    script, method = CASES[name]
    ours = serve(script, method, version, twisted=False)
    theirs = serve(script, method, version, twisted=True)
    assert ours == theirs
    assert ours[0].startswith(b"HTTP/1.")


def test_head_and_first_bytes_go_out_in_one_write() -> None:
    site = LimitedSite(Scripted(_later(b"abc", b"def", content_length=b"6")), Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    writes: list[bytes] = []
    write = transport.write

    def counted(data: bytes) -> None:
        writes.append(data)
        write(data)

    transport.write = counted  # type: ignore[method-assign]
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    assert len(writes) == 2 and writes[0].endswith(b"\r\n\r\nabc") and writes[1] == b"def"


def _head_writes() -> int:
    site = LimitedSite(Scripted(_later(b"abc", content_length=b"3")), Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    transport.writeSequence = lambda seq: writes.extend(seq)  # type: ignore[method-assign]
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    return len(writes)


def test_with_accelerations_off_twisted_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _head_writes() == 1
    monkeypatch.setattr(_accel, "_enabled", False)
    assert _head_writes() > 1  # Twisted's own: the head, then the body


def test_the_probe_passes_on_this_twisted() -> None:
    assert first_write.probe() is True


def test_the_probe_fails_when_the_head_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(first_write, "_probed", None)
    monkeypatch.setattr(first_write, "NO_BODY_CODES", ())  # a 204 would get a body
    assert first_write.probe() is False
    assert _head_writes() > 1  # and Twisted writes
