"""``/async-function/{name}[.{namespace}][/{path}]``: a call queued, answered 202 once confirmed.

A plain twisted.web resource on the hot asynchronous path (Klein's routing would be most
of its cost); its errors are answered from the one table (:mod:`txfaas.gateway.errors`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from txfaas import headers as hdr
from txfaas.gateway.answers import finish, text
from txfaas.gateway.calls import settle
from txfaas.gateway.errors import KNOWN, ErrorTable, HTTPError, no_function
from txfaas.gateway.functions import queue_of
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.gateway.settings import AppSettings
from txfaas.gateway.web import call_id_of, when_gone
from txfaas.http.ssrf import CallbackRefused, check_callback_url
from txfaas.model import (
    QUEUE_ANNOTATION,
    Call,
    CallRecord,
    CallStatus,
    FunctionSpec,
    ValidationError,
    split_ref,
)
from txfaas.queue import CallQueue, QueueUnavailable
from txfaas.store import AsyncCallStore, StoreUnavailable
from txfaas.store.cache import FunctionCache

# Set by the gateway itself, or of no use to the function.
_ASYNC_DROP = hdr.canonical_names(
    hdr.HOP_BY_HOP | frozenset({b"host", b"content-length", b"x-callback-url", b"x-call-id"})
)


def accepted(request: IRequest, record: CallRecord, duplicate: bool, set_raw: Any = hdr.set_raw) -> bytes:
    """202 naming the call and where its record is (JSON, as :func:`answers.json` writes it)."""
    location = f"/system/calls/{record.call_id}"
    headers = request.responseHeaders
    set_raw(headers, hdr.CALL_ID, [record.call_id.encode()])
    set_raw(headers, b"Location", [location.encode()])
    set_raw(headers, b"Content-Type", [b"application/json"])
    request.setResponseCode(202)
    body: dict[str, Any] = {"callId": record.call_id, "status": record.status, "location": location}
    if duplicate:
        body["duplicate"] = True
    return orjson.dumps(body)


class _ClientGone(Exception):
    """The client went away before anything was queued: nothing to do, nobody to answer."""


class _Posting:
    """One POST being accepted: whether its client is still there."""

    __slots__ = ("gone", "name", "request")

    def __init__(self, request: server.Request, name: str) -> None:
        self.request = request
        self.name = name
        self.gone = False
        when_gone(request, self._left)

    def _left(self, _reason: Failure) -> None:
        self.gone = True


class Acceptor:
    """Turns a POST into a queued :class:`Call` and its record, at most once per client call id."""

    log = Logger()

    def __init__(
        self,
        functions: FunctionCache,
        calls: AsyncCallStore,
        queue: CallQueue | None,
        resolver: Any,
        settings: AppSettings,
        clock: Any,
        refused_queues: dict[str, str],
    ) -> None:
        self._functions = functions
        self._calls = calls
        self._queue = queue
        self._resolver = resolver
        self._settings = settings
        self._clock = clock
        self._refused_queues = refused_queues
        self._set_raw = hdr.writers()[0]

    async def accept(self, posting: _Posting) -> bytes:
        """``posting.name`` is ``name.namespace`` (:class:`AsyncCalls` adds the default namespace)."""
        request = posting.request
        if self._queue is None or not self._settings.async_enabled:
            raise HTTPError(404, "asynchronous calls are not enabled on this gateway")
        try:
            name, namespace = split_ref(posting.name, self._settings.default_namespace)
        except ValidationError as e:
            raise HTTPError(400, str(e)) from None
        # As the client sent it (Klein's postpath is percent-decoded: not for forwarding).
        subpath = hdr.raw_subpath(request.path, 3)
        try:
            hdr.check_subpath(subpath)
        except hdr.BadPath as e:
            raise HTTPError(400, str(e)) from None
        call_id = call_id_of(request)
        callback = request.getHeader(hdr.CALLBACK_URL)
        callback_url = None if callback is None else await self._checked_callback(callback)
        spec = await self._functions.get(posting.name)
        if spec is None:
            raise HTTPError(404, no_function(name, namespace))
        if self._refused_queues and spec.queue in self._refused_queues:
            raise QueueUnavailable(
                f"function {spec.ref!r}'s queue cannot be used ({self._refused_queues[spec.queue]}); "
                f"redeploy it with another {QUEUE_ANNOTATION} annotation"
            )
        if posting.gone:
            raise _ClientGone()
        call = self._call(request, spec, call_id, subpath, callback_url)
        record = CallRecord.for_call(call)
        if request.getHeader(hdr.CALL_ID) is not None:
            return await self._accept_once(request, call, record)
        # An id the gateway just made up cannot exist: publish first, then record (a 202 is
        # only sent once the broker confirmed the message; a record that could not be
        # written is created by the worker).
        await self._queue.publish(call)
        try:
            found = await self._calls.create_call(record)
        except StoreUnavailable as e:
            self.log.warn(
                "[{call_id}] queued, but its status record could not be written yet: {error}",
                call_id=call_id,
                error=e,
            )
            found = None
        return accepted(request, found or record, False, self._set_raw)

    async def _checked_callback(self, callback: bytes) -> str:
        """``X-Callback-Url``, checked against the callback policy (an empty one is refused)."""
        url = callback.decode("latin-1")
        check = defer.Deferred.fromCoroutine(
            check_callback_url(url, self._resolver, self._settings.callback_policy)
        )
        if self._clock is not None:
            check.addTimeout(self._settings.resolve_timeout, self._clock)
        try:
            await check
        except defer.TimeoutError:
            raise HTTPError(
                400,
                f"X-Callback-Url refused: its host did not resolve within {self._settings.resolve_timeout:g}s",
            ) from None
        except CallbackRefused as e:
            raise HTTPError(400, f"X-Callback-Url refused: {e}") from None
        return url

    def _call(
        self,
        request: IRequest,
        spec: FunctionSpec,
        call_id: str,
        subpath: list[bytes],
        callback_url: str | None,
    ) -> Call:
        forwarded = [(k, v) for k, vs in hdr.end_to_end_raw(request.requestHeaders, _ASYNC_DROP) for v in vs]
        forwarded.append((b"X-Call-Id", call_id.encode()))
        path = b"/" + b"/".join(subpath)
        return Call(
            call_id=call_id,
            function=spec.service,
            method="POST",
            path=path.decode("latin-1"),
            query=request.uri.partition(b"?")[2].decode("latin-1"),
            headers=hdr.to_str_pairs(forwarded),
            body=request.content.read(),
            callback_url=callback_url,
            accepted_at=time.time(),
            queue=queue_of(spec, self._settings),
            namespace=spec.namespace,
        )

    async def _accept_once(self, request: IRequest, call: Call, record: CallRecord) -> bytes:
        """Queue a call under the id its client chose, at most once however often it is posted.

        The id is claimed (``accepting``, with a deadline) before the publish and becomes
        ``queued`` once the broker confirmed it.  A claim whose gateway died before the
        confirm lapses at its deadline; the client's retry then takes it and publishes again."""
        assert self._queue is not None
        claim, found = await self._calls.claim_call(record, self._settings.claim_window)
        if claim is None:
            assert found is not None
            return self._duplicate(request, found, call)
        try:
            await self._queue.publish(call)
        except QueueUnavailable:
            # Not queued (as far as we know): give the id back so that a retry can queue it.
            await settle(self._calls, claim, None)
            raise
        found = await settle(self._calls, claim, record)
        if found is None or found.status == CallStatus.ACCEPTING:
            found = record  # (ACCEPTING: our claim lapsed and was taken over, yet ours is confirmed)
        return accepted(request, found, False, self._set_raw)

    def _duplicate(self, request: IRequest, found: CallRecord, call: Call) -> bytes:
        if (found.function, found.namespace) != (call.function, call.namespace):
            # Someone else's call: its status is none of this caller's business.
            raise HTTPError(409, f"call id {found.call_id!r} is taken by another call: choose another id")
        if found.status == CallStatus.ACCEPTING:
            # The IETF Idempotency-Key draft: a retry while the first request is in progress is 409.
            left = (found.accepting_until or 0.0) - time.time()
            wait = min(max(1, math.ceil(left)), max(1, math.ceil(self._settings.claim_window)))
            raise HTTPError(
                409,
                f"call {found.call_id!r} is being accepted by another request: retry in {wait}s",
                {b"Retry-After": str(wait).encode()},
            )
        return accepted(request, found, True, self._set_raw)


class AsyncCalls(resource.Resource):
    """``/async-function/...``: POST queues the call (:class:`Acceptor`).

    A client that goes away does not cancel the work: once a call is being published, its
    publish and its record are completed (the call will run); only the answer is dropped.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        acceptor: Acceptor,
        functions: FunctionCache,
        metrics: GatewayMetrics,
        errors: ErrorTable,
        default_namespace: str,
    ) -> None:
        super().__init__()
        self._acceptor = acceptor
        self._functions = functions
        self._metrics = metrics
        self._errors = errors
        self._suffix = "." + default_namespace
        self._set_raw = hdr.writers()[0]

    def render(self, request: server.Request) -> Any:
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            return text(request, 405, "asynchronous calls must use POST")
        postpath = request.postpath
        if not postpath or not postpath[0]:
            return text(request, 404, "no function named in the path: use /async-function/{name}")
        name = postpath[0].decode("utf-8", "replace")
        if "." not in name:
            name += self._suffix  # name.namespace from here on: labels, the cache
        posting = _Posting(request, name)
        d = defer.Deferred.fromCoroutine(self._acceptor.accept(posting))
        d.addCallbacks(self._accepted, self._refused, callbackArgs=(posting,), errbackArgs=(posting,))
        d.addErrback(self._unexpected, posting)
        return server.NOT_DONE_YET

    def _label(self, ref: str) -> str:
        """A metric label for a function that exists; "-" for any other name (unknown names
        from clients must not create a new time series each)."""
        return ref if self._functions.cached(ref) is not None else "-"

    def _accepted(self, body: bytes, posting: _Posting) -> None:
        self._metrics.async_answer(posting.name, 202)
        request = posting.request
        if not posting.gone and not request.finished:
            self._set_raw(request.responseHeaders, b"Content-Length", [b"%d" % len(body)])
            request.write(body)
            request.finish()

    def _refused(self, failure: Failure, posting: _Posting) -> None:
        """The answer the Klein app gives for the same error: the one table's."""
        if failure.check(_ClientGone):
            return
        if not isinstance(failure.value, KNOWN):
            failure.raiseException()
        request = posting.request
        body = self._errors.answer(request, failure.value)
        self._metrics.async_answer(self._label(posting.name), request.code)
        if not posting.gone:
            finish(request, body)

    def _unexpected(self, failure: Failure, posting: _Posting) -> None:
        self.log.failure("asynchronous call to {uri} failed", failure, uri=posting.request.uri)
        if not posting.gone:
            finish(posting.request, text(posting.request, 500, "internal error"))
