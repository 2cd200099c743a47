"""``twistd faas-watchdog`` in fork mode, as a real process running real programs.

Timeouts are shortened (about a second) so each fires at its bound within the
test's time.  "No zombie or orphan" is checked by scanning /proc for any
process, zombies included, still in the function's process group.  For those
tests the test process makes itself a child subreaper that never reaps
(``orphans_stay_here``): an orphan the watchdog failed to adopt and reap would
stay visible here as a zombie, instead of being collected by PID 1.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.http_headers import Headers

from tests.support import ROOT, TwistdProcess, free_port, run_twistd_sync, sleep, wait_for
from txfaas import _accel
from txfaas.watchdog.common import Invocation, WatchdogConfig
from txfaas.watchdog.fork import ForkRunner
from txfaas.watchdog.process import OrphanReaper, group_launcher, native_group_spawn

FUNCTIONS = ROOT / "docker" / "functions"
PY = sys.executable


def group_members(pgid: int) -> list[tuple[int, str, int]]:
    """(pid, state, ppid) of every process in group ``pgid``, zombies included."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append((int(entry), fields[0], int(fields[1])))
    return members


async def start_watchdog(fprocess: str, *extra: str, env: dict | None = None) -> tuple[TwistdProcess, str]:
    port = free_port()
    proc = TwistdProcess(
        "faas-watchdog",
        ["--listen", f"tcp:{port}:interface=127.0.0.1", "--fprocess", fprocess, *extra],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    await proc.wait_http(base + "/_/health", status=200)
    return proc, base


async def fetch(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    response = await treq.request(method, url, data=data, headers=headers, timeout=30)
    body = await response.content()
    return response, body


@pytest.fixture
def orphans_stay_here():
    """This process adopts (and does not reap) orphans of what it starts, for the test's duration.

    Yields a list to which the test adds the function's process groups; any
    zombie of those groups left with us is reaped at teardown (after the test
    has failed on it).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        pytest.skip("PR_SET_CHILD_SUBREAPER is not available")
    groups: list[int] = []
    try:
        yield groups
    finally:
        libc.prctl(36, 0, 0, 0, 0)
        for pgid in groups:
            for pid, _, ppid in group_members(pgid):
                if ppid == os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    except OSError:
                        pass


def pgid_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="wd-pgid-")
    os.close(fd)
    os.unlink(name)
    return Path(name)


def spawner(path: Path) -> str:
    """A function that records its process group, leaves a grandchild running and hangs."""
    return f"sh -c 'echo $$ > {path}; sleep 100 & sleep 100'"


class RawClient(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[float] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(time.monotonic())


async def raw_connect(base: str) -> RawClient:
    port = int(base.rsplit(":", 1)[1])
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())


@pytest_twisted.ensureDeferred
async def test_body_environment_and_http_variables_reach_the_process():
    script = (
        'printf "%s|%s|%s|%s|%s|" "$Http_Method" "$Http_Path" "$Http_Query" "$Http_X_Call_Id" "$FN_OWN"; cat'
    )
    proc, base = await start_watchdog(f"sh -c '{script}'", env={"FN_OWN": "own-value"})
    try:
        response, body = await fetch(
            base + "/some/path?x=1&y=2",
            "POST",
            b"the body",
            {"X-Call-Id": "call-42", "Content-Type": "text/x"},
        )
        assert response.code == 200
        assert body == b"POST|/some/path|x=1&y=2|call-42|own-value|the body"
        assert response.headers.getRawHeaders("Content-Type") == ["text/x"]
        assert float(response.headers.getRawHeaders("X-Duration-Seconds")[0]) > 0
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_sample_functions_echo_and_wordcount():
    (echo, echo_base), (wc, wc_base) = [
        await start_watchdog(f"{PY} {FUNCTIONS / name}") for name in ("echo.py", "wordcount.py")
    ]
    try:
        _, body = await fetch(echo_base, "POST", b"hello watchdog")
        assert body == b"hello watchdog"
        _, body = await fetch(wc_base, "POST", b"one two\nthree\n")
        assert body == b'{"lines": 2, "words": 3, "bytes": 14}\n'
    finally:
        await echo.stop()
        await wc.stop()


@pytest_twisted.ensureDeferred
async def test_a_non_zero_exit_is_a_500_with_the_stderr_tail_and_stderr_is_logged():
    proc, base = await start_watchdog(
        "sh -c 'echo partial; echo first-err >&2; echo details-of-failure >&2; exit 3'"
    )
    try:
        response, body = await fetch(base, "POST", b"x")
        assert response.code == 500
        assert body == b"first-err\ndetails-of-failure\n"
        assert response.headers.getRawHeaders("X-Duration-Seconds")
        await wait_for(
            lambda: "function stderr: details-of-failure" in proc.output(), what="stderr in the log"
        )
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_exec_timeout_kills_the_whole_process_group_and_leaves_no_zombie_or_orphan(orphans_stay_here):
    path = pgid_file()
    proc, base = await start_watchdog(spawner(path), "--exec-timeout", "1s")
    try:
        started = time.monotonic()
        response, body = await fetch(base, "POST", b"")
        took = time.monotonic() - started
        assert response.code == 504
        assert body == b"exec_timeout of 1s exceeded\n"
        assert 0.95 <= float(response.headers.getRawHeaders("X-Duration-Seconds")[0]) < 1.5
        assert 0.95 <= took < 3
        pgid = int(path.read_text())
        orphans_stay_here.append(pgid)
        await wait_for(lambda: not group_members(pgid), timeout=5, what=f"group {pgid} to be empty")
        assert proc.popen.poll() is None

        # X-Timeout shortens it for one call.
        started = time.monotonic()
        response, body = await fetch(base, "POST", b"", {"X-Timeout": "300ms"})
        assert (response.code, body) == (504, b"X-Timeout of 300ms exceeded\n")
        assert time.monotonic() - started < 0.95
        pgid = int(path.read_text())
        orphans_stay_here.append(pgid)
        await wait_for(lambda: not group_members(pgid), timeout=5, what=f"group {pgid} to be empty")
    finally:
        await proc.stop()
        path.unlink(missing_ok=True)


@pytest_twisted.ensureDeferred
async def test_background_processes_left_by_a_finished_function_are_killed_and_reaped(orphans_stay_here):
    path = pgid_file()
    proc, base = await start_watchdog(f"sh -c 'echo $$ > {path}; sleep 100 > /dev/null 2>&1 & echo done'")
    try:
        response, body = await fetch(base, "POST", b"")
        assert (response.code, body) == (200, b"done\n")
        pgid = int(path.read_text())
        orphans_stay_here.append(pgid)
        await wait_for(lambda: not group_members(pgid), timeout=5, what=f"group {pgid} to be empty")
    finally:
        await proc.stop()
        path.unlink(missing_ok=True)


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_answers_503_and_exits_leaving_no_process_of_the_function(orphans_stay_here):
    path = pgid_file()
    fprocess = (
        f"sh -c 'if [ \"$Http_Path\" = /quick ]; then sleep 0.5; echo quick; exit; fi; {spawner(path)[7:-1]}'"
    )
    proc, base = await start_watchdog(fprocess, "--write-timeout", "2s", "--exec-timeout", "30s")
    try:
        hanging = Deferred.fromCoroutine(fetch(base + "/hang", "POST", b""))
        await wait_for(lambda: path.exists() and path.read_text().strip(), what="the function to start")
        pgid = int(path.read_text())
        orphans_stay_here.append(pgid)
        quick = Deferred.fromCoroutine(fetch(base + "/quick", "POST", b""))
        await sleep(0.2)
        stopping = time.monotonic()
        proc.signal(signal.SIGTERM)
        await sleep(0.2)
        health, _ = await fetch(base + "/_/health")
        assert health.code == 503
        refused, _ = await fetch(base + "/new", "POST", b"")
        assert refused.code == 503

        response, body = await quick  # finished within the grace
        assert (response.code, body) == (200, b"quick\n")
        response, body = await hanging  # stopped at the end of the grace
        assert response.code == 503
        assert 1.8 <= time.monotonic() - stopping < 5

        # twistd ends a SIGTERM'd run by re-raising the signal once the shutdown completed.
        assert await proc.wait_exit(10) in (0, -signal.SIGTERM)
        assert "watchdog stopped" in proc.output()
        await wait_for(lambda: not group_members(pgid), timeout=3, what=f"group {pgid} to be empty")
    finally:
        await proc.stop()
        path.unlink(missing_ok=True)


@pytest_twisted.ensureDeferred
async def test_a_client_trickling_its_request_gets_408_at_read_timeout():
    proc, base = await start_watchdog("cat", "--read-timeout", "1s")
    try:
        client = await raw_connect(base)
        started = time.monotonic()
        client.transport.write(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 100\r\n\r\n")
        while not client.closed.called and time.monotonic() - started < 5:
            client.transport.write(b"x")  # a byte every 100ms keeps Twisted's idle timer happy
            await sleep(0.1)
        closed_at = await client.closed
        assert bytes(client.data).startswith(b"HTTP/1.1 408 ")
        assert b"read_timeout of 1s exceeded" in client.data
        assert 0.9 <= closed_at - started < 2.5
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_the_response_is_disconnected_at_write_timeout():
    size = 32 * 1024 * 1024  # more than the kernel's socket buffers hold
    proc, base = await start_watchdog(
        f"head -c {size} /dev/zero", "--write-timeout", "1s", "--max-response", "64MiB"
    )
    try:
        client = await raw_connect(base)
        client.transport.pauseProducing()  # never read
        client.transport.write(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
        await wait_for(lambda: "write_timeout" in proc.output(), timeout=10, what="the write_timeout")
        client.transport.resumeProducing()
        await client.closed
        assert bytes(client.data).startswith(b"HTTP/1.1 200 ")
        assert len(client.data) < size  # cut off
        health, _ = await fetch(base + "/_/health")
        assert health.code == 200
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_calls_over_max_inflight_get_429():
    proc, base = await start_watchdog(f"{PY} {FUNCTIONS / 'sleep.py'}", "--max-inflight", "1")
    try:
        first = Deferred.fromCoroutine(fetch(base, "POST", b"1"))
        await sleep(0.3)
        second, body = await fetch(base, "POST", b"0")
        assert second.code == 429
        assert b"max_inflight" in body
        response, body = await first
        assert (response.code, body) == (200, b"slept 1s\n")
        third, _ = await fetch(base, "POST", b"0")
        assert third.code == 200
    finally:
        await proc.stop()


def test_an_invalid_setting_is_a_one_line_error_naming_it_not_a_traceback():
    cases = [
        (["--fprocess", "cat", "--read-timeout", "soon"], {}, "--read-timeout"),
        (["--fprocess", "cat"], {"exec_timeout": "-3"}, "--exec-timeout (from $exec_timeout)"),
        (["--fprocess", "cat", "--mode", "afterburn"], {}, "--mode"),
        (["--fprocess", "cat", "--mode", "http"], {}, "--upstream-url"),
        (["--fprocess", "no-such-command-xyz"], {}, "command not found"),
        ([], {"fprocess": ""}, "--fprocess"),
    ]
    for args, env, expected in cases:
        environ = {k: v for k, v in os.environ.items() if k not in ("fprocess", "function_process")}
        result = run_twistd_sync("faas-watchdog", args, env={**environ, **env})
        output = result.stdout + result.stderr
        assert result.returncode != 0, args
        assert "Traceback" not in output, output
        last = output.strip().splitlines()[-1]
        assert expected in last, (args, last)


def test_a_port_in_use_or_an_unreadable_endpoint_is_one_line_and_exit_1_before_the_function_starts():
    marker = Path(tempfile.mkdtemp()) / "started"
    fprocess = f"sh -c 'touch {marker}; cat'"
    environ = {k: v for k, v in os.environ.items() if k not in ("fprocess", "function_process")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (
                f"tcp:{port}:interface=127.0.0.1",
                f"error: --listen tcp:{port}:interface=127.0.0.1: cannot listen",
            ),
            ("nonsense:8080", "error: --listen nonsense:8080: not a valid endpoint"),
        ]
        for listen, expected in cases:
            # http mode: its command would start with the service, before any request.
            args = ["--listen", listen, "--mode", "http", "--upstream-url", "http://127.0.0.1:1"]
            result = run_twistd_sync("faas-watchdog", [*args, "--fprocess", fprocess], env=environ)
            output = result.stdout + result.stderr
            assert result.returncode == 1, output
            assert "Traceback" not in output, output
            assert expected in output.strip().splitlines()[-1], output
            assert not marker.exists(), "the function was started although the watchdog could not listen"


def test_help_documents_every_setting_with_its_variable_and_default():
    result = run_twistd_sync("faas-watchdog", ["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, variable, default in [
        ("--fprocess", "$fprocess", None),
        ("--mode", "$mode", "default fork"),
        ("--upstream-url", "$upstream_url", None),
        ("--listen", "$port", "default tcp:8080"),
        ("--read-timeout", "$read_timeout", "default 30s"),
        ("--write-timeout", "$write_timeout", "default 30s"),
        ("--exec-timeout", "$exec_timeout", "default 10s"),
        ("--max-inflight", "$max_inflight", "no limit"),
        ("--content-type", "$content_type", None),
        ("--healthcheck-interval", "$healthcheck_interval", "default 5s"),
    ]:
        assert flag in text and variable in text, flag
        if default:
            assert default in text, default
    assert "0 means no limit" in text


@pytest.mark.parametrize("how", ["native", "setsid", "python-shim"])
@pytest_twisted.ensureDeferred
async def test_every_way_of_spawning_makes_the_function_lead_its_own_group_and_cancel_empties_it(
    how, monkeypatch
):
    """In-process, with the real reactor: the three spawn paths tap.py may pick between (the
    native one is the accelerated path, tested here whatever TXFAAS_ACCEL says)."""
    monkeypatch.setattr(_accel, "_enabled", True)
    spawn = native_group_spawn(reactor) if how == "native" else None
    if how == "native":
        assert spawn is not None, "posix_spawn(setsid=True) should work on Linux"
    launcher = () if how == "native" else group_launcher(shutil.which("setsid") if how == "setsid" else None)
    path = pgid_file()
    config = WatchdogConfig(
        fprocess=("sh", "-c", spawner(path)[7:-1]), launcher=launcher, environ=dict(os.environ)
    )
    # This test process is not the watchdog: watch groups, but leave reaping strangers to others.
    reaper = OrphanReaper(reactor, waitid=lambda *a: None)
    runner = ForkRunner(reactor, config, reaper, spawn=spawn)
    runner.start()
    try:
        call = Invocation(method=b"POST", uri=b"/", path=b"/", query=b"", headers=Headers(), body=b"")
        d = runner.invoke(call)
        d.addErrback(lambda f: f.trap(Exception))
        await wait_for(lambda: path.exists() and path.read_text().strip(), what="the function to start")
        pgid = int(path.read_text())
        assert os.getpgid(pgid) == pgid and os.getsid(pgid) == pgid
        await wait_for(lambda: len(group_members(pgid)) >= 3, what="sh and its two sleeps")
        d.cancel()
        await wait_for(lambda: not group_members(pgid), timeout=5, what=f"group {pgid} to be empty")
    finally:
        await runner.stop()
        path.unlink(missing_ok=True)
