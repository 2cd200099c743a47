"""The worker: consume a queued call, invoke the function, record the outcome, call back, ack.

For each delivery from a work queue, in this order:

1. A retry that came out of a delay tier before its due time (``notBefore``) is
   sent round again for the rest of the wait (see :mod:`txfaas.retry`).
2. Read the call's record.  A message of an older attempt or an older replay
   than the record's is stale (a newer one exists): acked and dropped.  A
   record that is already final (a redelivery of a call that finished, e.g.
   the worker died before its ack) is not run again: only what may be missing
   is redone (its dead letter, a callback never tried).  A ``cancelled`` call
   is acked and never runs.
3. A call older than ``--max-age`` goes to the dead letters (``max_age``).  A
   record found ``running`` for this very attempt means an earlier worker died
   mid-call (an *interruption*): the call runs again (at-least-once), unless it
   was interrupted more than ``--delivery-limit`` times: then it keeps killing
   workers and goes to the dead letters (``delivery_limit``).
4. Record ``running`` (atomically: a cancel that came first wins), invoke the
   function with the queued method, path, query, headers and body, cancelling
   the request (which aborts the TCP connection) at exec_timeout.
   Timeout -> 504; unreachable -> 502; function deleted since queued -> 404.
5. A retry code (and attempts left): publish the next attempt to a delay queue
   (confirmed), then record ``retrying`` with ``nextAttemptAt``, then ack.  The
   wait lives in RabbitMQ, so a worker restart loses nothing.
6. Otherwise store the response (body cut at ``max_result_size``) and the final
   status; attempts exhausted -> also a dead letter (``attempts_exhausted``).
7. Deliver the callback once; a failure worth retrying becomes a *callback job*
   (the function's answer, kept in the message) published to a delay queue for
   the callback queue: the function never runs again for its callback.
8. Ack.  Nothing is acked before its outcome is in the store and everything it
   started (retry, dead letter, callback job) is confirmed by the broker.

Deliveries from the callback queue run steps 1, 2 (their own staleness rule)
and 7.  Deliveries from the dead-letter queue (the worker's own, and any the
broker dead-letters under an operator's policy) are *kept*: written to the
dead-letter store with their reason, the record marked ``dead_lettered``, then
acked.  Every dead letter is published with confirms before its original is
acked: a crash in between makes a duplicate (the store keeps one per call id),
never a loss.

When the store does not answer, a finished call's writes are retried for up to
:data:`RECORD_PATIENCE` seconds (so the function does not run twice); any other
failure gives the message back to the broker (``nack(requeue=True)``) after a
delay that grows with consecutive failures, so a Redis outage does not turn
into a hot loop.  A delivery of a call this process is already running (the
broker redelivers after a channel closed) joins the running call and is settled
with it, instead of running the function a second time.
"""

from __future__ import annotations

import random as _random
from collections import deque
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote, urlsplit

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
from txfaas.invocation_log import InvocationLog
from txfaas.model import (
    Call,
    CallbackJob,
    CallbackState,
    CallRecord,
    CallResult,
    CallStatus,
    DeadLetter,
    DeadMark,
    DeadReason,
    FunctionSpec,
    ValidationError,
    outcome_status,
)
from txfaas.queue import CallQueue, Delivery
from txfaas.retry import DEFAULT_TIERS, CallbackPolicy, RetryConfigError, RetryPolicy, parse_retry_after
from txfaas.store import StoreUnavailable
from txfaas.worker._http import BodyTooLarge, describe, fetch
from txfaas.worker.budget import ByteBudget
from txfaas.worker.callback import Callback, CallbackDelivery
from txfaas.worker.slots import KeyedSlots

#: How long the writes of a finished call are retried while the store is down.
RECORD_PATIENCE = 60.0
#: Safety margin between the longest a message may stay unacked and the broker's consumer timeout.
ACK_MARGIN = 30.0
#: Deliveries from the dead-letter queue handled at once.
KEEPER_PREFETCH = 10
#: How long a callback waits here for a slot of its host before it is parked in the broker.
CALLBACK_WAIT = 1.0

# Request headers the worker sets itself (the body producer sets Content-Length; the
# agent sets Host for the function's own address).
_REQUEST_DROP = frozenset({b"host", b"content-length", CALL_ID.lower()})
_URL_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _URL_SAFE + "?"
_TEXT = [(b"Content-Type", b"text/plain; charset=utf-8")]
# Statuses a starting attempt may replace (a cancel, or a finish, that came first wins).  An
# ``accepting`` claim is one whose gateway had the broker's confirm but did not record it.
_STARTABLE = frozenset({CallStatus.ACCEPTING, CallStatus.QUEUED, CallStatus.RETRYING, CallStatus.RUNNING})

CALL, CALLBACK, DEAD = "call", "callback", "dead"


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
    #: Function retries (``--max-attempts``, ``--retry-*``); functions' annotations override it.
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    #: Callback retries (``--callback-max-attempts``, ``--callback-max-age``, ...).
    callback_retry: CallbackPolicy = attrs.field(factory=CallbackPolicy)
    #: A call older than this when picked up goes to the dead letters.
    max_age: float = 6 * 3600.0
    #: Interruptions (the worker died mid-call) a call survives before it is dead-lettered.
    delivery_limit: int = 5
    callback_queue: str = "txfaas.callbacks"
    dead_letter_queue: str = "txfaas.dead-letter"
    #: The broker's delay tiers: a retry arriving less than half the smallest early runs now.
    delay_tiers: tuple[float, ...] = DEFAULT_TIERS
    #: Callback deliveries at once (the callback queue's prefetch), apart from --max-inflight.
    callback_concurrency: int = 200
    #: Of those, at most this many to one destination host.
    callback_host_concurrency: int = 100
    #: Bytes of functions' answers held at once, all jobs together (--max-answer-memory).
    max_answer_memory: int = 64 * 1024 * 1024

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
        names = {"attempts": "--max-attempts", "min_wait": "--retry-min-wait", "max_wait": "--retry-max-wait"}
        try:
            self.retry.check(names)
        except RetryConfigError as e:
            raise ConfigError(e.field, e.problem) from None
        if self.callback_retry.max_attempts < 1:
            raise ConfigError("--callback-max-attempts", "must be at least 1")
        if self.callback_retry.max_wait < self.callback_retry.min_wait:
            raise ConfigError("--callback-max-wait", "must not be below --callback-min-wait")
        if self.delivery_limit < 0:
            raise ConfigError("--delivery-limit", "must not be negative")
        if self.callback_concurrency < 1:
            raise ConfigError("--callback-concurrency", "must be at least 1")
        if self.callback_host_concurrency < 1:
            raise ConfigError("--callback-host-concurrency", "must be at least 1")
        if self.max_answer_memory < 64 * 1024:
            raise ConfigError("--max-answer-memory", "must be at least 64KiB")
        overlap = {self.callback_queue, self.dead_letter_queue} & set(self.queues)
        if overlap or self.callback_queue == self.dead_letter_queue:
            raise ConfigError(
                "--queue", "the work queues, --callback-queue and --dead-letter-queue must all differ"
            )
        return self


class WorkerMetrics:
    """The worker's Prometheus metrics, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "txfaas_worker_calls_in_flight",
            "Calls being handled now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
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
        self.retries = Counter(
            "txfaas_worker_retries",
            "Attempts scheduled again after a retry code, by function.",
            ["function"],
            registry=registry,
        )
        self.callback_retries = Counter(
            "txfaas_worker_callback_retries", "Callback deliveries scheduled again.", registry=registry
        )
        self.callbacks_parked = Counter(
            "txfaas_worker_callbacks_parked",
            "Callbacks put back in the broker for a while: their host had all its slots, or the "
            "answers held filled --max-answer-memory.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "txfaas_worker_dead_letters",
            "Calls sent to the dead-letter queue, by reason.",
            ["reason"],
            registry=registry,
        )
        self.kept = Counter(
            "txfaas_worker_dead_letters_kept",
            "Dead letters written to the dead-letter store, by reason.",
            ["reason"],
            registry=registry,
        )
        self.stale = Counter(
            "txfaas_worker_stale",
            "Messages dropped because a newer attempt, replay or delivery already exists.",
            ["kind"],
            registry=registry,
        )
        self.hops = Counter(
            "txfaas_worker_delay_hops",
            "Retries that arrived before their due time and were sent round again.",
            registry=registry,
        )


@attrs.frozen
class FunctionResponse:
    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    error: str | None = None


@attrs.define
class _Patience:
    """Seconds a job has lost so far to a store that would not take its writes."""

    spent: float = 0.0


_recording: ContextVar[_Patience | None] = ContextVar("txfaas_worker_recording", default=None)


class _NoRoom(Exception):
    """A callback's body does not fit in --max-answer-memory now: give its message back."""


@attrs.define
class _Holding:
    """Bytes of --max-answer-memory a job holds (its function's answer, or its callback's body)."""

    bytes: int = 0


_holding: ContextVar[_Holding | None] = ContextVar("txfaas_worker_holding", default=None)


@attrs.define(eq=False)
class _Job:
    kind: str
    call: Call
    deliveries: list[Delivery]
    deferred: defer.Deferred[None] | None = None
    settled: bool = False
    #: deliveries of other messages of the same call, waiting for this job to be settled
    followers: list[Delivery] = attrs.field(factory=list)
    #: given back at the drain limit: settled by ``_return_all``, not when its work ends
    returning: bool = False


#: The largest answer the worker reads from a function (it is kept in memory and travels in
#: the callback queue's message; RabbitMQ's default largest message is 128 MiB).
MAX_FUNCTION_RESPONSE = 64 * 1024 * 1024


def _job_key(kind: str, call: Call) -> tuple[str, str, bytes]:
    """Which running job a delivery belongs to: only a redelivery of the very same message joins
    one.  The next attempt, a replay or a callback retry of the same call id is a message of its
    own (it differs in its metadata), and must never be acked unrun with the attempt before it."""
    return (kind, call.call_id, call.encode_meta())


class WorkerService(Service):
    """Consumes calls from ``queue``; reads and writes ``store``; invokes functions through ``agent``.

    ``store`` is a ``CallStore``, ``FunctionStore`` and ``DeadLetterStore``.  ``agent`` is
    an ``IAgent`` (only ``tap.py`` builds the real one, with a connection pool sized to
    ``max_inflight``).  ``random`` draws the retry jitter (tests pass a fixed one).
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
        *,
        random: Callable[[], float] = _random.random,
        invocations: InvocationLog | None = None,
    ) -> None:
        self._clock = reactor
        self._invocations = invocations
        self.config = config
        self._queue = queue
        self._store = store
        self._agent = agent
        self._callbacks = callbacks
        self.metrics = metrics
        self._random = random
        self._jobs: dict[tuple[str, str, bytes], _Job] = {}
        self._by_call: dict[tuple[str, str], _Job] = {}  # the latest job of each call
        self._stopping = False
        self._callbacks_stopping = False  # callbacks are taken until the calls have drained
        self._failures = 0
        self._starting: defer.Deferred[None] | None = None
        self._returning: defer.Deferred[None] | None = None  # the give-back at the drain limit
        self._handlers = {CALL: self._execute, CALLBACK: self._execute_callback, DEAD: self._keep}
        self._callback_slots = KeyedSlots(config.callback_host_concurrency)
        self._answers = ByteBudget(config.max_answer_memory, on_free=self._admit)
        self._held_back: deque[Delivery] = deque()  # calls not started while answers fill the budget
        self._callbacks_paused = False  # the callback consumer, stopped while answers fill it
        self._callback_prefetch = config.callback_concurrency
        self._callback_biggest = 0  # the largest callback body seen since the budget was last empty
        self._callback_jobs = 0  # callback-queue deliveries held here (at most its prefetch)

    # --- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = self._callbacks_stopping = False
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
        config = self.config
        # The dead-letter and callback queues first: work may need them as soon as it arrives.
        self._queue.consume([config.dead_letter_queue], KEEPER_PREFETCH, self.handle_dead_letter)
        # Until callbacks show their size: as many as the budget holds at the largest answer.
        self._consume_callbacks(self._prefetch_for(config.max_answer_memory, MAX_FUNCTION_RESPONSE))
        self._queue.consume(list(config.queues), config.max_inflight, self.handle)
        self.log.info(
            "consuming {queues} (max in flight {n}), callbacks from {callbacks} ({c} at once, {h} a host), "
            "dead letters from {dead}",
            queues=",".join(config.queues),
            n=config.max_inflight,
            callbacks=config.callback_queue,
            c=config.callback_concurrency,
            h=config.callback_host_concurrency,
            dead=config.dead_letter_queue,
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
        config = self.config
        await self._stop_consuming([*config.queues, config.dead_letter_queue])
        while self._held_back:  # never started: straight back to the queue
            _settle(self._held_back.popleft(), ack=False)
        limit = None
        if self._jobs:
            self.log.info(
                "draining {n} call(s), for up to {t:g}s", n=len(self._jobs), t=self.config.drain_timeout
            )
            limit = self._clock.callLater(self.config.drain_timeout, self._give_back_all)
            # The calls first: the callbacks they queue as they finish still go out from here.
            await self._drained(lambda job: job.kind != CALLBACK)
        self._callbacks_stopping = True
        await self._stop_consuming([config.callback_queue])
        if self._jobs and limit is None:
            limit = self._clock.callLater(self.config.drain_timeout, self._give_back_all)
        await self._drained(lambda job: True)
        if limit is not None and limit.active():
            limit.cancel()
        if self._returning is not None:
            await self._returning
        if self._invocations is not None:
            await self._invocations.stop()
        for what, close in (("queue", self._queue.close), ("store", getattr(self._store, "close", None))):
            if close is None:
                continue
            try:
                await close()
            except Exception as e:
                self.log.warn("closing the {what}: {error}", what=what, error=e)

    async def _stop_consuming(self, queues: list[str]) -> None:
        try:
            await self._queue.stop_consuming(queues)
        except Exception as e:
            self.log.warn("stop consuming {queues}: {error}", queues=",".join(queues), error=e)

    async def _drained(self, which: Callable[[_Job], bool]) -> None:
        """Wait until no job ``which`` selects is running (or the drain limit gave them back)."""
        while self._returning is None:
            running = [
                job.deferred
                for job in self._jobs.values()
                if job.deferred is not None and not job.deferred.called and which(job)
            ]
            if not running:
                return
            await defer.DeferredList(running, consumeErrors=True)

    def _give_back_all(self) -> None:
        left = [job for job in self._jobs.values() if job.deferred is not None]
        self.log.warn("drain limit reached: giving {n} call(s) back to the queue", n=len(left))
        # Set before the cancels: they end the drain's wait, and the stop must then wait for this.
        returned: defer.Deferred[None] = defer.Deferred()
        self._returning = returned
        for job in left:
            job.returning = True  # settled below, once its record says queued again
            job.deferred.cancel()  # type: ignore[union-attr]
        d = defer.Deferred.fromCoroutine(self._return_all(left))
        d.addErrback(lambda f: self.log.failure("giving calls back failed", f))
        d.addBoth(lambda _: returned.callback(None))

    async def _return_all(self, jobs: list[_Job]) -> None:
        """Record each call given back as ``queued`` again, then hand its message back.

        A worker that stops on purpose did not crash: the next run of the call must not count
        as an interruption toward --delivery-limit, which is what a ``running`` record left
        behind would say.  The record goes first, so the redelivery finds it."""
        await defer.DeferredList(
            [
                defer.Deferred.fromCoroutine(self._requeue_record(job.call))
                for job in jobs
                if job.kind == CALL
            ],
            consumeErrors=True,
        )
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self._hand_back(job)) for job in jobs], consumeErrors=True
        )

    async def _hand_back(self, job: _Job) -> None:
        """Give a job's message back as a fresh copy (confirmed), then ack the original.

        A requeue (nack) would raise the broker's delivery count (quorum queues'
        ``x-delivery-count``), which a broker-side delivery limit (the README's policy) counts as
        a failed delivery; a stop on purpose is none.  If the copy cannot be published, requeue."""
        ack = False
        if job.kind in (CALL, CALLBACK):
            try:
                await self._queue.publish(job.call)
                ack = True
            except Exception as e:
                self.log.warn(
                    "call {call_id}: could not hand the message back as a copy ({error}); requeuing it",
                    call_id=job.call.call_id,
                    error=e,
                )
        self._settle_job(job, ack=ack)

    async def _requeue_record(self, call: Call) -> None:
        try:
            record = await self._store.get_call(call.call_id)
            if record is None or record.status != CallStatus.RUNNING or record.attempts != call.attempt:
                return
            queued = attrs.evolve(record, status=CallStatus.QUEUED, started_at=None)
            found = await self._store.transition_call(
                queued, {CallStatus.RUNNING}, attempts_at_most=call.attempt
            )
        except StoreUnavailable as e:
            self.log.warn(
                "call {call_id}: given back, but its record still says running ({error}): its next "
                "run counts as an interruption",
                call_id=call.call_id,
                error=e,
            )
            return
        if found is None:
            self.log.info("call {call_id}: given back to the queue unfinished", call_id=call.call_id)

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
        """Delivery handler of the work queues: run the call (or join the same call running here)."""
        self._begin(CALL, delivery)

    def handle_callback(self, delivery: Delivery) -> None:
        """Delivery handler of the callback queue: deliver a kept answer again."""
        self._begin(CALLBACK, delivery)

    def handle_dead_letter(self, delivery: Delivery) -> None:
        """Delivery handler of the dead-letter queue: keep the dead letter in the store."""
        self._begin(DEAD, delivery)

    def _begin(self, kind: str, delivery: Delivery) -> None:
        call = delivery.call
        key = _job_key(kind, call)
        running = self._jobs.get(key)
        if running is not None:
            self.log.info(
                "call {call_id}: redelivered while running here; it will be settled with the running call",
                call_id=call.call_id,
            )
            running.deliveries.append(delivery)
            return
        if self._stopping and (kind != CALLBACK or self._callbacks_stopping):
            _settle(delivery, ack=False)
            return
        if kind == CALL and self._answers.full:
            # The answers held fill --max-answer-memory: start no new call until some are
            # released.  The message waits here unacked (durable), and with the prefetch
            # used up the broker sends no more.
            self._held_back.append(delivery)
            return
        earlier = self._by_call.get((kind, call.call_id))
        if earlier is not None and not earlier.settled:
            # Another message of this call (its next attempt, a callback retry) while the one
            # before still records its outcome: it starts once that one is settled, so it reads
            # what that one wrote and neither overwrites the other's record.
            earlier.followers.append(delivery)
            return
        job = _Job(kind, call, [delivery])
        self._jobs[key] = job
        if kind == CALLBACK:
            self._callback_jobs += 1
        self._by_call[(kind, call.call_id)] = job
        self.metrics.in_flight.inc()
        job.deferred = defer.Deferred.fromCoroutine(self._process(job))
        job.deferred.addErrback(self._process_failed, job)

    def _admit(self) -> None:
        """Room in the answer budget again: start the calls held back, while it lasts, and take
        callbacks again (as many at once as the room left holds, at the largest body seen)."""
        while self._held_back and not self._answers.full:
            delivery = self._held_back.popleft()
            if self._stopping:
                _settle(delivery, ack=False)
            else:
                self._begin(CALL, delivery)
        self._tune_callbacks()

    def _tune_callbacks(self) -> None:
        """Resume a paused callback consumer, or raise its prefetch, to what the room left holds
        at the largest body seen since it started (a new consumer; the old one ends)."""
        if self._callbacks_stopping or self._answers.full:
            return
        room = self._answers.capacity - self._answers.held
        if self._callbacks_paused:
            self._callbacks_paused = False
            self._consume_callbacks(self._prefetch_for(room, self._callback_biggest or MAX_FUNCTION_RESPONSE))
        elif self._callback_biggest and self._callback_prefetch < self.config.callback_concurrency:
            prefetch = self._prefetch_for(room, self._callback_biggest)
            if prefetch >= 2 * self._callback_prefetch:
                d = defer.Deferred.fromCoroutine(self._queue.stop_consuming([self.config.callback_queue]))
                d.addErrback(lambda f: self.log.failure("restarting the callback consumer failed", f))
                self._consume_callbacks(prefetch)

    def _prefetch_for(self, room: int, size: int) -> int:
        return max(1, min(self.config.callback_concurrency, room // max(1, size)))

    def _process_failed(self, failure: Failure, job: _Job) -> None:
        if not failure.check(defer.CancelledError):
            self.log.failure("call {call_id}: unexpected error", failure, call_id=job.call.call_id)
        if not job.returning:
            self._settle_job(job, ack=False)

    def _settle_job(self, job: _Job, ack: bool) -> None:
        """Ack or requeue every delivery of the job, once; the job stops being in flight first,
        so a requeued message that comes straight back starts a job of its own."""
        if job.settled:
            return
        job.settled = True
        key = _job_key(job.kind, job.call)
        if self._jobs.get(key) is job:
            del self._jobs[key]
            self.metrics.in_flight.dec()
            if job.kind == CALLBACK:
                self._callback_jobs -= 1
        if self._by_call.get((job.kind, job.call.call_id)) is job:
            del self._by_call[(job.kind, job.call.call_id)]
        for delivery in job.deliveries:
            _settle(delivery, ack)
        for delivery in job.followers:
            self._clock.callLater(0, self._begin, job.kind, delivery)

    async def _process(self, job: _Job) -> None:
        call = job.call
        # Twisted runs each coroutine in a copy of the context: this budget is this job's alone.
        _recording.set(_Patience())
        holding = _Holding()
        _holding.set(holding)
        try:
            try:
                await self._handlers[job.kind](call, job.deliveries[0])
            finally:
                # The answer is no longer needed once the job's work is done (or failed).
                self._answers.release(holding.bytes)
                holding.bytes = 0
                if job.kind == CALLBACK:
                    self._tune_callbacks()
        except StoreUnavailable as e:
            await self._give_back(job, "store", f"store unavailable: {e}")
        except _NoRoom:
            self.metrics.requeued.labels("memory").inc()
            self._settle_job(job, ack=False)
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure("call {call_id}: handling failed", call_id=call.call_id)
            await self._give_back(job, "error", "unexpected error")
        else:
            self._failures = 0
            self._settle_job(job, ack=True)
        finally:
            if not job.settled and not job.returning:
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

    async def _early(self, call: Call) -> bool:
        """A retry that left its delay tier before its due time: send it round again for the rest."""
        left = call.not_before - self._clock.seconds()
        tiers = self.config.delay_tiers
        if left <= 0 or (tiers and left < tiers[0] / 2):
            return False
        tier = await self._queue.publish_delayed(call, left)
        self.metrics.hops.inc()
        self.log.debug(
            "call {call_id}: {left:.3f}s early; waiting {tier:g}s more",
            call_id=call.call_id,
            left=left,
            tier=tier,
        )
        return True

    def _stale(self, kind: str, call: Call, why: str) -> None:
        self.metrics.stale.labels(kind).inc()
        self.log.info("call {call_id}: {why}; dropping this message", call_id=call.call_id, why=why)

    # --- calls ---------------------------------------------------------------------------------

    async def _execute(self, call: Call, delivery: Delivery) -> None:
        if await self._early(call):
            return
        record = await self._store.get_call(call.call_id)
        if record is None:
            self.log.warn("call {call_id}: no record in the store; creating one", call_id=call.call_id)
            record = CallRecord.for_call(call)
        if call.replay < record.replays:
            self._stale(CALL, call, f"replay {call.replay} is older than the record's {record.replays}")
            return
        if call.replay > record.replays:
            # Re-queued from the dead letters, and the record was not reset: this message wins.
            record = CallRecord.for_call(call)
        if record.final:
            await self._redelivered_final(call, record)
            return
        if record.attempts > call.attempt or (
            record.attempts == call.attempt and record.status == CallStatus.RETRYING
        ):
            self._stale(
                CALL, call, f"attempt {call.attempt} is over (record: {record.status} {record.attempts})"
            )
            return
        now = self._clock.seconds()
        if call.accepted_at and now - call.accepted_at > self.config.max_age:
            age = format_duration(round(now - call.accepted_at))
            await self._dead_letter(
                call,
                record,
                DeadReason.MAX_AGE,
                f"attempt {call.attempt} not run: {age} old when picked up "
                f"(--max-age {format_duration(self.config.max_age)})",
            )
            return
        interrupted = record.status == CallStatus.RUNNING and record.attempts == call.attempt
        if interrupted:
            interruptions = record.interruptions + 1
            if interruptions > self.config.delivery_limit:
                await self._dead_letter(
                    call,
                    record,
                    DeadReason.DELIVERY_LIMIT,
                    f"attempt {call.attempt} was cut short {interruptions} times (the worker running it "
                    f"died or lost its broker connection; --delivery-limit {self.config.delivery_limit})",
                )
                return
            self.log.info(
                "call {call_id}: attempt {n} was interrupted ({i} time(s)); running it again",
                call_id=call.call_id,
                n=call.attempt,
                i=interruptions,
            )
        spec = await self._store.get_function(call.function, call.namespace)
        policy = self.retry_policy_for(spec)
        started = self._clock.seconds()
        running = attrs.evolve(
            record,
            status=CallStatus.RUNNING,
            started_at=started,
            attempts=call.attempt,
            max_attempts=policy.max_attempts,
            finished_at=None,
            duration=None,
            status_code=None,
            error=None,
            next_attempt_at=None,
            interruptions=record.interruptions + 1 if interrupted else record.interruptions,
            replays=call.replay,
        )
        # Retried like every other write: a start whose reply was lost (it landed) would otherwise
        # give the message back, and its redelivery would count an interruption that never was.
        found = await self._patiently(
            call,
            lambda: self._store.transition_call(
                running, _STARTABLE, create=True, attempts_at_most=call.attempt
            ),
        )
        if found is not None:
            if found.final:
                await self._redelivered_final(call, found)
            else:
                self._stale(CALL, call, f"the record moved on ({found.status}, attempt {found.attempts})")
            return
        response = await self._invoke(call, spec)
        finished = self._clock.seconds()
        duration = max(0.0, finished - started)
        if self._invocations is not None and spec is not None:
            self._invocations.call(
                spec.service,
                spec.namespace,
                call.call_id,
                b"async",
                call.method,
                call.path,
                response.status_code,
                duration,
                call.attempt,
                response.error,
            )
        limit = self.config.max_result_size
        result = CallResult(
            status_code=response.status_code,
            headers=to_str_pairs(response.headers),
            body=response.body[:limit],
            truncated=len(response.body) > limit,
        )
        self.metrics.duration.labels(call.ref).observe(duration)
        code = response.status_code
        if spec is not None and policy.should_retry(code, call.attempt):
            await self._retry(call, running, response, result, policy, finished, duration)
            return
        # Retries ran out (with --max-attempts 1 there are none: the outcome is just final).
        exhausted = spec is not None and policy.max_attempts > 1 and policy.retryable(code)
        status = CallStatus.DEAD_LETTERED if exhausted else outcome_status(code)
        error = response.error
        if exhausted:
            error = f"{policy.max_attempts} attempt(s), the last answered {code}" + (
                f": {response.error}" if response.error else ""
            )
        record = attrs.evolve(
            running,
            status=status,
            status_code=code,
            finished_at=finished,
            duration=duration,
            error=error,
            dead_reason=DeadReason.ATTEMPTS if exhausted else None,
        )
        # The answer and the outcome in one write: kept only if this run's outcome is.
        found = await self._patiently(
            call,
            lambda: self._store.transition_call(
                record, {CallStatus.RUNNING}, create=True, attempts_at_most=call.attempt, result=result
            ),
        )
        if found is not None and not _same_outcome(found, record):
            self._stale(CALL, call, f"another run already recorded the outcome ({found.status})")
            return
        # (found == this run's record: a write whose reply was lost, e.g. to a paused Redis,
        # landed all the same; the outcome is ours and its callback still to be delivered.)
        self.metrics.calls.labels(call.ref, record.status).inc()
        # One line per call: the text is made here with an f-string, and the event's format
        # has a single field -- twisted.logger formats with string.Formatter, in Python, which
        # took 3.4 % of the worker's CPU per call with seven fields.  The fields stay in the
        # event for structured (JSON) observers.
        self.log.info(
            "{outcome}",
            outcome=f"call {call.call_id}: {call.ref} -> {record.status} ({code}) in {duration:.3f}s, "
            f"attempt {call.attempt} of {policy.max_attempts}",
            call_id=call.call_id,
            function=call.ref,
            status=record.status,
            code=code,
            duration=duration,
            n=call.attempt,
            m=policy.max_attempts,
        )
        if exhausted:
            await self._send_to_dead_letters(call, DeadReason.ATTEMPTS, record.error, finished)
        await self._callback(call, record, response)

    async def _retry(
        self,
        call: Call,
        running: CallRecord,
        response: FunctionResponse,
        result: CallResult,
        policy: RetryPolicy,
        finished: float,
        duration: float,
    ) -> None:
        """Keep this attempt's answer, publish the next attempt to a delay queue (confirmed), then
        record ``retrying`` (a record write that comes after the next attempt started is refused:
        ``attempts_at_most``).

        The answer is written before the next attempt exists, so that attempt's answer, written
        by whichever worker runs it, always lands after this one and is the one kept."""
        retry_after = parse_retry_after(_header(response.headers, b"retry-after"), finished)
        wait = policy.wait(call.attempt, self._random, retry_after)
        due = finished + wait
        await self._patiently(call, lambda: self._store.put_result(call.call_id, result))
        await self._queue.publish_delayed(
            attrs.evolve(call, attempt=call.attempt + 1, not_before=due, dead=None), wait
        )
        record = attrs.evolve(
            running,
            status=CallStatus.RETRYING,
            status_code=response.status_code,
            finished_at=finished,
            duration=duration,
            error=response.error or f"function answered {response.status_code}",
            next_attempt_at=due,
        )
        await self._patiently(
            call,
            lambda: self._store.transition_call(
                record, {CallStatus.RUNNING}, create=True, attempts_at_most=call.attempt
            ),
        )
        self.metrics.retries.labels(call.ref).inc()
        self.log.info(
            "call {call_id}: {function} answered {code}; attempt {n} of {m} in {wait:.3f}s",
            call_id=call.call_id,
            function=call.ref,
            code=response.status_code,
            n=call.attempt + 1,
            m=policy.max_attempts,
            wait=wait,
        )

    def retry_policy_for(self, spec: FunctionSpec | None) -> RetryPolicy:
        """The worker's retry policy, with the function's ``com.openfaas.retry.*`` annotations."""
        if spec is None:
            return self.config.retry
        try:
            return self.config.retry.for_function(spec.annotations)
        except RetryConfigError as e:
            self.log.warn(
                "function {name}: {error}; using the worker's retry settings", name=spec.service, error=e
            )
            return self.config.retry

    async def _redelivered_final(self, call: Call, record: CallRecord) -> None:
        """A call that finished already: redo only what may be missing, never the call."""
        self.metrics.skipped.inc()
        self.log.info(
            "call {call_id}: already {status}; not running it again",
            call_id=call.call_id,
            status=record.status,
        )
        if record.status == CallStatus.CANCELLED:
            return
        if record.status == CallStatus.DEAD_LETTERED and record.dead_reason != DeadReason.CALLBACK:
            # The worker may have died between recording it and publishing the dead letter.
            await self._send_to_dead_letters(
                call,
                record.dead_reason or DeadReason.ATTEMPTS,
                record.error,
                record.finished_at or self._clock.seconds(),
                attempts=record.attempts,
            )
        if (
            record.dead_reason in (DeadReason.MAX_AGE, DeadReason.DELIVERY_LIMIT)
            and record.status_code is None
        ):
            return  # no answer to call back with
        await self._callback(call, record, None)

    async def _dead_letter(self, call: Call, record: CallRecord, reason: str, error: str) -> None:
        """Record ``dead_lettered`` and publish the call to the dead-letter queue (before the ack).

        A call an earlier attempt of which answered (it was waiting for a retry) still gets
        that answer as its callback; one that never answered gets none."""
        now = self._clock.seconds()
        answered = record.status_code is not None
        pending = record.callback_state in (CallbackState.PENDING, None) and bool(record.callback_url)
        record = attrs.evolve(
            record,
            status=CallStatus.DEAD_LETTERED,
            dead_reason=reason,
            error=error,
            finished_at=now,
            next_attempt_at=None,
            callback_state=(CallbackState.PENDING if answered else CallbackState.FAILED)
            if pending
            else record.callback_state,
            callback_error=record.callback_error
            if answered or not pending
            else "no callback: the call was dead-lettered before it answered",
        )
        found = await self._patiently(
            call, lambda: self._store.transition_call(record, _STARTABLE, create=True)
        )
        if found is not None and not _same_outcome(found, record):
            # Cancelled (or finished) meanwhile: nothing to dead-letter.  (Found equal to this
            # run's record: the write landed, only its reply was lost; the rest is still to do.)
            self._stale(CALL, call, f"the record moved on ({found.status})")
            return
        self.metrics.calls.labels(call.ref, record.status).inc()
        self.log.warn(
            "call {call_id}: dead-lettered ({reason}): {error}",
            call_id=call.call_id,
            reason=reason,
            error=error,
        )
        await self._send_to_dead_letters(call, reason, error, now)
        if answered:
            await self._callback(call, record, None)

    async def _send_to_dead_letters(
        self, call: Call, reason: str, error: str | None, at: float, attempts: int | None = None
    ) -> None:
        mark = DeadMark(reason, at, error, call.attempt if attempts is None else attempts)
        await self._queue.dead_letter(attrs.evolve(call, dead=mark, not_before=0.0))
        self.metrics.dead_letters.labels(reason).inc()

    # --- callbacks -----------------------------------------------------------------------------

    async def _callback(self, call: Call, record: CallRecord, response: FunctionResponse | None) -> None:
        """Queue a finished call's callback (confirmed) on the callback queue, before the call's ack.

        Every delivery is made from the callback queue, with its own concurrency: a slow
        receiver never holds one of the calls' --max-inflight slots.  While the worker drains,
        the first attempt is made here instead."""
        url = record.callback_url or call.callback_url
        if not url or record.callback_state not in (CallbackState.PENDING, None):
            return
        if response is None:
            # A redelivery of a finished call: send what the store kept (the body may be cut short).
            stored = await self._store.get_result(call.call_id)
            if stored is None:
                stored = CallResult(record.status_code or 502)
            response = FunctionResponse(stored.status_code, to_bytes_pairs(stored.headers), stored.body)
        job = CallbackJob(
            status_code=response.status_code,
            headers=to_str_pairs(response.headers),
            duration=record.duration or 0.0,
            attempt=1,
            first_at=self._clock.seconds(),
            retries=max(0, (record.attempts or 1) - 1),
            max_retries=max(0, (record.max_attempts or 1) - 1),
        )
        message = Call(
            call_id=call.call_id,
            function=call.function,
            namespace=call.namespace,
            body=response.body,
            callback_url=url,
            accepted_at=call.accepted_at,
            queue=self.config.callback_queue,
            replay=call.replay,
            callback_job=job,
        )
        if self._stopping:
            # Draining: no new call needs the slot, and a queued callback might not come
            # back to this worker before it stops.  (Still unacked: durable all the same.)
            await self._deliver(message, job, record)
        else:
            await self._queue.publish(message)

    async def _execute_callback(self, call: Call, delivery: Delivery) -> None:
        job = call.callback_job
        if job is None or not call.callback_url:
            self.log.error(
                "call {call_id}: a callback-queue message without a callback; dropped", call_id=call.call_id
            )
            return
        self._hold_callback_body(call)
        if await self._early(call):
            return
        record = await self._store.get_call(call.call_id)
        if record is None:
            record = attrs.evolve(
                CallRecord.for_call(call),
                status=outcome_status(job.status_code),
                status_code=job.status_code,
                duration=job.duration,
            )
        if call.replay < record.replays:
            self._stale(CALLBACK, call, f"replay {call.replay} is older than the record's {record.replays}")
            return
        if call.replay > record.replays:
            # Re-queued from the dead letters, and the record was not reset: this message wins.
            record = attrs.evolve(
                record,
                status=outcome_status(job.status_code),
                status_code=job.status_code,
                error=None,
                callback_state=CallbackState.RETRYING,
                callback_attempts=0,
                dead_reason=None,
                replays=call.replay,
            )
        if record.callback_state in (CallbackState.DELIVERED, CallbackState.FAILED) or (
            record.callback_attempts >= job.attempt
        ):
            self._stale(
                CALLBACK,
                call,
                f"callback attempt {job.attempt} is over (record: {record.callback_state}, "
                f"{record.callback_attempts} attempt(s))",
            )
            return
        host = (urlsplit(call.callback_url).hostname or "").lower()
        slot = self._callback_slots.acquire(host)
        if not slot.called:
            # The host has all its slots: wait a little here (a busy fast receiver frees one
            # soon), unless this is the last delivery the callback queue's prefetch lets in,
            # or the wait is too long: then park it in the broker, so that slow receivers
            # never fill the prefetch and hold up every other host's callbacks.
            if self._callback_jobs >= self._callback_prefetch:
                slot.addErrback(lambda f: f.trap(defer.CancelledError))
                slot.cancel()
                await self._park(call, f"callback host {host} has all its slots")
                return
            slot.addTimeout(CALLBACK_WAIT, self._clock)
            try:
                await slot
            except defer.TimeoutError:
                await self._park(call, f"callback host {host} has all its slots")
                return
        try:
            await self._deliver(call, job, record)
        finally:
            self._callback_slots.release(host)

    def _hold_callback_body(self, call: Call) -> None:
        """Count a callback's body (the answer it carries) in --max-answer-memory, or refuse it.

        Refused (:class:`_NoRoom`): the message goes straight back to the broker, which frees it
        here, and the callback consumer pauses until answers are released; it resumes with a
        prefetch that the room left can hold (see :meth:`_admit`)."""
        size = len(call.body)
        self._callback_biggest = max(self._callback_biggest, size, 1)
        if size > self._answers.capacity:
            return  # from before the bound was lowered: it can never fit, so it is just sent
        if not self._answers.try_reserve(size):
            self._pause_callbacks()
            raise _NoRoom()
        holding = _holding.get()
        if holding is not None:
            holding.bytes += size
        else:
            self._answers.release(size)

    def _pause_callbacks(self) -> None:
        if self._callbacks_paused or self._callbacks_stopping:
            return
        self._callbacks_paused = True
        self.log.info(
            "the answers held fill --max-answer-memory ({n} bytes): taking no callbacks until some are released",
            n=self._answers.capacity,
        )
        d = defer.Deferred.fromCoroutine(self._queue.stop_consuming([self.config.callback_queue]))
        d.addErrback(lambda f: self.log.failure("pausing the callback consumer failed", f))

    def _consume_callbacks(self, prefetch: int) -> None:
        self._callback_prefetch = prefetch
        self._callback_biggest = 0
        self._queue.consume([self.config.callback_queue], prefetch, self.handle_callback)

    async def _park(self, call: Call, why: str) -> None:
        """Put a callback back in the broker for the smallest delay tier (the same attempt)."""
        wait = self.config.delay_tiers[0] if self.config.delay_tiers else 1.0
        await self._queue.publish_delayed(attrs.evolve(call, not_before=self._clock.seconds() + wait), wait)
        self.metrics.callbacks_parked.inc()
        self.log.debug(
            "call {call_id}: {why}; its callback is tried again in {wait:g}s",
            call_id=call.call_id,
            why=why,
            wait=wait,
        )

    async def _deliver(self, message: Call, job: CallbackJob, record: CallRecord) -> None:
        """One callback attempt; then the next one queued, or the end recorded (and dead-lettered)."""
        assert message.callback_url is not None
        outcome = await self._callbacks.deliver(
            Callback(
                url=message.callback_url,
                call_id=message.call_id,
                function=message.ref,
                status_code=job.status_code,
                headers=to_bytes_pairs(job.headers),
                body=message.body,
                duration=job.duration,
                retries=job.retries,
                max_retries=job.max_retries,
            )
        )
        self.metrics.callbacks.labels(outcome.state).inc()
        now = self._clock.seconds()
        changes: dict[str, Any] = {
            "callback_url": message.callback_url,
            "callback_attempts": job.attempt,
            "callback_status": outcome.status,
            "callback_error": outcome.error,
            "callback_next_attempt_at": None,
        }
        policy = self.config.callback_retry
        dead = False
        if record.status == CallStatus.ACCEPTING:
            # A re-queued callback whose gateway did not record the confirm: the call's outcome.
            changes["status"] = outcome_status(job.status_code)
        if outcome.delivered:
            changes["callback_state"] = CallbackState.DELIVERED
        elif outcome.retryable and policy.should_retry(outcome.status, job.attempt, job.first_at, now):
            wait = policy.wait(job.attempt, self._random, job.first_at, now)
            if wait is None:
                dead = True
            else:
                await self._queue.publish_delayed(
                    attrs.evolve(
                        message,
                        callback_job=attrs.evolve(job, attempt=job.attempt + 1),
                        not_before=now + wait,
                        dead=None,
                    ),
                    wait,
                )
                self.metrics.callback_retries.inc()
                self.log.info(
                    "call {call_id}: callback attempt {n} of {m} in {wait:.3f}s",
                    call_id=message.call_id,
                    n=job.attempt + 1,
                    m=policy.max_attempts,
                    wait=wait,
                )
                changes["callback_state"] = CallbackState.RETRYING
                changes["callback_next_attempt_at"] = now + wait
        else:
            dead = outcome.retryable  # attempts or age exhausted; a 410 or a 4xx just stops
        if not outcome.delivered and "callback_state" not in changes:
            changes["callback_state"] = CallbackState.FAILED
        if dead:
            error = f"callback failed {job.attempt} time(s), the last: {outcome.error}"
            changes.update(status=CallStatus.DEAD_LETTERED, dead_reason=DeadReason.CALLBACK, error=error)
            # The dead letter keeps the answer: re-queuing it delivers the callback, never runs the call.
            await self._send_to_dead_letters(message, DeadReason.CALLBACK, error, now, attempts=job.attempt)
        updated = attrs.evolve(record, **changes)
        await self._patiently(message, lambda: self._store.put_call(updated))

    # --- dead letters --------------------------------------------------------------------------

    async def _keep(self, call: Call, delivery: Delivery) -> None:
        """Write a dead letter to the store, mark its record, then (the caller) ack it."""
        mark = call.dead
        if mark is None:
            mark = DeadMark(
                DeadReason.REJECTED, self._clock.seconds(), "in the dead-letter queue, no reason given"
            )
            call = attrs.evolve(call, dead=mark)
        record = await self._store.get_call(call.call_id) if call.function else None
        if record is not None and call.replay < record.replays:
            self._stale(DEAD, call, f"replay {call.replay} was re-queued already (record: {record.replays})")
            return
        await self._store.put_dead_letter(DeadLetter(call))
        self.metrics.kept.labels(mark.reason).inc()
        self.log.info(
            "call {call_id}: kept in the dead letters ({reason})", call_id=call.call_id, reason=mark.reason
        )
        if not call.function:
            return  # not a txfaas message: there is no record to mark
        found = record
        if record is None:
            record = CallRecord.for_call(call)
        if record.status == CallStatus.DEAD_LETTERED and record.dead_reason == mark.reason:
            return
        updated = attrs.evolve(
            record,
            status=CallStatus.DEAD_LETTERED,
            dead_reason=mark.reason,
            error=mark.error or record.error,
            finished_at=record.finished_at or mark.at,
            next_attempt_at=None,
        )
        # Only over the record as read: whoever dead-lettered the call may still be writing its
        # own, fuller record (the callback path publishes first, then records the end).
        await self._store.transition_call(
            updated, {found.status} if found is not None else (), create=found is None
        )

    async def _patiently(self, call: Call, write: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Retry a write of a finished call while the store is down.

        The time lost to failed writes and waits is counted against one RECORD_PATIENCE per
        message, however many writes it makes (start, result, record, callback state): that is
        what ``WorkerConfig.exec_timeout_limit`` budgets, once, below the broker's consumer
        timeout.  A budget per write would need one allowance per write in that sum."""
        budget = _recording.get()
        if budget is None:  # not within a job (a test calling in directly): a budget of its own
            budget = _Patience()
        attempt = 0
        while True:
            began = self._clock.seconds()
            try:
                return await write()
            except StoreUnavailable as e:
                budget.spent += self._clock.seconds() - began
                delay = self._delay(attempt)
                attempt += 1
                if budget.spent + delay > RECORD_PATIENCE:
                    raise
                self.log.warn(
                    "call {call_id}: cannot record the outcome ({error}); retrying in {delay:g}s",
                    call_id=call.call_id,
                    error=e,
                    delay=delay,
                )
                await task.deferLater(self._clock, delay, lambda: None)
                budget.spent += delay

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
            base = f"{self.config.gateway_url}/function/{call.ref}"
            url = base if path == "/" else base + path
        else:
            url = spec.base_url(self.config.function_url_template) + path
        if call.query:
            url += "?" + quote(call.query, safe=_QUERY_SAFE)
        return url.encode("ascii")

    async def _invoke(self, call: Call, spec: FunctionSpec | None) -> FunctionResponse:
        if spec is None:
            text = f"function {call.ref!r} not found (deleted after the call was queued?)"
            return FunctionResponse(404, list(_TEXT), text.encode() + b"\n", text)
        timeout = self.timeout_for(spec)
        try:
            # A queued call can carry what no HTTP request may (a non-ASCII method, say):
            # it fails once, as a 400, rather than coming back until its delivery limit.
            headers = end_to_end(to_bytes_pairs(call.headers), drop=_REQUEST_DROP)
            headers.append((CALL_ID, call.call_id.encode("latin-1")))
            method = call.method.upper().encode("ascii")
            if not method.isalpha():
                raise ValueError(f"invalid method {call.method!r}")
        except (UnicodeEncodeError, ValueError) as e:
            text = f"cannot build the request to function {call.ref!r}: {e}"
            return FunctionResponse(400, list(_TEXT), text.encode() + b"\n", text)
        body: bytes | None = call.body
        if not call.body and method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
            body = None
        try:
            url = self.url_for(call, spec)
        except (UnicodeEncodeError, KeyError, IndexError, ValueError) as e:
            text = f"cannot build the URL of function {call.ref!r}: {e}"
            return FunctionResponse(502, list(_TEXT), text.encode() + b"\n", text)
        limit = min(MAX_FUNCTION_RESPONSE, self._answers.capacity)
        d = fetch(self._agent, method, url, headers, body, limit=limit, budget=self._answers)
        d.addTimeout(timeout, self._clock)
        try:
            raw = await d
        except defer.TimeoutError:
            text = f"function {call.ref!r} did not answer within its exec_timeout ({timeout:g}s)"
            return FunctionResponse(504, list(_TEXT), text.encode() + b"\n", text)
        except defer.CancelledError:
            raise
        except BodyTooLarge:
            text = (
                f"function {call.ref!r} answered more than {limit} bytes, the most a worker "
                f"holds of one answer (--max-answer-memory, at most {MAX_FUNCTION_RESPONSE})"
            )
            return FunctionResponse(502, list(_TEXT), text.encode() + b"\n", text)
        except Exception as e:
            text = f"function {call.ref!r} unreachable: {describe(e)}"
            return FunctionResponse(502, list(_TEXT), text.encode() + b"\n", text)
        holding = _holding.get()
        if holding is not None:
            holding.bytes += raw.reserved
        else:  # not within a job (a test calling in directly): nobody would release it
            self._answers.release(raw.reserved)
        return FunctionResponse(raw.code, raw.headers, raw.body)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


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


def _same_outcome(found: CallRecord, ours: CallRecord) -> bool:
    """Whether the final record found is the one this run wrote (its finish time is this run's)."""
    return (
        found.status == ours.status
        and found.finished_at == ours.finished_at
        and found.attempts == ours.attempts
        and found.status_code == ours.status_code
        and found.dead_reason == ours.dead_reason
    )
