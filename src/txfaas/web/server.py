"""The HTTP server every process uses: request limits, plain-text errors, direct routes.

Over 500 lines because the channel, the request and the site share one request's state (its
route, limit and deadlines) and read as one piece.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, resource, server
from twisted.web.error import UnsupportedMethod
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers

from txfaas import _accel
from txfaas._accel import first_write
from txfaas.config import format_duration
from txfaas.reactor import send_now
from txfaas.timers import LazyTimer

#: Twisted's HTML error pages: those of twisted.web.resource (``Resource.getChild`` gives a
#: ``NoResource``), with public ``code`` and ``brief``; and those of twisted.web.pages.
_RESOURCE_PAGES = (resource.ErrorPage, resource.NoResource, resource.ForbiddenResource)
_PAGES = type(pages.notFound())


# --- HTTP request limits --------------------------------------------------------------------

_READ, _RESPONSE = "read", "response"


def _raw_response(status: bytes, message: str) -> bytes:
    body = message.encode("utf-8") + b"\n"
    return (
        b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, len(body), body)
    )


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
    # The head as read so far, counted here rather than read from HTTPChannel's privates.
    _busy = False  # a request is read whole and its response not finished
    _onRequestLine = True
    _target = b""
    _headSize = 0
    _headerCount = 0

    transport: Any  # a TCP transport; Twisted types it ITransport | None
    site: Any

    def __init__(self) -> None:
        # LazyTimers, made at the first use (the site sets the clock after __init__).
        self._deadline: Any = None
        self._idle: Any = None
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
        for name, values in headers.getAllRawHeaders():
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
        previous = self.timeOut
        self.timeOut = period  # type: ignore[assignment]  # typed int; seconds may be a float
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
        if not self._busy and data:
            self._requestStarted = True
            if self.readTimeout and not self._deadline.pending:
                self._deadlineKind = _READ
                self._deadline.set(self.readTimeout)
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._rejected:
            super().rawDataReceived(data)

    # A head over Twisted's limits is answered (it closed the connection without a word, or
    # answered a bare 400): 414 for a request line, 431 for the header lines.

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._onRequestLine:
            self.reject(b"414 URI Too Long", f"the request line is over {self.MAX_LENGTH} bytes")
        else:
            self.reject(
                b"431 Request Header Fields Too Large", f"a header line is over {self.MAX_LENGTH} bytes"
            )

    def lineReceived(self, line: bytes) -> None:
        self._headSize += len(line)
        if self._headSize > self.totalHeadersSize:
            if self._onRequestLine:
                self.reject(b"414 URI Too Long", f"the request line is over {self.totalHeadersSize} bytes")
            else:
                self.reject(
                    b"431 Request Header Fields Too Large",
                    f"the request head is over {self.totalHeadersSize} bytes",
                )
            return
        if self._onRequestLine and line:  # (Twisted skips one blank line before a request)
            self._onRequestLine = False
            parts = line.split(b" ")
            self._target = parts[1] if len(parts) == 3 else b""
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._headerCount >= self.maxHeaders:
            self.reject(b"431 Request Header Fields Too Large", f"more than {self.maxHeaders} header lines")
            return False
        ok = super().headerReceived(line)
        if ok:
            self._headerCount += 1
        return ok

    def allHeadersReceived(self) -> None:
        site = self.site
        route = site.route(self._target) if isinstance(site, LimitedSite) else None
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
        self._busy = True
        self._onRequestLine = True
        self._headSize = self._headerCount = 0
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
        elif self._busy:
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
        self._busy = False
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
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


class _PageCode:
    """Stands in for the request while a twisted.web.pages error page renders: keeps its code."""

    code = 500

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class _PlainPage(resource.Resource):
    """A twisted.web.pages error page answered in plain text: its code and reason phrase."""

    isLeaf = True

    def __init__(self, page: Any) -> None:
        super().__init__()
        self._page = page

    def render(self, request: server.Request) -> bytes:
        stand_in = _PageCode()
        self._page.render(stand_in)  # its HTML goes nowhere
        code = stand_in.code
        reason = RESPONSES.get(code, b"error").decode("latin-1").lower()
        path = request.path.decode("latin-1", "replace")
        return plain_error(request, code, f"{reason}: {path}" if code == 404 else reason)


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
        if isinstance(resrc, _RESOURCE_PAGES):
            path = self.path.decode("latin-1", "replace")
            code, brief = resrc.code, resrc.brief
            resrc = _PlainError(code, f"{brief.lower()}: {path}" if code == 404 else brief)
        elif isinstance(resrc, _PAGES):
            resrc = _PlainPage(resrc)
        elif type(resrc).render is resource.Resource.render:
            # Only Resource's own render raises UnsupportedMethod (no render_<METHOD>).
            resrc = _PlainMethods(resrc)
        super().render(resrc)

    log = Logger()
    _lost = False

    @property
    def disconnected(self) -> bool:
        """True once the connection was lost (Twisted's own flag is private)."""
        return self._lost

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        super().connectionLost(reason)

    def processingFailed(self, reason: Failure) -> Failure:
        self.log.failure("processing {uri} failed", failure=reason, uri=self.uri)
        if self.finished or self._lost:
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
    channel: Any  # a LimitedChannel
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
            and not self.finished
            and not self._lost
            and channel is not None
            and _accel.enabled()
            and first_write.plain(self)  # (no encoder holding the rest)
        ):
            # The response is whole: out now, before Twisted's teardown of the request and
            # what the caller does after finish (txfaas.reactor.send_now).
            send_now(channel.transport)
        super().finish()

    def write(self, data: bytes) -> None:
        """With accelerations on, the first write's head and bytes go to the transport in one
        write (:mod:`txfaas._accel.first_write`); anything unusual (a later write, Last-Modified,
        ETag or cookies set through the request) is Twisted's."""
        if (
            self.startedWriting
            or self.finished
            or self._lost
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
            or not isinstance(self.channel, LimitedChannel)
            or not _accel.enabled()
            or not first_write.write_first(self, data)
        ):
            super().write(data)

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
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [server.version])
        headers.setRawHeaders(b"Date", [http_date()])
        segments = self.path[1:].split(b"/")
        assert route is not None  # a leaf came from it
        self.prepath = [route.segment]
        self.postpath = [unquote(segment) for segment in segments[1:]]
        self.sitepath: list[bytes] = []
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

    def buildProtocol(self, addr: Any) -> LimitedChannel:  # type: ignore[override]  # stubs: a private type
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
