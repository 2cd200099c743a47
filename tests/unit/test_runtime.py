"""What every process shares: request limits (413 before reading, chunked counting, read, response
and send deadlines) and start-up failures (one line, exit 1, no traceback)."""

from __future__ import annotations

import pytest
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http_headers import Headers

from tests.fakes import FakeEndpoint
from txfaas.config import ConfigError
from txfaas.http.client import BytesProducer
from txfaas.service import Listener, StartupError, exit_on_startup_error, run_startup
from txfaas.timers import LazyTimer, TimerQueue
from txfaas.web.server import LimitedSite, Route


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


def make(limit=100, read_timeout=0.0, response_timeout=0.0, send_timeout=0.0, body_limit=None):
    clock = Clock()
    echo = Echo()
    site = LimitedSite(
        echo,
        clock,
        body_limit=body_limit,
        routes=None if body_limit is not None else {b"limited": Route(b"limited", None, limit)},
        read_timeout=read_timeout,
        response_timeout=response_timeout,
        send_timeout=send_timeout,
    )
    return clock, echo, site


def active(clock):
    return [c for c in clock.getDelayedCalls() if c.active()]


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
    answered = transport.value()
    assert answered.startswith(b"HTTP/1.1 200 ")
    clock.advance(60)  # well past the answered request's read deadline: a kept-alive connection
    assert transport.value() == answered
    assert not (transport.disconnecting or transport.disconnected)


def test_idle_timeout_closes_a_kept_alive_connection_and_restarts_with_each_request():
    clock = Clock()
    site = LimitedSite(Echo(), clock, idle_timeout=30)
    channel, transport = connect(site)
    clock.advance(20)
    channel.dataReceived(b"GET /free HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(29)  # 49 s since the connection opened, 29 since the last response
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting


def test_a_closed_connection_leaves_no_timer_behind():
    """A pending call would keep the channel (and its transport) in memory until it came due."""
    clock, echo, site = make(read_timeout=5, response_timeout=9)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /free HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [c for c in clock.getDelayedCalls() if c.active()]
    channel.connectionLost(Failure(ConnectionDone()))
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_response_not_finished_within_write_timeout_is_aborted():
    clock, echo, site = make(response_timeout=3)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert echo.pending
    clock.advance(2.9)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnecting or transport.disconnected


def test_finished_response_cancels_the_write_timer():
    clock, echo, site = make(response_timeout=3)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    echo.pending[0].write(b"done")
    echo.pending[0].finish()
    clock.advance(10)
    assert not transport.disconnecting


def test_a_fixed_body_limit_applies_to_every_path_and_zero_means_none():
    _clock, echo, site = make(body_limit=10)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /free HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    _clock, echo, site = make(body_limit=0)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /limited HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"c" * 500)
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_trickled_request_line_and_headers_are_cut_off_too():
    """The deadline runs from the connection's opening, not from the end of the request line."""
    clock, echo, site = make(read_timeout=2)
    channel, transport = connect(site)
    clock.advance(1)
    channel.dataReceived(b"GET /free HT")
    clock.advance(0.5)
    channel.dataReceived(b"TP/1.1\r\nHost: x\r\n")
    clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert b"read_timeout of 2s exceeded" in transport.value()


def test_a_connection_that_never_sends_is_closed_at_the_read_timeout_without_an_answer():
    clock, echo, site = make(read_timeout=2)
    channel, transport = connect(site)
    clock.advance(1.99)
    assert not transport.disconnecting
    clock.advance(0.01)
    assert transport.disconnecting
    assert transport.value() == b""


def test_the_next_request_on_a_kept_alive_connection_gets_its_deadline_from_its_first_byte():
    clock, echo, site = make(read_timeout=2)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /free HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(30)  # idle between requests: the idle timeout's business
    assert not transport.disconnecting
    channel.dataReceived(b"GET /free HTTP/1.1\r\n")
    clock.advance(1.99)
    assert not transport.disconnecting
    clock.advance(0.01)
    assert transport.value().count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 408 " in transport.value()


def test_requests_make_no_timer_in_the_reactor():
    """The deadlines (read, response, idle) move on without a callLater per request."""
    clock, echo, site = make(read_timeout=5, response_timeout=3)
    channel, transport = connect(site)
    armed = len(active(clock))
    for _ in range(20):
        channel.dataReceived(b"GET /free HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(0.1)
    assert transport.value().count(b"HTTP/1.1 200 ") == 20
    assert len(active(clock)) == armed
    assert len(clock.calls) == armed  # nothing made and cancelled either


def test_the_read_deadline_becomes_the_response_deadline_when_the_request_is_in():
    clock, echo, site = make(read_timeout=5, response_timeout=3)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\n")
    clock.advance(1)
    channel.dataReceived(b"Host: x\r\n\r\n")
    clock.advance(2.99)
    assert not transport.disconnected
    clock.advance(0.01)
    assert transport.disconnected  # abortConnection: the response was not finished


def test_response_timeout_counts_from_the_end_of_the_request_not_its_start():
    clock, echo, site = make(read_timeout=10, response_timeout=3)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
    clock.advance(5)  # a slow upload
    channel.dataReceived(b"ab")
    clock.advance(2.9)
    assert not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected


def test_a_finished_response_the_client_does_not_read_is_aborted_at_the_send_timeout():
    clock, echo, site = make(send_timeout=4)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.pauseProducing()  # what the transport does when its send buffer is full
    echo.pending[0].write(b"x" * 10)
    echo.pending[0].finish()
    clock.advance(3.99)
    assert not transport.disconnected
    clock.advance(0.01)
    assert transport.disconnected


def test_a_client_that_reads_in_time_is_not_cut_and_when_flushed_fires():
    clock, echo, site = make(send_timeout=4)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.pauseProducing()
    echo.pending[0].finish()
    flushed = []
    channel.whenFlushed(lambda: flushed.append(True))
    clock.advance(2)
    channel.resumeProducing()
    assert flushed == [True]
    clock.advance(10)
    assert not transport.disconnected


def test_without_send_timeout_a_backed_up_client_is_left_to_the_other_timers():
    clock, echo, site = make()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.pauseProducing()
    echo.pending[0].finish()
    clock.advance(3600)
    assert not transport.disconnected


def test_parse_tcp_listen_for_shared_ports():
    from txfaas.service import parse_tcp_listen

    assert parse_tcp_listen("tcp:8080") == ("0.0.0.0", 8080, 1024)
    assert parse_tcp_listen("tcp:8080", 77) == ("0.0.0.0", 8080, 77)
    assert parse_tcp_listen("tcp:8080:interface=127.0.0.1:backlog=512", 77) == ("127.0.0.1", 8080, 512)
    assert parse_tcp_listen("tcp6:port=8080:interface=\\:\\:1") == ("::1", 8080, 1024)
    for bad in ["unix:/tmp/s", "tcp:0", "tcp:http", "ssl:443", "tcp:80:foo=1"]:
        with pytest.raises(ValueError):
            parse_tcp_listen(bad)


# --- start-up failures ----------------------------------------------------------------------


class FakeReactor:
    def __init__(self) -> None:
        self.running = True
        self.stopped = False
        self.triggers: list = []

    def addSystemEventTrigger(self, phase, event, f):
        self.triggers.append((phase, event, f))

    def stop(self):
        self.stopped = True


def test_listener_opens_in_privileged_start_and_closes_on_stop():
    endpoint = FakeEndpoint()
    listener = Listener(None, "tcp:8080", object(), endpoint=endpoint)
    listener.privilegedStartService()
    assert listener.port is endpoint.port
    listener.startService()
    listener.stopService()
    assert endpoint.port.stopped and listener.port is None


def test_a_port_in_use_is_one_line_naming_the_setting_and_system_exit():
    endpoint = FakeEndpoint(CannotListenError("", 8080, OSError(98, "Address already in use")))
    listener = Listener(None, "tcp:8080", object(), setting="--metrics-listen", endpoint=endpoint)
    with pytest.raises(SystemExit) as caught:
        listener.privilegedStartService()
    assert caught.value.code == "error: --metrics-listen tcp:8080: cannot listen (Address already in use)"


def test_a_bad_endpoint_description_is_one_line_and_system_exit():
    with pytest.raises(SystemExit) as caught:
        Listener(MemoryReactor(), "nonsense:8080", object()).privilegedStartService()
    message = str(caught.value.code)
    assert message.startswith("error: --listen nonsense:8080: not a valid endpoint")
    assert "\n" not in message


def test_an_endpoint_that_fails_later_ends_the_running_process_with_exit_1(monkeypatch, capsys):
    reactor = FakeReactor()
    endpoint = FakeEndpoint(later=True)
    listener = Listener(reactor, "tcp:8080", object(), endpoint=endpoint)
    listener.privilegedStartService()
    assert listener.port is None and not reactor.stopped
    endpoint.pending.errback(CannotListenError("", 8080, OSError(13, "Permission denied")))
    assert reactor.stopped
    assert capsys.readouterr().err == "error: --listen tcp:8080: cannot listen (Permission denied)\n"
    [(phase, event, leave)] = reactor.triggers
    exits = []
    monkeypatch.setattr("os._exit", exits.append)
    leave()
    assert (phase, event, exits) == ("after", "shutdown", [1])


def test_exit_on_startup_error_turns_config_and_startup_errors_into_one_line_exits():
    with pytest.raises(SystemExit) as caught, exit_on_startup_error():
        raise ConfigError("--exec-timeout", "must be more than 0")
    assert caught.value.code == "error: --exec-timeout: must be more than 0"
    with pytest.raises(SystemExit) as caught, exit_on_startup_error():
        raise StartupError("--redis redis://x: unreachable")
    assert caught.value.code == "error: --redis redis://x: unreachable"
    with pytest.raises(KeyError), exit_on_startup_error():
        raise KeyError("a bug stays a bug, with its traceback")


def test_run_startup_ends_the_process_with_the_line_of_a_startup_error(capsys):
    reactor = FakeReactor()

    async def start():
        raise StartupError("--functions f.json: not valid JSON")

    run_startup(reactor, start)
    assert reactor.stopped
    assert capsys.readouterr().err == "error: --functions f.json: not valid JSON\n"


def test_bytes_producer_writes_the_body_at_once_and_declares_its_length():
    from twisted.internet.testing import StringTransport as Consumer

    consumer = Consumer()
    producer = BytesProducer(b"payload")
    assert producer.length == 7
    done = producer.startProducing(consumer)
    assert consumer.value() == b"payload" and done.called
    empty = Consumer()
    BytesProducer(b"").startProducing(empty)
    assert empty.value() == b""


def test_open_store_memory_url_is_the_in_process_store_and_a_redis_url_a_redis_store(monkeypatch):
    from txfaas.config import parse_redis_url
    from txfaas.store import open_store
    from txfaas.store.memory import MemoryStore
    from txfaas.store.redis import RedisStore

    assert isinstance(open_store(None, parse_redis_url("memory:"), prefix="p:", call_ttl=60), MemoryStore)
    made = []
    monkeypatch.setattr(
        RedisStore, "from_url", classmethod(lambda cls, *a, **kw: made.append((a, kw)) or "redis")
    )
    reactor = object()
    url = parse_redis_url("redis://h:1/2")
    assert open_store(reactor, url, prefix="p:", call_ttl=60) == "redis"
    assert made == [((url, reactor), {"prefix": "p:", "call_ttl": 60})]


def test_ordered_multiservice_stops_children_in_turn_last_added_first():
    from twisted.application import service
    from twisted.internet import defer

    from txfaas.service import OrderedMultiService

    events: list[str] = []
    pending: dict[str, defer.Deferred] = {}

    class Step(service.Service):
        def __init__(self, name: str) -> None:
            self.name = name

        def stopService(self):
            super().stopService()
            events.append(f"stop {self.name}")
            pending[self.name] = defer.Deferred()
            return pending[self.name]

    top = OrderedMultiService()
    for name in ["pools", "worker", "listener"]:
        Step(name).setServiceParent(top)
    top.startService()
    done = top.stopService()
    assert events == ["stop listener"]
    pending["listener"].callback(None)
    assert events == ["stop listener", "stop worker"]  # the worker drains only once the port closed
    pending["worker"].callback(None)
    assert events == ["stop listener", "stop worker", "stop pools"]
    assert not done.called
    pending["pools"].callback(None)
    assert done.called


def test_form_bodies_are_not_parsed_but_kept_whole():
    """A form-encoded POST reaches the resource as bytes, untouched and unparsed (nothing in args)."""
    seen = {}

    class Keep(resource.Resource):
        isLeaf = True

        def render(self, request):
            seen["args"] = dict(request.args)
            seen["body"] = request.content.read()
            return b"ok"

    site = LimitedSite(Keep(), Clock())
    channel, transport = connect(site)
    body = b"a=1&b=2"
    channel.dataReceived(
        b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert seen == {"args": {}, "body": body}


# --- LazyTimer and TimerQueue ---------------------------------------------------------------


def lazy_timer() -> tuple[Clock, LazyTimer, list[float]]:
    """A LazyTimer on a Clock, recording the times it fired at."""
    clock = Clock()
    fired: list[float] = []
    return clock, LazyTimer(clock, lambda: fired.append(clock.seconds())), fired


def test_lazy_timer_fires_at_the_last_deadline_set():
    clock, timer, fired = lazy_timer()
    timer.set(5)
    clock.advance(3)
    timer.set(5)  # later: the armed call stays, and re-arms when it comes due
    clock.advance(2)
    assert fired == [] and timer.pending
    clock.advance(2.99)
    assert fired == []
    clock.advance(0.01)
    assert fired == [8]
    assert not timer.pending


def test_lazy_timer_moves_its_call_when_the_new_deadline_is_sooner():
    clock, timer, fired = lazy_timer()
    timer.set(60)
    timer.set(1)
    clock.advance(1)
    assert fired == [1]
    clock.advance(100)
    assert fired == [1]


def test_lazy_timer_cleared_or_stopped_does_not_fire():
    clock, timer, fired = lazy_timer()
    timer.set(2)
    timer.clear()
    clock.advance(5)
    assert fired == []
    timer.set(2)
    timer.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(5)
    assert fired == []


def test_timer_queue_fires_each_timer_at_its_own_deadline_with_one_reactor_call():
    clock = Clock()
    queue = TimerQueue(clock, 10)
    fired: list[tuple[str, float]] = []
    queue.add(lambda: fired.append(("a", clock.seconds())))
    clock.advance(3)
    b = queue.add(lambda: fired.append(("b", clock.seconds())))
    clock.advance(1)
    queue.add(lambda: fired.append(("c", clock.seconds())))
    assert len(clock.getDelayedCalls()) == 1
    b.cancel()
    assert not b.active() and len(queue) == 2
    clock.advance(6)
    assert fired == [("a", 10)]
    clock.advance(4)
    assert fired == [("a", 10), ("c", 14)]
    assert clock.getDelayedCalls() == [] and len(queue) == 0


def test_timer_queue_drops_cancelled_timers_behind_a_slow_one():
    """One call at the head that lasts its whole timeout must not make the queue keep every
    call cancelled behind it."""
    clock = Clock()
    queue = TimerQueue(clock, 60)
    queue.add(lambda: None)  # the slow one
    for _ in range(5000):
        queue.add(lambda: None).cancel()
    assert len(queue._queue) < 2100
    assert len(queue) == 1


def test_timer_queue_keeps_going_after_a_timer_fails():
    clock = Clock()
    queue = TimerQueue(clock, 1)
    fired: list[str] = []
    queue.add(lambda: 1 / 0)
    queue.add(lambda: fired.append("next"))
    with capturedLogs() as events:
        clock.advance(1)
    assert fired == ["next"]
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [ZeroDivisionError]


def test_timer_queue_stop_fires_nothing():
    clock = Clock()
    queue = TimerQueue(clock, 1)
    fired: list[str] = []
    timer = queue.add(lambda: fired.append("x"))
    queue.stop()
    assert not timer.active()
    clock.advance(2)
    assert fired == [] and clock.getDelayedCalls() == []


def test_the_response_head_is_written_once_and_as_twisted_writes_it():
    from twisted.web.http import HTTPChannel

    _clock, _echo, site = make()
    channel, transport = connect(site)
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    headers = Headers({b"x-a": [b"1", b"2"], b"content-type": [b"text/plain"]})
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
    theirs = StringTransport()
    stock = HTTPChannel()
    stock.makeConnection(theirs)
    stock.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
    assert writes == [theirs.value()]
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nX-A: 2\r\n")
    # The old form, a list of pairs, is still sanitised by Twisted's own code.
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", [(b"x-b", b"bad\r\nvalue")])
    assert b"X-B: bad value\r\n" in transport.value()


def test_a_closed_connection_leaves_no_reference_cycle():
    """Its timers let go of the channel when it closes: freed by reference counting at once."""
    import gc
    import weakref

    _clock, _echo, site = make(read_timeout=5.0, response_timeout=5.0)
    gc.collect()
    gc.disable()
    try:
        channel, transport = connect(site)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in transport.value()
        transport.producer = None  # as a real transport lets go of it when the connection ends
        channel.connectionLost(Failure(ConnectionDone()))
        ref = weakref.ref(channel)
        del channel
        assert ref() is None
    finally:
        gc.enable()


def test_settle_gc_freezes_start_up_objects_once_the_reactor_runs_and_never_in_a_running_one():
    import gc

    from txfaas.service import settle_gc

    class Reactor:
        def __init__(self, running: bool) -> None:
            self.running = running
            self.when_running: list = []

        def callWhenRunning(self, f) -> None:  # type: ignore[no-untyped-def]
            self.when_running.append(f)

    running = Reactor(True)
    settle_gc(running)
    assert running.when_running == []  # a test run (or a reactor already going): left alone
    starting = Reactor(False)
    settle_gc(starting)
    [settle] = starting.when_running
    assert gc.get_freeze_count() == 0
    threshold = gc.get_threshold()
    try:
        settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (10_000, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


# --- a head over Twisted's limits is answered, not dropped -----------------------------------


def _head_answer(data: bytes, piecewise: bool = False) -> tuple[bytes, bool]:
    _clock, echo, site = make()
    channel, transport = connect(site)
    if piecewise:
        for i in range(0, len(data), 1000):
            channel.dataReceived(data[i : i + 1000])
    else:
        channel.dataReceived(data)
    return transport.value(), transport.disconnecting


@pytest.mark.parametrize("piecewise", [False, True])
def test_a_request_line_over_16k_is_414(piecewise):
    answer, closing = _head_answer(b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", piecewise)
    assert answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    assert answer.endswith(b"the request line is over 16384 bytes\n")
    assert closing


@pytest.mark.parametrize("piecewise", [False, True])
def test_a_header_line_over_16k_is_431(piecewise):
    answer, closing = _head_answer(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", piecewise
    )
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert closing


def test_header_lines_adding_up_to_over_16k_are_431():
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    answer, closing = _head_answer(b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"the request head is over 16384 bytes" in answer
    assert closing


def test_more_header_lines_than_allowed_are_431():
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(600))
    answer, closing = _head_answer(b"GET / HTTP/1.1\r\n" + lines + b"\r\n", piecewise=True)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"more than 500 header lines" in answer


def test_a_head_just_within_the_limits_is_served():
    answer, _closing = _head_answer(b"GET /" + b"a" * 16000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


# --- the listen backlog ------------------------------------------------------------------------


def test_endpoints_get_the_production_backlog_unless_they_set_their_own():
    from twisted.internet.testing import MemoryReactor

    from txfaas.service import DEFAULT_BACKLOG, server_endpoint, with_backlog

    assert DEFAULT_BACKLOG == 1024
    assert with_backlog("tcp:8080", 1024) == "tcp:8080:backlog=1024"
    assert with_backlog("tcp6:8080:interface=\\:\\:1", 7) == "tcp6:8080:interface=\\:\\:1:backlog=7"
    assert with_backlog("8080", 9) == "8080:backlog=9"
    assert with_backlog("unix:/tmp/s", 9) == "unix:/tmp/s:backlog=9"
    assert with_backlog("tcp:8080:backlog=5", 1024) == "tcp:8080:backlog=5"
    assert with_backlog("systemd:domain=INET:index=0", 1024) == "systemd:domain=INET:index=0"
    reactor = MemoryReactor()
    assert server_endpoint(reactor, "tcp:0")._backlog == 1024
    assert server_endpoint(reactor, "tcp:0", backlog=64)._backlog == 64
    assert server_endpoint(reactor, "tcp:0:backlog=5")._backlog == 5
    server_endpoint(reactor, "tcp:0").listen(site_for_backlog())
    assert reactor.tcpServers[0][2] == 1024


def site_for_backlog():
    return make()[2]


def test_the_queue_cancels_a_watched_deferred_at_its_deadline_only_if_still_waiting():
    from twisted.internet.defer import CancelledError, Deferred

    clock = Clock()
    queue = TimerQueue(clock)
    early, late = Deferred(), Deferred()
    fired: list[str] = []
    queue.watch(early, 5.0)
    queue.add(lambda: fired.append("timer"), when=6.0)
    queue.watch(late, 7.0)
    early.callback("in time")
    clock.advance(6.0)
    assert fired == ["timer"] and early.result == "in time" and not late.called
    clock.advance(1.0)
    assert late.called
    late.addErrback(lambda f: f.trap(CancelledError))
    assert len(queue) == 0 and not clock.getDelayedCalls()
