"""Process hygiene for the watchdog: process groups, killing, reaping, output logging.

Every function process starts in a new session and process group (through
``setsid --``, or a two-line Python shim where util-linux is missing), so one
``killpg`` reaches its children and grandchildren.  The watchdog makes itself
a *child subreaper* (Linux): orphans of a killed group are re-parented to it
instead of to PID 1, and :class:`OrphanReaper` reaps them.  Without that, a
watchdog running as PID 1 in a container would pile up zombies, and one started
by a shell script (which never reaps strangers) would leave them to it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import process as twisted_process
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txfaas import _accel

# Runs ``argv[1:]`` in a new session: used only when util-linux's setsid is not installed.
PYTHON_SETSID_SHIM = "import os,sys;os.setsid();os.execvp(sys.argv[1],sys.argv[1:])"

_PR_SET_CHILD_SUBREAPER = 36

log = Logger()


def group_launcher(setsid: str | None, python: str = sys.executable) -> tuple[str, ...]:
    """The argv prefix that starts a program as the leader of a new process group.

    ``setsid`` (util-linux) execs in place when its caller is not a group
    leader, which a freshly spawned child never is, so the function keeps the
    pid Twisted knows and that pid is also the group id.
    """
    if setsid:
        return (setsid, "--")
    return (python, "-c", PYTHON_SETSID_SHIM)


Spawn = Callable[[Any, str, list[str], dict[str, str]], Any]
"""``spawn(protocol, executable, args, env) -> process transport``."""


def default_spawn(reactor: Any) -> Spawn:
    def spawn(proto: Any, executable: str, args: list[str], env: dict[str, str]) -> Any:
        return reactor.spawnProcess(proto, executable, args, env=env, usePTY=False)

    return spawn


def native_group_spawn(reactor: Any) -> Spawn | None:
    """A spawn that makes the child a group leader with no ``setsid`` exec in front
    (:mod:`txfaas._accel.spawn`), when accelerations are on and its probe passes here; else
    None, and functions start through :func:`group_launcher`."""
    if not _accel.enabled():
        return None
    from txfaas._accel import spawn

    return spawn.group_spawn(reactor)


def become_subreaper() -> bool:
    """Ask Linux to re-parent orphaned descendants to this process (``PR_SET_CHILD_SUBREAPER``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def kill_group(pgid: int, sig: int = signal.SIGKILL, killpg: Callable[[int, int], None] = os.killpg) -> bool:
    """Signal a whole process group.  False when the group no longer exists."""
    try:
        killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only possible if the pgid was recycled by someone else's group: never touch it.
        log.warn("not allowed to signal process group {pgid}", pgid=pgid)
        return False
    return True


class GroupLeader(ProcessProtocol):
    """A function process started as the leader of its own process group.

    When the leader exits, whatever it left running in its group is an orphan
    and is killed at once; :meth:`kill_all` kills the group, the leader (should
    it not have made its group yet), and closes our ends of its pipes, so that
    a descendant that escaped the group cannot hold us up.  ``kill_group(pgid)``
    is the runner's: it signals the group and has the reaper watch it.
    """

    pgid: int | None = None
    _exited = False

    def __init__(self, kill_group: Callable[[int], None]) -> None:
        self._kill_group = kill_group

    def makeConnection(self, transport: Any) -> None:
        self.pgid = transport.pid
        super().makeConnection(transport)

    def processExited(self, reason: Any) -> None:
        self._exited = True
        if self.pgid is not None:
            self._kill_group(self.pgid)

    def kill_all(self) -> None:
        if self.pgid is not None and not self._exited:
            self._kill_group(self.pgid)
        transport = self.transport
        if transport is None:  # never started
            return
        try:
            transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass
        transport.loseConnection()


class OrphanReaper:
    """Reaps re-parented orphans and waits until killed process groups are really gone.

    ``watch(pgid)`` after killing a group; ``settled()`` fires once every
    watched group is empty (its members dead *and* reaped).  Zombies of
    processes Twisted spawned itself are left to Twisted (``reapAllProcesses``),
    so no exit status is ever stolen from a ``ProcessProtocol``.
    """

    log = Logger()
    idle_interval = 1.0
    busy_interval = 0.02

    def __init__(
        self,
        clock: IReactorTime,
        *,
        waitid: Callable[..., Any] = os.waitid,
        waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid,
        killpg: Callable[[int, int], None] = os.killpg,
        known: Callable[[], Any] = lambda: twisted_process.reapProcessHandlers,
        reap_known: Callable[[], None] = twisted_process.reapAllProcesses,
    ) -> None:
        self._clock = clock
        self._waitid = waitid
        self._waitpid = waitpid
        self._killpg = killpg
        self._known = known
        self._reap_known = reap_known
        self._watched: set[int] = set()
        self._waiters: list[Deferred[None]] = []
        self._loop: LoopingCall | None = None
        self._soon: Any = None
        self.reaped = 0

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.sweep)
            self._loop.clock = self._clock
            self._loop.start(self.idle_interval, now=False).addErrback(
                lambda f: self.log.failure("orphan reaper stopped", f)
            )

    def stop(self, timeout: float = 10.0) -> Deferred[None]:
        """Fires when every watched group is gone (or after ``timeout``, with a warning); then stops sweeping.

        SIGKILL cannot end a process stuck in uninterruptible sleep (a dead
        NFS server, say): shutting down must not wait for it forever.
        """
        d = self.settled()
        if timeout and not d.called:
            d.addTimeout(timeout, self._clock)

            def stuck(failure: Any) -> None:
                failure.trap(TimeoutError)
                self.log.warn(
                    "process groups {groups} still not empty after SIGKILL and {timeout}s; giving up on them",
                    groups=sorted(self._watched),
                    timeout=timeout,
                )
                self._waiters = [w for w in self._waiters if w is not d]

            d.addErrback(stuck)

        def halt(result: None) -> None:
            if self._loop is not None and self._loop.running:
                self._loop.stop()
            self._loop = None
            if self._soon is not None and self._soon.active():
                self._soon.cancel()
            self._soon = None
            return result

        return d.addBoth(halt)

    @property
    def watched(self) -> frozenset[int]:
        return frozenset(self._watched)

    def watch(self, pgid: int) -> None:
        """A group was just killed: keep sweeping until it is empty."""
        self._watched.add(pgid)
        self._sweep_soon()

    def settled(self) -> Deferred[None]:
        if not self._watched:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self._sweep_soon()
        return d

    def _sweep_soon(self) -> None:
        if self._soon is None or not self._soon.active():
            self._soon = self._clock.callLater(self.busy_interval, self._busy_sweep)

    def _busy_sweep(self) -> None:
        self._soon = None
        self.sweep()
        if self._watched:
            self._sweep_soon()

    def sweep(self) -> None:
        """Reap every waitable orphan, then drop the watched groups that are empty."""
        self.reap_orphans()
        for pgid in list(self._watched):
            # SIGKILL again: a member forked after the first kill is caught too.
            if not kill_group(pgid, signal.SIGKILL, self._killpg):
                self._watched.discard(pgid)
        if not self._watched and self._waiters:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def reap_orphans(self) -> int:
        """``waitid(WNOWAIT)`` peeks at a zombie child; reap it unless Twisted owns it."""
        count = 0
        for _ in range(10_000):
            try:
                info = self._waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None or not info.si_pid:
                break
            pid = info.si_pid
            if pid in self._known():
                # One of Twisted's own: let it collect the status for its ProcessProtocol.
                before = len(self._known())
                self._reap_known()
                if len(self._known()) >= before:
                    break
                continue
            try:
                self._waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            count += 1
        self.reaped += count
        return count


class OutputLog:
    """Splits a child's output into lines and logs them, bounded in line length and volume.

    The volume bound is per call (fork mode) or, with ``window``, per window of that many
    seconds (http mode: a long-running server's logs resume in the next window instead of
    stopping for the rest of its life).
    """

    max_line = 2048
    max_total = 64 * 1024

    def __init__(
        self,
        logger: Logger,
        stream: str,
        fields: dict[str, Any],
        window: float | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._stream = stream
        self._fields = fields
        self._partial = b""
        self._total = 0
        self._truncated = False
        self._window = window
        self._now = now
        self._window_start = now()

    def _new_window(self) -> None:
        if self._window is not None and self._now() - self._window_start >= self._window:
            self._window_start = self._now()
            self._total = 0
            self._truncated = False

    def feed(self, data: bytes) -> None:
        self._new_window()
        if self._truncated:
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_line:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        if self._partial and not self._truncated:
            self._emit(self._partial)
        self._partial = b""

    def _emit(self, line: bytes) -> None:
        if self._truncated:
            return
        self._total += len(line)
        if self._total > self.max_total:
            self._truncated = True
            self._log.warn(
                "function {stream}: more than {limit} bytes, not logging the rest"
                + (f" for {self._window:g}s" if self._window is not None else ""),
                stream=self._stream,
                limit=self.max_total,
                **self._fields,
            )
            return
        text = line[: self.max_line].rstrip(b"\r").decode("utf-8", "replace")
        self._log.info("function {stream}: {line}", stream=self._stream, line=text, **self._fields)


class Tail:
    """The last ``size`` bytes of a stream."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > 2 * self._size:
            del self._buf[: len(self._buf) - self._size]

    def value(self) -> bytes:
        return bytes(self._buf[-self._size :])
