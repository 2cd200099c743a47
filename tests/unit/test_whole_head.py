"""LimitedChannel's whole-head path: a request head that arrives whole in one read goes to Twisted's
own parsing in one loop.  Every case here is read twice -- in one piece (that path) and a byte at a
time (Twisted's line-by-line path) -- and must give the resource the same requests and the client
the same bytes; the cases that path leaves to Twisted must not take it."""

from __future__ import annotations

import re

import pytest
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


def read(data: bytes, piecewise: bool) -> tuple[list[tuple], bytes, int, bool]:
    """(what the resource saw, what the client got, lines read one by one, connection closing)."""
    record = Record()
    site = LimitedSite(record, Clock(), routes={b"limited": Route(b"limited", None, 1000)})
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    lines = 0
    line_received = channel.lineReceived

    def counting(line: bytes) -> None:
        nonlocal lines
        lines += 1
        line_received(line)

    channel.lineReceived = counting
    if piecewise:
        for i in range(len(data)):
            if transport.disconnecting:
                break
            channel.dataReceived(data[i : i + 1])
    else:
        channel.dataReceived(data)
    return record.seen, _DATE.sub(b"Date: -\r\n", transport.value()), lines, transport.disconnecting


GET = b"GET /function/echo?x=1 HTTP/1.1\r\nHost: gw\r\nX-Call-Id: abc\r\nAccept: */*\r\n\r\n"
POST = b"POST /async-function/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nX-Thing: a\r\nx-thing: b\r\n\r\nhello"

TAKEN = {  # the whole-head path reads these
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
}

LEFT_TO_TWISTED = {  # Twisted's line-by-line path reads these
    "a folded header line": b"GET / HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n",
    "a folded line with a tab": b"GET / HTTP/1.1\r\nX-A: one\r\n\ttwo\r\n\r\n",
    "a leading blank line": b"\r\n" + GET,
    "501 headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(501)) + b"\r\n",
    "a head over 16 KiB": b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 16400 + b"\r\n\r\n",
    "no end of head": b"GET / HTTP/1.1\r\nHost: gw\r\n",
}


@pytest.mark.parametrize("name", sorted(TAKEN))
def test_one_read_and_a_byte_at_a_time_give_the_same(name):
    data = TAKEN[name]
    whole = read(data, piecewise=False)
    bytewise = read(data, piecewise=True)
    assert whole[0] == bytewise[0]  # the requests the resource saw
    assert whole[1] == bytewise[1]  # what the client got
    assert whole[3] == bytewise[3]  # closing or not
    assert whole[2] < bytewise[2]  # and the first head was not read line by line


@pytest.mark.parametrize("name", sorted(LEFT_TO_TWISTED))
def test_what_the_whole_head_path_leaves_to_twisted(name):
    data = LEFT_TO_TWISTED[name]
    whole = read(data, piecewise=False)
    bytewise = read(data, piecewise=True)
    assert whole[:2] == bytewise[:2] and whole[3] == bytewise[3]
    assert whole[2] == bytewise[2] > 0  # every line read by Twisted's lineReceived


def test_the_simple_cases_answer_as_expected():
    seen, out, _lines, closing = read(GET + POST, piecewise=False)
    assert [s[:3] for s in seen] == [
        (b"GET", b"/function/echo?x=1", b"HTTP/1.1"),
        (b"POST", b"/async-function/echo", b"HTTP/1.1"),
    ]
    assert (b"X-Thing", (b"a", b"b")) in seen[1][3] and seen[1][4] == b"hello"
    assert out.count(b"HTTP/1.1 200 OK") == 2 and not closing
    seen, out, _lines, closing = read(TAKEN["header without a colon"], piecewise=False)
    assert seen == [] and out.startswith(b"HTTP/1.1 400 Bad Request") and closing
    seen, out, _lines, closing = read(TAKEN["body over the path's limit"], piecewise=False)
    assert seen == [] and out.startswith(b"HTTP/1.1 413") and closing


def test_off_when_twisted_lacks_what_it_relies_on(monkeypatch):
    """On a Twisted without its request-line parser or the channel's private first-line flag,
    every head goes line by line -- with the same result."""
    from txfaas.web import server as web_server

    assert web_server.WHOLE_HEAD  # the Twisted these tests run on has both
    monkeypatch.setattr(web_server, "WHOLE_HEAD", False)
    whole = read(GET + POST, piecewise=False)
    assert whole[2] > 0  # read by lineReceived
    assert whole[:2] == read(GET + POST, piecewise=True)[:2]
