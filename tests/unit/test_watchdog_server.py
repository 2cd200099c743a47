"""The watchdog's HTTP front, driven byte by byte over StringTransport with a Clock.

The runner is a fake whose Deferreds the tests fire or cancel, so every
timeout, limit and state change is checked at its exact bound.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeEndpoint
from txfaas.watchdog.common import FunctionResult, Invocation, WatchdogConfig
from txfaas.watchdog.server import DRAINING, RUNNING, STOPPED, Watchdog


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


class FrontTestCase(SynchronousTestCase):
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


class CallTests(FrontTestCase):
    def test_invocation_carries_method_path_query_headers_body_and_call_id(self) -> None:
        self.make()
        self.request(
            raw=b"PUT /a/b%20c?q=1&r=2 HTTP/1.1\r\nHost: w\r\nX-Call-Id: abc-1\r\n"
            b"Content-Length: 3\r\n\r\nxyz"
        )
        call = self.runner.calls[0][0]
        self.assertEqual(
            (call.method, call.uri, call.path, call.query, call.body, call.call_id),
            (b"PUT", b"/a/b%20c?q=1&r=2", b"/a/b%20c", b"q=1&r=2", b"xyz", "abc-1"),
        )
        self.assertEqual(call.headers.getRawHeaders(b"host"), [b"w"])

    def test_answer_has_function_headers_content_length_and_x_duration_seconds(self) -> None:
        self.make()
        client = self.request()
        self.clock.advance(0.25)
        self.runner.answer(body=b"result")
        [(status, headers, body)] = client.responses()
        self.assertEqual((status, body), (200, b"result"))
        self.assertEqual(headers[b"content-type"], b"text/plain")
        self.assertEqual(headers[b"content-length"], b"6")
        self.assertEqual(headers[b"x-duration-seconds"], b"0.250000")
        self.assertEqual(self.watchdog.inflight, 0)

    def test_client_going_away_cancels_the_call(self) -> None:
        self.make()
        client = self.request()
        client.channel.connectionLost(Exception("gone"))
        self.assertEqual(len(self.runner.cancelled), 1)
        self.assertEqual(self.watchdog.inflight, 0)

    def test_a_runner_error_is_a_500_not_a_hang(self) -> None:
        self.make()
        client = self.request()
        self.runner.calls[0][1].errback(RuntimeError("boom"))
        self.assertEqual(client.responses()[0][0], 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ExecTimeoutTests(FrontTestCase):
    def test_exec_timeout_cancels_the_call_and_answers_504_at_its_bound(self) -> None:
        self.make(exec_timeout=2.0)
        client = self.request()
        self.clock.advance(1.999)
        self.assertEqual((client.responses(), self.runner.cancelled), ([], []))
        self.clock.advance(0.001)
        [(status, headers, body)] = client.responses()
        self.assertEqual(status, 504)
        self.assertEqual(body, b"exec_timeout of 2s exceeded\n")
        self.assertEqual(headers[b"x-duration-seconds"], b"2.000000")
        self.assertEqual(len(self.runner.cancelled), 1)

    def test_x_timeout_shortens_exec_timeout(self) -> None:
        self.make(exec_timeout=10.0)
        client = self.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: 500ms\r\n\r\n")
        self.clock.advance(0.5)
        [(status, _, body)] = client.responses()
        self.assertEqual((status, body), (504, b"X-Timeout of 500ms exceeded\n"))

    def test_x_timeout_never_lengthens_exec_timeout(self) -> None:
        self.make(exec_timeout=1.0)
        client = self.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: 1m\r\n\r\n")
        self.clock.advance(1.0)
        [(status, _, body)] = client.responses()
        self.assertEqual((status, body), (504, b"exec_timeout of 1s exceeded\n"))

    def test_x_timeout_applies_when_exec_timeout_is_off(self) -> None:
        self.make(exec_timeout=0.0)
        client = self.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: 3\r\n\r\n")
        self.clock.advance(3)
        self.assertEqual(client.responses()[0][0], 504)

    def test_exec_timeout_zero_means_no_limit(self) -> None:
        self.make(exec_timeout=0.0)
        client = self.request()
        self.clock.advance(3600)
        self.assertEqual(client.responses(), [])
        self.runner.answer()
        self.assertEqual(client.responses()[0][0], 200)

    def test_an_invalid_x_timeout_is_a_400(self) -> None:
        self.make()
        client = self.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\nX-Timeout: soon\r\n\r\n")
        [(status, _, body)] = client.responses()
        self.assertEqual(status, 400)
        self.assertIn(b"X-Timeout", body)
        self.assertEqual(self.runner.calls, [])


class ReadTimeoutTests(FrontTestCase):
    def test_a_trickling_client_gets_408_at_read_timeout_from_its_first_byte(self) -> None:
        self.make(read_timeout=2.0)
        client = self.connect()
        client.send(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 100\r\n\r\n")
        for _ in range(19):  # a byte every 100ms: Twisted's idle timeout would never fire
            self.clock.advance(0.1)
            client.send(b"x")
        self.assertFalse(client.closed)
        self.clock.advance(0.1)
        [(status, headers, body)] = client.responses()
        self.assertEqual((status, body), (408, b"read_timeout of 2s exceeded\n"))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(client.closed)
        self.assertEqual(self.runner.calls, [])

    def test_trickled_headers_are_cut_off_too(self) -> None:
        self.make(read_timeout=1.0)
        client = self.connect()
        client.send(b"GET / HTTP/1.1\r\n")
        self.clock.advance(0.5)
        client.send(b"X-Slow: 1\r\n")
        self.clock.advance(0.5)
        self.assertEqual(client.responses()[0][0], 408)

    def test_a_request_completed_in_time_is_not_cut_off_while_the_function_runs(self) -> None:
        self.make(read_timeout=1.0, exec_timeout=0.0)
        client = self.request()
        self.clock.advance(5)
        self.assertFalse(client.closed)
        self.runner.answer()
        self.assertEqual(client.responses()[0][0], 200)

    def test_the_deadline_restarts_at_the_first_byte_of_the_next_request(self) -> None:
        self.make(read_timeout=1.0)
        client = self.request(raw=b"GET /1 HTTP/1.1\r\nHost: w\r\n\r\n")
        self.runner.answer()
        self.clock.advance(10)  # idle between requests: idle_timeout's business, not read_timeout's
        self.assertFalse(client.closed)
        client.send(b"GET /2 HTTP/1.1\r\n")
        self.clock.advance(0.999)
        self.assertFalse(client.closed)
        self.clock.advance(0.001)
        self.assertEqual([r[0] for r in client.responses()], [200, 408])

    def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(self) -> None:
        self.make(read_timeout=1.0, idle_timeout=60.0)
        client = self.request(raw=b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
        self.runner.answer()
        self.clock.advance(59.9)
        self.assertFalse(client.closed)
        self.clock.advance(0.1)
        self.assertTrue(client.closed)
        self.assertEqual([r[0] for r in client.responses()], [200])

    def test_a_connection_that_never_sends_is_closed_without_an_answer(self) -> None:
        self.make(read_timeout=1.0)
        client = self.connect()
        self.clock.advance(1.0)
        self.assertTrue(client.closed)
        self.assertEqual(client.transport.value(), b"")

    def test_read_timeout_zero_means_no_limit(self) -> None:
        self.make(read_timeout=0.0)
        client = self.connect()
        client.send(b"GET / HTTP/1.1\r\n")
        self.clock.advance(100)
        self.assertFalse(client.closed)


class MaxRequestTests(FrontTestCase):
    def test_a_declared_length_over_max_request_is_refused_with_413_before_reading(self) -> None:
        self.make(max_request=10)
        client = self.connect()
        client.send(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 11\r\n\r\n")
        [(status, _, _)] = client.responses()
        self.assertEqual(status, 413)
        self.assertTrue(client.closed)

    def test_a_chunked_body_over_max_request_is_refused_with_413(self) -> None:
        self.make(max_request=10)
        client = self.connect()
        client.send(b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n")
        client.send(b"8\r\n12345678\r\n")
        self.assertEqual(client.responses(), [])
        client.send(b"8\r\n12345678\r\n0\r\n\r\n")
        self.assertEqual([r[0] for r in client.responses()], [413])
        self.assertEqual(self.runner.calls, [])

    def test_a_body_of_exactly_max_request_is_accepted(self) -> None:
        self.make(max_request=5)
        self.request()
        self.assertEqual(self.runner.calls[0][0].body, b"hello")


class WriteTimeoutTests(FrontTestCase):
    def test_a_client_that_does_not_read_is_disconnected_at_write_timeout(self) -> None:
        self.make(write_timeout=3.0)
        client = self.request()
        client.channel.pauseProducing()  # what the transport does when its send buffer is full
        self.runner.answer(body=b"x" * 100)
        self.assertEqual(self.watchdog.inflight, 1)
        self.clock.advance(2.999)
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(0.001)
        self.assertTrue(client.transport.disconnected)  # abortConnection
        client.channel.connectionLost(Exception("aborted"))
        self.assertEqual(self.watchdog.inflight, 0)

    def test_a_response_handed_off_in_time_is_not_cut(self) -> None:
        self.make(write_timeout=3.0)
        client = self.request()
        client.channel.pauseProducing()
        self.runner.answer()
        self.clock.advance(2)
        client.channel.resumeProducing()  # the send buffer drained
        self.assertEqual(self.watchdog.inflight, 0)
        self.clock.advance(10)
        self.assertFalse(client.transport.disconnected)


class MaxInflightTests(FrontTestCase):
    def test_calls_over_max_inflight_get_429_until_one_finishes(self) -> None:
        self.make(max_inflight=2)
        first, second = self.request(), self.request()
        third = self.request()
        self.assertEqual(third.responses()[0][0], 429)
        self.assertEqual(len(self.runner.calls), 2)
        self.runner.answer(0)
        self.assertEqual(first.responses()[0][0], 200)
        fourth = self.request()
        self.assertEqual(len(self.runner.calls), 3)
        self.assertEqual((second.responses(), fourth.responses()), ([], []))

    def test_zero_means_no_limit(self) -> None:
        self.make(max_inflight=0)
        for _ in range(50):
            self.request()
        self.assertEqual(len(self.runner.calls), 50)


class HealthTests(FrontTestCase):
    def health(self) -> int:
        client = self.request(raw=b"GET /_/health HTTP/1.1\r\nHost: w\r\n\r\n")
        return client.responses()[0][0]

    def test_health_is_503_before_start_200_when_ready_503_when_the_runner_is_not(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.watchdog = Watchdog(config(), self.clock, self.runner)
        self.assertEqual(self.health(), 503)
        self.watchdog.startService()
        self.assertEqual(self.health(), 200)
        self.runner.ready = False
        self.assertEqual(self.health(), 503)
        self.assertEqual(self.request().responses()[0][0], 503)

    def test_other_internal_paths_are_404_and_health_only_answers_get(self) -> None:
        self.make()
        self.assertEqual(self.request(raw=b"GET /_/other HTTP/1.1\r\nHost: w\r\n\r\n").responses()[0][0], 404)
        self.assertEqual(
            self.request(raw=b"POST /_/health HTTP/1.1\r\nHost: w\r\n\r\n").responses()[0][0], 405
        )
        self.assertEqual(self.runner.calls, [])


class DrainTests(FrontTestCase):
    def test_stopping_refuses_new_calls_and_turns_health_503_while_running_calls_finish(self) -> None:
        self.make(write_timeout=5.0)
        running = self.request()
        stopped = self.watchdog.stopService()
        self.assertEqual(self.watchdog.state, DRAINING)
        self.assertEqual(
            self.request(raw=b"GET /_/health HTTP/1.1\r\nHost: w\r\n\r\n").responses()[0][0], 503
        )
        self.assertEqual(self.request().responses()[0][0], 503)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertIsNone(self.runner.stopped)  # the runner is not stopped while a call runs
        self.clock.advance(4)
        self.runner.answer()
        self.assertEqual(running.responses()[0][0], 200)
        self.assertIsNotNone(self.runner.stopped)
        self.assertNoResult(stopped)
        self.runner.stopped.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.watchdog.state, STOPPED)

    def test_calls_still_running_after_write_timeout_are_stopped_with_503(self) -> None:
        self.make(write_timeout=5.0, exec_timeout=0.0)
        running = self.request()
        stopped = self.watchdog.stopService()
        self.clock.advance(4.999)
        self.assertEqual(self.runner.cancelled, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.runner.cancelled), 1)
        self.assertEqual(running.responses()[0][0], 503)
        self.runner.stopped.callback(None)
        self.successResultOf(stopped)

    def test_stopping_with_nothing_running_stops_the_runner_at_once(self) -> None:
        self.make()
        self.assertEqual(self.watchdog.state, RUNNING)
        stopped = self.watchdog.stopService()
        self.runner.stopped.callback(None)
        self.successResultOf(stopped)


class QuickAnswerTests(FrontTestCase):
    def test_a_runner_that_answers_synchronously_is_served(self) -> None:
        self.make()
        self.runner.invoke = lambda call: succeed(FunctionResult.text(503, "not ready"))  # type: ignore[method-assign]
        client = self.request()
        self.assertEqual(client.responses()[0][0], 503)
        self.assertEqual(self.watchdog.inflight, 0)


class ListenTests(SynchronousTestCase):
    def test_it_listens_before_start_and_stops_listening_only_after_draining(self) -> None:
        endpoint = FakeEndpoint()
        runner = FakeRunner()
        watchdog = Watchdog(config(), Clock(), runner, endpoint)
        watchdog.privilegedStartService()
        self.assertEqual(endpoint.factories, [watchdog.site])
        watchdog.startService()
        self.assertTrue(runner.started)
        stopped = watchdog.stopService()
        self.assertFalse(endpoint.port.stopped)  # health keeps answering 503 while the runner stops
        runner.stopped.callback(None)
        self.successResultOf(stopped)
        self.assertTrue(endpoint.port.stopped)

    def test_a_port_it_cannot_listen_on_stops_twistd_with_one_line_not_a_traceback(self) -> None:
        endpoint = FakeEndpoint(CannotListenError("", 8080, OSError(98, "Address already in use")))
        runner = FakeRunner()
        watchdog = Watchdog(config(), Clock(), runner, endpoint)
        with self.assertRaises(SystemExit) as caught:
            watchdog.privilegedStartService()
        message = str(caught.exception.code)
        self.assertEqual(message, "error: --listen tcp:8080: cannot listen (Address already in use)")
        self.assertEqual(runner.started, False)


class RunnerBugTests(FrontTestCase):
    def test_a_runner_raising_synchronously_is_a_500_and_does_not_hold_a_slot(self) -> None:
        self.make(max_inflight=1)

        def broken(call: Invocation) -> Deferred[FunctionResult]:
            raise RuntimeError("bug")

        self.runner.invoke = broken  # type: ignore[method-assign]
        self.assertEqual(self.request().responses()[0][0], 500)
        self.assertEqual(self.watchdog.inflight, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
