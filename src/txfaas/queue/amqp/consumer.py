"""Consuming: one channel per ``consume()`` call, restarted whenever it is lost.

A channel the broker closes (consumer timeout, queue deleted, access refused) or a lost
connection is logged, and consuming resumes by itself with backoff (declare, qos, consume).
A consumer sees its queue only through a :class:`ConsumerContext`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import attrs
import pika.exceptions
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.model import Call, DeadMark, DeadReason
from txfaas.queue import DeliveryHandler, QueueUnavailable
from txfaas.queue.amqp.connection import close_quietly, describe
from txfaas.queue.amqp.topology import CALL_HEADER, Topology

_BROKER_REASONS = {"delivery_limit": DeadReason.DELIVERY_LIMIT, "rejected": DeadReason.REJECTED}


def broker_death(headers: dict[str, Any], call: Call, now: float) -> DeadMark | None:
    """The dead mark of a message the broker dead-lettered (from its newest ``x-death`` entry)."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    death = deaths[0]
    reason = death.get("reason")
    if isinstance(reason, bytes):
        reason = reason.decode("latin-1")
    if not isinstance(reason, str) or reason == "expired":
        return None  # a retry back from its delay tier, not a dead letter
    when = death.get("time")
    at = when.timestamp() if isinstance(when, datetime) else now
    queue = death.get("queue")
    if isinstance(queue, bytes):
        queue = queue.decode("latin-1")
    return DeadMark(
        reason=_BROKER_REASONS.get(reason, reason),
        at=at,
        error=f"dead-lettered by the broker from {queue} ({reason})",
        attempts=call.attempt,
    )


@attrs.frozen
class ConsumerContext:
    """What a consumer needs from its queue, and nothing else."""

    clock: IReactorTime
    #: How long each step of starting to consume may take.
    timeout: float
    #: The delay before restart number ``n`` after a failure.
    retry_delay: Callable[[int], float]
    #: The queue's current connection (None while down; it may be closing).
    connection: Callable[[], Any]
    #: Declare a queue on a connection (QueueUnavailable if the broker refuses it).
    declare: Callable[[Any, str], Coroutine[Any, Any, None]]
    #: Publish a raw message (message id, exchange, routing key, (body, properties)), confirmed.
    publish_raw: Callable[[str, str, str, tuple[bytes, Any]], Coroutine[Any, Any, None]]
    topology: Topology | None = None

    def bounded(self, d: Deferred) -> Deferred:
        return d.addTimeout(max(self.timeout, 0.0), self.clock)


@attrs.define(eq=False)
class AMQPDelivery:
    """One message handed to a consumer; implements ``txfaas.queue.Delivery``."""

    call: Call
    redelivered: bool
    delivery_count: int
    _consumer: Consumer = attrs.field(repr=False)
    _channel: Any = attrs.field(repr=False)
    _tag: int = 0
    settled: str | None = None

    def ack(self) -> None:
        self._settle("ack")

    def nack(self, requeue: bool = True) -> None:
        self._settle("requeue" if requeue else "dead")

    def _settle(self, how: str) -> None:
        if self.settled is not None:
            raise RuntimeError(f"delivery of {self.call.call_id} already settled ({self.settled})")
        self.settled = how
        self._consumer.settle(self, how)


class Consumer:
    """One ``consume()`` call: its own channel, restarted whenever it is lost.

    RabbitMQ applies ``basic_qos`` per consumer (quorum queues support no other
    mode), so with several queues the broker may deliver ``prefetch`` from each;
    the extra deliveries wait here, so the handler never holds more than
    ``prefetch`` unsettled deliveries, as with ``MemoryQueue``.
    """

    log = Logger()

    def __init__(
        self, context: ConsumerContext, queues: list[str], prefetch: int, handler: DeliveryHandler
    ) -> None:
        self._context = context
        self.queues = queues
        self.prefetch = prefetch
        self.handler = handler
        self.active = True
        self.channel: Any = None
        self.tags: list[str] = []
        self._tag_queue: dict[str, str] = {}
        self.unsettled = 0
        self._backlog: deque[AMQPDelivery] = deque()
        self._starting = False
        self._pumping = False
        self._failures = 0
        self._restart: Any = None

    def start(self, conn: Any) -> None:
        if not self.active or self._starting or self.channel is not None:
            return
        d = Deferred.fromCoroutine(self._start(conn))
        d.addErrback(
            lambda f: self.log.failure("consumer on {queues} failed to start", f, queues=self.queues)
        )

    async def _start(self, conn: Any) -> None:
        self._starting = True
        context = self._context
        channel = None
        try:
            for queue in self.queues:
                # Again here (a deleted queue comes back), each on its own short-lived channel:
                # a queue that exists with other arguments is refused (logged), yet consumable.
                try:
                    await context.declare(conn, queue)
                except QueueUnavailable:
                    pass
            channel = await context.bounded(conn.channel())
            channel.on_closed.addCallback(self._closed, channel)
            await context.bounded(channel.basic_qos(prefetch_count=self.prefetch))
            if not self.active:
                close_quietly(channel)
                return
            self.channel = channel
            self.tags = []
            for queue in self.queues:
                consumer, tag = await context.bounded(channel.basic_consume(queue=queue))
                self.tags.append(tag)
                self._tag_queue[tag] = queue
                reading = Deferred.fromCoroutine(self._read(channel, consumer))
                reading.addErrback(lambda f: self.log.failure("reading deliveries failed", f))
        except Exception as e:
            if self.channel is channel:
                self.channel = None
            close_quietly(channel)
            if self.active:
                self.log.warn(
                    "could not consume from {queues}: {reason}", queues=self.queues, reason=describe(e)
                )
                self._schedule_restart()
        else:
            if self.channel is channel:
                self.log.info(
                    "consuming {queues} (prefetch {prefetch})", queues=self.queues, prefetch=self.prefetch
                )
        finally:
            self._starting = False

    async def _read(self, channel: Any, consumer: Any) -> None:
        while True:
            try:
                message = await consumer.get()
            except Exception as e:
                self._consumer_ended(channel, e)
                return
            self._on_message(channel, message)

    def _consumer_ended(self, channel: Any, reason: BaseException) -> None:
        if channel is not self.channel or not self.active:
            return
        if isinstance(reason, pika.exceptions.ConsumerCancelled):
            # The broker cancelled us (the queue was deleted, or its leader went away);
            # the channel stays open, so close it: the restart path takes over.
            self.log.warn("the broker cancelled the consumer on {queues}; resuming", queues=self.queues)
            close_quietly(channel)

    def _closed(self, reason: BaseException, channel: Any) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        self.tags = []
        self._backlog.clear()  # the broker requeues them with the channel
        self.unsettled = 0
        if not self.active:
            return
        conn = self._context.connection()
        if conn is None or not conn.is_open:
            # The whole connection went: the reconnection restarts this consumer.
            self.log.info("consumer channel on {queues} lost with the connection", queues=self.queues)
            return
        # Closed by us (after the broker cancelled the consumer, already logged) or by the broker.
        log = self.log.info if isinstance(reason, pika.exceptions.ChannelClosedByClient) else self.log.warn
        log(
            "consumer channel on {queues} closed: {reason}; resuming",
            queues=self.queues,
            reason=describe(reason),
        )
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._restart is not None and self._restart.active():
            return
        self._failures += 1
        delay = self._context.retry_delay(self._failures)
        self._restart = self._context.clock.callLater(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart = None
        conn = self._context.connection()
        if conn is not None and conn.is_open:
            self.start(conn)

    def _on_message(self, channel: Any, message: Any) -> None:
        method, properties = message.method, message.properties
        if channel is not self.channel or not self.active:
            # Arrived after stop_consuming: hand it straight back.
            self._reject(channel, method.delivery_tag, requeue=True)
            return
        self._failures = 0
        headers = properties.headers or {}
        queue = self._tag_queue.get(method.consumer_tag, method.routing_key)
        try:
            call = Call.decode(headers[CALL_HEADER], message.body)
        except Exception as e:
            reason = describe(e) if not isinstance(e, KeyError) else f"no {CALL_HEADER} header"
            placeholder = self._undecodable(channel, message, queue, reason)
            if placeholder is None:
                return
            call = placeholder
        if call.dead is None:
            dead = broker_death(headers, call, self._context.clock.seconds())
            if dead is not None:
                call = attrs.evolve(call, dead=dead)
        count = headers.get("x-delivery-count")
        if not isinstance(count, int) or isinstance(count, bool):
            count = 1 if method.redelivered else 0
        delivery = AMQPDelivery(call, bool(method.redelivered), count, self, channel, method.delivery_tag)
        self._backlog.append(delivery)
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._backlog and self.unsettled < self.prefetch and self.active:
                delivery = self._backlog.popleft()
                self.unsettled += 1
                try:
                    self.handler(delivery)
                except Exception:
                    self.log.failure("consumer raised on {call_id}", call_id=delivery.call.call_id)
        finally:
            self._pumping = False

    def settle(self, delivery: AMQPDelivery, how: str) -> None:
        channel = delivery._channel
        if channel.is_open:
            try:
                if how == "ack":
                    channel.basic_ack(delivery_tag=delivery._tag)
                else:
                    channel.basic_nack(delivery_tag=delivery._tag, requeue=how == "requeue")
            except Exception:
                self.log.failure("{how} of {call_id} failed", how=how, call_id=delivery.call.call_id)
        else:
            self.log.info(
                "{how} of {call_id} ignored: its channel closed, the broker already requeued it",
                how=how,
                call_id=delivery.call.call_id,
            )
        if channel is not self.channel:
            return
        self.unsettled -= 1
        if self.active:
            self._pump()
        elif self.unsettled <= 0:
            close_quietly(channel)  # stopped and drained: the channel has no more use

    def _undecodable(self, channel: Any, message: Any, queue: str, reason: str) -> Call | None:
        """A message that is not a txfaas call.

        Without a topology it is rejected (dropped, as before).  With one, a work queue's is
        moved to the dead-letter queue as it is (published, confirmed, then acked), and one
        read from the dead-letter queue is handed over as a placeholder call to be kept."""
        method, properties = message.method, message.properties
        topology = self._context.topology
        if topology is None:
            self.log.error(
                "undecodable message {tag} from {queue} ({reason}): rejected without requeue",
                tag=method.delivery_tag,
                queue=queue,
                reason=reason,
            )
            self._reject(channel, method.delivery_tag, requeue=False)
            return None
        now = self._context.clock.seconds()
        message_id = properties.message_id or f"undecodable-{method.delivery_tag}-{int(now * 1000)}"
        if queue == topology.dead_letter_queue:
            return Call(
                call_id=str(message_id),
                function="",
                body=message.body,
                queue=queue,
                dead=DeadMark(DeadReason.UNDECODABLE, now, f"not a txfaas message: {reason}"),
            )
        self.log.error(
            "undecodable message {tag} from {queue} ({reason}): moving it to {dlq}",
            tag=method.delivery_tag,
            queue=queue,
            reason=reason,
            dlq=topology.dead_letter_queue,
        )
        d = Deferred.fromCoroutine(
            self._context.publish_raw(
                str(message_id), "", topology.dead_letter_queue, (message.body, properties)
            )
        )

        def moved(_: object) -> None:
            if channel.is_open:
                channel.basic_ack(delivery_tag=method.delivery_tag)

        def failed(f: Any) -> None:
            self.log.warn(
                "could not move undecodable message {tag} to {dlq} ({reason}); it stays in {queue}",
                tag=method.delivery_tag,
                dlq=topology.dead_letter_queue,
                reason=describe(f.value),
                queue=queue,
            )
            self._context.clock.callLater(1.0, self._reject, channel, method.delivery_tag, True)

        d.addCallbacks(moved, failed)
        d.addErrback(lambda f: self.log.failure("moving an undecodable message failed", f))
        return None

    @staticmethod
    def _reject(channel: Any, tag: int, requeue: bool) -> None:
        try:
            if channel.is_open:
                channel.basic_nack(delivery_tag=tag, requeue=requeue)
        except Exception:
            Consumer.log.failure("could not reject delivery {tag}", tag=tag)

    def deactivate(self) -> None:
        self.active = False
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None

    async def stop(self) -> None:
        """Cancel the consumers; deliveries already handed out can still be settled."""
        self.deactivate()
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        for tag in list(self.tags):
            try:
                await self._context.bounded(channel.basic_cancel(tag))
            except Exception as e:
                self.log.warn("could not cancel consumer {tag}: {reason}", tag=tag, reason=describe(e))
        while self._backlog:  # received but never handed out
            self._reject(channel, self._backlog.popleft()._tag, requeue=True)
        if self.unsettled <= 0 and channel is self.channel:
            close_quietly(channel)
