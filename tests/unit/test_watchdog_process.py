"""Process hygiene helpers: the group launcher, group kills, the orphan reaper, output logging."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txfaas.watchdog.process import (
    PYTHON_SETSID_SHIM,
    GroupLeader,
    OrphanReaper,
    OutputLog,
    Tail,
    group_launcher,
    kill_group,
)

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


def test_setsid_is_used_when_installed() -> None:
    assert group_launcher("/usr/bin/setsid", "/py") == ("/usr/bin/setsid", "--")


def test_a_python_shim_replaces_a_missing_setsid() -> None:
    assert group_launcher(None, "/py") == ("/py", "-c", PYTHON_SETSID_SHIM)


def test_kill_group_says_whether_the_group_existed() -> None:
    sent: list[tuple[int, int]] = []
    assert kill_group(12, signal.SIGTERM, lambda pgid, sig: sent.append((pgid, sig)))
    assert sent == [(12, signal.SIGTERM)]

    def gone(pgid: int, sig: int) -> None:
        raise ProcessLookupError()

    assert not kill_group(12, signal.SIGKILL, gone)


def test_a_group_we_may_not_signal_is_left_alone() -> None:
    def foreign(pgid: int, sig: int) -> None:
        raise PermissionError()

    assert not kill_group(12, signal.SIGKILL, foreign)


class FakeProcessTransport:
    def __init__(self, pid: int, gone: bool = False) -> None:
        self.pid = pid
        self.gone = gone
        self.signals: list[str] = []
        self.lost = False

    def signalProcess(self, name: str) -> None:
        if self.gone:
            from twisted.internet.error import ProcessExitedAlready

            raise ProcessExitedAlready()
        self.signals.append(name)

    def loseConnection(self) -> None:
        self.lost = True


class GroupLeaderHarness:
    """What the fork and http runners' processes share: the group dies with its leader."""

    def make(self, **kw: Any) -> tuple[GroupLeader, FakeProcessTransport, list[int]]:
        killed: list[int] = []
        leader = GroupLeader(killed.append)
        transport = FakeProcessTransport(4242, **kw)
        leader.makeConnection(transport)
        return leader, transport, killed


@pytest.fixture
def group_leader() -> GroupLeaderHarness:
    return GroupLeaderHarness()


def test_the_group_is_named_after_the_leader_and_killed_when_the_leader_exits(
    group_leader: GroupLeaderHarness,
) -> None:
    leader, _, killed = group_leader.make()
    assert leader.pgid == 4242
    leader.processExited(Failure(ProcessDone(0)))
    assert killed == [4242]  # orphans left behind in the group


def test_kill_all_kills_the_group_the_leader_and_closes_the_pipes(group_leader: GroupLeaderHarness) -> None:
    leader, transport, killed = group_leader.make()
    leader.kill_all()
    assert (killed, transport.signals, transport.lost) == ([4242], ["KILL"], True)


def test_kill_all_after_the_leader_exited_does_not_signal_a_group_id_that_may_be_reused(
    group_leader: GroupLeaderHarness,
) -> None:
    leader, transport, killed = group_leader.make(gone=True)
    leader.processExited(Failure(ProcessDone(0)))
    leader.kill_all()
    assert (killed, transport.signals, transport.lost) == ([4242], [], True)


class FakeChildren:
    """A process table: zombie children waiting to be reaped, and live groups."""

    def __init__(self) -> None:
        self.zombies: list[int] = []
        self.reaped: list[int] = []
        self.groups: dict[int, int] = {}  # pgid -> live members
        self.known: dict[int, object] = {}
        self.twisted_reaped: list[int] = []

    def waitid(self, idtype: int, ident: int, options: int) -> Any:
        assert options & os.WNOWAIT and options & os.WNOHANG
        if not self.zombies and not self.known:
            raise ChildProcessError()
        return SimpleNamespace(si_pid=self.zombies[0]) if self.zombies else None

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        self.zombies.remove(pid)
        self.reaped.append(pid)
        return pid, 0

    def killpg(self, pgid: int, sig: int) -> None:
        if not self.groups.get(pgid):
            raise ProcessLookupError()

    def reap_known(self) -> None:
        for pid in list(self.known):
            if pid in self.zombies:
                self.zombies.remove(pid)
                del self.known[pid]
                self.twisted_reaped.append(pid)

    def reaper(self, clock: Clock) -> OrphanReaper:
        return OrphanReaper(
            clock,
            waitid=self.waitid,
            waitpid=self.waitpid,
            killpg=self.killpg,
            known=lambda: self.known,
            reap_known=self.reap_known,
        )


def test_orphans_are_reaped_and_twistds_own_children_are_left_to_twisted() -> None:
    table = FakeChildren()
    table.known[20] = object()
    table.zombies = [10, 20, 30]
    reaper = table.reaper(Clock())
    assert reaper.reap_orphans() == 2
    assert table.reaped == [10, 30]  # waitpid only for strangers
    assert table.twisted_reaped == [20]  # Twisted collected its own status


def test_no_children_at_all_is_not_an_error() -> None:
    table = FakeChildren()
    assert table.reaper(Clock()).reap_orphans() == 0


def test_a_watched_group_is_swept_until_empty_then_settled_fires() -> None:
    clock = Clock()
    table = FakeChildren()
    table.groups[7] = 2
    reaper = table.reaper(clock)
    settled = reaper.settled()
    successResultOf(settled)  # nothing watched yet
    reaper.watch(7)
    settled = reaper.settled()
    clock.advance(reaper.busy_interval)
    assertNoResult(settled)
    table.groups[7] = 0
    table.zombies = [71, 72]
    clock.advance(reaper.busy_interval)
    successResultOf(settled)
    assert table.reaped == [71, 72]
    assert reaper.watched == frozenset()


def test_the_idle_sweep_runs_every_second_once_started_and_stop_ends_it() -> None:
    clock = Clock()
    table = FakeChildren()
    reaper = table.reaper(clock)
    reaper.start()
    table.zombies = [5]
    clock.advance(reaper.idle_interval)
    assert table.reaped == [5]
    successResultOf(reaper.stop())
    table.zombies = [6]
    clock.advance(10)
    assert table.reaped == [5]
    assert clock.getDelayedCalls() == []


@pytest.fixture
def observer() -> Any:
    """Every event logged during the test."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def lines(observer: Any) -> list[str]:
    return [e["line"] for e in observer if "line" in e]


def test_output_is_logged_line_by_line_across_chunks(observer: Any) -> None:
    out = OutputLog(Logger(), "stderr", {"call_id": "x"})
    out.feed(b"a\r\nb")
    out.feed(b"c\n")
    out.feed(b"tail")
    out.close()
    assert lines(observer) == ["a", "bc", "tail"]


def test_long_lines_are_cut_and_a_flood_stops_being_logged(observer: Any) -> None:
    out = OutputLog(Logger(), "stderr", {})
    out.max_line, out.max_total = 4, 10
    out.feed(b"123456789\n")
    out.feed(b"ab\ncd\n")
    assert lines(observer) == ["1234"]
    assert any("not logging the rest" in e["log_format"] for e in observer)


def test_tail_keeps_the_last_bytes() -> None:
    tail = Tail(4)
    for chunk in (b"abc", b"defgh", b"ij"):
        tail.feed(chunk)
    assert tail.value() == b"ghij"


def test_stop_gives_up_on_a_group_that_never_empties_after_its_timeout(observer: Any) -> None:
    clock = Clock()
    table = FakeChildren()
    table.groups[9] = 1  # a member stuck in uninterruptible sleep
    reaper = table.reaper(clock)
    reaper.watch(9)
    stopped = reaper.stop(timeout=10)
    clock.advance(9.99)
    assertNoResult(stopped)
    clock.advance(0.01)
    successResultOf(stopped)
    assert any("giving up" in e["log_format"] for e in observer)
    assert clock.getDelayedCalls() == []


def test_http_mode_output_log_resumes_in_the_next_window():
    """A long-running server's logs are bounded per window, not silenced for the rest of its life."""
    from twisted.logger import Logger

    from txfaas.watchdog.process import OutputLog

    events: list[dict] = []
    now = [0.0]
    log = OutputLog(Logger(observer=events.append), "stdout", {}, window=60.0, now=lambda: now[0])
    log.max_total = 10
    log.feed(b"0123456789\nover the limit\n")
    lines = [e for e in events if e.get("line")]
    assert [e["line"] for e in lines] == ["0123456789"]
    log.feed(b"still silenced\n")
    assert [e["line"] for e in events if e.get("line")] == ["0123456789"]
    now[0] = 61.0
    log.feed(b"next\n")
    assert [e["line"] for e in events if e.get("line")] == ["0123456789", "next"]
