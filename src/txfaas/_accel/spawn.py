"""Function processes started as session and group leaders by ``posix_spawn`` itself.

The stock path execs ``setsid`` (util-linux) or a Python shim in front of the function, which
costs a fork-mode call a second ``exec``. ``os.posix_spawnp(setsid=True)`` makes the child a
session leader with no extra program; Twisted has no option for it, so :class:`GroupLeaderProcess`
overrides its ``Process._trySpawnInsteadOfFork`` with the same steps plus ``setsid`` (and
``_setupChild`` with ``os.setsid()`` first, should Twisted fork instead).

Relies on ``twisted.internet.process``'s ``_trySpawnInsteadOfFork``, ``_setupChild``,
``_listOpenFDs`` and ``_getFileActions``; :func:`probe` spawns a child and checks that it leads
its own session and group and gets its pipes as the stock spawn would.
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import sys
from typing import Any

from twisted.internet import process as twisted_process
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

log = Logger()


class GroupLeaderProcess(twisted_process.Process):
    """A Twisted ``Process`` started as the leader of a new session, with no extra ``exec``."""

    def _trySpawnInsteadOfFork(
        self, path: Any, uid: Any, gid: Any, executable: Any, args: Any, environment: Any, kwargs: Any
    ) -> bool:
        if uid is not None or gid is not None or path is not None:
            return False
        fdState: list[Any] = []
        for fd in twisted_process._listOpenFDs():
            try:
                cloexec = fcntl.fcntl(fd, fcntl.F_GETFD, fcntl.FD_CLOEXEC)
            except OSError:
                continue
            fdState.append((fd, cloexec))
        ignored = [s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN]
        self.pid = os.posix_spawnp(  # type: ignore[assignment]
            executable,
            args,
            os.environ if environment is None else environment,
            file_actions=twisted_process._getFileActions(
                fdState, kwargs.get("fdmap"), doClose=os.POSIX_SPAWN_CLOSE, doDup2=os.POSIX_SPAWN_DUP2
            ),
            setsigdef=ignored,
            setsid=True,
        )
        self.status = -1
        return True

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        # Only reached if posix_spawn could not be used and Twisted forked: same outcome.
        os.setsid()
        super()._setupChild(*args, **kwargs)


def spawn_group_leader(
    reactor: Any, proto: Any, executable: str, args: list[str], env: dict[str, str]
) -> twisted_process.Process:
    """``reactor.spawnProcess`` (no PTY, default pipes), the child leading a new session and group."""
    return GroupLeaderProcess(
        reactor,
        os.fsencode(executable),
        [os.fsencode(a) for a in args],
        {os.fsencode(k): os.fsencode(v) for k, v in env.items()},
        None,
        proto,
    )


#: The probe's child: alive until its stdin is closed.
_CHILD = "import sys; sys.stdin.read()"


def _pipes(pid: int) -> bool:
    """Whether ``pid``'s standard fds are pipes (as Twisted's default ``childFDs`` make them)."""
    if not os.path.isdir(f"/proc/{pid}/fd"):
        return True  # no procfs to look at: the group checks must do
    return all(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:") for fd in (0, 1, 2))


def probe(reactor: Any) -> bool:
    """True if :func:`spawn_group_leader` really starts a child that leads its own session and
    group, with pipes on its standard fds. Spawns one Python child, ended at once."""
    try:
        child = spawn_group_leader(
            reactor, ProcessProtocol(), sys.executable, [sys.executable, "-S", "-c", _CHILD], {}
        )
        try:
            pid = child.pid
            assert pid is not None
            works = os.getpgid(pid) == pid and os.getsid(pid) == pid and _pipes(pid)
        finally:
            child.loseConnection()
    except Exception as e:
        log.warn("cannot spawn functions as group leaders directly ({error})", error=e)
        return False
    if not works:
        log.warn("this Twisted ignores the group-leader spawn hook")
    return works


def group_spawn(reactor: Any) -> functools.partial[Any] | None:
    """:func:`spawn_group_leader` bound to ``reactor`` if :func:`probe` passes; else None."""
    return functools.partial(spawn_group_leader, reactor) if probe(reactor) else None
