"""Fork mode: a new process per request, like OpenFaaS's classic watchdog.

The request body goes to the process's stdin; its stdout is the response
body.  It sees the watchdog's environment plus ``Http_Method``,
``Http_Path``, ``Http_Query`` and ``Http_<Header_Name>`` for every request
header.  Exit status 0 answers 200; anything else answers 500 with the tail of
stderr.  Every line of stderr is logged.

The process is the leader of its own process group.  When the leader exits,
whatever it left behind in its group is killed; when the call is cancelled
(exec_timeout, client gone, shutdown) the whole group is killed.  Either way
every process is reaped (:class:`~txfaas.watchdog.process.OrphanReaper`).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure

from txfaas.watchdog.common import FunctionResult, Invocation, WatchdogConfig
from txfaas.watchdog.process import (
    GroupLeader,
    OrphanReaper,
    OutputLog,
    Spawn,
    Tail,
    default_spawn,
    kill_group,
)

_ENV_NAME = re.compile(rb"^[A-Za-z0-9_-]+$")


class BadRequest(ValueError):
    """The request cannot be turned into a process environment."""


def function_environ(base: Mapping[str, str], call: Invocation) -> dict[str, str]:
    """The process environment: ``base`` plus OpenFaaS's ``Http_*`` variables.

    ``X-Call-Id: 1`` becomes ``Http_X_Call_Id=1``; repeated headers are joined
    with ``", "``.  ``Http_Path`` is percent-decoded (as Go's ``URL.Path``),
    ``Http_Query`` is the raw query string.  Bytes that are not UTF-8 reach
    the process unchanged (``os.fsdecode``).
    """
    env = dict(base)
    for name, values in call.headers.getAllRawHeaders():
        if not _ENV_NAME.match(name):
            continue
        env["Http_" + name.decode("ascii").replace("-", "_")] = os.fsdecode(b", ".join(values))
    path = unquote_to_bytes(call.path)
    if b"\x00" in path:
        raise BadRequest("the path contains a NUL byte")
    env["Http_Method"] = call.method.decode("ascii", "replace")
    env["Http_Path"] = os.fsdecode(path)
    env["Http_Query"] = os.fsdecode(call.query)
    return env


class ForkRunner:
    """Starts ``config.fprocess`` once per call, in its own process group.

    ``spawn`` starts a process (``reactor.spawnProcess`` by default, behind
    ``config.launcher``); ``tap.py`` passes
    :func:`~txfaas.watchdog.process.spawn_group_leader` when it works here.
    """

    log = Logger()
    stderr_tail = 4096

    def __init__(
        self,
        reactor: IReactorProcess,
        config: WatchdogConfig,
        reaper: OrphanReaper,
        *,
        killpg: Callable[[int, int], None] = os.killpg,
        spawn: Spawn | None = None,
    ) -> None:
        self._spawn = spawn or default_spawn(reactor)
        self._config = config
        self._reaper = reaper
        self._killpg = killpg
        self._argv = [*config.launcher, *config.fprocess]
        self._base_env = dict(config.environ)
        self._running: set[_FunctionProcess] = set()
        self._stopping = False

    @property
    def ready(self) -> bool:
        return not self._stopping

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._reaper.start()

    def invoke(self, call: Invocation) -> Deferred[FunctionResult]:
        if self._stopping:
            return succeed(FunctionResult.text(503, "the watchdog is shutting down"))
        try:
            env = function_environ(self._base_env, call)
        except BadRequest as e:
            return succeed(FunctionResult.text(400, str(e)))
        proto = _FunctionProcess(self, call)
        result: Deferred[FunctionResult] = Deferred(lambda _: proto.abort())
        proto.result = result
        try:
            self._spawn(proto, self._argv[0], self._argv, env)
        except (OSError, ValueError) as e:
            self.log.error("cannot start {command}: {error}", command=self._config.command, error=e)
            return succeed(FunctionResult.text(500, f"cannot start the function: {e}"))
        self._running.add(proto)
        proto.ended.addBoth(lambda _: self._running.discard(proto))
        return result

    def stop(self) -> Deferred[None]:
        """Kill every running call's process group and wait until all of it is reaped."""
        self._stopping = True
        ended = [p.ended for p in self._running]
        for proto in list(self._running):
            proto.abort()
        d = DeferredList(ended, consumeErrors=True)
        d.addCallback(lambda _: self._reaper.stop())
        return d.addCallback(lambda _: None)

    # called by _FunctionProcess

    def _kill(self, pgid: int) -> None:
        if kill_group(pgid, signal.SIGKILL, self._killpg):
            self._reaper.watch(pgid)


class _FunctionProcess(GroupLeader):
    log = Logger()

    def __init__(self, runner: ForkRunner, call: Invocation) -> None:
        super().__init__(runner._kill)
        self._runner = runner
        self._call = call
        self._limit = runner._config.max_response
        self.result: Deferred[FunctionResult] | None = None
        self.ended: Deferred[None] = Deferred()
        self._stdout: list[bytes] = []
        self._size = 0
        self._tail = Tail(runner.stderr_tail)
        fields: dict[str, Any] = {"call_id": call.call_id} if call.call_id else {}
        self._stderr_log = OutputLog(self.log, "stderr", fields)
        self._aborted = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._call.body:
            self.transport.write(self._call.body)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            if self._aborted:
                return
            self._size += len(data)
            if self._limit and self._size > self._limit:
                self._answer(
                    FunctionResult.text(
                        500, f"the function's output exceeds max_response ({self._limit} bytes)"
                    )
                )
                self.abort()
                return
            self._stdout.append(data)
        elif childFD == 2:
            self._tail.feed(data)
            self._stderr_log.feed(data)

    def processEnded(self, reason: Failure) -> None:
        self._stderr_log.close()
        if self._aborted:
            self._answer(FunctionResult.text(503, "the function was stopped"))
        else:
            self._answer(self._outcome(reason))
        self.ended.callback(None)

    def abort(self) -> None:
        """Kill the whole group (and the leader, should it not have made its group yet)."""
        if self._aborted:
            return
        self._aborted = True
        self.kill_all()

    def _answer(self, result: FunctionResult) -> None:
        if self.result is not None and not self.result.called:
            self.result.callback(result)

    def _outcome(self, reason: Failure) -> FunctionResult:
        if reason.check(error.ProcessDone):
            return FunctionResult(200, ((b"Content-Type", self._content_type()),), b"".join(self._stdout))
        value = reason.value
        tail = self._tail.value()
        if getattr(value, "signal", None):
            message = f"the function was killed by signal {value.signal}"
        else:
            message = f"the function exited with status {getattr(value, 'exitCode', '?')}"
        self.log.warn(
            "{command}: {message}",
            command=self._runner._config.command,
            message=message,
            call_id=self._call.call_id,
        )
        body = (tail if tail else message.encode("utf-8")).rstrip(b"\n") + b"\n"
        return FunctionResult(500, ((b"Content-Type", b"text/plain; charset=utf-8"),), body)

    def _content_type(self) -> bytes:
        configured = self._runner._config.content_type
        if configured:
            return configured.encode("latin-1")
        sent = self._call.headers.getRawHeaders(b"Content-Type")
        return sent[0] if sent else b"application/octet-stream"


__all__ = ["BadRequest", "ForkRunner", "function_environ"]
