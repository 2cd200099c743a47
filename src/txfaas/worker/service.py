"""The worker: consume a queued call, invoke the function, record the outcome, call back, ack.

For each delivery, in this order:

1. Read the call's record.  A record that is already final (a redelivery of a
   call that finished, e.g. the worker died before its ack) is not run again:
   only its callback is (re)delivered if it was not delivered yet.
2. Record ``running`` (``startedAt``, ``attempts + 1``).  A record found
   ``running`` means an earlier worker died mid-call: the call runs again
   (at-least-once) and the attempt is counted.
3. Invoke the function with the queued method, path, query, headers and body,
   cancelling the request (which aborts the TCP connection) at exec_timeout.
   Timeout -> 504; unreachable -> 502; function deleted since queued -> 404.
4. Store the response (body cut at ``max_result_size``) and the final status.
5. Deliver the callback, record its outcome.
6. Ack.  Nothing is acked before its outcome is in the store.

When the store does not answer, a finished call's writes are retried for up to
:data:`RECORD_PATIENCE` seconds (so the function does not run twice); any other
failure gives the message back to the broker (``nack(requeue=True)``) after a
delay that grows with consecutive failures, so a Redis outage does not turn
into a hot loop.  A delivery of a call this process is already running (the
broker redelivers after a channel closed) joins the running call and is settled
with it, instead of running the function a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from txfaas.config import ConfigError, format_duration
from txfaas.headers import CALL_ID, end_to_end, to_bytes_pairs, to_str_pairs
from txfaas.model import (
    Call,
    CallRecord,
    CallResult,
    CallStatus,
    FunctionSpec,
    ValidationError,
    outcome_status,
)
from txfaas.queue import CallQueue, Delivery
from txfaas.store import StoreUnavailable
from txfaas.worker._http import describe, fetch
from txfaas.worker.callback import Callback, CallbackDelivery

#: How long the writes of a finished call are retried while the store is down.
RECORD_PATIENCE = 60.0
#: Safety margin between the longest a message may stay unacked and the broker's consumer timeout.
ACK_MARGIN = 30.0

# Request headers the worker sets itself (the body producer sets Content-Length; the
# agent sets Host for the function's own address).
_REQUEST_DROP = frozenset({b"host", b"content-length", CALL_ID.lower()})
_URL_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _URL_SAFE + "?"
_TEXT = [(b"Content-Type", b"text/plain; charset=utf-8")]


@attrs.frozen
class WorkerConfig:
    """Everything the worker decides by (built by ``tap.py`` from flags and environment)."""

    queues: tuple[str, ...] = ("faas-request",)
    max_inflight: int = 100
    exec_timeout: float = 30.0
    function_url_template: str = "http://{name}:8080"
    gateway_url: str | None = None
    callback_timeout: float = 10.0
    consumer_timeout: float = 30 * 60.0
    drain_timeout: float = 30.0
    max_result_size: int = 1024 * 1024
    retry_delay: float = 0.5
    max_retry_delay: float = 30.0
    health_timeout: float = 2.0

    @property
    def exec_timeout_limit(self) -> float:
        """The longest exec_timeout that keeps a message's whole handling below the consumer timeout."""
        return self.consumer_timeout - self.callback_timeout - RECORD_PATIENCE - ACK_MARGIN

    def check(self) -> WorkerConfig:
        """Refuse settings that would make the broker take a message back while it is still running."""
        if self.max_inflight < 1:
            raise ConfigError("--max-inflight", "must be at least 1")
        if not self.queues:
            raise ConfigError("--queue", "at least one queue is needed")
        if self.exec_timeout <= 0:
            raise ConfigError("--exec-timeout", "must be more than 0")
        if self.exec_timeout > self.exec_timeout_limit:
            raise ConfigError(
                "--exec-timeout",
                f"{format_duration(self.exec_timeout)} + --callback-timeout "
                f"{format_duration(self.callback_timeout)} + {format_duration(RECORD_PATIENCE)} "
                f"for recording + {format_duration(ACK_MARGIN)} margin must stay below --consumer-timeout "
                f"{format_duration(self.consumer_timeout)} (the broker's consumer_timeout), or the broker "
                "takes calls back while they run and they run twice",
            )
        return self


class WorkerMetrics:
    """The worker's Prometheus metrics, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge("txfaas_worker_calls_in_flight", "Calls being handled now.", registry=registry)
        self.calls = Counter(
            "txfaas_worker_calls",
            "Calls run to a final status.",
            ["function", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "txfaas_worker_call_duration_seconds",
            "Time spent invoking the function.",
            ["function"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
        )
        self.callbacks = Counter(
            "txfaas_worker_callbacks", "Callback deliveries by outcome.", ["outcome"], registry=registry
        )
        self.requeued = Counter(
            "txfaas_worker_requeued",
            "Messages given back to the broker unfinished, by reason.",
            ["reason"],
            registry=registry,
        )
        self.skipped = Counter(
            "txfaas_worker_skipped",
            "Redelivered messages whose call had already finished (not run again).",
            registry=registry,
        )


@attrs.frozen
class FunctionResponse:
    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    error: str | None = None


@attrs.define(eq=False)
class _Job:
    call: Call
    deliveries: list[Delivery]
    deferred: defer.Deferred[None] | None = None
    settled: bool = False


class WorkerService(Service):
    """Consumes calls from ``queue``; reads and writes ``store``; invokes functions through ``agent``.

    ``store`` is both a ``CallStore`` and a ``FunctionStore``.  ``agent`` is an
    ``IAgent`` (only ``tap.py`` builds the real one, with a connection pool sized
    to ``max_inflight``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: WorkerConfig,
        queue: CallQueue,
        store: Any,
        agent: IAgent,
        callbacks: CallbackDelivery,
        metrics: WorkerMetrics,
    ) -> None:
        self._clock = reactor
        self.config = config
        self._queue = queue
        self._store = store
        self._agent = agent
        self._callbacks = callbacks
        self.metrics = metrics
        self._jobs: dict[str, _Job] = {}
        self._stopping = False
        self._failures = 0
        self._starting: defer.Deferred[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._starting = defer.Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    async def _start(self) -> None:
        attempt = 0
        while True:
            try:
                await self._queue.start()
                break
            except defer.CancelledError:
                raise
            except Exception as e:
                delay = self._delay(attempt)
                attempt += 1
                self.log.warn("broker not reachable ({error}); retrying in {delay:g}s", error=e, delay=delay)
                await task.deferLater(self._clock, delay, lambda: None)
        self._queue.consume(list(self.config.queues), self.config.max_inflight, self.handle)
        self.log.info(
            "consuming {queues} (max in flight {n})",
            queues=",".join(self.config.queues),
            n=self.config.max_inflight,
        )

    def _start_failed(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            self.log.failure("worker failed to start", failure)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._starting is not None:
            self._starting.cancel()
        try:
            await self._queue.stop_consuming()
        except Exception as e:
            self.log.warn("stop consuming: {error}", error=e)
        jobs = [job.deferred for job in self._jobs.values() if job.deferred is not None]
        if jobs:
            self.log.info("draining {n} call(s), for up to {t:g}s", n=len(jobs), t=self.config.drain_timeout)
            limit = self._clock.callLater(self.config.drain_timeout, self._give_back_all)
            await defer.DeferredList(jobs, consumeErrors=True)
            if limit.active():
                limit.cancel()
        for what, close in (("queue", self._queue.close), ("store", getattr(self._store, "close", None))):
            if close is None:
                continue
            try:
                await close()
            except Exception as e:
                self.log.warn("closing the {what}: {error}", what=what, error=e)

    def _give_back_all(self) -> None:
        left = [job for job in self._jobs.values() if job.deferred is not None]
        self.log.warn("drain limit reached: giving {n} call(s) back to the queue", n=len(left))
        for job in left:
            job.deferred.cancel()  # type: ignore[union-attr]

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    async def health(self) -> list[str]:
        """What is unreachable now ("broker", "redis"); empty when all answer."""

        async def probe(name: str, ping: Callable[[], Coroutine[Any, Any, None]]) -> str | None:
            d = defer.Deferred.fromCoroutine(ping())
            d.addTimeout(self.config.health_timeout, self._clock)
            try:
                await d
            except Exception:
                return name
            return None

        results = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(probe("broker", self._queue.ping)),
                defer.Deferred.fromCoroutine(probe("redis", self._store.ping)),
            ]
        )
        return [name for name in results if name]

    # --- deliveries ----------------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """The queue's delivery handler: start handling the call (or join the same call running here)."""
        call = delivery.call
        running = self._jobs.get(call.call_id)
        if running is not None:
            self.log.info(
                "call {call_id}: redelivered while running here; it will be settled with the running call",
                call_id=call.call_id,
            )
            running.deliveries.append(delivery)
            return
        if self._stopping:
            _settle(delivery, ack=False)
            return
        job = _Job(call, [delivery])
        self._jobs[call.call_id] = job
        self.metrics.in_flight.inc()
        job.deferred = defer.Deferred.fromCoroutine(self._process(job))
        job.deferred.addErrback(self._process_failed, job)

    def _process_failed(self, failure: Failure, job: _Job) -> None:
        if not failure.check(defer.CancelledError):
            self.log.failure("call {call_id}: unexpected error", failure, call_id=job.call.call_id)
        self._settle_job(job, ack=False)

    def _settle_job(self, job: _Job, ack: bool) -> None:
        """Ack or requeue every delivery of the job, once; the job stops being in flight first,
        so a requeued message that comes straight back starts a job of its own."""
        if job.settled:
            return
        job.settled = True
        if self._jobs.get(job.call.call_id) is job:
            del self._jobs[job.call.call_id]
            self.metrics.in_flight.dec()
        for delivery in job.deliveries:
            _settle(delivery, ack)

    async def _process(self, job: _Job) -> None:
        call = job.call
        try:
            await self._execute(call, job.deliveries[0])
        except StoreUnavailable as e:
            await self._give_back(job, "store", f"store unavailable: {e}")
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure("call {call_id}: handling failed", call_id=call.call_id)
            await self._give_back(job, "error", "unexpected error")
        else:
            self._failures = 0
            self._settle_job(job, ack=True)
        finally:
            if not job.settled:
                self._settle_job(job, ack=False)

    async def _give_back(self, job: _Job, reason: str, why: str) -> None:
        delay = self._delay(self._failures)
        self._failures += 1
        self.log.warn(
            "call {call_id}: {why}; giving it back to the queue in {delay:g}s",
            call_id=job.call.call_id,
            why=why,
            delay=delay,
        )
        if not self._stopping:
            await task.deferLater(self._clock, delay, lambda: None)
        self.metrics.requeued.labels(reason).inc()
        self._settle_job(job, ack=False)

    def _delay(self, failures: int) -> float:
        return min(self.config.retry_delay * 2 ** min(failures, 30), self.config.max_retry_delay)

    async def _execute(self, call: Call, delivery: Delivery) -> None:
        record = await self._store.get_call(call.call_id)
        if record is None:
            self.log.warn("call {call_id}: no record in the store; creating one", call_id=call.call_id)
            record = CallRecord.for_call(call)
        if record.final:
            self.metrics.skipped.inc()
            self.log.info(
                "call {call_id}: already {status}; not running it again",
                call_id=call.call_id,
                status=record.status,
            )
            await self._callback(call, record, None)
            return
        if record.status == CallStatus.RUNNING:
            self.log.info(
                "call {call_id}: attempt {n} was interrupted (delivery {count}); running it again",
                call_id=call.call_id,
                n=record.attempts,
                count=delivery.delivery_count,
            )
        spec = await self._store.get_function(call.function)
        started = self._clock.seconds()
        record = attrs.evolve(
            record,
            status=CallStatus.RUNNING,
            started_at=started,
            attempts=record.attempts + 1,
            finished_at=None,
            duration=None,
            status_code=None,
            error=None,
        )
        await self._store.put_call(record)
        response = await self._invoke(call, spec)
        finished = self._clock.seconds()
        duration = max(0.0, finished - started)
        limit = self.config.max_result_size
        result = CallResult(
            status_code=response.status_code,
            headers=to_str_pairs(response.headers),
            body=response.body[:limit],
            truncated=len(response.body) > limit,
        )
        record = attrs.evolve(
            record,
            status=outcome_status(response.status_code),
            status_code=response.status_code,
            finished_at=finished,
            duration=duration,
            error=response.error,
        )
        await self._patiently(call, lambda: self._store.put_result(call.call_id, result))
        await self._patiently(call, lambda: self._store.put_call(record))
        self.metrics.calls.labels(call.function, record.status).inc()
        self.metrics.duration.labels(call.function).observe(duration)
        self.log.info(
            "call {call_id}: {function} -> {status} ({code}) in {duration:.3f}s",
            call_id=call.call_id,
            function=call.function,
            status=record.status,
            code=response.status_code,
            duration=duration,
        )
        await self._callback(call, record, response)

    async def _patiently(self, call: Call, write: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Retry a write of a finished call while the store is down, up to RECORD_PATIENCE."""
        deadline = self._clock.seconds() + RECORD_PATIENCE
        attempt = 0
        while True:
            try:
                await write()
                return
            except StoreUnavailable as e:
                delay = self._delay(attempt)
                attempt += 1
                if self._clock.seconds() + delay > deadline:
                    raise
                self.log.warn(
                    "call {call_id}: cannot record the outcome ({error}); retrying in {delay:g}s",
                    call_id=call.call_id,
                    error=e,
                    delay=delay,
                )
                await task.deferLater(self._clock, delay, lambda: None)

    async def _callback(self, call: Call, record: CallRecord, response: FunctionResponse | None) -> None:
        url = record.callback_url or call.callback_url
        if not url or record.callback_state == "delivered":
            return
        if response is None:
            # A redelivery of a finished call: send what the store kept (the body may be cut short).
            stored = await self._store.get_result(call.call_id)
            if stored is None:
                stored = CallResult(record.status_code or 502)
            response = FunctionResponse(stored.status_code, to_bytes_pairs(stored.headers), stored.body)
        outcome = await self._callbacks.deliver(
            Callback(
                url=url,
                call_id=call.call_id,
                function=call.function,
                status_code=response.status_code,
                headers=response.headers,
                body=response.body,
                duration=record.duration or 0.0,
            )
        )
        self.metrics.callbacks.labels(outcome.state).inc()
        record = attrs.evolve(
            record,
            callback_url=url,
            callback_state=outcome.state,
            callback_attempts=record.callback_attempts + 1,
            callback_status=outcome.status,
        )
        await self._patiently(call, lambda: self._store.put_call(record))

    # --- invoking ------------------------------------------------------------------------------

    def timeout_for(self, spec: FunctionSpec) -> float:
        """The function's own timeout, else the default; never above what the consumer timeout allows."""
        try:
            timeout = spec.timeout or self.config.exec_timeout
        except ValidationError as e:
            self.log.warn("function {name}: {error}; using the default timeout", name=spec.service, error=e)
            timeout = self.config.exec_timeout
        limit = self.config.exec_timeout_limit
        if timeout > limit:
            self.log.warn(
                "function {name}: timeout {t:g}s is above what --consumer-timeout allows; using {limit:g}s",
                name=spec.service,
                t=timeout,
                limit=limit,
            )
            timeout = limit
        return timeout

    def url_for(self, call: Call, spec: FunctionSpec) -> bytes:
        path = quote(call.path or "/", safe=_URL_SAFE)
        if not path.startswith("/"):
            path = "/" + path
        if self.config.gateway_url:
            base = f"{self.config.gateway_url}/function/{call.function}"
            url = base if path == "/" else base + path
        else:
            url = spec.base_url(self.config.function_url_template) + path
        if call.query:
            url += "?" + quote(call.query, safe=_QUERY_SAFE)
        return url.encode("ascii")

    async def _invoke(self, call: Call, spec: FunctionSpec | None) -> FunctionResponse:
        if spec is None:
            text = f"function {call.function!r} not found (deleted after the call was queued?)"
            return FunctionResponse(404, list(_TEXT), text.encode() + b"\n", text)
        timeout = self.timeout_for(spec)
        headers = end_to_end(to_bytes_pairs(call.headers), drop=_REQUEST_DROP)
        headers.append((CALL_ID, call.call_id.encode("latin-1")))
        method = call.method.upper().encode("ascii")
        body: bytes | None = call.body
        if not call.body and method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
            body = None
        try:
            url = self.url_for(call, spec)
        except (UnicodeEncodeError, KeyError, IndexError, ValueError) as e:
            text = f"cannot build the URL of function {call.function!r}: {e}"
            return FunctionResponse(502, list(_TEXT), text.encode() + b"\n", text)
        d = fetch(self._agent, method, url, headers, body)
        d.addTimeout(timeout, self._clock)
        try:
            raw = await d
        except defer.TimeoutError:
            text = f"function {call.function!r} did not answer within its exec_timeout ({timeout:g}s)"
            return FunctionResponse(504, list(_TEXT), text.encode() + b"\n", text)
        except defer.CancelledError:
            raise
        except Exception as e:
            text = f"function {call.function!r} unreachable: {describe(e)}"
            return FunctionResponse(502, list(_TEXT), text.encode() + b"\n", text)
        return FunctionResponse(raw.code, raw.headers, raw.body)


def _settle(delivery: Delivery, ack: bool) -> None:
    """Ack or requeue; a delivery whose channel is gone is already back on the queue."""
    try:
        if ack:
            delivery.ack()
        else:
            delivery.nack(requeue=True)
    except Exception as e:
        WorkerService.log.warn(
            "call {call_id}: could not {what} the message: {error}",
            call_id=delivery.call.call_id,
            what="ack" if ack else "requeue",
            error=e,
        )
