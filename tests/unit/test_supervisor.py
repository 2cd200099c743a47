"""ChildProcesses: copies of the command on Twisted's ProcessMonitor, restarted, stopped in turn."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txfaas.multiprocess import CHILD_ENV
from txfaas.supervisor import ChildProcesses


class Process:
    def __init__(self, protocol: Any, pid: int, env: dict[str, str]) -> None:
        self.protocol = protocol
        self.pid = pid
        self.env = env
        self.signals: list[str] = []

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)

    def end(self, exit_code: int = 0) -> None:
        reason = error.ProcessDone(None) if exit_code == 0 else error.ProcessTerminated(exit_code)
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(Clock):
    """A clock that spawns pretend processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Process] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any = None, **kw: Any
    ) -> Any:
        process = Process(protocol, 100 + len(self.spawned), dict(env or {}))
        self.spawned.append(process)
        protocol.makeConnection(process)
        return process


@pytest.fixture
def reactor() -> ProcessReactor:
    return ProcessReactor()


def test_each_child_is_marked_with_its_index_and_alive_lists_them(reactor):
    children = ChildProcesses(reactor, 2, argv=["/bin/twistd", "faas-worker"])
    children.startService()
    assert sorted(p.env[CHILD_ENV] for p in reactor.spawned) == ["1", "2"]
    assert children.alive() == [1, 2]


def test_a_child_that_dies_is_restarted_and_its_metrics_marked_dead(reactor, monkeypatch, tmp_path):
    dead: list[int] = []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from prometheus_client import multiprocess

    monkeypatch.setattr(multiprocess, "mark_process_dead", dead.append)
    children = ChildProcesses(reactor, 2, argv=["twistd"])
    children.startService()
    reactor.advance(5)  # ran a while: restarted at once
    first = reactor.spawned[0]
    first.end(9)
    assert dead == [first.pid] and children.alive() == [2]
    reactor.advance(0)
    assert children.alive() == [1, 2] and reactor.spawned[-1].env[CHILD_ENV] == "1"


def test_a_child_that_dies_at_once_is_restarted_later_and_later(reactor):
    children = ChildProcesses(reactor, 1, argv=["twistd"], restart_delay=1.0)
    children.startService()
    reactor.spawned[-1].end(1)
    reactor.advance(0.9)
    assert len(reactor.spawned) == 1
    reactor.advance(0.1)
    assert len(reactor.spawned) == 2
    reactor.spawned[-1].end(1)
    reactor.advance(1.0)
    assert len(reactor.spawned) == 2  # backed off: 2 s now
    reactor.advance(1.0)
    assert len(reactor.spawned) == 3


def test_stop_waits_the_grace_then_terms_and_fires_once_all_ended(reactor):
    children = ChildProcesses(reactor, 2, argv=["twistd"], grace=1.0)
    children.startService()
    first, second = reactor.spawned
    stopped = children.stopService()
    first.end()  # the process group's SIGTERM reached it already
    assert not stopped.called and first.signals == [] and second.signals == []
    reactor.advance(1.0)
    assert first.signals == [] and second.signals == ["TERM"]
    second.end()
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 2  # nothing restarted
    assert second.signals == ["TERM"]  # and no SIGKILL once it ended


def test_stop_kills_a_child_that_ignores_the_term(reactor):
    children = ChildProcesses(reactor, 1, argv=["twistd"], grace=1.0)
    children.startService()
    stopped = children.stopService()
    reactor.advance(1.0)
    reactor.advance(children.killTime)
    assert reactor.spawned[0].signals == ["TERM", "KILL"]
    reactor.spawned[0].end(9)
    assert stopped.called


def test_no_tap_imports_the_global_reactor_before_it_chooses_one():
    """A tap that imported procmon (or anything else importing the reactor) at module level
    would leave Twisted's default reactor installed before ``global_reactor()`` runs."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "import txfaas.gateway.tap, txfaas.worker.tap, txfaas.watchdog.tap, txfaas.local.tap\n"
        "print('twisted.internet.reactor' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
