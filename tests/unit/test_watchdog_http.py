"""HTTP mode's runner: the long-running server's life cycle and the proxying, without sockets.

Proxying goes through treq's ``RequestTraversalAgent`` (real HTTP parsing in
memory) or a fake agent whose Deferreds the tests control; the server process
and ``killpg`` are fakes (see ``test_watchdog_fork``).
"""

from __future__ import annotations

import signal
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.client import ResponseNeverReceived

from tests.unit.test_watchdog_fork import FakeReactor, KillRecorder, call
from txfaas.watchdog.common import WatchdogConfig
from txfaas.watchdog.http import HTTPRunner
from txfaas.watchdog.process import OrphanReaper


class Upstream(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.answer: tuple[int, list[tuple[bytes, bytes]], bytes] = (201, [(b"X-Fn", b"yes")], b"made")

    def render(self, request: server.Request) -> bytes:
        self.seen.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                "body": request.content.read(),
            }
        )
        code, headers, body = self.answer
        request.setResponseCode(code)
        for name, value in headers:
            request.responseHeaders.addRawHeader(name, value)
        return body


class FakeAgent:
    """Cancelling a request errbacks like twisted.web's Agent: ResponseNeverReceived([CancelledError])."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Deferred[Any]]] = []
        self.cancelled: list[bytes] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled.append(uri)
            d.errback(ResponseNeverReceived([Failure(CancelledError())]))

        d: Deferred[Any] = Deferred(cancel)
        self.requests.append((method, uri, d))
        return d


class Probe:
    def __init__(self) -> None:
        self.calls = 0
        self.up = False

    def __call__(self) -> Deferred[None]:
        self.calls += 1
        return succeed(None) if self.up else fail(error.ConnectionRefusedError())


class HTTPTestCase(SynchronousTestCase):
    def make(self, agent: Any = None, **kw: Any) -> None:
        self.reactor = FakeReactor()
        self.killpg = KillRecorder()
        self.reaper = OrphanReaper(
            self.reactor, killpg=self.killpg, waitid=lambda *a: None, known=dict, reap_known=lambda: None
        )
        self.probe = Probe()
        self.upstream = Upstream()
        self.agent = agent if agent is not None else RequestTraversalAgent(self.upstream)
        self.pool_closed = 0
        fields: dict[str, Any] = {
            "fprocess": ("server", "--port", "5000"),
            "mode": "http",
            "upstream_url": "http://127.0.0.1:5000",
            "launcher": ("/usr/bin/setsid", "--"),
            "environ": {"PATH": "/bin"},
            "healthcheck_interval": 5.0,
        }
        fields.update(kw)

        def close_pool() -> Deferred[None]:
            self.pool_closed += 1
            return succeed(None)

        self.runner = HTTPRunner(
            self.reactor,
            self.reactor,
            self.agent,
            WatchdogConfig(**fields),
            self.reaper,
            self.probe,
            killpg=self.killpg,
            close_pool=close_pool,
        )

    def start_ready(self) -> None:
        self.runner.start()
        self.probe.up = True
        self.reactor.advance(self.runner.start_probe_interval)
        self.assertTrue(self.runner.ready)

    @property
    def child(self) -> Any:
        return self.reactor.processes[-1]


class LifecycleTests(HTTPTestCase):
    def test_the_server_starts_once_in_its_own_group_and_is_ready_when_its_port_answers(self) -> None:
        self.make()
        self.runner.start()
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["args"], ["/usr/bin/setsid", "--", "server", "--port", "5000"])
        self.assertEqual(spawned["env"], {"PATH": "/bin"})
        self.assertFalse(self.runner.ready)
        self.reactor.advance(self.runner.start_probe_interval)
        self.assertFalse(self.runner.ready)  # refused
        self.probe.up = True
        self.reactor.advance(self.runner.start_probe_interval)
        self.assertTrue(self.runner.ready)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_calls_before_ready_get_503_without_reaching_the_server(self) -> None:
        self.make()
        self.runner.start()
        result = self.successResultOf(self.runner.invoke(call()))
        self.assertEqual(result.code, 503)
        self.assertEqual(self.upstream.seen, [])

    def test_once_up_the_server_is_probed_every_healthcheck_interval_and_marked_down_after_3_failures(
        self,
    ) -> None:
        self.make(healthcheck_interval=5.0)
        self.start_ready()
        before = self.probe.calls
        self.reactor.advance(4.9)
        self.assertEqual(self.probe.calls, before)
        self.reactor.advance(0.1)
        self.assertEqual(self.probe.calls, before + 1)
        self.probe.up = False
        self.reactor.advance(5.0)  # first failure
        self.reactor.advance(self.runner.start_probe_interval)  # second
        self.assertTrue(self.runner.ready)
        self.reactor.advance(self.runner.start_probe_interval)  # third
        self.assertFalse(self.runner.ready)
        self.probe.up = True
        self.reactor.advance(self.runner.start_probe_interval)
        self.assertTrue(self.runner.ready)

    def test_a_dead_server_is_unhealthy_its_group_killed_and_it_is_restarted_with_backoff(self) -> None:
        self.make()
        self.start_ready()
        first = self.child
        pid = first.pid
        self.killpg.alive.add(pid)  # it left a worker behind
        first.exit(1)
        self.assertFalse(self.runner.ready)
        self.assertIn((pid, signal.SIGKILL), self.killpg.kills)
        self.assertEqual(self.reaper.watched, {pid})
        self.reactor.advance(self.runner.restart_min - 0.01)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(self.runner.start_probe_interval)
        self.assertTrue(self.runner.ready)
        self.child.exit(1)  # dies again at once: the wait doubles
        self.reactor.advance(self.runner.restart_min * 2 - 0.01)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_stop_terms_the_group_then_kills_it_after_the_grace_and_never_restarts(self) -> None:
        self.make()
        self.start_ready()
        child = self.child
        pid = child.pid
        self.killpg.alive.add(pid)
        stopped = self.runner.stop()
        self.assertFalse(self.runner.ready)
        self.assertEqual(self.killpg.kills[-1], (pid, signal.SIGTERM))
        self.reactor.advance(self.runner.stop_grace - 0.01)
        self.assertEqual(child.signals, [])
        self.reactor.advance(0.01)
        self.assertEqual(self.killpg.kills[-1], (pid, signal.SIGKILL))
        self.assertEqual(child.signals, ["KILL"])
        child.exit(None, signal.SIGKILL)  # type: ignore[arg-type]
        self.killpg.alive.clear()
        self.reactor.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(self.pool_closed, 1)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_a_server_that_exits_on_sigterm_is_not_killed(self) -> None:
        self.make()
        self.start_ready()
        child = self.child
        stopped = self.runner.stop()
        child.exit(0)
        self.successResultOf(stopped)
        self.assertEqual(child.signals, [])


class ProxyTests(HTTPTestCase):
    def test_the_request_reaches_the_server_without_hop_by_hop_headers(self) -> None:
        self.make()
        self.start_ready()
        headers = {
            b"Connection": [b"keep-alive, X-Hop"],
            b"X-Hop": [b"1"],
            b"Keep-Alive": [b"5"],
            b"X-Call-Id": [b"c1"],
            b"Host": [b"public.example"],
            b"Accept-Encoding": [b"br"],
        }
        d = self.runner.invoke(call(b"payload", method=b"PUT", uri=b"/p/q?x=1", headers=headers))
        self.agent.flush()
        self.successResultOf(d)
        [seen] = self.upstream.seen
        self.assertEqual((seen["method"], seen["uri"], seen["body"]), (b"PUT", b"/p/q?x=1", b"payload"))
        self.assertEqual(seen["headers"][b"x-call-id"], [b"c1"])
        self.assertEqual(seen["headers"][b"accept-encoding"], [b"br"])  # untouched: no gzip added
        for hop in (b"x-hop", b"keep-alive"):
            self.assertNotIn(hop, seen["headers"])
        self.assertNotIn(b"keep-alive, X-Hop", seen["headers"].get(b"connection", []))
        self.assertEqual(seen["headers"][b"host"], [b"127.0.0.1:5000"])

    def test_the_servers_status_headers_and_body_come_back(self) -> None:
        self.make()
        self.start_ready()
        self.upstream.answer = (
            418,
            [(b"X-Fn", b"1"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
            b"tea",
        )
        d = self.runner.invoke(call())
        self.agent.flush()
        result = self.successResultOf(d)
        self.assertEqual((result.code, result.body), (418, b"tea"))
        self.assertIn((b"X-Fn", b"1"), result.headers)
        self.assertEqual([v for n, v in result.headers if n == b"Set-Cookie"], [b"a=1", b"b=2"])
        self.assertNotIn(b"Content-Length", [n for n, _ in result.headers])

    def test_a_server_that_does_not_answer_is_a_502(self) -> None:
        agent = FakeAgent()
        self.make(agent)
        self.start_ready()
        d = self.runner.invoke(call())
        agent.requests[0][2].errback(error.ConnectionRefusedError())
        result = self.successResultOf(d)
        self.assertEqual(result.code, 502)
        self.assertIn(b"did not answer", result.body)

    def test_a_response_over_max_response_is_a_502(self) -> None:
        self.make(max_response=3)
        self.start_ready()
        d = self.runner.invoke(call())
        self.agent.flush()
        result = self.successResultOf(d)
        self.assertEqual(result.code, 502)
        self.assertIn(b"max_response (3 bytes)", result.body)

    def test_cancelling_a_call_aborts_the_proxied_request_and_reports_a_cancellation(self) -> None:
        agent = FakeAgent()
        self.make(agent)
        self.start_ready()
        d = self.runner.invoke(call(uri=b"/slow"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(agent.cancelled, [b"http://127.0.0.1:5000/slow"])
