"""The watchdog's HTTP front: timeouts, limits, health and draining around a runner.

- ``read_timeout``: an absolute deadline for reading a whole request, from its
  first byte (or from the connection's opening, for the first request) until
  its body is complete.  Twisted's own idle timeout restarts at every byte, so
  a client trickling bytes would never be cut off; here it gets ``408`` and
  the connection is closed.  ``max_request`` caps the body (``413``), counted
  for chunked bodies too.
- ``exec_timeout`` (shortened, never lengthened, per call by ``X-Timeout``):
  the runner's Deferred is cancelled, which kills the process group (fork) or
  aborts the proxied request (http); the client gets ``504``.
- ``write_timeout``: from the start of writing the response until Twisted's
  send buffer has been handed to the kernel; a client that does not read
  is disconnected (``abortConnection``).
- ``max_inflight``: ``429`` beyond it.  ``/_/health``: ``200`` when ready,
  ``503`` while starting, when the function is not ready, and while draining.
- Stopping (SIGTERM): new requests get ``503``, running ones have
  ``write_timeout`` to finish, the rest are cancelled, then the runner kills
  and reaps whatever is left.
- Every answer that involved the function carries ``X-Duration-Seconds``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import HTTPChannel, datetimeToString

from txfaas.config import format_duration, parse_duration
from txfaas.headers import CALL_ID, DURATION, valid_call_id
from txfaas.watchdog.common import TEXT_PLAIN, FunctionResult, Invocation, Runner, WatchdogConfig

STARTING, RUNNING, DRAINING, STOPPED = "starting", "running", "draining", "stopped"
X_TIMEOUT = b"X-Timeout"
HEALTH_PATH = b"/_/health"


def _raw_response(status: bytes, message: str) -> bytes:
    body = message.encode("utf-8") + b"\n"
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status,
        TEXT_PLAIN,
        len(body),
        body,
    )


class _Channel(HTTPChannel):
    """HTTP/1.1 with an absolute read deadline, a body cap and a write deadline."""

    log = Logger()

    # Set by WatchdogSite.buildProtocol.
    readTimeout: float = 0.0
    writeTimeout: float = 0.0
    maxRequest: int = 0

    _readDeadline: Any = None
    _writeDeadline: Any = None
    _requestStarted = False
    _rejected = False
    _backedUp = False

    def __init__(self) -> None:
        super().__init__()
        self._flushWaiters: list[Callable[[], None]] = []

    # reading

    def connectionMade(self) -> None:
        super().connectionMade()
        self._armReadDeadline()

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if data and not self._handlingRequest:
            self._requestStarted = True
            if self._readDeadline is None:
                self._armReadDeadline()
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._rejected:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.maxRequest and self.length is not None and self.length > self.maxRequest:
            self.reject(
                b"413 Request Entity Too Large",
                f"the request body exceeds max_request ({self.maxRequest} bytes)",
            )
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._rejected:
            return
        self._cancelReadDeadline()
        self._requestStarted = False
        super().allContentReceived()

    def _armReadDeadline(self) -> None:
        if self.readTimeout:
            self._readDeadline = self.callLater(self.readTimeout, self._readTimedOut)

    def _cancelReadDeadline(self) -> None:
        if self._readDeadline is not None:
            if self._readDeadline.active():
                self._readDeadline.cancel()
            self._readDeadline = None

    def _readTimedOut(self) -> None:
        self._readDeadline = None
        if self._rejected or self._handlingRequest or self.transport is None:
            return
        if not self._requestStarted:
            # Opened and never used: nothing was asked, so nothing to answer.
            self._rejected = True
            self.loseConnection()
            return
        self.log.info(
            "read_timeout: no complete request from {peer} within {timeout}",
            peer=str(self.transport.getPeer()),
            timeout=format_duration(self.readTimeout),
        )
        self.reject(b"408 Request Timeout", f"read_timeout of {format_duration(self.readTimeout)} exceeded")

    def reject(self, status: bytes, message: str) -> None:
        """Answer before the request was read to its end, and close."""
        if self._rejected:
            return
        self._rejected = True
        self._cancelReadDeadline()
        self.transport.write(_raw_response(status, message))
        self.loseConnection()

    # writing

    def pauseProducing(self) -> None:
        self._backedUp = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._backedUp = False
        super().resumeProducing()
        self._flushed()

    def whenFlushed(self, done: Callable[[], None]) -> None:
        """Call ``done`` once the response just written has left Twisted's send buffer.

        The transport pauses this channel when more than its buffer size is
        pending and resumes it once everything was handed to the kernel; a
        client that does not read within ``writeTimeout`` is disconnected.
        """
        if not self._backedUp or self.transport is None:
            done()
            return
        self._flushWaiters.append(done)
        if self.writeTimeout and self._writeDeadline is None:
            self._writeDeadline = self.callLater(self.writeTimeout, self._writeTimedOut)

    def _flushed(self) -> None:
        if self._writeDeadline is not None:
            if self._writeDeadline.active():
                self._writeDeadline.cancel()
            self._writeDeadline = None
        waiters, self._flushWaiters = self._flushWaiters, []
        for done in waiters:
            done()

    def _writeTimedOut(self) -> None:
        self._writeDeadline = None
        self.log.warn(
            "write_timeout: {peer} did not read the response within {timeout}; disconnecting",
            peer=str(self.transport.getPeer()),
            timeout=format_duration(self.writeTimeout),
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._cancelReadDeadline()
        super().connectionLost(reason)
        self._flushed()


class _Request(server.Request):
    """Counts the body against max_request and hands itself to the watchdog."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        limit = self.channel.maxRequest
        if limit and self._received > limit:
            self.channel.reject(
                b"413 Request Entity Too Large", f"the request body exceeds max_request ({limit} bytes)"
            )
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        # No resource tree to walk: every request goes to the watchdog.
        self.site = self.channel.site
        self.setHeader(b"Date", datetimeToString())
        try:
            self.site.watchdog.handle(self)
        except BaseException:
            self.processingFailed(Failure())


class WatchdogSite(server.Site):
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request
    displayTracebacks = False

    def __init__(self, watchdog: Watchdog, config: WatchdogConfig, clock: IReactorTime) -> None:
        super().__init__(resource.Resource(), timeout=config.idle_timeout or None, reactor=clock)
        self.watchdog = watchdog
        self._config = config

    def buildProtocol(self, addr: Any) -> _Channel:
        channel = super().buildProtocol(addr)
        channel.readTimeout = self._config.read_timeout
        channel.writeTimeout = self._config.write_timeout
        channel.maxRequest = self._config.max_request
        return channel

    def log(self, request: server.Request) -> None:
        """No access log: the hot path stays lean (failures are logged where they happen)."""


class _Exchange:
    __slots__ = (
        "channel",
        "deferred",
        "gone",
        "request",
        "responded",
        "started",
        "timeout",
        "timeout_source",
    )

    def __init__(self, request: server.Request, started: float, timeout: float, timeout_source: str) -> None:
        self.request = request
        self.started = started
        self.timeout = timeout
        self.timeout_source = timeout_source
        self.deferred: Deferred[FunctionResult] | None = None
        self.channel: _Channel | None = None
        self.gone = False
        self.responded = False


class Watchdog(Service):
    """The HTTP front of one function.  ``site`` serves it; ``endpoint`` (optional) is where it listens."""

    log = Logger()

    def __init__(
        self,
        config: WatchdogConfig,
        clock: IReactorTime,
        runner: Runner,
        endpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._runner = runner
        self._endpoint = endpoint
        self.site = WatchdogSite(self, config, clock)
        self.state = STARTING
        self.port: IListeningPort | None = None
        self._exchanges: set[_Exchange] = set()
        self._drain_waiters: list[Deferred[None]] = []

    @property
    def inflight(self) -> int:
        return len(self._exchanges)

    @property
    def healthy(self) -> bool:
        return self.state == RUNNING and self._runner.ready

    # service

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._endpoint is None or self.port is not None:
            return
        outcome: list[Any] = []
        self._endpoint.listen(self.site).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            # twistd refuses to start: one line for the operator, not a traceback.
            raise SystemExit(f"faas-watchdog: cannot listen on {self.config.listen}: {outcome[0].value}")
        if outcome:
            self.port = outcome[0]

    def startService(self) -> None:
        if self._endpoint is not None and self.port is None:
            self.privilegedStartService()
        super().startService()
        self._runner.start()
        self.state = RUNNING
        self.log.info(
            "watchdog ({mode} mode) running {command} on {listen}",
            mode=self.config.mode,
            command=self.config.command,
            listen=self.config.listen,
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        self.state = DRAINING
        grace = self.config.write_timeout
        if self._exchanges:
            self.log.info(
                "draining: {n} running request(s), waiting {grace}",
                n=len(self._exchanges),
                grace=format_duration(grace) if grace else "without limit",
            )
            waiter: Deferred[None] = Deferred()
            self._drain_waiters.append(waiter)
            if grace:
                waiter.addTimeout(grace, self._clock)
            try:
                await waiter
            except TimeoutError:
                self.log.warn(
                    "draining: {n} request(s) still running after {grace}; stopping them",
                    n=len(self._exchanges),
                    grace=format_duration(grace),
                )
        for ex in list(self._exchanges):
            if not ex.responded and ex.deferred is not None:
                ex.deferred.cancel()
            elif ex.channel is not None and ex.channel.transport is not None:
                ex.channel.transport.abortConnection()
        await self._runner.stop()
        if self.port is not None:
            await self.port.stopListening()
        self.state = STOPPED
        self.log.info("watchdog stopped")

    # requests

    def handle(self, request: server.Request) -> None:
        path = request.path
        if path.startswith(b"/_/"):
            self._internal(request, path)
            return
        if self.state != RUNNING:
            self._reply(
                request, 503, "the watchdog is shutting down" if self.state != STARTING else "starting"
            )
            return
        if not self._runner.ready:
            self._reply(request, 503, "the function is not ready")
            return
        limit = self.config.max_inflight
        if limit and len(self._exchanges) >= limit:
            self._reply(request, 429, f"max_inflight ({limit}) reached, try again later")
            return
        try:
            timeout, source = self._timeout_for(request)
        except ValueError as e:
            self._reply(request, 400, f"X-Timeout: {e}")
            return

        headers = request.requestHeaders
        ids = headers.getRawHeaders(CALL_ID)
        call_id = ids[0].decode("ascii") if ids and valid_call_id(ids[0]) else ""
        uri = request.uri
        call = Invocation(
            method=request.method,
            uri=uri,
            path=request.path,
            query=uri.partition(b"?")[2],
            headers=headers,
            body=request.content.read() if request.content is not None else b"",
            call_id=call_id,
        )
        ex = _Exchange(request, self._clock.seconds(), timeout, source)
        self._exchanges.add(ex)
        request.notifyFinish().addErrback(self._gone, ex)
        try:
            d = self._runner.invoke(call)
        except Exception:
            self.log.failure("the runner failed to start a call")
            self._close(ex)
            self._reply(request, 500, "the watchdog failed to run the function")
            return
        ex.deferred = d
        if timeout:
            d.addTimeout(timeout, self._clock)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(ex,), errbackArgs=(ex,))
        d.addErrback(self._bug, ex)

    def _timeout_for(self, request: server.Request) -> tuple[float, str]:
        """exec_timeout, or the request's X-Timeout when that is shorter (never longer)."""
        limit = self.config.exec_timeout
        asked = request.requestHeaders.getRawHeaders(X_TIMEOUT)
        if asked:
            seconds = parse_duration(asked[0].decode("latin-1"))
            if seconds > 0 and (not limit or seconds < limit):
                return seconds, "X-Timeout"
        return limit, "exec_timeout"

    def _internal(self, request: server.Request, path: bytes) -> None:
        if path != HEALTH_PATH:
            self._reply(request, 404, "not found")
        elif request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            self._reply(request, 405, "use GET")
        elif self.healthy:
            self._reply(request, 200, "OK")
        else:
            reason = {STARTING: "starting", RUNNING: "the function is not ready"}.get(self.state, "draining")
            self._reply(request, 503, reason)

    def _gone(self, failure: Failure, ex: _Exchange) -> None:
        ex.gone = True
        if not ex.responded and ex.deferred is not None:
            ex.deferred.cancel()  # kills the process / aborts the proxied request
        else:
            self._close(ex)

    def _answered(self, result: FunctionResult, ex: _Exchange) -> None:
        if ex.gone:
            self._close(ex)
            return
        self._send(ex, result.code, result.headers, result.body)

    def _failed(self, failure: Failure, ex: _Exchange) -> None:
        if ex.gone:
            self._close(ex)
            return
        if failure.check(TimeoutError):
            limit = format_duration(ex.timeout)
            self.log.warn(
                "{source} of {limit} exceeded: {command} stopped",
                source=ex.timeout_source,
                limit=limit,
                command=self.config.command,
            )
            result = FunctionResult.text(504, f"{ex.timeout_source} of {limit} exceeded")
        elif failure.check(CancelledError):
            result = FunctionResult.text(503, "the watchdog is shutting down")
        else:
            self.log.failure("running the function failed", failure)
            result = FunctionResult.text(500, "the watchdog failed to run the function")
        self._send(ex, result.code, result.headers, result.body)

    def _bug(self, failure: Failure, ex: _Exchange) -> None:
        self.log.failure("answering a call failed", failure)
        self._close(ex)

    def _send(self, ex: _Exchange, code: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> None:
        request = ex.request
        ex.responded = True
        request.setResponseCode(code)
        out = request.responseHeaders
        seen: set[bytes] = set()
        for name, value in headers:
            key = name.lower()
            if key in seen:
                out.addRawHeader(name, value)
            else:
                seen.add(key)
                out.setRawHeaders(name, [value])
        out.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        out.setRawHeaders(DURATION, [b"%.6f" % (self._clock.seconds() - ex.started)])
        channel = request.channel
        ex.channel = channel
        request.write(body)
        request.finish()
        channel.whenFlushed(lambda: self._close(ex))

    def _close(self, ex: _Exchange) -> None:
        self._exchanges.discard(ex)
        if not self._exchanges and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    def _reply(self, request: server.Request, code: int, message: str) -> None:
        body = message.encode("utf-8") + b"\n"
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", TEXT_PLAIN)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()
