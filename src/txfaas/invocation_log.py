"""The invocation log's writer: one line per finished call, written to the store in batches.

Used by the gateway (synchronous calls) and the workers (queued calls).  A call only
appends a tuple to a list; the first line of a batch sets one timer, and when it fires
the lines are formatted and sent in one round trip.  The buffer is bounded: past it,
lines are dropped and counted (a slow or absent Redis never holds calls up).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txfaas.logs import invocation_line
from txfaas.model import DEFAULT_NAMESPACE
from txfaas.store import LogLine, LogStore


def instance_name(role: str) -> str:
    """``gateway-HOST-PID``: the ``instance`` of the lines a process writes."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


class InvocationLog:
    log = Logger()

    def __init__(
        self,
        store: LogStore,
        clock: Any,
        instance: str,
        *,
        max_lines: int = 1000,
        interval: float = 0.25,
        buffer: int = 10_000,
    ) -> None:
        self._store = store
        self._clock = clock
        self.instance = instance
        self._instance = instance.encode()
        self.max_lines = max_lines
        self._interval = interval
        self._buffer = buffer
        self._pending: list[tuple[Any, ...]] = []
        self._timer: IDelayedCall | None = None
        self._writing: defer.Deferred[None] | None = None
        self.dropped = 0  # lines lost since the last warning
        self.written = 0

    def call(
        self,
        name: str,
        namespace: str,
        call_id: str | bytes,
        kind: bytes,
        method: str | bytes,
        path: str | bytes | list[bytes],
        status: int,
        duration: float,
        attempt: int = 1,
        error: str | None = None,
    ) -> None:
        """A finished call (formatted later, when its batch is written).  ``path`` may be the
        path's segments (the proxy's), joined then."""
        pending = self._pending
        if len(pending) >= self._buffer:
            self.dropped += 1
            return
        pending.append(
            (name, namespace, time.time(), call_id, kind, method, path, status, duration, attempt, error)
        )
        if self._timer is None and self._writing is None:
            self._timer = self._clock.callLater(self._interval, self._flush)

    def _lines(self, batch: list[tuple[Any, ...]]) -> list[LogLine]:
        instance = self._instance
        lines: list[LogLine] = []
        append = lines.append
        for name, namespace, ts, call_id, kind, method, path, status, duration, attempt, error in batch:
            if path.__class__ is list:
                path = b"/" + b"/".join(path)
            text = invocation_line(call_id, kind, method, path, status, duration, attempt, error)
            append((name, namespace or DEFAULT_NAMESPACE, ts, instance, text))
        return lines

    def _flush(self) -> defer.Deferred[None]:
        self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return defer.succeed(None)
        d = self._writing = defer.Deferred.fromCoroutine(
            self._store.append_logs(self._lines(batch), self.max_lines)
        )
        d.addCallbacks(self._written, self._failed, callbackArgs=(len(batch),), errbackArgs=(len(batch),))
        return d

    def _written(self, _: Any, count: int) -> None:
        self._writing = None
        self.written += count
        if self.dropped:
            self.log.warn(
                "invocation log: {dropped} line(s) dropped (more than {buffer} waiting)",
                dropped=self.dropped,
                buffer=self._buffer,
            )
            self.dropped = 0
        self._again()

    def _failed(self, failure: Failure, count: int) -> None:
        self._writing = None
        self.log.warn(
            "invocation log: {count} line(s) not written: {error}",
            count=count + self.dropped,
            error=failure.getErrorMessage(),
        )
        self.dropped = 0
        self._again()

    def _again(self) -> None:
        if self._pending and self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._flush)

    async def stop(self) -> None:
        """Write what is waiting (at shutdown)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._writing is not None:
            await self._writing
        await self._flush()
