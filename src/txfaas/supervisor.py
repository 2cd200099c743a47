"""The supervisor of ``--workers`` / ``--processes``: copies of this command on procmon.

``twisted.runner.procmon`` imports the global reactor, so this module is imported only once a
process has chosen its reactor (in ``makeService``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from txfaas.multiprocess import CHILD_ENV

log = Logger(namespace="txfaas.supervisor")


class ChildProcesses(ProcessMonitor):
    """Runs ``count`` more copies of this very twistd command, each marked with its index in
    ``CHILD_ENV``, on Twisted's ``ProcessMonitor``: one that dies is restarted (at once if it ran
    a while, else with procmon's back-off), and all are stopped with the service.

    Added to procmon, with its public API only: the stop waits ``grace`` seconds before the
    SIGTERM (a SIGTERM to the whole process group -- systemd, Ctrl-C -- has reached the children
    already, and a second one makes Twisted log a traceback), and its Deferred fires once every
    child has ended (procmon's ``stopService`` returns nothing and does not wait); a child's end
    is logged and, with prometheus multiprocess metrics, its values marked dead.  What procmon
    cannot do: let the children write to the parent's stdout and stderr -- it reads their output
    through pipes and logs it line by line as ``[index] line`` in the parent's log.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: list[str] | None = None,
        restart_delay: float = 1.0,
        grace: float = 1.0,
    ) -> None:
        super().__init__(reactor)
        self.minRestartDelay = restart_delay  # type: ignore[assignment]  # typed int; seconds
        self._time = reactor
        self._grace = grace
        self._ended: dict[str, defer.Deferred[None]] = {}
        args = list(argv if argv is not None else [sys.executable, *sys.argv])
        for index in range(1, count + 1):
            self.addProcess(str(index), args, env={**os.environ, CHILD_ENV: str(index)})

    def alive(self) -> list[int]:
        """The indices of the children running now."""
        return sorted(int(name) for name in self.protocols)

    def startProcess(self, name: str) -> None:
        super().startProcess(name)
        protocol = self.protocols.get(name)
        if protocol is None or protocol.transport is None:
            return  # it could not be spawned: procmon retries
        pid = protocol.transport.pid
        ended: defer.Deferred[None] = defer.Deferred()
        self._ended[name] = ended
        log.info("started process {index} (pid {pid})", index=name, pid=pid)
        procmon_ended = protocol.processEnded

        def processEnded(reason: Failure) -> None:
            try:
                procmon_ended(reason)  # procmon's bookkeeping, and the restart it schedules
            finally:
                self._child_ended(name, pid, reason, ended)

        protocol.processEnded = processEnded  # type: ignore[method-assign]

    def _child_ended(self, name: str, pid: int | None, reason: Failure, ended: defer.Deferred[None]) -> None:
        if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)
        if self.running:
            delay = self.restart[name].getTime() - self._time.seconds() if name in self.restart else 0
            log.warn(
                "process {index} ended ({reason}); restarting it in {delay:.1f}s",
                index=name,
                reason=reason.getErrorMessage(),
                delay=max(0.0, delay),
            )
        ended.callback(None)

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        """No more restarts; SIGTERM after ``grace`` to the children still running (SIGKILL
        ``killTime`` later); fires once all have ended."""
        service.Service.stopService(self)
        for call in self.restart.values():
            if call.active():
                call.cancel()
        timer = self._time.callLater(self._grace, ProcessMonitor.stopService, self)
        waiting = [d for name, d in self._ended.items() if name in self.protocols]
        ended = defer.DeferredList(waiting, consumeErrors=True)

        def done(result: object) -> None:
            if timer.active():
                timer.cancel()

        return ended.addBoth(done)
