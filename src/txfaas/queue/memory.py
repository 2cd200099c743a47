"""In-process queue: for unit tests and the single-process mode (nothing is durable)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.model import Call
from txfaas.queue import DeliveryHandler, QueueUnavailable


@attrs.define(eq=False)
class MemoryDelivery:
    call: Call
    redelivered: bool
    delivery_count: int
    _queue: MemoryQueue
    settled: str | None = None
    #: The consumer it was handed to (prefetch counts per consumer, as RabbitMQ's does).
    _consumer: object = None
    #: The queue it came from (a requeue puts it back there, whatever ``call.queue`` says).
    _source: str | None = None

    def ack(self) -> None:
        self._settle("ack")

    def nack(self, requeue: bool = True) -> None:
        self._settle("requeue" if requeue else "dead")

    def _settle(self, how: str) -> None:
        if self.settled is not None:
            raise RuntimeError(f"delivery of {self.call.call_id} already settled ({self.settled})")
        self.settled = how
        self._queue._unacked.discard(self)
        # Requeue before pumping, so the call is redelivered (first) rather than left waiting.
        if how == "requeue":
            self._queue._requeue(self.call, self.delivery_count + 1, self._source)
        elif how == "dead":
            self._queue.dead_letters.append(self.call)
        self._queue._pump()


class MemoryQueue(Service):
    """Implements ``CallQueue`` in memory, with prefetch, redelivery and a dead-letter list.

    Also a service, as ``AMQPQueue`` is: stopping it is :meth:`close`.

    Set ``available = False`` to make publishing fail as an unreachable broker would.
    Deliveries are made synchronously, from ``publish``/``ack``/``nack``/``consume``: a
    handler may be re-entered while its own code is still settling a delivery (a call
    requeued by ``nack`` comes straight back), which a real broker never does.
    """

    log = Logger()

    def __init__(
        self,
        queues: list[str] | None = None,
        *,
        clock: IReactorTime | None = None,
        dead_letter_queue: str = "txfaas.dead-letter",
    ) -> None:
        self.messages: dict[str, deque[tuple[Call, int]]] = {q: deque() for q in queues or []}
        #: Every call dead-lettered (``dead_letter``) or rejected without requeue, in order.
        self.dead_letters: list[Call] = []
        self.published: list[Call] = []
        #: Delayed publishes: (delay, call), in order.  Without a clock they wait here for ever.
        self.delayed: list[tuple[float, Call]] = []
        self.clock = clock
        self.dead_letter_queue = dead_letter_queue
        self.available = True
        self._consumers: list[tuple[list[str], int, DeliveryHandler]] = []
        self._unacked: set[MemoryDelivery] = set()
        self._pumping = False

    async def start(self) -> None:
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    async def ready(self, timeout: float) -> None:
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")

    async def declare(self, queue: str) -> None:
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")
        self.messages.setdefault(queue, deque())

    async def publish(self, call: Call) -> None:
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")
        if call.queue not in self.messages:
            raise QueueUnavailable(f"no queue named {call.queue!r}")
        self.published.append(call)
        self.messages[call.queue].append((call, 0))
        self._pump()

    async def publish_delayed(self, call: Call, delay: float) -> float:
        """Deliver ``call`` after exactly ``delay`` seconds on the clock (no tiers here)."""
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")
        if call.queue not in self.messages:
            raise QueueUnavailable(f"no queue named {call.queue!r}")
        if delay <= 0:
            await self.publish(call)
            return 0.0
        self.delayed.append((delay, call))
        if self.clock is not None:
            self.clock.callLater(delay, self._arrive, call)
        return delay

    def _arrive(self, call: Call) -> None:
        self.messages.setdefault(call.queue, deque()).append((call, 0))
        self._pump()

    async def dead_letter(self, call: Call) -> None:
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")
        self.dead_letters.append(call)
        self.messages.setdefault(self.dead_letter_queue, deque()).append((call, 0))
        self._pump()

    def consume(self, queues: list[str], prefetch: int, handler: DeliveryHandler) -> None:
        for q in queues:
            self.messages.setdefault(q, deque())
        self._consumers.append((list(queues), prefetch, handler))
        self._pump()

    async def stop_consuming(self, queues: Sequence[str] | None = None) -> None:
        if queues is None:
            self._consumers.clear()
        else:
            self._consumers = [c for c in self._consumers if not set(c[0]) & set(queues)]

    async def ping(self) -> None:
        if not self.available:
            raise QueueUnavailable("memory queue marked unavailable")

    async def close(self) -> None:
        self._consumers.clear()
        for delivery in list(self._unacked):
            delivery.nack(requeue=True)

    def pending(self, queue: str) -> int:
        return len(self.messages.get(queue, ()))

    def _requeue(self, call: Call, count: int, source: str | None = None) -> None:
        self.messages.setdefault(source or call.queue, deque()).appendleft((call, count))

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            progress = True
            while progress:
                progress = False
                for consumer in list(self._consumers):
                    queues, prefetch, handler = consumer
                    mine = sum(1 for d in self._unacked if d._consumer is consumer)
                    for q in queues:
                        if mine >= prefetch or not self.messages[q]:
                            continue
                        call, count = self.messages[q].popleft()
                        delivery = MemoryDelivery(call, count > 0, count, self, consumer=consumer, source=q)
                        self._unacked.add(delivery)
                        mine += 1
                        progress = True
                        try:
                            handler(delivery)
                        except Exception:
                            self.log.failure("consumer raised on {call_id}", call_id=call.call_id)
        finally:
            self._pumping = False
