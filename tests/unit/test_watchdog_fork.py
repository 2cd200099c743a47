"""Fork mode's runner, with a fake ``spawnProcess`` and a fake ``killpg``.

What the process receives (argv, environment, stdin) and how its exit,
output and cancellation become answers and kills.  The same behaviours with
real processes are in ``tests/integration/test_watchdog_fork.py``.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from txfaas.watchdog.common import FunctionResult, Invocation, WatchdogConfig
from txfaas.watchdog.fork import ForkRunner, function_environ
from txfaas.watchdog.process import OrphanReaper

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


class FakeProcess:
    """The transport spawnProcess hands the protocol: records what is done to the process."""

    def __init__(self, proto: Any, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.stdin = b""
        self.stdin_closed = False
        self.signals: list[str] = []
        self.lost = False

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: str) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(sig)

    def loseConnection(self) -> None:
        self.lost = True

    # test helpers: what the real reactor would report

    def exit(self, code: int = 0, sig: int | None = None) -> None:
        reason = Failure(
            error.ProcessDone(0) if code == 0 and sig is None else error.ProcessTerminated(code, sig)
        )
        self.proto.processExited(reason)
        self.pid = None
        self.proto.processEnded(reason)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.processes: list[FakeProcess] = []
        self.fail_with: Exception | None = None

    def spawnProcess(
        self, proto: Any, executable: str, args: list[str], env: dict, usePTY: bool = False
    ) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        process = FakeProcess(proto, 4000 + len(self.processes))
        self.spawned.append({"executable": executable, "args": args, "env": env})
        self.processes.append(process)
        proto.makeConnection(process)
        return process


class KillRecorder:
    def __init__(self) -> None:
        self.kills: list[tuple[int, int]] = []
        self.alive: set[int] = set()

    def __call__(self, pgid: int, sig: int) -> None:
        self.kills.append((pgid, sig))
        if pgid not in self.alive:
            raise ProcessLookupError(pgid)


def call(body: bytes = b"", headers: dict[bytes, list[bytes]] | None = None, **kw: Any) -> Invocation:
    fields = {
        "method": b"POST",
        "uri": b"/p?q=1",
        "path": b"/p",
        "query": b"q=1",
        "headers": Headers(headers or {}),
        "body": body,
        "call_id": "c1",
    }
    fields.update(kw)
    return Invocation(**fields)


class ForkHarness:
    def make(self, **kw: Any) -> None:
        self.reactor = FakeReactor()
        self.killpg = KillRecorder()
        self.reaper = OrphanReaper(
            self.reactor, killpg=self.killpg, waitid=lambda *a: None, known=dict, reap_known=lambda: None
        )
        fields: dict[str, Any] = {
            "fprocess": ("fn", "--flag"),
            "launcher": ("/usr/bin/setsid", "--"),
            "environ": {"PATH": "/bin", "FN_SETTING": "v"},
        }
        fields.update(kw)
        self.runner = ForkRunner(self.reactor, WatchdogConfig(**fields), self.reaper, killpg=self.killpg)
        self.runner.start()


@pytest.fixture
def fork() -> ForkHarness:
    return ForkHarness()


def test_the_command_runs_through_the_group_launcher_with_the_body_on_stdin(fork: ForkHarness) -> None:
    fork.make()
    fork.runner.invoke(call(b"input"))
    [spawned] = fork.reactor.spawned
    assert spawned["executable"] == "/usr/bin/setsid"
    assert spawned["args"] == ["/usr/bin/setsid", "--", "fn", "--flag"]
    process = fork.reactor.processes[0]
    assert (process.stdin, process.stdin_closed) == (b"input", True)


def test_the_process_sees_its_environment_and_the_http_variables(fork: ForkHarness) -> None:
    fork.make()
    fork.runner.invoke(call(headers={b"X-Call-Id": [b"c1"], b"Content-Type": [b"text/plain"]}))
    env = fork.reactor.spawned[0]["env"]
    assert env["FN_SETTING"] == "v"
    assert env["Http_X_Call_Id"] == "c1"
    assert env["Http_Content_Type"] == "text/plain"
    assert (env["Http_Method"], env["Http_Path"], env["Http_Query"]) == ("POST", "/p", "q=1")


def test_a_spawn_failure_is_a_500(fork: ForkHarness) -> None:
    fork.make()
    fork.reactor.fail_with = OSError(2, "No such file")
    result = successResultOf(fork.runner.invoke(call()))
    assert result.code == 500
    assert b"cannot start the function" in result.body


def test_exit_zero_answers_200_with_stdout(fork: ForkHarness) -> None:
    fork.make()
    d = fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    process.proto.childDataReceived(1, b"hel")
    process.proto.childDataReceived(1, b"lo")
    assertNoResult(d)
    process.exit(0)
    result = successResultOf(d)
    assert (result.code, result.body) == (200, b"hello")
    assert fork.runner.running == 0


def test_content_type_is_configured_else_the_requests_else_octet_stream(fork: ForkHarness) -> None:
    for configured, sent, expected in [
        ("application/json", [b"text/csv"], b"application/json"),
        (None, [b"text/csv"], b"text/csv"),
        (None, None, b"application/octet-stream"),
    ]:
        fork.make(content_type=configured)
        d = fork.runner.invoke(call(headers={b"Content-Type": sent} if sent else None))
        fork.reactor.processes[0].exit(0)
        assert dict(successResultOf(d).headers)[b"Content-Type"] == expected


def test_a_non_zero_exit_answers_500_with_the_tail_of_stderr(fork: ForkHarness) -> None:
    fork.make()
    fork.runner.stderr_tail = 8
    d = fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    process.proto.childDataReceived(1, b"partial output")
    process.proto.childDataReceived(2, b"first line\nthe end\n")
    process.exit(3)
    result = successResultOf(d)
    assert (result.code, result.body) == (500, b"the end\n")


def test_a_non_zero_exit_without_stderr_says_the_status(fork: ForkHarness) -> None:
    fork.make()
    d = fork.runner.invoke(call())
    fork.reactor.processes[0].exit(7)
    assert successResultOf(d).body == b"the function exited with status 7\n"


def test_death_by_signal_says_the_signal(fork: ForkHarness) -> None:
    fork.make()
    d = fork.runner.invoke(call())
    fork.reactor.processes[0].exit(None, signal.SIGSEGV)  # type: ignore[arg-type]
    result = successResultOf(d)
    assert result.code == 500
    assert b"killed by signal 11" in result.body


@pytest.fixture
def observer() -> Any:
    """Every event logged during the test."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def test_stderr_is_logged_line_by_line(fork: ForkHarness, observer: Any) -> None:
    fork.make()
    fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    process.proto.childDataReceived(2, b"one\ntw")
    process.proto.childDataReceived(2, b"o\nthree")
    process.exit(0)
    lines = [e["line"] for e in observer if e.get("stream") == "stderr" and "line" in e]
    assert lines == ["one", "two", "three"]
    assert all(e.get("call_id") == "c1" for e in observer if e.get("stream") == "stderr")


def test_output_over_max_response_is_a_500_and_kills_the_group(fork: ForkHarness) -> None:
    fork.make(max_response=10)
    d = fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    fork.killpg.alive.add(process.pid)
    process.proto.childDataReceived(1, b"x" * 10)
    assertNoResult(d)
    process.proto.childDataReceived(1, b"y")
    result = successResultOf(d)
    assert result.code == 500
    assert b"max_response (10 bytes)" in result.body
    assert (process.pid, signal.SIGKILL) in fork.killpg.kills
    assert process.signals == ["KILL"]


def test_cancelling_a_call_kills_its_process_group_and_closes_the_pipes(fork: ForkHarness) -> None:
    fork.make()
    d = fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    fork.killpg.alive.add(process.pid)
    d.cancel()
    failureResultOf(d, CancelledError)
    assert fork.killpg.kills == [(process.pid, signal.SIGKILL)]
    assert process.signals == ["KILL"]  # in case it had not made its group yet
    assert process.lost
    assert fork.reaper.watched == {process.pid}
    assert fork.runner.running == 1  # until it is reaped
    process.exit(None, signal.SIGKILL)  # type: ignore[arg-type]
    assert fork.runner.running == 0


def test_what_the_leader_leaves_behind_in_its_group_is_killed_when_it_exits(fork: ForkHarness) -> None:
    fork.make()
    d = fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    pid = process.pid
    fork.killpg.alive.add(pid)  # a background child still runs in the group
    process.exit(0)
    assert successResultOf(d).code == 200
    assert fork.killpg.kills == [(pid, signal.SIGKILL)]
    assert fork.reaper.watched == {pid}
    fork.killpg.alive.clear()
    fork.reactor.advance(fork.reaper.busy_interval)
    assert fork.reaper.watched == frozenset()


def test_a_leader_that_leaves_nothing_behind_costs_one_killpg(fork: ForkHarness) -> None:
    fork.make()
    d = fork.runner.invoke(call())
    process = fork.reactor.processes[0]
    pid = process.pid
    process.exit(0)
    successResultOf(d)
    assert fork.killpg.kills == [(pid, signal.SIGKILL)]
    assert fork.reaper.watched == frozenset()


def test_stop_kills_every_running_call_and_fires_once_all_are_reaped(fork: ForkHarness) -> None:
    fork.make()
    calls = [fork.runner.invoke(call()) for _ in range(2)]
    for p in fork.reactor.processes:
        fork.killpg.alive.add(p.pid)
    stopped = fork.runner.stop()
    assert {k[0] for k in fork.killpg.kills} == {p.pid for p in fork.reactor.processes}
    assertNoResult(stopped)
    for p in fork.reactor.processes:
        p.exit(None, signal.SIGKILL)  # type: ignore[arg-type]
    assertNoResult(stopped)  # the groups are not empty yet
    fork.killpg.alive.clear()
    fork.reactor.advance(fork.reaper.busy_interval)
    successResultOf(stopped)
    for d in calls:
        assert successResultOf(d).code == 503
    assert not fork.runner.ready
    assert successResultOf(fork.runner.invoke(call())).code == 503


def test_headers_become_http_variables_with_dashes_as_underscores() -> None:
    env = function_environ({}, call(headers={b"X-Custom-Header": [b"a", b"b"], b"Accept": [b"*/*"]}))
    assert env["Http_X_Custom_Header"] == "a, b"
    assert env["Http_Accept"] == "*/*"


def test_header_names_that_cannot_be_variable_names_are_skipped() -> None:
    env = function_environ({}, call(headers={b"X!Bang": [b"1"], b"X.Dot": [b"2"]}))
    assert [k for k in env if k.startswith("Http_X")] == []


def test_method_path_and_query_cannot_be_overridden_by_headers() -> None:
    env = function_environ({}, call(headers={b"Method": [b"EVIL"], b"Path": [b"/evil"]}))
    assert (env["Http_Method"], env["Http_Path"]) == ("POST", "/p")


def test_the_path_is_percent_decoded_and_the_query_is_raw() -> None:
    env = function_environ({}, call(path=b"/a%20b/%C3%A9", query=b"x=%20"))
    assert (env["Http_Path"], env["Http_Query"]) == ("/a b/\u00e9", "x=%20")


def test_non_utf8_bytes_reach_the_process_unchanged() -> None:
    import os

    env = function_environ({}, call(headers={b"X-Raw": [b"\xff\xfe"]}))
    assert os.fsencode(env["Http_X_Raw"]) == b"\xff\xfe"


def test_a_nul_in_the_path_is_a_400() -> None:
    runner = ForkRunner(FakeReactor(), WatchdogConfig(fprocess=("fn",)), OrphanReaper(Clock()))
    result: FunctionResult = successResultOf(runner.invoke(call(path=b"/a%00b")))
    assert result.code == 400


def test_the_base_environment_is_kept() -> None:
    assert function_environ({"HOME": "/h"}, call())["HOME"] == "/h"
