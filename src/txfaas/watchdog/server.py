"""The watchdog's HTTP front: timeouts, limits, health and draining around a runner.

- ``read_timeout``: an absolute deadline for reading a whole request, from its
  first byte (or from the connection's opening, for the first request) until
  its body is complete: ``408`` and the connection is closed.  ``max_request``
  caps the body (``413``), counted for chunked bodies too.  Both, and
  ``write_timeout`` and ``idle_timeout``, are :class:`txfaas.web.server.LimitedSite`'s,
  which the gateway uses too.
- ``exec_timeout`` (shortened, never lengthened, per call by ``X-Timeout``):
  the runner's Deferred is cancelled, which kills the process group (fork) or
  aborts the proxied request (http); the client gets ``504``.
- ``write_timeout``: once the response is written, until Twisted's send
  buffer has been handed to the kernel; a client that does not read is
  disconnected (``abortConnection``).
- ``max_inflight``: ``429`` beyond it.  ``/_/health``: ``200`` when ready,
  ``503`` while starting, when the function is not ready, and while draining.
- Stopping (SIGTERM): new requests get ``503``, running ones have
  ``write_timeout`` to finish, the rest are cancelled, then the runner kills
  and reaps whatever is left.
- Every answer that involved the function carries ``X-Duration-Seconds``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import datetimeToString

from txfaas.config import format_duration, parse_duration
from txfaas.headers import CALL_ID, DURATION, valid_call_id
from txfaas.service import Listener
from txfaas.watchdog.common import TEXT_PLAIN, FunctionResult, Invocation, Runner, WatchdogConfig
from txfaas.web.server import LimitedChannel, LimitedRequest, LimitedSite

STARTING, RUNNING, DRAINING, STOPPED = "starting", "running", "draining", "stopped"
X_TIMEOUT = b"X-Timeout"
HEALTH_PATH = b"/_/health"


class _Request(LimitedRequest):
    """Hands itself to the watchdog (the body was counted against max_request by LimitedRequest)."""

    channel: Any  # the LimitedChannel the watchdog's site built

    def process(self) -> None:
        # No resource tree to walk: every request goes to the watchdog.
        site: Any = self.channel.site
        self.site = site
        self.setHeader(b"Date", datetimeToString())
        try:
            site.watchdog.handle(self)
        except BaseException:
            self.processingFailed(Failure())


class WatchdogSite(LimitedSite):
    """read_timeout, max_request (413), write_timeout (a client that does not read is cut off) and
    idle_timeout, as :class:`~txfaas.web.server.LimitedSite` implements them for every process."""

    requestFactory = _Request

    def __init__(self, watchdog: Watchdog, config: WatchdogConfig, clock: IReactorTime) -> None:
        super().__init__(
            resource.Resource(),
            clock,
            body_limit=config.max_request,
            read_timeout=config.read_timeout,
            send_timeout=config.write_timeout,
            idle_timeout=config.idle_timeout,
        )
        self.watchdog = watchdog


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
        self.channel: LimitedChannel | None = None
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
        self._listener = (
            Listener(None, config.listen, self.site, endpoint=endpoint) if endpoint is not None else None
        )
        self._exchanges: set[_Exchange] = set()
        self._drain_waiters: list[Deferred[None]] = []

    @property
    def inflight(self) -> int:
        return len(self._exchanges)

    @property
    def healthy(self) -> bool:
        return self.state == RUNNING and self._runner.ready

    # service

    @property
    def port(self) -> IListeningPort | None:
        return self._listener.port if self._listener is not None else None

    def privilegedStartService(self) -> None:
        """Listen before anything starts: a port in use ends twistd with one line (service.Listener)."""
        super().privilegedStartService()
        if self._listener is not None:
            self._listener.privilegedStartService()

    def startService(self) -> None:
        if self._listener is not None and not self._listener.running:
            self._listener.startService()
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
                transport: Any = ex.channel.transport  # a TCP transport
                transport.abortConnection()
        await self._runner.stop()
        if self._listener is not None:
            await self._listener.stopService()  # health answered 503 until now
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
        channel: Any = request.channel  # a LimitedChannel
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
