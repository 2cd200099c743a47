"""The worker service: consume queued calls, run them, settle each message once its work is done.

Nothing is acked before its outcome is in the store and everything it started (a retry, a
dead letter, a callback job) is confirmed by the broker.  Deliveries from the work queues are
calls (:mod:`~txfaas.worker.call`), from the callback queue callbacks
(:mod:`~txfaas.worker.callback_jobs`), from the dead-letter queue dead letters to keep
(:mod:`~txfaas.worker.dead_letters`).

The queue and the store are the worker's siblings in the process tree (see ``tap.py``):
started before it and closed after it has drained.  When the store does not answer, a message
is given back to the broker (requeued) after a delay that grows with consecutive failures, so
an outage does not turn into a hot loop.  On stop, the calls drain (callbacks they queue still
go out), then the callbacks; past --drain-timeout the rest are given back.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from txfaas.invocation_log import InvocationLog
from txfaas.queue import CallQueue, Delivery
from txfaas.store import StoreUnavailable
from txfaas.worker.call import CallRuns
from txfaas.worker.callback import CallbackDelivery
from txfaas.worker.callback_jobs import CallbackJobs, NoRoom
from txfaas.worker.config import KEEPER_PREFETCH, WorkerConfig
from txfaas.worker.context import Context
from txfaas.worker.dead_letters import DeadLetters
from txfaas.worker.invoke import Invoker
from txfaas.worker.jobs import CALL, CALLBACK, DEAD, Job, JobTable, job_key, settle
from txfaas.worker.metrics import WorkerMetrics
from txfaas.worker.records import RecordWriter, new_patience

__all__ = ["WorkerConfig", "WorkerMetrics", "WorkerService"]


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
        self.config = config
        self._queue = queue
        self._store = store
        self.metrics = metrics
        self._table = JobTable(
            reactor,
            metrics,
            answer_memory=config.max_answer_memory,
            callback_host_concurrency=config.callback_host_concurrency,
            restart=self._begin,
            on_free=self._admit,
        )
        records = RecordWriter(reactor, store, config)
        context = Context(reactor, config, queue, store, records, metrics, random)
        self._records = records
        self._dead_letters = DeadLetters(context)
        self._callbacks = CallbackJobs(
            context, callbacks, self._dead_letters, self._table, self.handle_callback
        )
        self.invoker = Invoker(reactor, config, agent, self._table)
        self.calls = CallRuns(context, self.invoker, self._callbacks, self._dead_letters, invocations)
        self._handlers = {CALL: self.calls.run, CALLBACK: self._callbacks.run, DEAD: self._dead_letters.keep}
        self._stopping = False
        self._failures = 0  # consecutive messages given back for a failure
        self._returning: defer.Deferred[None] | None = None  # the give-back at the drain limit

    # --- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        """Consume; the queue (a sibling service started before this one) connects on its own."""
        super().startService()
        self._stopping = self._callbacks.draining = self._callbacks.stopping = False
        config = self.config
        # The dead-letter and callback queues first: work may need them as soon as it arrives.
        self._queue.consume([config.dead_letter_queue], KEEPER_PREFETCH, self.handle_dead_letter)
        self._callbacks.start()
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

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop taking messages, drain, give back what is left; the queue and the store stay open
        (the process tree closes them once this has stopped)."""
        self._stopping = self._callbacks.draining = True
        config = self.config
        await self._stop_consuming([*config.queues, config.dead_letter_queue])
        while self._table.held_back:  # never started: straight back to the queue
            settle(self._table.held_back.popleft(), ack=False)
        limit = None
        if len(self._table):
            self.log.info(
                "draining {n} call(s), for up to {t:g}s", n=len(self._table), t=config.drain_timeout
            )
            limit = self._clock.callLater(config.drain_timeout, self._give_back_all)
            # The calls first: the callbacks they queue as they finish still go out from here.
            await self._drained(lambda job: job.kind != CALLBACK)
        self._callbacks.stopping = True
        await self._stop_consuming([config.callback_queue])
        if len(self._table) and limit is None:
            limit = self._clock.callLater(config.drain_timeout, self._give_back_all)
        await self._drained(lambda job: True)
        if limit is not None and limit.active():
            limit.cancel()
        if self._returning is not None:
            await self._returning
        if self.calls.invocations is not None:
            await self.calls.invocations.stop()

    async def _stop_consuming(self, queues: list[str]) -> None:
        try:
            await self._queue.stop_consuming(queues)
        except Exception as e:
            self.log.warn("stop consuming {queues}: {error}", queues=",".join(queues), error=e)

    async def _drained(self, which: Callable[[Job], bool]) -> None:
        """Wait until no job ``which`` selects is running (or the drain limit gave them back)."""
        while self._returning is None:
            running = self._table.running(which)
            if not running:
                return
            await defer.DeferredList(running, consumeErrors=True)

    def _give_back_all(self) -> None:
        left = [job for job in self._table.jobs() if job.deferred is not None]
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

    async def _return_all(self, jobs: list[Job]) -> None:
        """Record each call given back as ``queued`` again, then hand its message back.

        The record goes first, so the redelivery finds it."""
        await _all(
            self._records.given_back(job.call.call_id, job.call.attempt) for job in jobs if job.kind == CALL
        )
        await _all(self._hand_back(job) for job in jobs)

    async def _hand_back(self, job: Job) -> None:
        """Give a job's message back as a fresh copy (confirmed), then ack the original.

        A requeue (nack) would raise the broker's delivery count (quorum queues'
        ``x-delivery-count``), which a broker-side delivery limit counts as a failed delivery;
        a stop on purpose is none.  If the copy cannot be published, requeue."""
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
        self._table.settle(job, ack=ack)

    @property
    def in_flight(self) -> int:
        """Messages being handled now."""
        return len(self._table)

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
        table = self._table
        key = job_key(kind, delivery.call)
        if table.join(key, delivery):
            return
        if self._stopping and (kind != CALLBACK or self._callbacks.stopping):
            settle(delivery, ack=False)
            return
        if kind == CALL and table.answers.full:
            # The answers held fill --max-answer-memory: start no new call until some are
            # released.  The message waits here unacked (durable), and with the prefetch
            # used up the broker sends no more.
            table.held_back.append(delivery)
            return
        job = table.open(key, kind, delivery)
        if job is None:
            return
        job.deferred = defer.Deferred.fromCoroutine(self._process(job))
        job.deferred.addErrback(self._process_failed, job)

    def _admit(self) -> None:
        """Room in the answer budget again: start the calls held back, while it lasts, and take
        callbacks again."""
        held_back = self._table.held_back
        while held_back and not self._table.answers.full:
            delivery = held_back.popleft()
            if self._stopping:
                settle(delivery, ack=False)
            else:
                self._begin(CALL, delivery)
        self._callbacks.tune()

    def _process_failed(self, failure: Failure, job: Job) -> None:
        if not failure.check(defer.CancelledError):
            self.log.failure("call {call_id}: unexpected error", failure, call_id=job.call.call_id)
        if not job.returning:
            self._table.settle(job, ack=False)

    async def _process(self, job: Job) -> None:
        # Twisted runs each coroutine in a copy of the context: these budgets are this job's alone.
        new_patience()
        holding = self._table.hold_answers()
        try:
            try:
                await self._handlers[job.kind](job.call, job.deliveries[0])
            finally:
                self._table.release_answers(holding)
                if job.kind == CALLBACK:
                    self._callbacks.tune()
        except StoreUnavailable as e:
            await self._give_back(job, "store", f"store unavailable: {e}")
        except NoRoom:
            self.metrics.requeued.labels("memory").inc()
            self._table.settle(job, ack=False)
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure("call {call_id}: handling failed", call_id=job.call.call_id)
            await self._give_back(job, "error", "unexpected error")
        else:
            self._failures = 0
            self._table.settle(job, ack=True)
        finally:
            if not job.settled and not job.returning:
                self._table.settle(job, ack=False)

    async def _give_back(self, job: Job, reason: str, why: str) -> None:
        delay = self.config.backoff(self._failures)
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
        self._table.settle(job, ack=False)


async def _all(coroutines: Any) -> None:
    """Run coroutines at once and wait for all of them, whatever each one's end."""
    await defer.DeferredList([defer.Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True)
