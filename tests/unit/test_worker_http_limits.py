"""The worker reads bounded answers: a function's up to a hard cap, a callback receiver's only a little;
and builds request headers as ``addRawHeader`` would."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers, InvalidHeaderName

from txfaas.http.client import BodyTooLarge, make_headers, read_body


class FakeResponse:
    """Delivers ``chunks`` to the body protocol, as Twisted's response would."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.transport = StringTransport()

    def deliverBody(self, protocol) -> None:
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            if self.transport.producerState == "stopped":
                return
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(ResponseDone()))


def result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_a_body_within_the_limit_is_read_whole():
    assert result(read_body(FakeResponse([b"a" * 10, b"b" * 10]), limit=20)) == b"a" * 10 + b"b" * 10


def test_a_body_over_the_limit_fails_and_the_connection_is_dropped():
    response = FakeResponse([b"a" * 10] * 100)
    outcome = result(read_body(response, limit=25))
    assert isinstance(outcome, Failure) and outcome.check(BodyTooLarge)
    assert response.transport.producerState == "stopped"  # no more of it is read


def test_keep_head_gives_the_first_bytes_and_stops_reading():
    response = FakeResponse([b"0123456789"] * 1000)
    assert result(read_body(response, limit=15, keep_head=True)) == b"012345678901234"
    assert response.transport.producerState == "stopped"


def test_make_headers_gives_what_add_raw_header_gives():
    pairs = [
        (b"content-type", b"text/plain"),
        (b"X-Multi", b"one"),
        (b"x-multi", b"two"),
        (b"X-Folded", b"a\r\nb\rc\nd"),
        (b"x-text", "caf\u00e9"),
        (b"www-authenticate", b"Basic"),
        (b"Empty", b""),
    ]
    expected = Headers()
    for name, value in pairs:
        expected.addRawHeader(name, value)
    assert list(make_headers(pairs).getAllRawHeaders()) == list(expected.getAllRawHeaders())
    with pytest.raises(InvalidHeaderName):
        make_headers([(b"bad name", b"x")])
