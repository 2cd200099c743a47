"""The request head is parsed by Twisted alone: LimitedSite's limits sit on top of it and must not
change what it does.  Every head here, listed and Hypothesis-generated (smuggling cases among
them: two or conflicting Content-Lengths, Content-Length with chunked, folded lines, bare CR or
LF, NUL, a blank before the colon, bad request lines, HTTP/1.0 and 1.1), is read by a
LimitedSite and by Twisted's own ``Site``, in one piece and a byte at a time: the resource must
see the same requests and the client get the same bytes."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from txfaas.web.server import LimitedSite, Route


class Record(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def render(self, request: server.Request) -> bytes:
        body = request.content.read()
        headers = sorted((k, tuple(v)) for k, v in request.requestHeaders.getAllRawHeaders())
        self.seen.append((request.method, request.uri, request.clientproto, headers, body))
        return b"seen %d" % len(self.seen)


_DATE = re.compile(rb"Date: [^\r]*\r\n")


def read(data: bytes, piecewise: bool = False, limited: bool = True) -> tuple[list[tuple], bytes, bool]:
    """(what the resource saw, what the client got, connection closing)."""
    record = Record()
    if limited:
        site = LimitedSite(record, Clock(), routes={b"limited": Route(b"limited", None, 1000)})
    else:
        site = server.Site(record, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    if piecewise:
        for i in range(len(data)):
            if transport.disconnecting:
                break
            channel.dataReceived(data[i : i + 1])
    else:
        channel.dataReceived(data)
    return record.seen, _DATE.sub(b"Date: -\r\n", transport.value()), bool(transport.disconnecting)


GET = b"GET /function/echo?x=1 HTTP/1.1\r\nHost: gw\r\nX-Call-Id: abc\r\nAccept: */*\r\n\r\n"
POST = b"POST /async-function/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nX-Thing: a\r\nx-thing: b\r\n\r\nhello"

CASES = {
    "GET": GET,
    "POST with a body": POST,
    "two pipelined": GET + POST,
    "three pipelined, the last cut short": GET + POST + GET[:20],
    "chunked body": b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "HTTP/1.0": b"GET / HTTP/1.0\r\nHost: gw\r\n\r\n" + GET,
    "Connection: close, then more": b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n" + GET,
    "Expect: 100-continue": b"POST /p HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    "value with spaces and tabs": b"GET / HTTP/1.1\r\nX-A:  \t spaced value \t \r\n\r\n",
    "empty value": b"GET / HTTP/1.1\r\nX-Empty:\r\n\r\n",
    "bad request line": b"GET /a b HTTP/1.1\r\nHost: gw\r\n\r\n",
    "HTTP/2.0 request line": b"GET / HTTP/2.0\r\n\r\n",
    "a request line starting with a blank": b" GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "a request line starting with a tab": b"\tGET / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "two spaces in the request line": b"GET  / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "a tab in the request line": b"GET\t/ HTTP/1.1\r\nHost: gw\r\n\r\n",
    "a trailing space in the request line": b"GET / HTTP/1.1 \r\nHost: gw\r\n\r\n",
    "no version": b"GET /\r\nHost: gw\r\n\r\n",
    "lower-case version": b"GET / http/1.1\r\nHost: gw\r\n\r\n",
    "method not a token": b"G(T / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "method of every token character": b"!#$%&'*+-.^_`|~09AZaz / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "target with a control byte": b"GET /a\x7fb HTTP/1.1\r\nHost: gw\r\n\r\n",
    "target with byte 176": b"GET /a\xb0b HTTP/1.1\r\nHost: gw\r\n\r\n",
    "target with byte 177": b"GET /a\xb1b HTTP/1.1\r\nHost: gw\r\n\r\n",
    "target of every printable byte": b"GET /!\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~ HTTP/1.1\r\n\r\n",
    "absolute-form target": b"GET http://gw/function/echo HTTP/1.1\r\nHost: gw\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "same header three ways": b"GET / HTTP/1.1\r\nx-a: 1\r\nX-A: 2\r\nx-A: 3\r\n\r\n",
    "Transfer-Encoding identity": b"GET / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
    "Transfer-Encoding CHUNKED": b"POST /p HTTP/1.1\r\nTransfer-Encoding: CHUNKED\r\n\r\n1\r\na\r\n0\r\n\r\n",
    "content-length in lower case": b"POST /p HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi" + GET,
    "a bad header before a good one": b"GET / HTTP/1.1\r\nBad Name: 1\r\nHost: gw\r\n\r\n",
    "header without a colon": b"GET / HTTP/1.1\r\nHost gw\r\n\r\n",
    "header name not a token": b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "bare LF in a value": b"GET / HTTP/1.1\r\nX-A: a\nb\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    "two Content-Lengths": b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "Content-Length and chunked": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "Content-Length not a number": b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
    "unknown transfer coding": b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    "body over the path's limit": b"POST /limited HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100,
    "body within the path's limit": b"POST /limited HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + GET,
    "500 headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    "a folded header line": b"GET / HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n",
    "a folded line with a tab": b"GET / HTTP/1.1\r\nX-A: one\r\n\ttwo\r\n\r\n",
    "a leading blank line": b"\r\n" + GET,
    "501 headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(501)) + b"\r\n",
    "a head over 16 KiB": b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 16400 + b"\r\n\r\n",
    "no end of head": b"GET / HTTP/1.1\r\nHost: gw\r\n",
}

#: The cases over LimitedSite's limits: it answers them, Twisted's Site does not (or not so).
OVER_LIMITS = {"body over the path's limit", "a head over 16 KiB", "501 headers"}


def same(data: bytes) -> None:
    ours = read(data)
    assert read(data, piecewise=True) == ours
    assert read(data, limited=False) == ours


@pytest.mark.parametrize("name", sorted(set(CASES) - OVER_LIMITS))
def test_a_head_reads_as_twisted_reads_it(name):
    same(CASES[name])


methods = st.sampled_from([b"GET", b"POST", b"get", b"G(T", b"", b"PUT"])
targets = st.sampled_from(
    [b"/", b"/function/echo?x=1", b"/a b", b"/a\x7f", b"/\xb0", b"/\xb1", b"", b"*", b"http://gw/x"]
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""])
separators = st.sampled_from([b" ", b"  ", b"\t"])
names = st.sampled_from(
    [
        b"Host",
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"X-A",
        b"Bad Name",
        b"X-A ",
        b" X-A",
        b"",
        b"Expect",
        b"Connection",
        b"X\x00A",
    ]
)
colons = st.sampled_from([b":", b": ", b":\t", b"", b" :"])
values = st.sampled_from(
    [
        b"5",
        b"0",
        b"+5",
        b" 5",
        b"5, 5",
        b"-1",
        b"chunked",
        b"CHUNKED",
        b"identity",
        b"gzip",
        b"chunked, identity",
        b"a\rb",
        b"a\nb",
        b"a\x00b",
        b"a\tb",
        b"close",
        b"keep-alive",
        b"100-continue",
        b"",
        b"  spaced  ",
        b"\xff",
    ]
)
folds = st.sampled_from([b"", b"", b"\r\n folded", b"\r\n\tfolded"])
endings = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])
bodies = st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"5\r\nhel"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    line = draw(methods) + draw(separators) + draw(targets) + draw(separators) + draw(versions)
    if draw(st.integers(0, 3)) == 0:
        line = draw(st.sampled_from([b"\r\n", b" ", b"\r\n\r\n"])) + line
    end = draw(endings)
    lines = [line]
    for _ in range(draw(st.integers(0, 5))):
        lines.append(draw(names) + draw(colons) + draw(values) + draw(folds))
    then = draw(st.sampled_from([b"", b"GET /next HTTP/1.1\r\n\r\n"]))
    return end.join(lines) + end + end + draw(bodies) + then


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
def test_generated_heads_read_as_twisted_reads_them(data: bytes) -> None:
    same(data)


def test_the_simple_cases_answer_as_expected():
    seen, out, closing = read(GET + POST)
    assert [s[:3] for s in seen] == [
        (b"GET", b"/function/echo?x=1", b"HTTP/1.1"),
        (b"POST", b"/async-function/echo", b"HTTP/1.1"),
    ]
    assert (b"X-Thing", (b"a", b"b")) in seen[1][3] and seen[1][4] == b"hello"
    assert out.count(b"HTTP/1.1 200 OK") == 2 and not closing
    seen, out, closing = read(CASES["header without a colon"])
    assert seen == [] and out.startswith(b"HTTP/1.1 400 Bad Request") and closing


@pytest.mark.parametrize(
    ("name", "status"),
    [("body over the path's limit", b"413"), ("a head over 16 KiB", b"431"), ("501 headers", b"431")],
)
def test_over_the_limits_is_answered_alike_in_one_piece_or_a_byte_at_a_time(name, status):
    seen, out, closing = read(CASES[name])
    assert seen == [] and out.startswith(b"HTTP/1.1 " + status) and closing
    assert read(CASES[name], piecewise=True) == (seen, out, closing)
