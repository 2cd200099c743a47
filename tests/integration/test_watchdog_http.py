"""``twistd faas-watchdog`` in http mode: one real server process (docker/functions/http_echo.py), proxied."""

from __future__ import annotations

import os
import signal
import time

import pytest_twisted

from tests.integration.test_watchdog_fork import FUNCTIONS, PY, fetch, group_members, orphans_stay_here
from tests.support import TwistdProcess, free_port, wait_for

__all__ = ["orphans_stay_here"]  # a fixture, used by name below


def server_pgid(watchdog_pid: int, port: int) -> int | None:
    """The process group of the http_echo server started by the watchdog."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == watchdog_pid and str(port).encode() in argv and fields[0] != "Z":
            return int(fields[2])
    return None


async def start_http_watchdog(*extra: str) -> tuple[TwistdProcess, str, int]:
    port, upstream = free_port(), free_port()
    proc = TwistdProcess(
        "faas-watchdog",
        [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--mode",
            "http",
            "--fprocess",
            f"{PY} {FUNCTIONS / 'http_echo.py'} {upstream}",
            "--upstream-url",
            f"http://127.0.0.1:{upstream}",
            *extra,
        ],
    )
    base = f"http://127.0.0.1:{port}"
    await proc.wait_http(base + "/_/health", status=200)
    return proc, base, upstream


@pytest_twisted.ensureDeferred
async def test_requests_are_proxied_to_the_long_running_server():
    proc, base, upstream = await start_http_watchdog()
    try:
        pid = server_pgid(proc.pid, upstream)
        for i in range(3):
            response, body = await fetch(
                base + f"/echo/{i}?q=1",
                "PUT",
                b"payload-%d" % i,
                {"X-Call-Id": f"id-{i}", "Content-Type": "text/x"},
            )
            assert (response.code, body) == (200, b"payload-%d" % i)
            assert response.headers.getRawHeaders("X-Method") == ["PUT"]
            assert response.headers.getRawHeaders("X-Path") == [f"/echo/{i}?q=1"]
            assert response.headers.getRawHeaders("X-Seen-Call-Id") == [f"id-{i}"]
            assert response.headers.getRawHeaders("Content-Type") == ["text/x"]
            assert float(response.headers.getRawHeaders("X-Duration-Seconds")[0]) > 0
        assert server_pgid(proc.pid, upstream) == pid  # one server for every call
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_exec_timeout_aborts_the_proxied_request_with_504_and_the_server_keeps_serving():
    proc, base, _ = await start_http_watchdog("--exec-timeout", "1s")
    try:
        started = time.monotonic()
        response, body = await fetch(base + "/sleep?seconds=5", "POST", b"")
        assert (response.code, body) == (504, b"exec_timeout of 1s exceeded\n")
        assert 0.95 <= time.monotonic() - started < 3
        assert 0.95 <= float(response.headers.getRawHeaders("X-Duration-Seconds")[0]) < 1.5
        response, body = await fetch(base + "/after", "POST", b"still here")
        assert (response.code, body) == (200, b"still here")
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_a_dead_server_makes_health_503_and_is_restarted():
    proc, base, upstream = await start_http_watchdog()
    try:
        pgid = server_pgid(proc.pid, upstream)
        assert pgid is not None
        os.killpg(pgid, signal.SIGKILL)

        async def health() -> int:
            response, _ = await fetch(base + "/_/health")
            return response.code

        await wait_for(lambda: _is(health(), 503), timeout=5, what="health 503")
        response, _ = await fetch(base + "/x", "POST", b"")
        assert response.code == 503
        await wait_for(lambda: _is(health(), 200), timeout=10, what="health 200 after the restart")
        assert server_pgid(proc.pid, upstream) not in (None, pgid)
        response, body = await fetch(base + "/x", "POST", b"back")
        assert (response.code, body) == (200, b"back")
        assert "restarting" in proc.output()
    finally:
        await proc.stop()


async def _is(awaitable, expected) -> bool:
    return (await awaitable) == expected


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_the_server_and_leaves_no_process_of_it(orphans_stay_here):
    proc, base, upstream = await start_http_watchdog()
    try:
        pgid = server_pgid(proc.pid, upstream)
        assert pgid is not None
        orphans_stay_here.append(pgid)
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(15) in (0, -signal.SIGTERM)
        assert "watchdog stopped" in proc.output()
        await wait_for(lambda: not group_members(pgid), timeout=3, what=f"group {pgid} to be empty")
    finally:
        await proc.stop()
