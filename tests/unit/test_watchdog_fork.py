"""Fork mode's runner, with a fake ``spawnProcess`` and a fake ``killpg``.

What the process receives (argv, environment, stdin) and how its exit,
output and cancellation become answers and kills.  The same behaviours with
real processes are in ``tests/integration/test_watchdog_fork.py``.
"""

from __future__ import annotations

import signal
from typing import Any

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


class ForkTestCase(SynchronousTestCase):
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


class SpawnTests(ForkTestCase):
    def test_the_command_runs_through_the_group_launcher_with_the_body_on_stdin(self) -> None:
        self.make()
        self.runner.invoke(call(b"input"))
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["executable"], "/usr/bin/setsid")
        self.assertEqual(spawned["args"], ["/usr/bin/setsid", "--", "fn", "--flag"])
        process = self.reactor.processes[0]
        self.assertEqual((process.stdin, process.stdin_closed), (b"input", True))

    def test_the_process_sees_its_environment_and_the_http_variables(self) -> None:
        self.make()
        self.runner.invoke(call(headers={b"X-Call-Id": [b"c1"], b"Content-Type": [b"text/plain"]}))
        env = self.reactor.spawned[0]["env"]
        self.assertEqual(env["FN_SETTING"], "v")
        self.assertEqual(env["Http_X_Call_Id"], "c1")
        self.assertEqual(env["Http_Content_Type"], "text/plain")
        self.assertEqual((env["Http_Method"], env["Http_Path"], env["Http_Query"]), ("POST", "/p", "q=1"))

    def test_a_spawn_failure_is_a_500(self) -> None:
        self.make()
        self.reactor.fail_with = OSError(2, "No such file")
        result = self.successResultOf(self.runner.invoke(call()))
        self.assertEqual(result.code, 500)
        self.assertIn(b"cannot start the function", result.body)


class OutcomeTests(ForkTestCase):
    def test_exit_zero_answers_200_with_stdout(self) -> None:
        self.make()
        d = self.runner.invoke(call())
        process = self.reactor.processes[0]
        process.proto.childDataReceived(1, b"hel")
        process.proto.childDataReceived(1, b"lo")
        self.assertNoResult(d)
        process.exit(0)
        result = self.successResultOf(d)
        self.assertEqual((result.code, result.body), (200, b"hello"))
        self.assertEqual(self.runner.running, 0)

    def test_content_type_is_configured_else_the_requests_else_octet_stream(self) -> None:
        for configured, sent, expected in [
            ("application/json", [b"text/csv"], b"application/json"),
            (None, [b"text/csv"], b"text/csv"),
            (None, None, b"application/octet-stream"),
        ]:
            self.make(content_type=configured)
            d = self.runner.invoke(call(headers={b"Content-Type": sent} if sent else None))
            self.reactor.processes[0].exit(0)
            self.assertEqual(dict(self.successResultOf(d).headers)[b"Content-Type"], expected)

    def test_a_non_zero_exit_answers_500_with_the_tail_of_stderr(self) -> None:
        self.make()
        self.runner.stderr_tail = 8
        d = self.runner.invoke(call())
        process = self.reactor.processes[0]
        process.proto.childDataReceived(1, b"partial output")
        process.proto.childDataReceived(2, b"first line\nthe end\n")
        process.exit(3)
        result = self.successResultOf(d)
        self.assertEqual((result.code, result.body), (500, b"the end\n"))

    def test_a_non_zero_exit_without_stderr_says_the_status(self) -> None:
        self.make()
        d = self.runner.invoke(call())
        self.reactor.processes[0].exit(7)
        self.assertEqual(self.successResultOf(d).body, b"the function exited with status 7\n")

    def test_death_by_signal_says_the_signal(self) -> None:
        self.make()
        d = self.runner.invoke(call())
        self.reactor.processes[0].exit(None, signal.SIGSEGV)  # type: ignore[arg-type]
        result = self.successResultOf(d)
        self.assertEqual(result.code, 500)
        self.assertIn(b"killed by signal 11", result.body)

    def test_stderr_is_logged_line_by_line(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.make()
        self.runner.invoke(call())
        process = self.reactor.processes[0]
        process.proto.childDataReceived(2, b"one\ntw")
        process.proto.childDataReceived(2, b"o\nthree")
        process.exit(0)
        lines = [e["line"] for e in observer if e.get("stream") == "stderr" and "line" in e]
        self.assertEqual(lines, ["one", "two", "three"])
        self.assertTrue(all(e.get("call_id") == "c1" for e in observer if e.get("stream") == "stderr"))

    def test_output_over_max_response_is_a_500_and_kills_the_group(self) -> None:
        self.make(max_response=10)
        d = self.runner.invoke(call())
        process = self.reactor.processes[0]
        self.killpg.alive.add(process.pid)
        process.proto.childDataReceived(1, b"x" * 10)
        self.assertNoResult(d)
        process.proto.childDataReceived(1, b"y")
        result = self.successResultOf(d)
        self.assertEqual(result.code, 500)
        self.assertIn(b"max_response (10 bytes)", result.body)
        self.assertIn((process.pid, signal.SIGKILL), self.killpg.kills)
        self.assertEqual(process.signals, ["KILL"])


class KillTests(ForkTestCase):
    def test_cancelling_a_call_kills_its_process_group_and_closes_the_pipes(self) -> None:
        self.make()
        d = self.runner.invoke(call())
        process = self.reactor.processes[0]
        self.killpg.alive.add(process.pid)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.killpg.kills, [(process.pid, signal.SIGKILL)])
        self.assertEqual(process.signals, ["KILL"])  # in case it had not made its group yet
        self.assertTrue(process.lost)
        self.assertEqual(self.reaper.watched, {process.pid})
        self.assertEqual(self.runner.running, 1)  # until it is reaped
        process.exit(None, signal.SIGKILL)  # type: ignore[arg-type]
        self.assertEqual(self.runner.running, 0)

    def test_what_the_leader_leaves_behind_in_its_group_is_killed_when_it_exits(self) -> None:
        self.make()
        d = self.runner.invoke(call())
        process = self.reactor.processes[0]
        pid = process.pid
        self.killpg.alive.add(pid)  # a background child still runs in the group
        process.exit(0)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.killpg.kills, [(pid, signal.SIGKILL)])
        self.assertEqual(self.reaper.watched, {pid})
        self.killpg.alive.clear()
        self.reactor.advance(self.reaper.busy_interval)
        self.assertEqual(self.reaper.watched, frozenset())

    def test_a_leader_that_leaves_nothing_behind_costs_one_killpg(self) -> None:
        self.make()
        d = self.runner.invoke(call())
        process = self.reactor.processes[0]
        pid = process.pid
        process.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.killpg.kills, [(pid, signal.SIGKILL)])
        self.assertEqual(self.reaper.watched, frozenset())

    def test_stop_kills_every_running_call_and_fires_once_all_are_reaped(self) -> None:
        self.make()
        calls = [self.runner.invoke(call()) for _ in range(2)]
        for p in self.reactor.processes:
            self.killpg.alive.add(p.pid)
        stopped = self.runner.stop()
        self.assertEqual({k[0] for k in self.killpg.kills}, {p.pid for p in self.reactor.processes})
        self.assertNoResult(stopped)
        for p in self.reactor.processes:
            p.exit(None, signal.SIGKILL)  # type: ignore[arg-type]
        self.assertNoResult(stopped)  # the groups are not empty yet
        self.killpg.alive.clear()
        self.reactor.advance(self.reaper.busy_interval)
        self.successResultOf(stopped)
        for d in calls:
            self.assertEqual(self.successResultOf(d).code, 503)
        self.assertFalse(self.runner.ready)
        self.assertEqual(self.successResultOf(self.runner.invoke(call())).code, 503)


class EnvironTests(SynchronousTestCase):
    def test_headers_become_http_variables_with_dashes_as_underscores(self) -> None:
        env = function_environ({}, call(headers={b"X-Custom-Header": [b"a", b"b"], b"Accept": [b"*/*"]}))
        self.assertEqual(env["Http_X_Custom_Header"], "a, b")
        self.assertEqual(env["Http_Accept"], "*/*")

    def test_header_names_that_cannot_be_variable_names_are_skipped(self) -> None:
        env = function_environ({}, call(headers={b"X!Bang": [b"1"], b"X.Dot": [b"2"]}))
        self.assertEqual([k for k in env if k.startswith("Http_X")], [])

    def test_method_path_and_query_cannot_be_overridden_by_headers(self) -> None:
        env = function_environ({}, call(headers={b"Method": [b"EVIL"], b"Path": [b"/evil"]}))
        self.assertEqual((env["Http_Method"], env["Http_Path"]), ("POST", "/p"))

    def test_the_path_is_percent_decoded_and_the_query_is_raw(self) -> None:
        env = function_environ({}, call(path=b"/a%20b/%C3%A9", query=b"x=%20"))
        self.assertEqual((env["Http_Path"], env["Http_Query"]), ("/a b/\u00e9", "x=%20"))

    def test_non_utf8_bytes_reach_the_process_unchanged(self) -> None:
        import os

        env = function_environ({}, call(headers={b"X-Raw": [b"\xff\xfe"]}))
        self.assertEqual(os.fsencode(env["Http_X_Raw"]), b"\xff\xfe")

    def test_a_nul_in_the_path_is_a_400(self) -> None:
        runner = ForkRunner(FakeReactor(), WatchdogConfig(fprocess=("fn",)), OrphanReaper(Clock()))
        result: FunctionResult = self.successResultOf(runner.invoke(call(path=b"/a%00b")))
        self.assertEqual(result.code, 400)

    def test_the_base_environment_is_kept(self) -> None:
        self.assertEqual(function_environ({"HOME": "/h"}, call())["HOME"], "/h")
