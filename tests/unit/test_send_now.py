"""Where txfaas sends a finished message at once (``txfaas.reactor.send_now``): a response
when ``LimitedRequest.finish`` is called with the whole of it written, and a request to a
function once the proxy's client has written all of it.  The transports here record each
``send_now`` with what they held then; ``tests/unit/test_reactor.py`` tests the sending."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web._newclient import Request
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from txfaas import _accel
from txfaas._accel.http11 import HTTP11Connection
from txfaas.http.client import BytesProducer
from txfaas.web.server import LimitedRequest, LimitedSite


@pytest.fixture(autouse=True)
def _accelerated(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin the accelerated path: on whatever TXFAAS_ACCEL says."""
    monkeypatch.setattr(_accel, "_enabled", True)


class Recorder:
    """A transport's ``reactor`` with ``send_now``: what the transport held at each call."""

    def __init__(self, transport: StringTransport, state: Any = None) -> None:
        self.transport = transport
        self.state = state
        self.calls: list[tuple[bytes, Any]] = []

    def send_now(self, transport: Any) -> None:
        assert transport is self.transport
        self.calls.append((transport.value(), self.state() if self.state else None))


class Scripted(resource.Resource):
    isLeaf = True

    def __init__(self, script: Any) -> None:
        super().__init__()
        self.script = script
        self.requests: list[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:
        self.requests.append(request)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        request.finished_seen = finished  # type: ignore[attr-defined]
        self.script(request)
        return server.NOT_DONE_YET


def serve(script: Any, version: bytes = b"1.1") -> tuple[Recorder, Scripted]:
    leaf = Scripted(script)
    site = LimitedSite(leaf, Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    recorder = Recorder(transport, lambda: bool(leaf.requests[0].finished_seen))
    transport.reactor = recorder  # type: ignore[attr-defined]
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /x HTTP/" + version + b"\r\nHost: t\r\n\r\n")
    return recorder, leaf


def _whole(request: server.Request) -> None:
    request.setHeader(b"Content-Length", b"6")
    request.write(b"abc")
    request.write(b"def")
    request.finish()


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_a_whole_response_is_sent_at_finish_before_twisteds_teardown(version: bytes) -> None:
    recorder, leaf = serve(_whole, version)
    [(held, finished_then)] = recorder.calls
    assert held.startswith(b"HTTP/" + version + b" 200 OK\r\n") and held.endswith(b"\r\n\r\nabcdef")
    assert finished_then is False  # notifyFinish had not fired yet: the teardown came after
    assert leaf.requests[0].finished_seen == [True]


def test_an_empty_response_finished_without_a_write_is_left_to_the_flush() -> None:
    recorder, _ = serve(lambda request: request.finish())
    assert recorder.calls == []  # its head is written by finish itself


def test_a_chunked_response_is_left_to_the_flush() -> None:
    def chunked(request: server.Request) -> None:
        request.write(b"abc")  # HTTP/1.1 without a length: chunked
        request.finish()  # writes the last chunk

    recorder, _ = serve(chunked)
    assert recorder.calls == []


def test_a_response_whose_client_left_is_not_sent() -> None:
    def left(request: server.Request) -> None:
        request.setHeader(b"Content-Length", b"3")
        request.write(b"abc")
        request.channel.connectionLost(Failure(ConnectionDone()))
        with pytest.raises(RuntimeError):  # Twisted's answer to a finish after that
            request.finish()

    recorder, leaf = serve(left)
    assert recorder.calls == []
    assert isinstance(leaf.requests[0], LimitedRequest)


def _conn() -> tuple[HTTP11Connection, StringTransport, Recorder]:
    protocol = HTTP11Connection(lambda _: None)
    transport = StringTransport()
    recorder = Recorder(transport)
    transport.reactor = recorder  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    return protocol, transport, recorder


@pytest.mark.parametrize("body", [None, b"payload"], ids=["no body", "body in memory"])
def test_a_request_to_a_function_is_sent_once_all_of_it_is_written(body: bytes | None) -> None:
    protocol, _, recorder = _conn()
    producer = None if body is None else BytesProducer(body)
    protocol.request(Request(b"POST", b"/", Headers({b"host": [b"fn"]}), producer))
    [(held, _)] = recorder.calls
    assert held.startswith(b"POST / HTTP/1.1\r\n") and held.endswith(b"\r\n\r\n" + (body or b""))


def test_a_streamed_request_body_is_left_to_the_flush() -> None:
    import io

    protocol, _, recorder = _conn()
    producer = FileBodyProducer(io.BytesIO(b"streamed"), cooperator=Cooperator(scheduler=lambda f: None))
    protocol.request(Request(b"POST", b"/", Headers({b"host": [b"fn"]}), producer))
    assert recorder.calls == []
