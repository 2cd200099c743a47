"""Process plumbing shared by the twistd services: start-up failures, listening, HTTP request limits.

Not pure (it talks to the reactor), but holds no policy of any one process.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import unquote_to_bytes as unquote

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import pages, resource, server
from twisted.web.client import HTTPConnectionPool
from twisted.web.error import UnsupportedMethod
from twisted.web.http import NO_BODY_CODES, NO_CONTENT, NOT_MODIFIED, HTTPChannel, datetimeToString, toChunk
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.iweb import INonQueuedRequestFactory

from txfaas.config import ConfigError, RedisURL, format_duration
from txfaas.http11 import HTTP11ConnectionFactory
from txfaas.reactor import send_now

#: Twisted's HTML error pages (``Resource.getChild`` gives ``_UnsafeNoResource``).
_ERROR_PAGES = (resource._UnsafeErrorPageBase, type(pages.notFound()))

log = Logger(namespace="txfaas.runtime")


# --- start-up failures ----------------------------------------------------------------------
#
# One rule for every process: a start-up failure is ONE line naming the setting ("error: --listen
# tcp:8080: cannot listen (Address already in use)"), on stderr and in the log, and exit status 1;
# never a traceback.  Raise StartupError (or ConfigError) anywhere in start-up code, then:
#   - synchronous code that runs before any service started (makeService, privilegedStartService):
#     ``with exit_on_startup_error(): ...`` raises SystemExit, so nothing else starts;
#   - asynchronous start-up once services run: ``run_startup(reactor, coroutine_function)`` stops
#     the reactor (services stop in order) and exits 1 after shutdown (fail_startup).


class StartupError(Exception):
    """A start-up failure whose ``str()`` is the one line the operator sees (naming the setting)."""


def _line(message: str) -> str:
    return f"error: {message}"


def _message(failure: Failure) -> str:
    """The one line for a start-up failure: its own words for the expected kinds, else a summary."""
    if failure.check(StartupError, ConfigError):
        return str(failure.value)
    log.failure("start-up failed", failure)
    return f"start-up failed: {failure.getErrorMessage()}"


def fail_startup(reactor: IReactorCore, message: str) -> None:
    """Log one line, stop the reactor, and make the process exit with status 1.

    twistd has no exit status of its own: after the services have stopped, the
    process leaves with ``os._exit(1)`` so scripts see the failure.
    """
    log.critical("{message}", message=message)
    sys.stderr.write(_line(message) + "\n")
    sys.stderr.flush()

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


@contextmanager
def exit_on_startup_error() -> Iterator[None]:
    """Turn a :class:`StartupError` or :class:`~txfaas.config.ConfigError` raised inside into
    ``SystemExit`` with the one line: for code that runs before any service has started
    (``makeService``, ``privilegedStartService``), where stopping the reactor would still let
    the other services start."""
    try:
        yield
    except (StartupError, ConfigError) as e:
        # Only the SystemExit: logging is not set up yet, so a log event would print a second line.
        raise SystemExit(_line(str(e))) from None


def run_startup(reactor: IReactorCore, start: Callable[[], Any]) -> defer.Deferred:
    """Run an ``async`` start-up routine; any failure ends the process with one line."""
    d = defer.Deferred.fromCoroutine(start())
    d.addErrback(lambda failure: fail_startup(reactor, _message(failure)))
    return d


#: Net allocations between two young collections (CPython's default: 700).
YOUNG_GC_THRESHOLD = 10_000


def settle_gc(reactor: Any) -> None:
    """Tune the cyclic GC for a server whose calls are freed by reference counting.

    Once the reactor runs: collect, then freeze (``gc.freeze``) every object start-up made.
    The GC's full collections walk every object the process holds, and steady traffic
    (calls in flight surviving two young collections) set one off every few thousand calls:
    with twisted.web, Klein, pika and prometheus_client loaded, each took 40-60 ms here, a
    seventh of the gateway's CPU per accepted call.  Frozen, the modules, classes and
    configuration of start-up are left out of every collection.

    And a young collection every 10,000 net allocations rather than 700: the hot paths leave
    no reference cycles (tests check), so what 50-200 calls in flight hold is all that a
    collection would find, alive; cyclic garbage, wherever it still comes from, waits a little
    longer.  Only from a process's ``makeService`` (``twistd``), before the reactor runs:
    never in a test run."""
    if getattr(reactor, "running", True):
        return

    def settle() -> None:
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)
        log.debug("start-up objects frozen for the GC: {count}", count=gc.get_freeze_count())

    reactor.callWhenRunning(settle)


# --- listening ------------------------------------------------------------------------------


#: Pending connections the kernel queues for a listening socket (Twisted's own default is 50,
#: and SYNs past it are dropped under a burst of connections); Linux caps it at somaxconn.
DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=`` added, for an endpoint type that takes one and a
    description that does not set its own."""
    parts = re.split(r"(?<!\\):", description)
    kind = "tcp" if parts[0].isdigit() else parts[0]
    if kind not in _BACKLOG_TYPES or any(p.startswith("backlog=") for p in parts[1:]):
        return description
    return f"{description}:backlog={backlog}"


def server_endpoint(
    reactor: Any, description: str, setting: str = "--listen", backlog: int = DEFAULT_BACKLOG
) -> IStreamServerEndpoint:
    """``serverFromString`` (with ``backlog`` unless the description sets one); a description it
    cannot read is a :class:`StartupError` naming the setting."""
    try:
        return endpoints.serverFromString(reactor, with_backlog(description, backlog))
    except (ValueError, KeyError, TypeError) as e:
        raise StartupError(f"{setting} {description}: not a valid endpoint ({e})") from None


async def listen(
    reactor: Any,
    description: str,
    factory: Any,
    setting: str = "--listen",
    *,
    endpoint: IStreamServerEndpoint | None = None,
    backlog: int = DEFAULT_BACKLOG,
) -> IListeningPort:
    """Listen on a Twisted endpoint string (or on ``endpoint``, described by ``description``);
    a failure is a :class:`StartupError` naming the setting."""
    if endpoint is None:
        endpoint = server_endpoint(reactor, description, setting, backlog)
    try:
        return await endpoint.listen(factory)
    except Exception as e:  # CannotListenError and friends
        reason = getattr(e, "socketError", None) or e
        reason = getattr(reason, "strerror", None) or reason
        raise StartupError(f"{setting} {description}: cannot listen ({reason})") from None


class Listener(service.Service):
    """A listening port as a service: it opens in ``privilegedStartService`` and closes in ``stopService``.

    Opening before any service starts (and before twistd sheds privileges, for ports
    below 1024) means a port in use ends the process with one line and exit 1 while
    nothing else has started.  TCP, UNIX and SSL endpoints listen at once; one that
    answers later and fails ends the process through :func:`fail_startup`.  ``reactor``
    may be None when ``endpoint`` is given.
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        *,
        setting: str = "--listen",
        endpoint: IStreamServerEndpoint | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self._backlog = backlog
        self._reactor = reactor
        self._description = description
        self._factory = factory
        self._setting = setting
        self._endpoint = endpoint
        self._opening: defer.Deferred[Any] | None = None
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open()

    def startService(self) -> None:
        self._open()  # when started without the privileged phase (a parent that is already running)
        super().startService()

    def _open(self) -> None:
        if self._opening is not None:
            return
        d = defer.Deferred.fromCoroutine(
            listen(
                self._reactor,
                self._description,
                self._factory,
                self._setting,
                endpoint=self._endpoint,
                backlog=self._backlog,
            )
        )
        self._opening = d
        if d.called:
            outcome: list[Any] = []
            d.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                with exit_on_startup_error():
                    outcome[0].raiseException()
            self.port = outcome[0]
        else:
            d.addCallbacks(self._opened, lambda f: fail_startup(self._reactor, _message(f)))

    def _opened(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port, self._opening = self.port, None, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


# --- HTTP request limits --------------------------------------------------------------------

_READ, _RESPONSE = "read", "response"


def _raw_response(status: bytes, message: str) -> bytes:
    body = message.encode("utf-8") + b"\n"
    return (
        b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, len(body), body)
    )


def _nothing() -> None:
    pass


class LazyTimer:
    """A deadline that moves on often and passes rarely, with one ``DelayedCall`` behind it.

    A connection's deadlines are set, moved and dropped for every request; with ``callLater``
    each of those is a timer made and cancelled in the reactor's heap.  Here :meth:`set` and
    :meth:`clear` only record the deadline (the armed call is moved only when the new deadline
    is sooner), and when the armed call comes due before the current deadline it re-arms for
    the rest.  ``fire`` runs at the deadline, as it would with ``callLater``.  :meth:`stop`
    when the owner is done with it (a pending call keeps its owner alive until it is due).
    """

    __slots__ = ("_armed", "_call", "_clock", "_fire", "_when")

    def __init__(self, clock: Any, fire: Callable[[], object]) -> None:
        self._clock = clock
        self._fire = fire
        self._when: float | None = None
        self._call: Any = None
        self._armed = 0.0

    @property
    def pending(self) -> bool:
        return self._when is not None

    def set(self, delay: float) -> None:
        """Fire ``delay`` seconds from now (replacing any deadline set before)."""
        when = self._when = self._clock.seconds() + delay
        call = self._call
        if call is None:
            self._armed = when
            self._call = self._clock.callLater(delay, self._due)
        elif when < self._armed:
            self._armed = when
            call.reset(delay)

    def clear(self) -> None:
        self._when = None

    def stop(self) -> None:
        """Done with: no deadline, no call in the reactor, and no reference to ``fire`` (its owner
        holds this timer: a cycle the cyclic GC would have to find)."""
        self._when = None
        self._fire = _nothing
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _due(self) -> None:
        self._call = None
        when = self._when
        if when is None:
            return
        delay = when - self._clock.seconds()
        if delay > 0:
            self._armed = when
            self._call = self._clock.callLater(delay, self._due)
            return
        self._when = None
        self._fire()


class QueuedTimer:
    """One timer of a :class:`TimerQueue` (``cancel``/``active`` as a ``DelayedCall``)."""

    __slots__ = ("_queue", "fire", "when")

    def __init__(self, when: float, fire: Callable[[], object] | None, queue: TimerQueue) -> None:
        self.when = when
        self.fire = fire
        self._queue = queue

    def active(self) -> bool:
        return self.fire is not None

    def cancel(self) -> None:
        if self.fire is not None:
            self.fire = None
            self._queue._cancelled += 1


class TimerQueue:
    """Timers that all have the same delay, so they come due in the order they were set: one
    ``DelayedCall`` for all of them (a proxied call's deadline, a pooled connection's idle time).

    Cancelled timers are dropped when they reach the head, or all at once when they are most of
    the queue (one slow call at the head must not make the queue hold every call behind it).
    """

    def __init__(self, clock: Any, delay: float) -> None:
        self._clock = clock
        self.delay = delay
        self._queue: deque[QueuedTimer] = deque()
        self._cancelled = 0
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._queue) - self._cancelled

    def add(self, fire: Callable[[], object]) -> QueuedTimer:
        queue = self._queue
        while queue and queue[0].fire is None:
            queue.popleft()
            self._cancelled -= 1
        if self._cancelled > 1024 and self._cancelled * 2 > len(queue):
            self._queue = queue = deque(t for t in queue if t.fire is not None)
            self._cancelled = 0
        timer = QueuedTimer(self._clock.seconds() + self.delay, fire, self)
        queue.append(timer)
        if self._call is None:
            self._call = self._clock.callLater(self.delay, self._due)
        return timer

    def _due(self) -> None:
        self._call = None
        queue = self._queue
        now = self._clock.seconds()
        while queue and (queue[0].fire is None or queue[0].when <= now):
            timer = queue.popleft()
            fire, timer.fire = timer.fire, None
            if fire is None:
                self._cancelled -= 1
                continue
            try:
                fire()
            except Exception:
                log.failure("timer {timer!r} failed", timer=fire)
        if queue and self._call is None:
            self._call = self._clock.callLater(max(0.0, queue[0].when - now), self._due)

    def stop(self) -> None:
        """Cancel every timer (none fires)."""
        for timer in self._queue:
            timer.fire = None
        self._queue.clear()
        self._cancelled = 0
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


#: Twisted's ``_parseRequestLine`` as one match: a token, a target of printable ASCII (33-176,
#: as Twisted allows), HTTP/1.0 or 1.1, single spaces between.  (Twisted's loops over the
#: target in Python, byte by byte.)
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\xb0]+) (HTTP/1\.[01])").fullmatch
#: The headers that choose how the body is framed (HTTPChannel._maybeChooseTransferDecoder).
_FRAMING = frozenset({b"Content-Length", b"Transfer-Encoding"})

try:  # Twisted's own request-line parser (24.7 and later), whose rules _REQUEST_LINE follows
    from twisted.web.http import _parseRequestLine
except ImportError:  # pragma: no cover - a Twisted without it: every head goes line by line
    _parseRequestLine = None
#: The whole-head path needs the Twisted it was written against: the request-line rules it
#: follows (their parser is there), and HTTPChannel's "first line next" flag under its private
#: name.  Anything else: line by line.  tests/unit/test_whole_head.py compares the two paths.
WHOLE_HEAD = _parseRequestLine is not None and getattr(HTTPChannel, "_HTTPChannel__first_line", None) == 1


class LimitedChannel(HTTPChannel):
    """HTTP/1.1 with a body limit, an absolute read deadline, and two kinds of write deadline.

    Its settings come from :class:`LimitedSite` (see there for their meaning).  One
    deadline per request: set at the request's first byte for reading, moved on to the
    response deadline once the request is read, dropped when the response is finished.
    It and Twisted's idle timeout between requests are :class:`LazyTimer` s, so a request
    makes no timer in the reactor.  A send deadline exists only while the client is not
    reading (the transport paused this channel).
    """

    log = Logger()

    # Set by LimitedSite.buildProtocol.
    clock: Any = None
    readTimeout: float = 0.0
    responseTimeout: float = 0.0
    sendTimeout: float = 0.0

    _deadlineKind = _READ
    _requestStarted = False
    _rejected = False
    _limit: int | None = None
    _backedUp = False
    _sendDeadline: Any = None
    _host: Any = None
    _peer: Any = None

    def __init__(self) -> None:
        self._deadline: LazyTimer | None = None
        self._idle: LazyTimer | None = None
        super().__init__()
        self._flushWaiters: list[Callable[[], None]] = []

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """Twisted's, written as one string: ``writeSequence`` checks every piece (four a header)."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)  # sanitises a list of pairs
            return
        self.writeHead(version, code, reason, headers, b"")

    def writeHead(self, version: bytes, code: bytes, reason: bytes, headers: Headers, body: bytes) -> None:
        """The head (as :meth:`writeHeaders`) and the first of the body in one transport write."""
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers._rawHeaders.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if body:
            parts.append(body)
        self.transport.write(b"".join(parts))

    def _timers(self) -> None:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor as clock
        self._deadline = LazyTimer(clock, self._timedOut)
        self._idle = LazyTimer(clock, self.timeoutConnection)

    # Twisted's idle timeout (TimeoutMixin), on a LazyTimer: HTTPChannel stops it when a
    # request's headers are in and starts it again when the response is done.

    def setTimeout(self, period: float | None) -> float | None:
        previous, self.timeOut = self.timeOut, period
        if self._idle is None:
            self._timers()
        if period is None:
            self._idle.clear()
        else:
            self._idle.set(period)
        return previous

    def resetTimeout(self) -> None:
        if self.timeOut is not None and self._idle is not None and self._idle.pending:
            self._idle.set(self.timeOut)

    # reading

    def getHost(self) -> Any:
        """The local address, asked of the kernel once per connection (twisted.web asks for
        every request: a ``getsockname`` system call each time)."""
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def connectionMade(self) -> None:
        if self._deadline is None:
            self._timers()
        super().connectionMade()
        if self.readTimeout:  # the first request's deadline counts from the connection's opening
            self._deadline.set(self.readTimeout)

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if not self._handlingRequest and data:
            self._requestStarted = True
            if self.readTimeout and not self._deadline.pending:
                self._deadlineKind = _READ
                self._deadline.set(self.readTimeout)
            if self._wholeHead(data):
                return
        super().dataReceived(data)

    def _wholeHead(self, data: bytes) -> bool:
        """A request whose head arrived whole in one read, with nothing before it: its lines are
        parsed in one loop with Twisted's rules (``_parseRequestLine``'s as one match,
        ``headerReceived``'s checks, then Twisted's ``allHeadersReceived``), rather than one
        ``LineReceiver`` pass each (the buffer split again for every line).  False, having changed nothing, for anything else:
        part of a head, bytes left from an earlier read, a leading blank line, a folded
        header line, a head over the size or count limits -- Twisted's line-by-line path
        takes those, with its own answers.  (The next request on a keep-alive connection
        comes this way too, once the one before is answered.)"""
        if (
            not WHOLE_HEAD
            or self._buffer
            or self._busyReceiving
            or not self.line_mode
            or self.paused
            or not self.persistent
            or self._HTTPChannel__first_line != 1
            or self._receivedHeaderSize
        ):
            return False
        end = data.find(b"\r\n\r\n")
        if end <= 0:
            return False
        lines = data[:end].split(b"\r\n")
        size = end - 2 * (len(lines) - 1)  # as lineReceived counts: the lines without their CR LF
        if size > self.totalHeadersSize or len(lines) - 1 > self.maxHeaders or not lines[0]:
            return False
        if data.find(b"\n ", 0, end) >= 0 or data.find(b"\n\t", 0, end) >= 0:
            return False  # a folded header line (the request line cannot start with a blank: 400)
        self.resetTimeout()
        factory = self.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            request = factory(self)
        else:
            request = factory(self, len(self.requests))
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        parsed = _REQUEST_LINE(lines[0])
        if parsed is None:
            self._respondToBadRequestAndDisconnect()
            return True
        self._command, self._path, self._version = parsed.groups()
        self._receivedHeaderSize = size
        # HTTPChannel.headerReceived, line by line, in one loop: the same checks and answers.
        raw = request.requestHeaders._rawHeaders
        encode = _nameEncoder.encode
        count = 0
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                self._respondToBadRequestAndDisconnect()
                return True
            try:
                name = encode(name)
            except InvalidHeaderName:
                self._respondToBadRequestAndDisconnect()
                return True
            value = value.strip(b" \t")
            if len(value.translate(None, b"\x00\r\n")) != len(value):
                self._respondToBadRequestAndDisconnect()
                return True
            if name in _FRAMING and not self._maybeChooseTransferDecoder(name, value):
                return True  # answered 400 and closing
            values = raw.get(name)
            if values is None:
                raw[name] = [value]
            else:
                values.append(value)
            count += 1
        self._receivedHeaderCount = count
        self.allHeadersReceived()
        if self._rejected or self.transport is None or self.transport.disconnecting:
            return True
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
        rest = data[end + 4 :]
        if rest and not self._rejected and self.transport is not None and not self.transport.disconnecting:
            LineReceiver.dataReceived(self, rest)
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if not self._rejected:
            super().rawDataReceived(data)

    # A head over Twisted's limits is answered (it closed the connection without a word, or
    # answered a bare 400): 414 for a request line, 431 for the header lines.

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:
            self.reject(b"414 URI Too Long", f"the request line is over {self.MAX_LENGTH} bytes")
        else:
            self.reject(
                b"431 Request Header Fields Too Large", f"a header line is over {self.MAX_LENGTH} bytes"
            )

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            if self._HTTPChannel__first_line:
                self.reject(b"414 URI Too Long", f"the request line is over {self.totalHeadersSize} bytes")
            else:
                self.reject(
                    b"431 Request Header Fields Too Large",
                    f"the request head is over {self.totalHeadersSize} bytes",
                )
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self.reject(b"431 Request Header Fields Too Large", f"more than {self.maxHeaders} header lines")
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        site = self.site
        route = site.route(self._path) if isinstance(site, LimitedSite) else None
        if route is not None:
            self.requests[-1].route = route  # the request's leaf comes from the same decision
        limit = self._limit = route.limit if route is not None else None
        if limit is not None and self.length is not None and self.length > limit:
            self.refuseBody(limit, self.length)
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._rejected:
            return
        self._requestStarted = False
        if self.responseTimeout:
            self._deadlineKind = _RESPONSE
            self._deadline.set(self.responseTimeout)
        else:
            self._deadline.clear()
        super().allContentReceived()

    def unbounded(self) -> None:
        """No response deadline for the response being sent: a stream that lasts as long as
        its client stays (``/system/logs?follow=true``)."""
        if self._deadlineKind == _RESPONSE:
            self._cancelDeadline()

    def refuseBody(self, limit: int, length: int | None = None) -> None:
        """413: the body (declared, or counted so far) is over ``limit``."""
        size = f"of {length} bytes " if length is not None else ""
        self.reject(b"413 Content Too Large", f"the request body {size}is over the limit of {limit} bytes")

    def reject(self, status: bytes, message: str) -> None:
        """Answer before the request was read to its end, and close: no resource sees it."""
        if self._rejected:
            return
        self._rejected = True
        self._cancelDeadline()
        if self.transport is not None:
            self.transport.write(_raw_response(status, message))
            self.loseConnection()

    # the one per-request timer

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            self._deadline.clear()

    def _timedOut(self) -> None:
        if self._rejected or self.transport is None:
            return
        if self._deadlineKind == _RESPONSE:
            uri = self.requests[0].uri if self.requests else b"?"
            self.log.warn(
                "response to {uri} not finished within {timeout} of the request: closing",
                uri=uri,
                timeout=format_duration(self.responseTimeout),
            )
            self.transport.abortConnection()
        elif self._handlingRequest:
            return
        elif not self._requestStarted:
            # Opened and never used: nothing was asked, so nothing to answer.
            self._rejected = True
            self.loseConnection()
        else:
            self.log.info(
                "read_timeout: no complete request from {peer} within {timeout}",
                peer=str(self.transport.getPeer()),
                timeout=format_duration(self.readTimeout),
            )
            self.reject(
                b"408 Request Timeout", f"read_timeout of {format_duration(self.readTimeout)} exceeded"
            )

    def requestDone(self, request: Any) -> None:
        self._cancelDeadline()
        if self._backedUp and self.sendTimeout and self._sendDeadline is None:
            self._sendDeadline = self.callLater(self.sendTimeout, self._sendTimedOut)
        super().requestDone(request)

    # sending

    def pauseProducing(self) -> None:
        self._backedUp = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._backedUp = False
        super().resumeProducing()
        self._flushed()

    def whenFlushed(self, done: Callable[[], None]) -> None:
        """Call ``done`` once the response just finished has left Twisted's send buffer.

        The transport pauses this channel while more than its buffer size is
        pending and resumes it once everything was handed to the kernel; a
        client that does not read within ``sendTimeout`` is disconnected.
        """
        if not self._backedUp or self.transport is None:
            done()
            return
        self._flushWaiters.append(done)
        if self.sendTimeout and self._sendDeadline is None:
            self._sendDeadline = self.callLater(self.sendTimeout, self._sendTimedOut)

    def _flushed(self) -> None:
        deadline, self._sendDeadline = self._sendDeadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        waiters, self._flushWaiters = self._flushWaiters, []
        for done in waiters:
            done()

    def _sendTimedOut(self) -> None:
        self._sendDeadline = None
        if self.transport is None:
            return
        self.log.warn(
            "write_timeout: {peer} did not read the response within {timeout}; disconnecting",
            peer=str(self.transport.getPeer()),
            timeout=format_duration(self.sendTimeout),
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        # Their calls would keep this channel alive until due (the idle one: hours).
        if self._deadline is not None:
            self._deadline.stop()
            self._idle.stop()
        self._flushed()


class Route:
    """Where a request goes, decided once from its path (:meth:`LimitedSite.route`): the
    percent-decoded first ``segment``, the ``leaf`` resource that serves every path under it
    without a walk of the tree (None: Twisted's walk), and the body ``limit`` in bytes (None:
    none).  A leaf must be where the tree leads for that segment."""

    __slots__ = ("leaf", "limit", "segment")

    def __init__(self, segment: bytes, leaf: Any, limit: int | None) -> None:
        self.segment = segment
        self.leaf = leaf
        self.limit = limit

    def __repr__(self) -> str:
        return f"Route({self.segment!r}, {self.leaf!r}, limit={self.limit})"


def _drop(data: bytes) -> None:
    """A response's ``write`` once nothing more may follow its head (HEAD, 204, 304)."""


_date: list[Any] = [None, b""]  # [whole second, its HTTP date]


def http_date() -> bytes:
    """Now as an HTTP date (``datetimeToString()``), formatted once per second rather than per request."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, datetimeToString(now)
    return _date[1]


def plain_error(request: server.Request, code: int, message: str) -> bytes:
    """Set ``code`` and a plain-text ``message`` line as the response; return the body."""
    body = message.encode("utf-8", "replace") + b"\n"
    request.setResponseCode(code)
    raw = request.responseHeaders._rawHeaders
    raw[b"Content-Type"] = [b"text/plain; charset=utf-8"]
    raw[b"Content-Length"] = [b"%d" % len(body)]
    return body


class _PlainError(resource.Resource):
    """What is rendered in place of one of Twisted's HTML error pages (NoResource, ...)."""

    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self._code = code
        self._message = message

    def render(self, request: server.Request) -> bytes:
        return plain_error(request, self._code, self._message)


class _PlainMethods:
    """A resource whose unsupported methods answer 405 in plain text (Twisted's page is HTML)."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def render(self, request: server.Request) -> Any:
        try:
            return self._inner.render(request)
        except UnsupportedMethod as e:
            if request.method == b"HEAD" and b"GET" in e.allowedMethods:
                raise  # Twisted answers HEAD with the GET's headers
            allowed = b", ".join(e.allowedMethods)
            request.setHeader(b"Allow", allowed)
            method = request.method.decode("latin-1")
            return plain_error(request, 405, f"method {method} not allowed here: use {allowed.decode()}")


class PlainErrorsRequest(server.Request):
    """A request whose errors are short plain text, never Twisted's HTML pages: a resource
    Twisted would render as an error page (``NoResource`` for an unknown path, ...), a method
    the resource has no ``render_*`` for, and a failure while processing (500)."""

    def render(self, resrc: Any) -> None:
        if isinstance(resrc, _ERROR_PAGES):
            code = getattr(resrc, "code", None) or getattr(resrc, "_code", 500)
            brief = getattr(resrc, "brief", None) or getattr(resrc, "_brief", "error")
            path = self.path.decode("latin-1", "replace")
            resrc = _PlainError(code, f"{brief.lower()}: {path}" if code == 404 else brief)
        elif type(resrc).render is resource.Resource.render:
            # Only Resource's own render raises UnsupportedMethod (no render_<METHOD>).
            resrc = _PlainMethods(resrc)
        super().render(resrc)

    def processingFailed(self, reason: Failure) -> Failure:
        self._log.failure("processing {uri} failed", failure=reason, uri=self.uri)
        if self.finished or self._disconnected:
            return reason
        if self.startedWriting:
            self.channel.loseConnection()  # a body cut short must not look whole
            return reason
        body = plain_error(self, 500, "internal error")
        self.write(body)
        self.finish()
        return reason


class PlainErrorsSite(server.Site):
    """A ``Site`` of :class:`PlainErrorsRequest` s (no HTML error page, no traceback shown)."""

    requestFactory = PlainErrorsRequest
    displayTracebacks = False


class LimitedRequest(PlainErrorsRequest):
    """Counts the body as it arrives (chunked too) against the limit its route chose.

    A request whose :class:`Route` has a leaf goes straight to it: where Twisted's
    ``Site.getResourceFor`` would walk the tree from the root to the same leaf, the request
    gets the same ``prepath``, ``postpath`` and ``sitepath``; anything else takes Twisted's
    own way.  ``Date`` is formatted once a second.
    """

    #: Decided by the channel once the head is read (or here, for a request read elsewhere).
    route: Route | None = None
    _received = 0
    _gone: Callable[[Failure], object] | None = None

    def whenGone(self, gone: Callable[[Failure], object]) -> None:
        """Call ``gone(reason)`` if the connection is lost before the response is finished.

        What ``notifyFinish().addErrback(gone)`` does, at the same moment, without a Deferred
        made, and fired at the end, for every request (one caller per request: the hot routes).
        """
        self._gone = gone

    def finish(self) -> None:
        self._gone = None  # it holds the caller, which holds this request: no cycle left behind
        channel = self.channel
        if (
            self.startedWriting
            and not self.chunked  # (the last chunk is written by finish)
            and self._encoder is None  # (so is what an encoder still holds)
            and not self.finished
            and not self._disconnected
            and channel is not None
        ):
            # The response is whole: out now, before Twisted's teardown of the request and
            # what the caller does after finish (txfaas.reactor.send_now).
            send_now(channel.transport)
        super().finish()

    def write(self, data: bytes) -> None:
        """The first write as ``server.Request.write`` and ``http.Request.write`` make it -- the
        default Content-Type, chunked when HTTP/1.1 has no Content-Length, nothing after the head
        for HEAD or a code without a body -- but the head and these bytes go to the transport in
        one write, the headers read from the raw dict.  Anything unusual (a later write, an
        encoder, Last-Modified, ETag or cookies set through the request) is Twisted's."""
        channel = self.channel
        if (
            self.startedWriting
            or self.finished
            or self._disconnected
            or self._inFakeHead
            or self._encoder is not None
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
            or not isinstance(channel, LimitedChannel)
        ):
            super().write(data)
            return
        raw = self.responseHeaders._rawHeaders
        code = self.code
        if code != NOT_MODIFIED and code != NO_CONTENT and self.defaultContentType is not None:
            length = raw.get(b"Content-Length")
            if b"Content-Type" not in raw and not (length and length[0] == b"0"):
                raw[b"Content-Type"] = [self.defaultContentType]
        self.startedWriting = 1
        version = self.clientproto
        silent = self.method == b"HEAD" or code in NO_BODY_CODES
        if version == b"HTTP/1.1" and not silent and b"Content-Length" not in raw:
            raw[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = 1
        if silent:
            channel.writeHead(version, b"%d" % code, self.code_message, self.responseHeaders, b"")
            self.write = _drop  # type: ignore[method-assign]  # as Twisted does
            return
        self.sentLength += len(data)
        if data and self.chunked:
            data = b"".join(toChunk(data))
        channel.writeHead(version, b"%d" % code, self.code_message, self.responseHeaders, data)

    def connectionLost(self, reason: Failure) -> None:
        gone, self._gone = self._gone, None
        super().connectionLost(reason)
        if gone is not None and not self.finished:
            gone(reason)

    def process(self) -> None:
        site = self.channel.site
        route = self.route
        if route is None and isinstance(site, LimitedSite):
            route = self.route = site.route(self.uri)
        leaf = route.leaf if route is not None else None
        if leaf is None:
            super().process()  # Twisted's way: through the tree
            return
        # server.Request.process, without the walk: where it would lead, and what it sets.
        self.site = site
        raw = self.responseHeaders._rawHeaders
        raw[b"Server"] = [server.version]
        raw[b"Date"] = [http_date()]
        segments = self.path[1:].split(b"/")
        self.prepath = [route.segment]
        self.postpath = [unquote(segment) for segment in segments[1:]]
        self.sitepath = []
        try:
            self.render(leaf)
        except BaseException:
            self.processingFailed(Failure())

    def handleContentChunk(self, data: bytes) -> None:
        limit = self.channel._limit
        if limit is not None:
            self._received += len(data)
            if self._received > limit:
                self.channel.refuseBody(limit)
                return
        super().handleContentChunk(data)


class LimitedSite(PlainErrorsSite):
    """A ``Site`` whose connections are :class:`LimitedChannel` s.  Every duration is seconds, 0 = none.

    - ``body_limit``: a number of bytes (0: none), for every path that ``routes`` does not
      name.  A declared Content-Length over a request's limit is refused with 413 before any
      body is read; a chunked body is counted as it arrives.
    - ``routes``: percent-decoded first path segment -> :class:`Route` (see :meth:`route`).
    - ``read_timeout``: the whole request (line, headers, body) must arrive within this of
      its first byte, or of the connection's opening for the first request; else 408 and
      close.  (Twisted's idle timeout restarts at every byte: a client trickling bytes
      would never be cut off.)  A connection that sends nothing in that time is closed
      without an answer.
    - ``response_timeout``: from the request read in full to its response finished (the
      last byte handed to the transport); past it the connection is aborted.  The
      gateway's ``--write-timeout``: Go's ``http.Server.WriteTimeout``, which OpenFaaS's
      gateway sets, but counted from the end of the request rather than of its headers,
      so that a slow upload does not eat into the function's ``--upstream-timeout``.
    - ``send_timeout``: once a response is finished, how long a client may take to accept
      what Twisted could not yet hand to the kernel; one that does not read is aborted.
      The watchdog's ``write_timeout``.
    - ``idle_timeout``: between requests on a keep-alive connection (Twisted's own timer).
    """

    protocol = LimitedChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Any,
        clock: Any,
        *,
        body_limit: int | None = None,
        routes: dict[bytes, Route] | None = None,
        read_timeout: float = 0,
        response_timeout: float = 0,
        send_timeout: float = 0,
        idle_timeout: float = 12 * 3600,
    ) -> None:
        # No form parsing of POST bodies: nothing here reads request.args for a body, and
        # twisted.web would otherwise parse every form-encoded body it proxies or queues.
        super().__init__(resource, timeout=idle_timeout or None, reactor=clock, parsePOSTFormSubmission=False)
        self.clock = clock
        self.routes = dict(routes or {})
        self.default_route = Route(b"", None, body_limit or None)
        self.read_timeout = read_timeout
        self.response_timeout = response_timeout
        self.send_timeout = send_timeout

    def buildProtocol(self, addr: Any) -> LimitedChannel:
        channel = super().buildProtocol(addr)
        channel.clock = self.clock
        channel.readTimeout = self.read_timeout
        channel.responseTimeout = self.response_timeout
        channel.sendTimeout = self.send_timeout
        return channel

    def route(self, target: bytes) -> Route:
        """The route of a request target (its path and query, as in the request line): the one
        decision that every limit and leaf of the request comes from.

        Decided on the first path segment percent-decoded, as Twisted's walk of the tree
        decodes it, so that ``/%66unction/x`` is ``/function/x`` with its limits.  (``%2F`` is
        no separator, for the walk as for this: a route's segment never holds a ``/``.)"""
        if target[:1] != b"/":
            return self.default_route  # "*", or an absolute URI: no segment of ours
        end = len(target)
        for stop in (b"/", b"?"):
            found = target.find(stop, 1, end)
            if found >= 0:
                end = found
        segment = target[1:end]
        if b"%" in segment:
            segment = unquote(segment)
        return self.routes.get(segment, self.default_route)

    def log(self, request: Any) -> None:
        """No access log line per request: the hot path stays quiet (metrics count requests)."""


def open_store(reactor: Any, url: RedisURL, *, prefix: str, call_ttl: float) -> Any:
    """The store a ``--redis`` URL names: an in-process ``MemoryStore`` for ``memory:``, else a
    ``RedisStore`` that connects in the background (its ``close()`` belongs in shutdown)."""
    if url.memory:
        from txfaas.store.memory import MemoryStore

        return MemoryStore()
    from txfaas.store.redis import RedisStore

    return RedisStore.connect(url, reactor, prefix=prefix, call_ttl=call_ttl)


# --- several processes on one port -----------------------------------------------------------

CHILD_ENV = "TXFAAS_CHILD_INDEX"


def parse_tcp_listen(description: str, backlog: int = DEFAULT_BACKLOG) -> tuple[str, int, int]:
    """``tcp:PORT[:interface=HOST][:backlog=N]`` -> (host, port, backlog), for SO_REUSEPORT
    listening (``backlog`` when the description sets none)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError(f"--workers needs a tcp:PORT endpoint, not {description!r}")
    port_text = parts[1][5:] if parts[1].startswith("port=") else parts[1]
    if not port_text.isdigit() or int(port_text) == 0:
        raise ValueError(f"--workers needs a fixed port, not {parts[1]!r}")
    host = "::" if parts[0] == "tcp6" else "0.0.0.0"
    for option in parts[2:]:
        key, _, value = option.partition("=")
        if key == "interface":
            host = value
        elif key == "backlog" and value.isdigit():
            backlog = int(value)
        else:
            raise ValueError(f"--workers: unsupported endpoint option {option!r}")
    return host, int(port_text), backlog


async def listen_reuseport(
    reactor: Any, description: str, factory: Any, setting: str = "--listen", *, backlog: int = DEFAULT_BACKLOG
) -> Any:
    """Listen with SO_REUSEPORT, so that several processes share the port (the kernel spreads connections)."""
    import socket

    try:
        host, port, backlog = parse_tcp_listen(description, backlog)
    except ValueError as e:
        raise StartupError(f"{setting} {description}: {e}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    except OSError as e:
        raise StartupError(f"{setting} {description}: cannot listen ({e.strerror})") from None
    finally:
        sock.close()  # the reactor holds its own duplicate


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


def quiet_pool(reactor: Any, *, persistent: bool = True, per_host: int = 2) -> Any:
    """A :class:`RecentFirstPool` keeping up to ``per_host`` idle connections per host."""
    pool = RecentFirstPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = per_host
    return pool


class RecentFirstPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` that hands out the connection used last (Twisted's takes the one
    idle longest).

    After a burst, a pool sized for concurrency holds hundreds of idle connections; taking the
    oldest first rotates light traffic through all of them, and that made one request in a
    hundred take 12-18 ms instead of 0.4 (p99 at one connection, measured after 200
    connections' worth of load).  Most recent first keeps light traffic on a few warm
    connections; the rest expire after ``cachedConnectionTimeout``.  When full, the connection
    idle longest is closed, as in Twisted's.  Its connections are :class:`txfaas.http11.HTTP11Connection`s
    (which log nothing when they open and close), and their idle timers share one reactor
    timer (:class:`TimerQueue`): a connection comes back to the pool after every request.
    """

    _factory = HTTP11ConnectionFactory
    _idle: TimerQueue | None = None

    def cached(self, key: Any) -> Any:
        """An idle connection for ``key`` taken out of the pool, or None: what ``getConnection``
        does first, without a Deferred (the caller retries a failed idempotent request itself,
        see ``txfaas.client.PoolAgent``)."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                return connection
        return None

    def _putConnection(self, key: Any, connection: Any) -> None:
        if connection.state != "QUIESCENT":
            self._log.error("BUG: non-quiescent protocol added to the connection pool")
            return
        connections = self._connections.setdefault(key, [])
        if len(connections) >= self.maxPersistentPerHost:
            dropped = connections.pop()  # idle longest: at the end
            dropped.transport.loseConnection()
            self._timeouts.pop(dropped).cancel()
        connections.insert(0, connection)  # getConnection takes connections[0]
        idle = self._idle
        if idle is None or idle.delay != self.cachedConnectionTimeout:
            idle = self._idle = TimerQueue(self._reactor, self.cachedConnectionTimeout)
        self._timeouts[connection] = idle.add(partial(self._removeConnection, key, connection))


class Deadlines:
    """Cancels the Deferreds still pending at their deadline, with one timer for them all.

    ``addTimeout`` costs a DelayedCall per Deferred (about 6 µs here, a tenth of a publish)
    and another call to cancel it.  Every user here has one fixed timeout (the broker's
    confirm, a Redis reply), so deadlines are added in order and a FIFO will do."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._pending: deque[tuple[float, defer.Deferred]] = deque()
        self._timer: Any = None

    def watch(self, d: defer.Deferred, deadline: float) -> None:
        pending = self._pending
        while pending and pending[0][1].called:
            pending.popleft()
        pending.append((deadline, d))
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        delay = max(0.0, self._pending[0][0] - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        pending = self._pending
        while pending and (pending[0][1].called or pending[0][0] <= now):
            _, d = pending.popleft()
            if not d.called:
                d.cancel()  # its waiter sees CancelledError after the deadline: a timeout
        if pending and self._timer is None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class OrderedMultiService(service.MultiService):
    """A ``MultiService`` whose children stop one after the other, last added first.

    ``MultiService`` calls every child's ``stopService`` at once; a process that must
    stop listening, then drain its work, then close its clients needs them in turn.
    """

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)

        async def stop_in_turn() -> None:
            for child in reversed(list(self)):
                try:
                    await defer.maybeDeferred(child.stopService)
                except Exception:
                    log.failure("error while stopping {child}", child=child)

        return defer.Deferred.fromCoroutine(stop_in_turn())
