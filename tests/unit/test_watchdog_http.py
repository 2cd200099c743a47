"""HTTP mode's runner: the long-running server's life cycle and the proxying, without sockets.

Proxying goes through treq's ``RequestTraversalAgent`` (real HTTP parsing in
memory) or a fake agent whose Deferreds the tests control; the server process
and ``killpg`` are fakes (see ``test_watchdog_fork``).
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
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

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


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


class HTTPHarness:
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
        assert self.runner.ready

    @property
    def child(self) -> Any:
        return self.reactor.processes[-1]


@pytest.fixture
def http() -> HTTPHarness:
    return HTTPHarness()


def test_the_server_starts_once_in_its_own_group_and_is_ready_when_its_port_answers(
    http: HTTPHarness,
) -> None:
    http.make()
    http.runner.start()
    [spawned] = http.reactor.spawned
    assert spawned["args"] == ["/usr/bin/setsid", "--", "server", "--port", "5000"]
    assert spawned["env"] == {"PATH": "/bin"}
    assert not http.runner.ready
    http.reactor.advance(http.runner.start_probe_interval)
    assert not http.runner.ready  # refused
    http.probe.up = True
    http.reactor.advance(http.runner.start_probe_interval)
    assert http.runner.ready
    assert len(http.reactor.spawned) == 1


def test_calls_before_ready_get_503_without_reaching_the_server(http: HTTPHarness) -> None:
    http.make()
    http.runner.start()
    result = successResultOf(http.runner.invoke(call()))
    assert result.code == 503
    assert http.upstream.seen == []


def test_once_up_the_server_is_probed_every_healthcheck_interval_and_marked_down_after_3_failures(
    http: HTTPHarness,
) -> None:
    http.make(healthcheck_interval=5.0)
    http.start_ready()
    before = http.probe.calls
    http.reactor.advance(4.9)
    assert http.probe.calls == before
    http.reactor.advance(0.1)
    assert http.probe.calls == (before + 1)
    http.probe.up = False
    http.reactor.advance(5.0)  # first failure
    http.reactor.advance(http.runner.start_probe_interval)  # second
    assert http.runner.ready
    http.reactor.advance(http.runner.start_probe_interval)  # third
    assert not http.runner.ready
    http.probe.up = True
    http.reactor.advance(http.runner.start_probe_interval)
    assert http.runner.ready


def test_a_dead_server_is_unhealthy_its_group_killed_and_it_is_restarted_with_backoff(
    http: HTTPHarness,
) -> None:
    http.make()
    http.start_ready()
    first = http.child
    pid = first.pid
    http.killpg.alive.add(pid)  # it left a worker behind
    first.exit(1)
    assert not http.runner.ready
    assert (pid, signal.SIGKILL) in http.killpg.kills
    assert http.reaper.watched == {pid}
    http.reactor.advance(http.runner.restart_min - 0.01)
    assert len(http.reactor.spawned) == 1
    http.reactor.advance(0.01)
    assert len(http.reactor.spawned) == 2
    http.reactor.advance(http.runner.start_probe_interval)
    assert http.runner.ready
    http.child.exit(1)  # dies again at once: the wait doubles
    http.reactor.advance(http.runner.restart_min * 2 - 0.01)
    assert len(http.reactor.spawned) == 2
    http.reactor.advance(0.01)
    assert len(http.reactor.spawned) == 3


def test_stop_terms_the_group_then_kills_it_after_the_grace_and_never_restarts(
    http: HTTPHarness,
) -> None:
    http.make()
    http.start_ready()
    child = http.child
    pid = child.pid
    http.killpg.alive.add(pid)
    stopped = http.runner.stop()
    assert not http.runner.ready
    assert http.killpg.kills[-1] == (pid, signal.SIGTERM)
    http.reactor.advance(http.runner.stop_grace - 0.01)
    assert child.signals == []
    http.reactor.advance(0.01)
    assert http.killpg.kills[-1] == (pid, signal.SIGKILL)
    assert child.signals == ["KILL"]
    child.exit(None, signal.SIGKILL)  # type: ignore[arg-type]
    http.killpg.alive.clear()
    http.reactor.advance(1)
    successResultOf(stopped)
    assert http.pool_closed == 1
    http.reactor.advance(100)
    assert len(http.reactor.spawned) == 1


def test_a_server_that_exits_on_sigterm_is_not_killed(http: HTTPHarness) -> None:
    http.make()
    http.start_ready()
    child = http.child
    stopped = http.runner.stop()
    child.exit(0)
    successResultOf(stopped)
    assert child.signals == []


def test_the_request_reaches_the_server_without_hop_by_hop_headers(http: HTTPHarness) -> None:
    http.make()
    http.start_ready()
    headers = {
        b"Connection": [b"keep-alive, X-Hop"],
        b"X-Hop": [b"1"],
        b"Keep-Alive": [b"5"],
        b"X-Call-Id": [b"c1"],
        b"Host": [b"public.example"],
        b"Accept-Encoding": [b"br"],
    }
    d = http.runner.invoke(call(b"payload", method=b"PUT", uri=b"/p/q?x=1", headers=headers))
    http.agent.flush()
    successResultOf(d)
    [seen] = http.upstream.seen
    assert (seen["method"], seen["uri"], seen["body"]) == (b"PUT", b"/p/q?x=1", b"payload")
    assert seen["headers"][b"x-call-id"] == [b"c1"]
    assert seen["headers"][b"accept-encoding"] == [b"br"]  # untouched: no gzip added
    for hop in (b"x-hop", b"keep-alive"):
        assert hop not in seen["headers"]
    assert b"keep-alive, X-Hop" not in seen["headers"].get(b"connection", [])
    assert seen["headers"][b"host"] == [b"127.0.0.1:5000"]


def test_the_servers_status_headers_and_body_come_back(http: HTTPHarness) -> None:
    http.make()
    http.start_ready()
    http.upstream.answer = (
        418,
        [(b"X-Fn", b"1"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
        b"tea",
    )
    d = http.runner.invoke(call())
    http.agent.flush()
    result = successResultOf(d)
    assert (result.code, result.body) == (418, b"tea")
    assert (b"X-Fn", b"1") in result.headers
    assert [v for n, v in result.headers if n == b"Set-Cookie"] == [b"a=1", b"b=2"]
    assert b"Content-Length" not in [n for n, _ in result.headers]


def test_a_server_that_does_not_answer_is_a_502(http: HTTPHarness) -> None:
    agent = FakeAgent()
    http.make(agent)
    http.start_ready()
    d = http.runner.invoke(call())
    agent.requests[0][2].errback(error.ConnectionRefusedError())
    result = successResultOf(d)
    assert result.code == 502
    assert b"did not answer" in result.body


def test_a_response_over_max_response_is_a_502(http: HTTPHarness) -> None:
    http.make(max_response=3)
    http.start_ready()
    d = http.runner.invoke(call())
    http.agent.flush()
    result = successResultOf(d)
    assert result.code == 502
    assert b"max_response (3 bytes)" in result.body


def test_cancelling_a_call_aborts_the_proxied_request_and_reports_a_cancellation(http: HTTPHarness) -> None:
    agent = FakeAgent()
    http.make(agent)
    http.start_ready()
    d = http.runner.invoke(call(uri=b"/slow"))
    d.cancel()
    failureResultOf(d, CancelledError)
    assert agent.cancelled == [b"http://127.0.0.1:5000/slow"]
