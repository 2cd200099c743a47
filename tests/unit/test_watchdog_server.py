"""The watchdog's HTTP front, driven byte by byte over StringTransport with a Clock.

The runner is a fake whose Deferreds the tests fire or cancel, so every
timeout, limit and state change is checked at its exact bound.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeEndpoint
from txfaas.watchdog.common import FunctionResult, Invocation, WatchdogConfig
from txfaas.watchdog.server import DRAINING, RUNNING, STOPPED, Watchdog

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


@pytest.fixture
def observer() -> Any:
    """Every event logged during the test."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def logged_errors(observer: Any, kind: type) -> list[Any]:
    return [e for e in observer if e.get("log_failure") is not None and e["log_failure"].check(kind)]


class FakeRunner:
    def __init__(self) -> None:
        self.ready = True
        self.calls: list[tuple[Invocation, Deferred[FunctionResult]]] = []
        self.cancelled: list[Invocation] = []
        self.started = False
        self.stopped: Deferred[None] | None = None

    def start(self) -> None:
        self.started = True

    def invoke(self, call: Invocation) -> Deferred[FunctionResult]:
        d: Deferred[FunctionResult] = Deferred(lambda _: self.cancelled.append(call))
        self.calls.append((call, d))
        return d

    def stop(self) -> Deferred[None]:
        self.stopped = Deferred()
        return self.stopped

    def answer(self, index: int = -1, body: bytes = b"out", code: int = 200) -> None:
        self.calls[index][1].callback(FunctionResult(code, ((b"Content-Type", b"text/plain"),), body))


def config(**kw: Any) -> WatchdogConfig:
    base = {"fprocess": ("cat",), "read_timeout": 5.0, "write_timeout": 5.0, "exec_timeout": 10.0}
    base.update(kw)
    return WatchdogConfig(**base)


def parse(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split the bytes a client received into (status, headers, body) responses."""
    responses = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        responses.append((status, headers, rest[:length]))
        raw = rest[length:]
    return responses


@attrs.define
class Client:
    channel: Any
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def responses(self) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        return parse(self.transport.value())

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class FrontHarness:
    def make(self, **kw: Any) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.watchdog = Watchdog(config(**kw), self.clock, self.runner)
        self.watchdog.startService()

    def connect(self) -> Client:
        channel = self.watchdog.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return Client(channel, transport)

    def request(self, client: Client | None = None, raw: bytes = b"") -> Client:
        client = client or self.connect()
        client.send(raw or b"POST /fn?x=1 HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\n\r\nhello")
        return client


@pytest.fixture
def front() -> FrontHarness:
    return FrontHarness()


def test_invocation_carries_method_path_query_headers_body_and_call_id(front: FrontHarness) -> None:
    front.make()
    front.request(
        raw=b"PUT /a/b%20c?q=1&r=2 HTTP/1.1\r\nHost: w\r\nX-Call-Id: abc-1\r\nContent-Length: 3\r\n\r\nxyz"
    )
    call = front.runner.calls[0][0]
    assert (call.method, call.uri, call.path, call.query, call.body, call.call_id) == (
        b"PUT",
        b"/a/b%20c?q=1&r=2",
        b"/a/b%20c",
        b"q=1&r=2",
        b"xyz",
        "abc-1",
    )
    assert call.headers.getRawHeaders(b"host") == [b"w"]


def test_answer_has_function_headers_content_length_and_x_duration_seconds(front: FrontHarness) -> None:
    front.make()
    client = front.request()
    front.clock.advance(0.25)
    front.runner.answer(body=b"result")
    [(status, headers, body)] = client.responses()
    assert (status, body) == (200, b"result")
    assert headers[b"content-type"] == b"text/plain"
    assert headers[b"content-length"] == b"6"
    assert headers[b"x-duration-seconds"] == b"0.250000"
    assert front.watchdog.inflight == 0


def test_client_going_away_cancels_the_call(front: FrontHarness) -> None:
    front.make()
    client = front.request()
    client.channel.connectionLost(Exception("gone"))
    assert len(front.runner.cancelled) == 1
    assert front.watchdog.inflight == 0


def test_a_runner_error_is_a_500_not_a_hang(front: FrontHarness, observer: Any) -> None:
    front.make()
    client = front.request()
    front.runner.calls[0][1].errback(RuntimeError("boom"))
    assert client.responses()[0][0] == 500
    assert len(logged_errors(observer, RuntimeError)) == 1


def test_exec_timeout_cancels_the_call_and_answers_504_at_its_bound(front: FrontHarness) -> None:
    front.make(exec_timeout=2.0)
    client = front.request()
    front.clock.advance(1.999)
    assert (client.responses(), front.runner.cancelled) == ([], [])
    front.clock.advance(0.001)
    [(status, headers, body)] = client.responses()
    assert status == 504
    assert body == b"exec_timeout of 2s exceeded\n"
    assert headers[b"x-duration-seconds"] == b"2.000000"
    assert len(front.runner.cancelled) == 1


def test_x_timeout_shortens_exec_timeout(front: FrontHarness) -> None:
    front.make(exec_timeout=10.0)
    client = front.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: 500ms\r\n\r\n")
    front.clock.advance(0.5)
    [(status, _, body)] = client.responses()
    assert (status, body) == (504, b"X-Timeout of 500ms exceeded\n")


def test_x_timeout_never_lengthens_exec_timeout(front: FrontHarness) -> None:
    front.make(exec_timeout=1.0)
    client = front.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: 1m\r\n\r\n")
    front.clock.advance(1.0)
    [(status, _, body)] = client.responses()
    assert (status, body) == (504, b"exec_timeout of 1s exceeded\n")


def test_x_timeout_applies_when_exec_timeout_is_off(front: FrontHarness) -> None:
    front.make(exec_timeout=0.0)
    client = front.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: 3\r\n\r\n")
    front.clock.advance(3)
    assert client.responses()[0][0] == 504


def test_exec_timeout_zero_means_no_limit(front: FrontHarness) -> None:
    front.make(exec_timeout=0.0)
    client = front.request()
    front.clock.advance(3600)
    assert client.responses() == []
    front.runner.answer()
    assert client.responses()[0][0] == 200


def test_an_invalid_x_timeout_is_a_400(front: FrontHarness) -> None:
    front.make()
    client = front.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: soon\r\n\r\n")
    [(status, _, body)] = client.responses()
    assert status == 400
    assert b"X-Timeout" in body
    assert front.runner.calls == []


def test_a_trickling_client_gets_408_at_read_timeout_from_its_first_byte(
    front: FrontHarness,
) -> None:
    front.make(read_timeout=2.0)
    client = front.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 100\r\n\r\n")
    for _ in range(19):  # a byte every 100ms: Twisted's idle timeout would never fire
        front.clock.advance(0.1)
        client.send(b"x")
    assert not client.closed
    front.clock.advance(0.1)
    [(status, headers, body)] = client.responses()
    assert (status, body) == (408, b"read_timeout of 2s exceeded\n")
    assert headers[b"connection"] == b"close"
    assert client.closed
    assert front.runner.calls == []


def test_trickled_headers_are_cut_off_too(front: FrontHarness) -> None:
    front.make(read_timeout=1.0)
    client = front.connect()
    client.send(b"GET / HTTP/1.1\r\n")
    front.clock.advance(0.5)
    client.send(b"X-Slow: 1\r\n")
    front.clock.advance(0.5)
    assert client.responses()[0][0] == 408


def test_a_request_completed_in_time_is_not_cut_off_while_the_function_runs(
    front: FrontHarness,
) -> None:
    front.make(read_timeout=1.0, exec_timeout=0.0)
    client = front.request()
    front.clock.advance(5)
    assert not client.closed
    front.runner.answer()
    assert client.responses()[0][0] == 200


def test_the_deadline_restarts_at_the_first_byte_of_the_next_request(
    front: FrontHarness,
) -> None:
    front.make(read_timeout=1.0)
    client = front.request(raw=b"GET /1 HTTP/1.1\r\nHost: w\r\n\r\n")
    front.runner.answer()
    front.clock.advance(10)  # idle between requests: idle_timeout's business, not read_timeout's
    assert not client.closed
    client.send(b"GET /2 HTTP/1.1\r\n")
    front.clock.advance(0.999)
    assert not client.closed
    front.clock.advance(0.001)
    assert [r[0] for r in client.responses()] == [200, 408]


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(front: FrontHarness) -> None:
    front.make(read_timeout=1.0, idle_timeout=60.0)
    client = front.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
    front.runner.answer()
    front.clock.advance(59.9)
    assert not client.closed
    front.clock.advance(0.1)
    assert client.closed
    assert [r[0] for r in client.responses()] == [200]


def test_a_connection_that_never_sends_is_closed_without_an_answer(front: FrontHarness) -> None:
    front.make(read_timeout=1.0)
    client = front.connect()
    front.clock.advance(1.0)
    assert client.closed
    assert client.transport.value() == b""


def test_read_timeout_zero_means_no_limit(front: FrontHarness) -> None:
    front.make(read_timeout=0.0)
    client = front.connect()
    client.send(b"GET / HTTP/1.1\r\n")
    front.clock.advance(100)
    assert not client.closed


def test_a_declared_length_over_max_request_is_refused_with_413_before_reading(
    front: FrontHarness,
) -> None:
    front.make(max_request=10)
    client = front.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 11\r\n\r\n")
    [(status, _, _)] = client.responses()
    assert status == 413
    assert client.closed


def test_a_chunked_body_over_max_request_is_refused_with_413(front: FrontHarness) -> None:
    front.make(max_request=10)
    client = front.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"8\r\n12345678\r\n")
    assert client.responses() == []
    client.send(b"8\r\n12345678\r\n0\r\n\r\n")
    assert [r[0] for r in client.responses()] == [413]
    assert front.runner.calls == []


def test_a_body_of_exactly_max_request_is_accepted(front: FrontHarness) -> None:
    front.make(max_request=5)
    front.request()
    assert front.runner.calls[0][0].body == b"hello"


def test_a_client_that_does_not_read_is_disconnected_at_write_timeout(
    front: FrontHarness,
) -> None:
    front.make(write_timeout=3.0)
    client = front.request()
    client.channel.pauseProducing()  # what the transport does when its send buffer is full
    front.runner.answer(body=b"x" * 100)
    assert front.watchdog.inflight == 1
    front.clock.advance(2.999)
    assert not client.transport.disconnected
    front.clock.advance(0.001)
    assert client.transport.disconnected  # abortConnection
    client.channel.connectionLost(Exception("aborted"))
    assert front.watchdog.inflight == 0


def test_a_response_handed_off_in_time_is_not_cut(front: FrontHarness) -> None:
    front.make(write_timeout=3.0)
    client = front.request()
    client.channel.pauseProducing()
    front.runner.answer()
    front.clock.advance(2)
    client.channel.resumeProducing()  # the send buffer drained
    assert front.watchdog.inflight == 0
    front.clock.advance(10)
    assert not client.transport.disconnected


def test_calls_over_max_inflight_get_429_until_one_finishes(front: FrontHarness) -> None:
    front.make(max_inflight=2)
    first, second = front.request(), front.request()
    third = front.request()
    assert third.responses()[0][0] == 429
    assert len(front.runner.calls) == 2
    front.runner.answer(0)
    assert first.responses()[0][0] == 200
    fourth = front.request()
    assert len(front.runner.calls) == 3
    assert (second.responses(), fourth.responses()) == ([], [])


def test_zero_means_no_limit(front: FrontHarness) -> None:
    front.make(max_inflight=0)
    for _ in range(50):
        front.request()
    assert len(front.runner.calls) == 50


class HealthHarness(FrontHarness):
    def health(self) -> int:
        client = self.request(raw=b"GET /_/health HTTP/1.1\r\nHost: w\r\n\r\n")
        return client.responses()[0][0]


@pytest.fixture
def health() -> HealthHarness:
    return HealthHarness()


def test_health_is_503_before_start_200_when_ready_503_when_the_runner_is_not(health: HealthHarness) -> None:
    health.clock = Clock()
    health.runner = FakeRunner()
    health.watchdog = Watchdog(config(), health.clock, health.runner)
    assert health.health() == 503
    health.watchdog.startService()
    assert health.health() == 200
    health.runner.ready = False
    assert health.health() == 503
    assert health.request().responses()[0][0] == 503


def test_other_internal_paths_are_404_and_health_only_answers_get(health: HealthHarness) -> None:
    health.make()
    assert health.request(raw=b"GET /_/other HTTP/1.1\r\nHost: w\r\n\r\n").responses()[0][0] == 404
    assert health.request(raw=b"POST /_/health HTTP/1.1\r\nHost: w\r\n\r\n").responses()[0][0] == 405
    assert health.runner.calls == []


def test_stopping_refuses_new_calls_and_turns_health_503_while_running_calls_finish(
    front: FrontHarness,
) -> None:
    front.make(write_timeout=5.0)
    running = front.request()
    stopped = front.watchdog.stopService()
    assert front.watchdog.state == DRAINING
    assert front.request(raw=b"GET /_/health HTTP/1.1\r\nHost: w\r\n\r\n").responses()[0][0] == 503
    assert front.request().responses()[0][0] == 503
    assert len(front.runner.calls) == 1
    assert front.runner.stopped is None  # the runner is not stopped while a call runs
    front.clock.advance(4)
    front.runner.answer()
    assert running.responses()[0][0] == 200
    assert front.runner.stopped is not None
    assertNoResult(stopped)
    front.runner.stopped.callback(None)
    successResultOf(stopped)
    assert front.watchdog.state == STOPPED


def test_calls_still_running_after_write_timeout_are_stopped_with_503(front: FrontHarness) -> None:
    front.make(write_timeout=5.0, exec_timeout=0.0)
    running = front.request()
    stopped = front.watchdog.stopService()
    front.clock.advance(4.999)
    assert front.runner.cancelled == []
    front.clock.advance(0.001)
    assert len(front.runner.cancelled) == 1
    assert running.responses()[0][0] == 503
    front.runner.stopped.callback(None)
    successResultOf(stopped)


def test_stopping_with_nothing_running_stops_the_runner_at_once(front: FrontHarness) -> None:
    front.make()
    assert front.watchdog.state == RUNNING
    stopped = front.watchdog.stopService()
    front.runner.stopped.callback(None)
    successResultOf(stopped)


def test_a_runner_that_answers_synchronously_is_served(front: FrontHarness) -> None:
    front.make()
    front.runner.invoke = lambda call: succeed(FunctionResult.text(503, "not ready"))  # type: ignore[method-assign]
    client = front.request()
    assert client.responses()[0][0] == 503
    assert front.watchdog.inflight == 0


def test_it_listens_before_start_and_stops_listening_only_after_draining() -> None:
    endpoint = FakeEndpoint()
    runner = FakeRunner()
    watchdog = Watchdog(config(), Clock(), runner, endpoint)
    watchdog.privilegedStartService()
    assert endpoint.factories == [watchdog.site]
    watchdog.startService()
    assert runner.started
    stopped = watchdog.stopService()
    assert not endpoint.port.stopped  # health keeps answering 503 while the runner stops
    runner.stopped.callback(None)
    successResultOf(stopped)
    assert endpoint.port.stopped


def test_a_port_it_cannot_listen_on_stops_twistd_with_one_line_not_a_traceback() -> None:
    endpoint = FakeEndpoint(CannotListenError("", 8080, OSError(98, "Address already in use")))
    runner = FakeRunner()
    watchdog = Watchdog(config(), Clock(), runner, endpoint)
    with pytest.raises(SystemExit) as caught:
        watchdog.privilegedStartService()
    message = str(caught.value.code)
    assert message == "error: --listen tcp:8080: cannot listen (Address already in use)"
    assert runner.started is False


def test_a_runner_raising_synchronously_is_a_500_and_does_not_hold_a_slot(
    front: FrontHarness, observer: Any
) -> None:
    front.make(max_inflight=1)

    def broken(call: Invocation) -> Deferred[FunctionResult]:
        raise RuntimeError("bug")

    front.runner.invoke = broken  # type: ignore[method-assign]
    assert front.request().responses()[0][0] == 500
    assert front.watchdog.inflight == 0
    assert len(logged_errors(observer, RuntimeError)) == 1
