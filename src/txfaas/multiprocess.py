"""Several processes of one command: the child marker, parent-death signal, shared metrics, supervisor."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

# --- several processes on one port -----------------------------------------------------------

CHILD_ENV = "TXFAAS_CHILD_INDEX"


def prepare_multiprocess_metrics(workers: int, parent_only: bool = False) -> None:
    """With several processes, prometheus_client keeps its values in a shared folder, so that any
    process's /metrics adds up all of them.  Must run before prometheus_client is imported --
    unless ``parent_only``: a supervisor that makes no metrics itself, only its children do."""
    import tempfile

    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if "prometheus_client" in sys.modules and not parent_only:
            raise RuntimeError("prometheus_client was imported before the multiprocess folder was set")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="txfaas-metrics-")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) is not None


def die_with_parent(sig: int = 15) -> bool:
    """Ask Linux to send this process ``sig`` (SIGTERM) when its parent dies.

    A child of ``--workers``/``--processes`` would otherwise outlive a parent that was
    SIGKILLed, keep the port (or the queue) and serve with nobody supervising it.  Returns
    False where the call is not available (not Linux).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before the call: then nobody would send the signal.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True


class ChildProcesses(service.Service):
    """Runs ``count`` more copies of this very twistd command (marked as children), restarts one
    that dies, and stops them all (SIGTERM, then waits) when the service stops."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: list[str] | None = None,
        restart_delay: float = 1.0,
        grace: float = 1.0,
    ) -> None:
        self._grace = grace
        self._reactor = reactor
        self._count = count
        self._argv = list(argv if argv is not None else [sys.executable, *sys.argv])
        self._restart_delay = restart_delay
        self._children: dict[int, Any] = {}
        self._ended: dict[int, defer.Deferred] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._count + 1):
            self._spawn(index)

    def alive(self) -> list[int]:
        """The indices of the children running now."""
        return sorted(self._children)

    def _spawn(self, index: int) -> None:
        from twisted.internet import protocol

        owner = self
        ended: defer.Deferred[None] = defer.Deferred()

        class Child(protocol.ProcessProtocol):
            def processEnded(self, reason: Any) -> None:
                owner._ended_child(index, self.transport.pid, reason, ended)

        env = dict(os.environ)
        env[CHILD_ENV] = str(index)
        transport = self._reactor.spawnProcess(
            Child(), self._argv[0], self._argv, env=env, childFDs={0: "w", 1: 1, 2: 2}
        )
        self._children[index] = transport
        self._ended[index] = ended
        self.log.info("started process {index} (pid {pid})", index=index, pid=transport.pid)

    def _ended_child(self, index: int, pid: int | None, reason: Any, ended: defer.Deferred) -> None:
        self._children.pop(index, None)
        ended.callback(None)
        if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)
        if not self._stopping:
            self.log.warn(
                "process {index} ended ({reason}); restarting it in {delay}s",
                index=index,
                reason=reason.getErrorMessage(),
                delay=self._restart_delay,
            )
            self._reactor.callLater(self._restart_delay, lambda: self._stopping or self._spawn(index))

    def stopService(self) -> defer.Deferred:
        """Stop the children.  A SIGTERM sent to the whole process group (systemd, Ctrl-C) has
        reached them already, and a second one would make Twisted log a traceback: they get
        ``grace`` seconds to leave on their own before they are sent SIGTERM."""
        super().stopService()
        self._stopping = True

        def terminate() -> None:
            for transport in list(self._children.values()):
                try:
                    transport.signalProcess("TERM")
                except Exception:  # already gone
                    pass

        timer = self._reactor.callLater(self._grace, terminate)
        ended = defer.DeferredList(list(self._ended.values()), consumeErrors=True)
        ended.addBoth(lambda result: (timer.active() and timer.cancel()) or result)
        return ended
