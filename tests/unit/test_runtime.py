"""Request limits shared by the HTTP servers: 413 before reading, chunked counting, read/write deadlines."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from txfaas.runtime import LimitedSite


class Echo(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[bytes] = []
        self.pending: list[server.Request] = []

    def render(self, request: server.Request):
        body = request.content.read()
        self.rendered.append(body)
        if request.path == b"/slow":
            self.pending.append(request)
            return server.NOT_DONE_YET
        return b"got %d" % len(body)


def connect(site: LimitedSite):
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def make(limit=100, read_timeout=0.0, write_timeout=0.0):
    clock = Clock()
    echo = Echo()
    site = LimitedSite(
        echo,
        clock,
        body_limit=lambda path: limit if path.startswith(b"/limited") else None,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
    )
    return clock, echo, site


def test_declared_body_over_limit_is_413_before_any_body_is_read():
    _clock, echo, site = make()
    channel, transport = connect(site)
    channel.dataReceived(b"POST /limited HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"over the limit of 100 bytes" in out
    assert transport.disconnecting
    assert echo.rendered == []


def test_body_at_the_limit_is_accepted():
    _clock, echo, site = make()
    channel, transport = connect(site)
    channel.dataReceived(b"POST /limited HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 100)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert echo.rendered == [b"a" * 100]


def test_chunked_body_is_counted_as_it_arrives():
    _clock, echo, site = make()
    channel, transport = connect(site)
    channel.dataReceived(b"POST /limited HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    channel.dataReceived(b"0\r\n\r\n")
    assert echo.rendered == []


def test_paths_without_a_limit_take_any_size():
    _clock, echo, site = make()
    channel, transport = connect(site)
    channel.dataReceived(b"POST /free HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_trickling_client_is_cut_off_with_408_at_the_read_timeout():
    clock, echo, site = make(read_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /free HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    for _ in range(4):
        clock.advance(1)
        channel.dataReceived(b"a")  # each byte would reset an idle timeout
    assert transport.value() == b""
    clock.advance(1.01)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting
    assert echo.rendered == []


def test_read_timer_is_cancelled_once_the_request_is_complete():
    clock, echo, site = make(read_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /free HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    # Only the channel's own idle timeout is left.
    pending = [c for c in clock.getDelayedCalls() if c.active()]
    assert [c.func.__name__ for c in pending] == ["__timedOut"]


def test_response_not_finished_within_write_timeout_is_aborted():
    clock, echo, site = make(write_timeout=3)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert echo.pending
    clock.advance(2.9)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnecting or transport.disconnected


def test_finished_response_cancels_the_write_timer():
    clock, echo, site = make(write_timeout=3)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    echo.pending[0].write(b"done")
    echo.pending[0].finish()
    clock.advance(10)
    assert not transport.disconnecting


def test_parse_tcp_listen_for_shared_ports():
    import pytest

    from txfaas.runtime import parse_tcp_listen

    assert parse_tcp_listen("tcp:8080") == ("0.0.0.0", 8080, 50)
    assert parse_tcp_listen("tcp:8080:interface=127.0.0.1:backlog=512") == ("127.0.0.1", 8080, 512)
    assert parse_tcp_listen("tcp6:port=8080:interface=\\:\\:1") == ("::1", 8080, 50)
    for bad in ["unix:/tmp/s", "tcp:0", "tcp:http", "ssl:443", "tcp:80:foo=1"]:
        with pytest.raises(ValueError):
            parse_tcp_listen(bad)
