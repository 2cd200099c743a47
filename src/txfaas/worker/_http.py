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

Pairs = list[tuple[bytes, bytes]]


@attrs.frozen
class RawResponse:
    code: int
    headers: Pairs
    body: bytes


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
        self, done: defer.Deferred[bytes], limit: int | None = None, keep_head: bool = False
    ) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._keep_head = keep_head

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
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
) -> RawResponse:
    producer = None if body is None else BytesProducer(body)
    response = await agent.request(method, url, make_headers(headers), producer)
    data = await read_body(response, limit, keep_head)
    return RawResponse(response.code, header_pairs(response.headers), data)


def fetch(
    agent: IAgent,
    method: bytes,
    url: bytes,
    headers: Pairs,
    body: bytes | None,
    limit: int | None = None,
    keep_head: bool = False,
) -> defer.Deferred[RawResponse]:
    """Send one request and read the whole answer.

    ``body=None`` sends no body (and no ``Content-Length``); ``limit``/``keep_head``
    bound the answer's body (see :func:`read_body`).  Cancelling the
    Deferred aborts the connection and always fails it with ``CancelledError``
    (the agent itself would report ``ResponseNeverReceived``), so ``addTimeout``
    turns it into ``TimeoutError`` and callers can tell cancellation from a
    broken function.
    """
    inner = defer.Deferred.fromCoroutine(_fetch(agent, method, url, headers, body, limit, keep_head))
    cancelled = False

    def cancel(_: defer.Deferred[RawResponse]) -> None:
        nonlocal cancelled
        cancelled = True
        inner.cancel()

    outer: defer.Deferred[RawResponse] = defer.Deferred(cancel)

    def relay(result: Any) -> None:
        if cancelled:
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
