"""The worker's HTTP plumbing: one request, body included, over an injected ``IAgent``.

treq's ``HTTPClient`` always wraps its agent in a ``ContentDecoderAgent``
(it adds ``Accept-Encoding: gzip`` and gunzips the answer) and, by default,
a ``RedirectAgent``.  The worker must hand on the function's bytes exactly as
sent and must never follow a redirect, so it drives the agent itself: no
decoding, no redirects, no cookies.  Cancelling :func:`fetch`'s Deferred aborts
the TCP connection, whether the response headers have arrived or not.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.iweb import IAgent, IResponse

from txfaas.http11 import BytesProducer
from txfaas.worker.budget import ByteBudget

Pairs = list[tuple[bytes, bytes]]


@attrs.frozen
class RawResponse:
    code: int
    headers: Pairs
    body: bytes
    #: Bytes of ``budget`` the body holds: the caller's to release.
    reserved: int = 0


def make_headers(pairs: Pairs) -> Headers:
    """``Headers`` of ``pairs``, as ``addRawHeader`` would make them: each name checked and in
    Header-Case (``InvalidHeaderName`` if not a token), a CR or LF in a value folded into a
    space; without ``addRawHeader``'s per-header ``splitlines`` when a value has neither."""
    headers = Headers()
    raw = headers._rawHeaders
    encode = _nameEncoder.encode
    for name, value in pairs:
        if isinstance(value, str):
            value = value.encode("utf8")
        if len(value.translate(None, b"\r\n")) != len(value):  # (a bytes ``in`` raises inside)
            value = b" ".join(value.splitlines())
        key = encode(name)
        values = raw.get(key)
        if values is None:
            raw[key] = [value]
        else:
            values.append(value)
    return headers


def header_pairs(headers: Headers) -> Pairs:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class BodyTooLarge(Exception):
    """The answer's body went over the reader's limit (the connection was aborted)."""


class _BodyReader(Protocol):
    def __init__(
        self,
        done: defer.Deferred[bytes],
        limit: int | None = None,
        keep_head: bool = False,
        budget: ByteBudget | None = None,
    ) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._keep_head = keep_head
        # With a budget, every byte kept is reserved first; past it, reading pauses.
        self._budget = budget
        self.reserved = 0
        self._waiting: defer.Deferred[None] | None = None
        self._backlog: list[bytes] = []  # arrived while a reservation was waiting
        self._ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._budget is not None and not (self._limit is not None and self._size > self._limit):
            if self._waiting is not None:
                self._backlog.append(data)
                return
            if not self._budget.try_reserve(len(data)):
                self._backlog.append(data)
                self.transport.pauseProducing()
                self._wait()
                return
            self.reserved += len(data)
        if self._limit is not None and self._size > self._limit:
            # Stop reading: a peer may not make us hold an unbounded body in memory.
            if self._keep_head:
                self._parts.append(data[: max(0, len(data) - (self._size - self._limit))])
                self._done.callback(b"".join(self._parts))
            else:
                self._done.errback(BodyTooLarge(f"response body over {self._limit} bytes"))
            _abort(self.transport)
            return
        self._parts.append(data)

    def _wait(self) -> None:
        assert self._budget is not None
        n = sum(len(b) for b in self._backlog)
        self._waiting = self._budget.reserve(n)
        self._waiting.addCallbacks(self._granted, lambda f: None, callbackArgs=(n,))

    def _granted(self, _: object, n: int) -> None:
        self._waiting = None
        self.reserved += n
        taken = 0
        while taken < n:
            chunk = self._backlog.pop(0)
            self._parts.append(chunk)
            taken += len(chunk)
        if self._done.called:
            return
        if self._backlog:
            self._wait()
        elif self._ended is not None:
            self._end(self._ended)
        else:
            self.transport.resumeProducing()

    def give_up(self) -> None:
        """Failed or cancelled: stop waiting and give back what was reserved."""
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if self._budget is not None:
            self._budget.release(self.reserved)
        self.reserved = 0
        self._parts = []
        self._backlog = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if self._waiting is not None:
            self._ended = reason  # the end is read once the bytes before it are reserved
            return
        self._end(reason)

    def _end(self, reason: Failure) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: no length was given and the connection ended: that is the end.
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def _abort(transport: Any) -> None:
    if transport is None:
        return
    abort = getattr(getattr(transport, "_producer", None), "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


def read_body(
    response: IResponse, limit: int | None = None, keep_head: bool = False
) -> defer.Deferred[bytes]:
    """The whole body; cancelling aborts the connection.

    Over ``limit`` bytes the connection is aborted and the Deferred fails with
    :class:`BodyTooLarge` -- or, with ``keep_head``, fires with the first ``limit`` bytes.
    (Twisted's ``readBody`` means to abort on cancel, but the transport it is handed is a
    ``TransportProxyProducer`` without ``abortConnection``, so it only warns.)
    """
    done: defer.Deferred[bytes] = defer.Deferred(lambda _: _abort(reader.transport))
    reader = _BodyReader(done, limit, keep_head)
    response.deliverBody(reader)
    return done


async def _fetch(
    agent: IAgent,
    method: bytes,
    url: bytes,
    headers: Pairs,
    body: bytes | None,
    limit: int | None,
    keep_head: bool,
    budget: ByteBudget | None = None,
) -> RawResponse:
    producer = None if body is None else BytesProducer(body)
    response = await agent.request(method, url, make_headers(headers), producer)
    if budget is None:
        data = await read_body(response, limit, keep_head)
        return RawResponse(response.code, header_pairs(response.headers), data)
    length = response.length
    if isinstance(length, int) and limit is not None and length > limit:
        _abort_response(response)
        raise BodyTooLarge(f"response body of {length} bytes is over {limit}")
    reserved = 0
    if isinstance(length, int) and length > 0:
        # The whole answer at once, before a byte is read (the transport stays paused until
        # the body is delivered): answers of known length never hold part of the budget.
        wait = budget.reserve(length)
        try:
            await wait
        except BaseException:
            _abort_response(response)
            raise
        reserved = length
    done: defer.Deferred[bytes] = defer.Deferred(lambda _: _abort(reader.transport))
    reader = _BodyReader(done, limit, keep_head, None if reserved else budget)
    response.deliverBody(reader)
    try:
        data = await done
    except BaseException:
        reader.give_up()
        budget.release(reserved)
        raise
    # A body shorter than its Content-Length (the connection ended early) fails above.
    return RawResponse(response.code, header_pairs(response.headers), data, reserved + reader.reserved)


def _abort_response(response: IResponse) -> None:
    """Abort the connection of a response whose body will not be read."""

    class _Discard(Protocol):
        def connectionMade(self) -> None:
            _abort(self.transport)

    response.deliverBody(_Discard())


def fetch(
    agent: IAgent,
    method: bytes,
    url: bytes,
    headers: Pairs,
    body: bytes | None,
    limit: int | None = None,
    keep_head: bool = False,
    budget: ByteBudget | None = None,
) -> defer.Deferred[RawResponse]:
    """Send one request and read the whole answer.

    ``body=None`` sends no body (and no ``Content-Length``); ``limit``/``keep_head``
    bound the answer's body (see :func:`read_body`).  With ``budget``, the body's bytes are
    reserved in it before they are kept (reading waits for room; see :class:`ByteBudget`) and
    the result's ``reserved`` must be released by the caller.  Cancelling the
    Deferred aborts the connection and always fails it with ``CancelledError``
    (the agent itself would report ``ResponseNeverReceived``), so ``addTimeout``
    turns it into ``TimeoutError`` and callers can tell cancellation from a
    broken function.
    """
    inner = defer.Deferred.fromCoroutine(_fetch(agent, method, url, headers, body, limit, keep_head, budget))
    cancelled = False

    def cancel(_: defer.Deferred[RawResponse]) -> None:
        nonlocal cancelled
        cancelled = True
        inner.cancel()

    outer: defer.Deferred[RawResponse] = defer.Deferred(cancel)

    def relay(result: Any) -> None:
        if cancelled:
            if budget is not None and isinstance(result, RawResponse):
                budget.release(result.reserved)  # finished as it was cancelled: nobody takes it
            return None  # outer fails with CancelledError; whatever the abort caused is moot
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)
        return None

    inner.addBoth(relay)
    return outer


def describe(error: BaseException) -> str:
    """One line saying why a request failed (``ResponseFailed`` hides its reasons in a list)."""
    if isinstance(error, ResponseFailed):
        reasons: list[Any] = error.reasons
        return "; ".join(describe(r.value) for r in reasons) or "response failed"
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name
