"""The accelerated group-leader spawn (txfaas._accel.spawn) against the stock ones (``setsid --``
and the Python shim in front of the program, through ``reactor.spawnProcess``): each gives a
child that leads its own session and group, with the same argv, environment and fds, and a
group kill ends its grandchildren too.  Real processes on the real reactor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from txfaas import _accel
from txfaas._accel import spawn as accel
from txfaas.watchdog import process
from txfaas.watchdog.process import group_launcher, kill_group

# Reports itself on one line, starts a grandchild in its group, then waits to be killed.
CHILD = """
import json, os, subprocess, sys
grandchild = subprocess.Popen(["sleep", "60"])
fds = sorted(
    (int(fd), os.readlink(f"/proc/self/fd/{fd}").split(":")[0])
    for fd in os.listdir("/proc/self/fd")
    if os.path.exists(f"/proc/self/fd/{fd}") and not os.readlink(f"/proc/self/fd/{fd}").startswith("/proc")
)
print(json.dumps({
    "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "argv": sys.argv,
    "env": dict(os.environ), "fds": fds, "grandchild": grandchild.pid,
    "grandchild_pgid": os.getpgid(grandchild.pid),
}), flush=True)
sys.stdin.read()
"""

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs procfs")


class Reporter(ProcessProtocol):
    def __init__(self) -> None:
        self.report: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" in self._out and not self.report.called:
            self.report.callback(json.loads(self._out.split(b"\n")[0]))

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead
    except FileNotFoundError:
        return True


async def _run(how: str) -> dict[str, Any]:
    proto = Reporter()
    args = [sys.executable, "-S", "-c", CHILD, "first", "second arg"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TXFAAS_TEST": "1"}
    if how == "accel":
        accel.spawn_group_leader(reactor, proto, args[0], args, env)
    else:
        launcher = group_launcher(shutil.which("setsid") if how == "setsid" else None)
        reactor.spawnProcess(proto, launcher[0], [*launcher, *args], env=env, usePTY=False)
    report = await proto.report.addTimeout(20, reactor)
    if report["pgid"] != report["pid"]:  # not a group of its own: killing it would kill the tests
        os.kill(report["grandchild"], signal.SIGKILL)
        os.kill(report["pid"], signal.SIGKILL)
    else:
        assert kill_group(report["pgid"], signal.SIGKILL)
    await proto.ended.addTimeout(20, reactor)
    for _ in range(500):
        if _gone(report["grandchild"]):
            break
        await deferLater(reactor, 0.01, lambda: None)
    report["grandchild_gone"] = _gone(report["grandchild"])
    return report


@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid is not installed")
@pytest_twisted.ensureDeferred
async def test_the_accelerated_spawn_gives_the_child_the_stock_spawn_gives():
    results = {how: await _run(how) for how in ("accel", "setsid", "shim")}
    for how, report in results.items():
        assert report["pid"] == report["pgid"] == report["sid"], how  # leads its session and group
        assert report["grandchild_pgid"] == report["pgid"], how
        assert report["grandchild_gone"], how  # the group kill reached the grandchild
    for what in ("argv", "env", "fds"):
        assert results["accel"][what] == results["setsid"][what] == results["shim"][what], what
    assert results["accel"]["argv"] == ["-c", "first", "second arg"]


@pytest_twisted.ensureDeferred
async def test_the_probe_passes_here():
    assert accel.probe(reactor)


def test_the_probe_fails_when_the_child_does_not_lead_its_group(monkeypatch):
    monkeypatch.setattr(accel.GroupLeaderProcess, "_trySpawnInsteadOfFork", lambda self, *a: False)
    monkeypatch.setattr(accel.GroupLeaderProcess, "_setupChild", accel.twisted_process.Process._setupChild)
    assert not accel.probe(reactor)
    assert accel.group_spawn(reactor) is None


def test_the_watchdog_takes_the_stock_path_when_accelerations_are_off(monkeypatch):
    monkeypatch.setenv(_accel.ENV, "0")
    _accel.reset()
    try:
        assert process.native_group_spawn(reactor) is None
    finally:
        monkeypatch.delenv(_accel.ENV)
        _accel.reset()
