"""A lean HTTP/1.1 client connection, built by the outgoing pools instead of ``HTTP11ClientProtocol``.

Twisted's protocol parses a response one line at a time through ``LineReceiver``, a stateful
dispatcher and an ``addRawHeader`` per header, and routes each response through four chained
Deferreds and a transport proxy.  :class:`HTTP11Connection` does the same job for one request at
a time with the head parsed in one pass, and keeps Twisted's contract with ``HTTPConnectionPool``
and with callers:

- ``request(request)`` takes Twisted's client ``Request`` and fires with an
  ``IResponse`` once the response head is in, or fails with Twisted's
  exceptions (``RequestNotSent``, ``RequestGenerationFailed``,
  ``RequestTransmissionFailed``, ``ResponseNeverReceived``, ``ResponseFailed``),
  so the pool's retry of idempotent requests on a stale connection still works;
- cancelling that Deferred aborts the connection; ``stopProducing`` on the body's
  transport aborts it too, while the response is still arriving;
- the body ends with ``ResponseDone``, ``PotentialDataLoss`` (no length given and the
  connection closed) or ``ResponseFailed``; bodies are framed by Content-Length,
  chunked transfer coding (Twisted's own decoder) or the connection's end; HEAD,
  1xx (skipped), 204 and 304 answers have none;
- a body not yet asked for is buffered with the connection paused, as Twisted does;
- the connection goes back to the pool (the quiescent callback) only after a
  complete response to a fully sent, persistent request whose answer did not
  say ``Connection: close`` (an HTTP/1.0 answer must say ``keep-alive``).

A request body is written here when there is none or it is a ``BytesProducer`` (the body in
memory: one write with the head); any other producer goes through Twisted's ``Request.writeTo``,
which enforces its length or chunks it.  Private names used: ``twisted.web._newclient``'s
``Request``, ``HTTPClientParser`` constants and URI/method checks, ``_ChunkedTransferDecoder``,
``Headers._rawHeaders`` and ``HTTPConnectionPool._factory`` (:func:`install`); :func:`probe` runs
a request through a stock pool with them.  ``tests/unit/test_accel_http11.py`` compares this
parser with Twisted's.  (Over 500 lines: one protocol, whose parser, framing and pool contract are
read together.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTPClientParser,
    ParseError,
    Request,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _ensureValidMethod,
    _ensureValidURI,
)
from twisted.web.http import PotentialDataLoss, _ChunkedTransferDecoder, _DataLoss
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from txfaas.http.client import BytesProducer
from txfaas.reactor import send_now

#: Longest response head (status line and headers) accepted.
MAX_HEAD = 64 * 1024
# Not the response's own headers but how the connection carries it; and the codes with no body.
_CONTROL = frozenset(HTTPClientParser.CONNECTION_CONTROL_HEADERS)
_CONTROL_NAMES = {_nameEncoder.encode(name): name for name in _CONTROL}  # Header-Case -> lower case
NO_BODY_CODES = frozenset(HTTPClientParser.NO_BODY_CODES)
_BODY_METHODS = frozenset({b"PUT", b"POST"})
_DONE = ResponseDone("Response body fully received")
# The reason every complete body ends with, made once: its readers only look at it (check, trap,
# isinstance of its value).
_DONE_FAILURE = Failure(_DONE)
_ENDED = object()  # a response's protocol once its body ended


@implementer(IPushProducer)
class _BodyTransport:
    """The body's ``transport``: flow control over the connection while the body arrives."""

    def __init__(self, response: Response) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        connection = self._response._connection
        if connection is not None:
            connection._pause()

    def resumeProducing(self) -> None:
        connection = self._response._connection
        if connection is not None:
            connection._resume()

    def stopProducing(self) -> None:
        """Abort the connection if the body is still arriving; nothing once it is complete."""
        connection = self._response._connection
        if connection is not None:
            connection.transport.abortConnection()


@implementer(IResponse)
class Response:
    """A response whose head is in; its body is delivered to one protocol (``deliverBody``)."""

    previousResponse: Any = None

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: Any,
        request: Request,
        connection: HTTP11Connection | None,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.request = request
        self._connection = connection  # while the body is still arriving
        self._protocol: Any = None
        self._buffer: list[bytes] = []
        self._end: Failure | None = None

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the response body was already delivered")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self))
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            if self._protocol is _ENDED:
                return
            protocol.dataReceived(data)
        if self._end is not None:
            end, self._end = self._end, None
            self._lose(end)
        elif self._connection is not None:
            self._connection._resume()  # if paused while nobody read the body

    def _data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None:
            self._buffer.append(data)
        elif protocol is not _ENDED:
            protocol.dataReceived(data)

    def _finish(self, reason: Failure) -> None:
        self._connection = None
        if self._protocol is not None:
            self._lose(reason)
        else:
            self._end = reason

    def _lose(self, reason: Failure) -> None:
        if self._protocol is not _ENDED:
            # Let go of the protocol: it holds this response through its transport, and a
            # reference cycle per call would leave every call's objects to the cyclic GC.
            protocol, self._protocol = self._protocol, _ENDED
            protocol.connectionLost(reason)


class HTTP11Connection(Protocol):
    """One HTTP/1.1 client connection, one request at a time (see the module's docstring)."""

    #: A TCP transport (ITCPTransport and IPushProducer); Twisted types it ITransport | None.
    transport: Any

    log = Logger()

    def __init__(self, quiescentCallback: Callable[[HTTP11Connection], object] = lambda c: None) -> None:
        self._quiescentCallback = quiescentCallback
        self._state = "QUIESCENT"
        self._paused = False  # reading from the transport paused by us (and only we pause it)
        self._abortDeferreds: list[defer.Deferred[None]] = []
        self._reset()

    def _reset(self) -> None:
        self._request: Request | None = None
        self._result: defer.Deferred[IResponse] | None = None  # until the head is in
        self._writing: defer.Deferred[None] | None = None  # a body producer still writing
        self._sent = False
        self._head = b""
        self._received = False  # any byte of the response
        self._response: Response | None = None
        self._remaining: int | None = None  # Content-Length left to read
        self._chunked: Any = None
        self._keep = False

    @property
    def state(self) -> str:
        return self._state

    def _pause(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def _resume(self) -> None:
        """Resume reading if paused: a transport already reading is not told again (Twisted's
        resumeProducing -> startReading -> addReader -> _add, four calls to find nothing to do)."""
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    # --- the request ------------------------------------------------------------------------

    def request(self, request: Request) -> defer.Deferred[IResponse]:
        if self._state != "QUIESCENT":
            return defer.fail(RequestNotSent())
        self._state = "ACTIVE"
        self._request = request
        result = self._result = defer.Deferred(self._cancel)
        try:
            writing = self._write(request)
        except BaseException:
            self._generation_failed(Failure())
            return result
        if writing is None:
            self._sent = True
        else:
            self._writing = writing
            writing.addCallbacks(self._written, self._write_failed)
        return result

    def _write(self, request: Request) -> defer.Deferred[None] | None:
        body = request.bodyProducer
        if body is not None and type(body) is not BytesProducer:
            return request.writeTo(self.transport)  # Twisted's: length enforced, or chunked
        method = _ensureValidMethod(request.method)
        headers = request.headers
        if len(headers._rawHeaders.get(b"Host", ())) != 1:
            raise ValueError("exactly one Host header is required")
        lines = [method + b" " + _ensureValidURI(request.uri) + b" HTTP/1.1\r\n"]
        if not request.persistent:
            lines.append(b"Connection: close\r\n")
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % body.length)
        elif method in _BODY_METHODS:
            lines.append(b"Content-Length: 0\r\n")
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        if body is not None and body.length:
            lines.append(body.body)
        self.transport.write(b"".join(lines))  # (writeSequence would check every piece)
        send_now(self.transport)  # the whole request: out before our caller's bookkeeping
        return None

    def _written(self, _: object) -> None:
        self._writing = None
        self._sent = True

    def _write_failed(self, failure: Failure) -> None:
        self._writing = None
        if self._state == "ACTIVE" and self._result is not None:
            self._generation_failed(failure)
        elif self._state == "ACTIVE":
            # The answer came before the body could be sent: the connection cannot be reused.
            self._state = "DONE"
            self.transport.abortConnection()
        else:  # the connection is done with or gone: what the body's producer says is moot
            self.log.debug(
                "request body not written ({state}): {error}", state=self._state, error=failure.value
            )

    def _abort(self, state: str, error: Exception) -> bool:
        """Drop the connection; fail the caller's Deferred with ``error`` if it still waits."""
        self._state = state
        self.transport.abortConnection()
        result, self._result = self._result, None
        if result is None:
            return False
        result.errback(Failure(error))
        return True

    def _generation_failed(self, failure: Failure) -> None:
        self._abort("GENERATION_FAILED", RequestGenerationFailed([failure]))

    def _cancel(self, result: defer.Deferred[IResponse]) -> None:
        if self._writing is not None:
            self._writing.cancel()  # fails the write: RequestGenerationFailed([CancelledError])
            return
        self._result = None
        self.transport.abortConnection()
        result.errback(Failure(ResponseNeverReceived([Failure(defer.CancelledError())])))

    # --- the response -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            if self._response is None:
                self._head_received(data)
            else:
                self._body_received(data)
        except Exception:
            self._protocol_error(Failure())

    def _head_received(self, data: bytes) -> None:
        if self._request is None or self._state != "ACTIVE":
            self.transport.loseConnection()  # unasked for: not a connection to keep
            return
        self._received = True
        head = self._head + data if self._head else data
        while True:
            crlf = head.find(b"\n\r\n")
            lf = head.find(b"\n\n")
            if lf >= 0 and (crlf < 0 or lf < crlf):
                end, rest = lf, head[lf + 2 :]
            elif crlf >= 0:
                end, rest = crlf, head[crlf + 3 :]
            else:
                if len(head) > MAX_HEAD:
                    raise ParseError("response head too long", head[:80])
                self._head = head
                return
            if end > MAX_HEAD:
                raise ParseError("response head too long", head[:80])
            response = self._parse_head(head[:end])
            if response is not None:
                break
            head = rest  # a 1xx answer: the real one follows
        self._head = b""
        self._response = response
        result, self._result = self._result, None
        if response._connection is None:  # no body: complete already
            self._exchange_done(rest)
            if result is not None:
                result.callback(response)
            return
        if result is not None:
            result.callback(response)  # the caller may read the body now
        if self._response is not response:
            return  # the caller's callback already ended the exchange
        if rest:
            self._body_received(rest)
        if response._connection is not None and response._protocol is None:
            self._pause()  # until someone reads the body

    def _parse_head(self, head: bytes) -> Response | None:
        lines = head.split(b"\n", 1)
        status = lines[0].rstrip(b"\r")
        parts = status.split(b" ", 2)
        if len(parts) == 2:
            parts.append(b"")
        elif len(parts) != 3:
            raise ParseError("wrong number of parts", status)
        version, code_b, phrase = parts
        proto, _, numbers = version.partition(b"/")
        major, _, minor = numbers.partition(b".")
        if proto != b"HTTP" or not major.isdigit() or not minor.isdigit():
            raise ParseError("bad response version", version)
        if len(code_b) != 3 or not code_b.isdigit():
            raise ParseError("bad status code", status)
        code = int(code_b)
        if 100 <= code < 200:
            return None
        request = self._request
        assert request is not None
        headers = Headers()
        raw = headers._rawHeaders
        control: dict[bytes, list[bytes]] = {}
        head_method = request.method == b"HEAD"
        encode = _nameEncoder.encode
        block = head[len(lines[0]) + 1 :] if len(lines) > 1 else b""
        if block[-1:] == b"\r":
            block = block[:-1]  # the CR of the last line's CR LF (the head was cut at its LF)
        for name, value in _header_lines(block):
            # Not ``b"\r" in value``: a bytes ``in`` first tries its operand as an integer,
            # raising and clearing a TypeError every time.
            if len(value.translate(None, b"\r\x00")) != len(value):
                value = b" ".join(value.replace(b"\x00", b" ").splitlines())
            key = encode(name)  # Header-Case (remembered per spelling), and InvalidHeaderName unless a token
            low = _CONTROL_NAMES.get(key)
            if low is not None and not (head_method and low == b"content-length"):
                control.setdefault(low, []).append(value)
                continue
            values = raw.get(key)
            if values is None:
                raw[key] = [value]
            else:
                values.append(value)
        http11 = (major, minor) != (b"1", b"0")
        tokens = b",".join(control.get(b"connection", ())).lower()
        keep = tokens.find(b"close") < 0 if http11 else tokens.find(b"keep-alive") >= 0
        self._keep = keep and request.persistent
        length: Any = UNKNOWN_LENGTH
        if code in NO_BODY_CODES or request.method == b"HEAD":
            length = 0
        elif b"transfer-encoding" in control:
            codings = b",".join(control[b"transfer-encoding"]).lower().split(b",")
            if codings[-1].strip() == b"chunked":
                self._chunked = _ChunkedTransferDecoder(self._chunk, self._chunks_done)
            else:
                self._keep = False  # the body ends with the connection
            if b"content-length" in control:
                self._keep = False  # both framings given: do not trust this connection further
        elif b"content-length" in control:
            lengths = {v.strip() for vs in control[b"content-length"] for v in vs.split(b",")}
            if len(lengths) != 1:
                raise ParseError("conflicting Content-Length values", b", ".join(sorted(lengths)))
            text = lengths.pop()
            if not text.isdigit():
                raise ParseError("bad Content-Length", text)
            length = int(text)
            if length:
                self._remaining = length
        else:
            self._keep = False  # the body ends with the connection
        response = Response((b"HTTP", int(major), int(minor)), code, phrase, headers, length, request, self)
        if length == 0:
            response._finish(_DONE_FAILURE)
        return response

    def _body_received(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        if response._connection is None:
            self.transport.loseConnection()  # bytes after a complete answer: not reusable
            self._keep = False
            return
        remaining = self._remaining
        if remaining is not None:
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                response._data(data)
                return
            self._remaining = None
            response._data(data[:remaining])
            if self._response is response:
                self._exchange_done(data[remaining:])
            response._finish(_DONE_FAILURE)
        elif self._chunked is not None:
            self._chunked.dataReceived(data)
        else:
            response._data(data)

    def _chunk(self, data: bytes) -> None:
        assert self._response is not None
        self._response._data(data)

    def _chunks_done(self, rest: bytes) -> None:
        response = self._response
        assert response is not None
        self._chunked = None
        self._exchange_done(rest)
        response._finish(_DONE_FAILURE)

    def _exchange_done(self, rest: bytes) -> None:
        """The response is complete: back to the pool, or closed.

        Called before the caller hears that the body ended (as in Twisted), so a caller that
        sends its next request from there gets this connection again, not a new one."""
        if self._state != "ACTIVE" or not self._sent:
            if self._state == "ACTIVE" and self._writing is not None:
                self._state = "DONE"
                self._request.stopWriting()  # type: ignore[union-attr]
                self.transport.loseConnection()
            return
        if not self._keep or rest:
            self._state = "DONE"
            self.transport.loseConnection()
            return
        self._reset()
        self._state = "QUIESCENT"
        self._resume()
        try:
            self._quiescentCallback(self)
        except Exception:
            self.log.failure("while returning a connection to the pool")
            self.transport.loseConnection()

    def _protocol_error(self, failure: Failure) -> None:
        """A response that cannot be parsed: fail it and drop the connection."""
        if not self._abort("DONE", ResponseFailed([failure])) and self._response is not None:
            self._response._finish(Failure(ResponseFailed([failure], self._response)))

    # --- the end ----------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        aborting = self._state == "ABORTING"
        self._state = "CONNECTION_LOST"
        if aborting:
            reason = Failure(ConnectionAborted())
        result, self._result = self._result, None
        if self._writing is not None and self._request is not None:
            self._request.stopWriting()
        if result is not None:
            if not self._sent and self._writing is not None:
                result.errback(Failure(RequestTransmissionFailed([reason])))
            elif self._received:
                result.errback(Failure(ResponseFailed([reason])))
            else:
                result.errback(Failure(ResponseNeverReceived([reason])))
        response = self._response
        if response is not None and response._connection is not None:
            if self._remaining is None and self._chunked is None and reason.check(ConnectionDone):
                # No length given: the end of the connection is the end of the body.
                response._finish(Failure(PotentialDataLoss()))
            else:
                response._finish(Failure(ResponseFailed([reason, Failure(_DataLoss())], response)))
        self._response = None
        self._chunked = None
        self._remaining = None
        deferreds, self._abortDeferreds = self._abortDeferreds, []
        for d in deferreds:
            d.callback(None)

    def abort(self) -> defer.Deferred[None]:
        """Close the connection; fires once it is closed (as ``HTTP11ClientProtocol.abort``)."""
        if self._state == "CONNECTION_LOST":
            return defer.succeed(None)
        self.transport.loseConnection()
        self._state = "ABORTING"
        d: defer.Deferred[None] = defer.Deferred()
        self._abortDeferreds.append(d)
        return d


def _header_lines(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of a header block; ``ParseError`` for a line that is not one.

    Lines end in CR LF or a bare LF; a line starting with a space or a tab continues the
    value before it (obs-fold).  Names are checked when they are encoded (``InvalidHeaderName``)."""
    if not block:
        return []
    lines = block.split(b"\r\n")
    if len(lines) != block.count(b"\n") + 1:  # some line ends in a bare LF
        lines = [line[:-1] if line[-1:] == b"\r" else line for line in block.split(b"\n")]
    pairs: list[tuple[bytes, bytes]] = []
    for line in lines:
        first = line[:1]
        if first == b" " or first == b"\t":
            if not pairs:
                raise ParseError("continuation line without a header", line)
            name, value = pairs[-1]
            pairs[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise ParseError("header line without a colon", line)
        pairs.append((name, value.strip(b" \t")))
    return pairs


class HTTP11ConnectionFactory(Factory):
    """What ``HTTPConnectionPool._factory`` builds connections with: :class:`HTTP11Connection`."""

    noisy = False  # no log line for every connection opened and closed

    def __init__(self, quiescentCallback: Callable[[HTTP11Connection], object], metadata: object) -> None:
        self._quiescentCallback = quiescentCallback
        self._metadata = metadata

    def __repr__(self) -> str:
        return f"HTTP11ConnectionFactory({self._quiescentCallback!r}, {self._metadata!r})"

    def buildProtocol(self, addr: Any) -> HTTP11Connection:
        return HTTP11Connection(self._quiescentCallback)


def install(pool: Any) -> None:
    """Make ``pool`` (a stock ``HTTPConnectionPool``) build :class:`HTTP11Connection`s."""
    pool._factory = HTTP11ConnectionFactory


def probe() -> bool:
    """True when a stock pool with :func:`install` sends a request, reads a chunked answer and
    keeps the connection, and Twisted's ``Request`` and ``Headers`` look as this module reads them."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.web.client import HTTPConnectionPool

    try:
        headers = Headers()
        headers.addRawHeader(b"x-probe", b"1")
        if headers._rawHeaders != {b"X-Probe": [b"1"]} or _nameEncoder.encode(b"x-probe") != b"X-Probe":
            return False
        built: list[tuple[HTTP11Connection, StringTransport]] = []

        class Endpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                protocol.makeConnection(transport)
                built.append((protocol, transport))
                return defer.succeed(protocol)

        pool = HTTPConnectionPool(Clock(), persistent=True)
        install(pool)
        answers: list[Any] = []
        for _ in range(2):
            endpoint: Any = Endpoint()
            pool.getConnection(b"probe", endpoint).addCallback(
                lambda c: c.request(Request(b"GET", b"/p", Headers({b"host": [b"h"]}), None, persistent=True))
            ).addBoth(answers.append)
            protocol, transport = built[-1]
            if not isinstance(protocol, HTTP11Connection):
                return False
            if (
                not transport.value().startswith(b"GET /p HTTP/1.1\r\n")
                or b"\r\nHost: h\r\n" not in transport.value()
            ):
                return False
            transport.clear()
            protocol.dataReceived(
                b"HTTP/1.1 200 OK\r\nX-A: b\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )
        body: list[bytes] = []
        ends: list[Failure] = []

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                body.append(data)

            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                ends.append(reason)

        response = answers[-1]
        response.deliverBody(Reader())
        return (
            len(built) == 1  # the second request went on the kept connection
            and response.code == 200
            and response.headers.getRawHeaders(b"x-a") == [b"b"]
            and body == [b"ok"]
            and bool(ends)
            and ends[0].check(ResponseDone) is not None
        )
    except Exception:
        return False
