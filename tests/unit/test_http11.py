"""The lean HTTP/1.1 client connection (txfaas._accel.http11) over a StringTransport: what it writes,
how it frames and hands over responses, when the pool gets the connection back, and how every
failure is reported (with Twisted's exception types, which the pool's retry relies on)."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    Request,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import FileBodyProducer, _RetryingHTTP11ClientProtocol
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from txfaas._accel.http11 import MAX_HEAD, HTTP11Connection, HTTP11ConnectionFactory
from txfaas.http.client import BytesProducer

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


class Body(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason

    @property
    def body(self) -> bytes:
        return b"".join(self.data)


class Conn:
    """A connection over a StringTransport, and what it handed back to the 'pool'."""

    def __init__(self) -> None:
        self.returned: list[HTTP11Connection] = []
        self.protocol = HTTP11Connection(self.returned.append)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def request(
        self,
        method: bytes = b"GET",
        uri: bytes = b"/path?q=1",
        headers: dict[bytes, list[bytes]] | None = None,
        body: Any = None,
        persistent: bool = True,
    ) -> defer.Deferred:
        h = Headers({b"host": [b"fn.local:8080"], **(headers or {})})
        return self.protocol.request(Request(method, uri, h, body, persistent=persistent))

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def answer(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.dataReceived(piece)

    def lose(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))


def result(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def read(response: Any) -> Body:
    body = Body()
    response.deliverBody(body)
    return body


def failed_with(d: defer.Deferred, kind: type) -> list[Failure]:
    failure = result(d)
    assert isinstance(failure, Failure), failure
    assert failure.check(kind), failure
    return failure.value.reasons if hasattr(failure.value, "reasons") else []


# --- what goes out ------------------------------------------------------------------------------


def test_a_get_is_written_with_its_target_host_and_headers_and_no_length():
    c = Conn()
    c.request(headers={b"x-custom": [b"a", b"b"]})
    head = c.sent().split(b"\r\n")
    assert head[0] == b"GET /path?q=1 HTTP/1.1"
    assert b"Host: fn.local:8080" in head and b"X-Custom: a" in head and b"X-Custom: b" in head
    assert not any(line.lower().startswith((b"content-length", b"connection")) for line in head)
    assert head[-2:] == [b"", b""]


def test_a_body_in_memory_goes_out_with_its_length_in_one_write():
    c = Conn()
    writes: list[Any] = []
    c.transport.write = writes.append  # type: ignore[method-assign]
    c.request(b"POST", body=BytesProducer(b"payload"))
    [wire] = writes
    assert b"\r\nContent-Length: 7\r\n" in wire and wire.endswith(b"\r\n\r\npayload")


@pytest.mark.parametrize("method", [b"POST", b"PUT"])
def test_a_post_or_put_without_a_body_says_content_length_0(method):
    c = Conn()
    c.request(method)
    assert b"\r\nContent-Length: 0\r\n" in c.sent()


def test_a_producer_of_unknown_length_is_sent_chunked_by_twisteds_writer():
    c = Conn()
    producer = FileBodyProducer(BytesIO(b"abc"), cooperator=Cooperator(scheduler=lambda f: f()))
    producer.length = UNKNOWN_LENGTH
    d = c.request(b"POST", body=producer)
    wire = c.sent()
    assert b"Transfer-Encoding: chunked\r\n" in wire and wire.endswith(b"3\r\nabc\r\n0\r\n\r\n")
    c.answer(OK)
    assert read(result(d)).body == b"hello"
    assert c.returned == [c.protocol]


def test_a_request_not_to_be_kept_says_connection_close_and_is_not_kept():
    c = Conn()
    d = c.request(persistent=False)
    assert b"\r\nConnection: close\r\n" in c.sent()
    c.answer(OK)
    assert read(result(d)).body == b"hello"
    assert c.returned == [] and c.transport.disconnecting


@pytest.mark.parametrize(
    "method, headers", [(b"GET BAD", {}), (b"GET", {b"host": [b"a", b"b"]})], ids=["method", "two hosts"]
)
def test_a_request_that_cannot_be_written_fails_as_generation_failed(method, headers):
    c = Conn()
    request = Request(b"GET", b"/", Headers(headers or {b"host": [b"h"]}), None)
    request.method = method  # (Twisted's constructor checks it too; the writer must not trust that)
    d = c.protocol.request(request)
    failed_with(d, RequestGenerationFailed)
    assert c.sent() == b"" and c.transport.disconnected
    assert c.protocol.state != "QUIESCENT"


def test_a_second_request_while_one_is_in_flight_is_not_sent():
    c = Conn()
    c.request()
    failed_with(c.request(), RequestNotSent)


# --- what comes back ----------------------------------------------------------------------------


def test_the_response_comes_with_its_head_and_its_body_then_the_connection_goes_back():
    c = Conn()
    d = c.request()
    c.answer(OK)
    response = result(d)
    assert (response.version, response.code, response.phrase, response.length) == (
        (b"HTTP", 1, 1),
        200,
        b"OK",
        5,
    )
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain"]
    assert not response.headers.hasHeader(b"content-length")  # how it was carried, not what it is
    assert response.request.uri == b"/path?q=1"
    body = read(response)
    assert body.body == b"hello" and body.reason.check(ResponseDone)
    assert c.returned == [c.protocol] and c.protocol.state == "QUIESCENT"
    assert not c.transport.disconnecting


def test_a_connection_is_used_again_after_its_response():
    c = Conn()
    for n in range(3):
        d = c.request(uri=b"/%d" % n)
        assert c.sent().startswith(b"GET /%d HTTP/1.1" % n)
        c.answer(OK)
        assert read(result(d)).body == b"hello"
    assert c.returned == [c.protocol] * 3


def test_a_head_split_into_single_bytes_is_parsed_the_same():
    c = Conn()
    d = c.request()
    c.answer(*(OK[i : i + 1] for i in range(len(OK))))
    assert read(result(d)).body == b"hello"
    assert c.returned == [c.protocol]


def test_bare_line_feeds_and_a_missing_phrase_are_accepted():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 201\nX-A: 1\nContent-Length: 2\n\nok")
    response = result(d)
    assert (response.code, response.phrase, response.headers.getRawHeaders(b"x-a")) == (201, b"", [b"1"])
    assert read(response).body == b"ok"


def test_repeated_headers_keep_their_order_and_folded_lines_are_joined():
    c = Conn()
    d = c.request()
    c.answer(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nX-Long: one\r\n  two\r\nset-cookie: b\r\nContent-Length: 0\r\n\r\n"
    )
    headers = result(d).headers
    assert headers.getRawHeaders(b"set-cookie") == [b"a", b"b"]
    assert headers.getRawHeaders(b"x-long") == [b"one two"]
    assert (b"Set-Cookie", [b"a", b"b"]) in list(headers.getAllRawHeaders())  # Header-Case names


def test_a_bare_carriage_return_in_a_value_becomes_a_space():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nX-A: one\rtwo\r\nContent-Length: 0\r\n\r\n")
    assert result(d).headers.getRawHeaders(b"x-a") == [b"one two"]


def test_a_chunked_body_is_decoded_across_reads_and_the_connection_kept():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    response = result(d)
    assert response.length is UNKNOWN_LENGTH
    assert not response.headers.hasHeader(b"transfer-encoding")
    body = read(response)
    c.answer(b"lo\r\n", b"6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    assert body.body == b"hello world" and body.reason.check(ResponseDone)
    assert c.returned == [c.protocol]


def test_a_body_without_a_length_ends_with_the_connection():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\n\r\nsome")
    body = read(result(d))
    c.answer(b" more")
    c.lose()
    assert body.body == b"some more" and body.reason.check(PotentialDataLoss)
    assert c.returned == []


def test_a_body_without_a_length_cut_by_an_error_is_a_failure_not_the_end():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\n\r\nsome")
    body = read(result(d))
    c.lose(Failure(ConnectionLost("reset")))
    assert body.reason.check(ResponseFailed)


@pytest.mark.parametrize(
    "method, head",
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
    ids=["HEAD", "204", "304", "empty"],
)
def test_answers_without_a_body_are_complete_at_once(method, head):
    c = Conn()
    d = c.request(method)
    c.answer(head)
    response = result(d)
    body = read(response)
    assert response.length == 0 and body.body == b"" and body.reason.check(ResponseDone)
    assert c.returned == [c.protocol]
    if method == b"HEAD":  # what a GET would have carried: an entity header here
        assert response.headers.getRawHeaders(b"content-length") == [b"99"]


def test_interim_1xx_answers_are_skipped():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
    assert not d.called
    c.answer(OK)
    response = result(d)
    assert response.code == 200 and not response.headers.hasHeader(b"link")


@pytest.mark.parametrize(
    "head, kept",
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", False),
    ],
    ids=["close", "close among tokens", "1.0", "1.0 keep-alive", "both framings"],
)
def test_the_connection_goes_back_only_when_the_answer_lets_it(head, kept):
    c = Conn()
    d = c.request()
    c.answer(head)
    read(result(d))
    assert c.returned == ([c.protocol] if kept else [])
    assert c.transport.disconnecting is not kept


def test_bytes_after_a_complete_answer_mean_the_connection_is_not_kept():
    c = Conn()
    d = c.request()
    c.answer(OK + b"HTTP/1.1 200 OK\r\n")
    assert read(result(d)).body == b"hello"
    assert c.returned == [] and c.transport.disconnecting


def test_bytes_on_an_idle_connection_close_it():
    c = Conn()
    c.answer(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert c.transport.disconnecting


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n",
    ],
    ids=["no code", "long code", "not http", "no colon", "bad name", "bad length", "two lengths", "fold"],
)
def test_a_head_that_does_not_parse_fails_the_response_and_drops_the_connection(head):
    c = Conn()
    d = c.request()
    c.answer(head)
    failed_with(d, ResponseFailed)
    assert c.transport.disconnected and c.returned == []


def test_an_endless_head_fails_once_it_passes_the_limit():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\n")
    for _ in range(MAX_HEAD // 1000 + 1):
        c.answer(b"X-Pad: " + b"p" * 991 + b"\r\n")
    [reason] = failed_with(d, ResponseFailed)
    assert reason.check(ParseError)


def test_a_body_nobody_reads_yet_is_kept_with_the_connection_paused():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    response = result(d)
    assert c.transport.producerState == "paused"
    body = read(response)
    assert c.transport.producerState == "producing" and body.body == b"hello"
    c.answer(b"world")
    assert body.body == b"helloworld" and body.reason.check(ResponseDone)
    with pytest.raises(RuntimeError):
        response.deliverBody(Body())


def test_a_transport_that_was_not_paused_is_not_told_to_resume():
    """The body read as soon as the head is in (the proxy's way): nothing was paused, so the
    transport hears neither pause nor resume, through to the connection's return to the pool."""
    c = Conn()
    calls: list[str] = []
    for name in ("pauseProducing", "resumeProducing"):
        original = getattr(c.transport, name)

        def counted(name: str = name, original: Any = original) -> None:
            calls.append(name)
            original()

        setattr(c.transport, name, counted)
    d = c.request()
    d.addCallback(read)
    c.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    body = result(d)
    assert body.body == b"hello" and body.reason.check(ResponseDone)
    assert calls == [] and c.returned == [c.protocol]


def test_a_body_delivered_late_still_gets_all_of_it_and_its_end():
    c = Conn()
    d = c.request()
    c.answer(OK)
    response = result(d)
    assert c.returned == [c.protocol]  # complete: the connection is free already
    body = read(response)
    assert body.body == b"hello" and body.reason.check(ResponseDone)


def test_stop_producing_aborts_a_body_still_arriving_and_nothing_once_it_is_complete():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    body = read(result(d))
    body.transport.stopProducing()
    assert c.transport.disconnected
    c.lose(Failure(ConnectionLost()))
    assert body.reason.check(ResponseFailed)

    c = Conn()
    d = c.request()
    c.answer(OK)
    body = read(result(d))
    body.transport.stopProducing()  # the connection is back in the pool: it must stay open
    assert not c.transport.disconnecting and c.returned == [c.protocol]


# --- cancellation and lost connections -----------------------------------------------------------


def test_cancelling_a_request_aborts_the_connection():
    c = Conn()
    d = c.request()
    d.cancel()
    [reason] = failed_with(d, ResponseNeverReceived)
    assert reason.check(defer.CancelledError)
    assert c.transport.disconnected
    c.lose(Failure(ConnectionLost()))  # the abort's own connectionLost changes nothing
    assert c.protocol.state == "CONNECTION_LOST"


def test_cancelling_while_a_body_is_written_stops_the_producer():
    c = Conn()
    stopped: list[bool] = []

    class Slow:
        length = 10

        def startProducing(self, consumer: Any) -> defer.Deferred:
            return defer.Deferred(lambda d: stopped.append(True))

        def stopProducing(self) -> None:
            stopped.append(True)

        def pauseProducing(self) -> None:
            pass

        def resumeProducing(self) -> None:
            pass

    d = c.request(b"POST", body=Slow())
    d.cancel()
    [reason] = failed_with(d, RequestGenerationFailed)
    assert reason.check(defer.CancelledError) and stopped and c.transport.disconnected


def test_a_connection_lost_before_any_answer_is_response_never_received():
    c = Conn()
    d = c.request()
    c.lose()
    [reason] = failed_with(d, ResponseNeverReceived)
    assert reason.check(ConnectionDone)


def test_a_connection_lost_within_the_head_is_response_failed():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nContent-Le")
    c.lose()
    failed_with(d, ResponseFailed)


def test_a_connection_lost_within_a_body_of_known_length_fails_the_body():
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    body = read(result(d))
    c.lose()
    assert body.body == b"hel" and body.reason.check(ResponseFailed)


def test_a_connection_lost_while_a_body_is_written_is_transmission_failed():
    c = Conn()
    never: defer.Deferred = defer.Deferred()

    class Stalled:
        length = 10

        def startProducing(self, consumer: Any) -> defer.Deferred:
            return never

        def stopProducing(self) -> None:
            pass

    d = c.request(b"POST", body=Stalled())
    c.lose(Failure(ConnectionLost()))
    failed_with(d, RequestTransmissionFailed)


def test_abort_closes_and_fires_once_closed():
    c = Conn()
    done = c.protocol.abort()
    assert c.transport.disconnecting and not done.called
    c.lose()
    assert done.called and result(c.protocol.abort()) is None


# --- with the pool ------------------------------------------------------------------------------


def test_the_factory_builds_these_connections_quietly():
    factory = HTTP11ConnectionFactory(lambda c: None, "meta")
    assert factory.noisy is False
    assert isinstance(factory.buildProtocol(None), HTTP11Connection)


def test_a_get_on_a_connection_the_server_had_closed_is_retried_on_a_new_one():
    """What the pool's retry wrapper needs from us: a stale keep-alive connection fails the GET
    as never answered, so it is sent again on a fresh connection."""
    stale = Conn()
    fresh = Conn()
    retried = _RetryingHTTP11ClientProtocol(stale.protocol, lambda: defer.succeed(fresh.protocol))
    d = retried.request(Request(b"GET", b"/", Headers({b"host": [b"h"]}), None))
    stale.lose()
    assert fresh.sent().startswith(b"GET / HTTP/1.1")
    fresh.answer(OK)
    assert read(result(d)).body == b"hello"


def test_a_finished_exchange_leaves_no_reference_cycle():
    """Freed by reference counting as soon as it is done: a cycle per call (the body's protocol
    and the response holding each other) left every call to the cyclic GC, whose runs cost a
    sixth of the proxy's CPU under load and grew with the heap."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        c = Conn()
        d = c.request()
        c.answer(OK)
        response = result(d)
        body = read(response)
        refs = [weakref.ref(body), weakref.ref(response)]
        del d, response, body
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "answer",
    [
        OK,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
    ids=["length", "chunked", "no body"],
)
def test_the_connection_is_back_in_the_pool_before_the_caller_hears_the_body_ended(answer):
    """So a caller that sends its next request from there gets this connection, not a new one
    (Twisted's order too; seen as connections alternating, two where one would do)."""
    c = Conn()
    d = c.request()
    pooled_at_end: list[list] = []

    class Next(Body):
        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            pooled_at_end.append(list(c.returned))
            super().connectionLost(reason)

    d.addCallback(lambda response: response.deliverBody(Next()))
    c.answer(answer)
    assert pooled_at_end == [[c.protocol]]


def test_the_last_header_line_loses_its_cr_and_blanks():
    """The head is cut at its last LF: the CR before it ends the line, it is not in the value,
    and the value's trailing blanks go as on every other line."""
    c = Conn()
    d = c.request()
    c.answer(b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 2\r\nX-Last: v \t\r\n\r\nok")
    response = result(d)
    assert response.headers.getRawHeaders(b"server") == [b"nginx/1.22.1"]
    assert response.headers.getRawHeaders(b"x-last") == [b"v"]
    assert read(response).body == b"ok"
