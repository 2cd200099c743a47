"""The call queue on RabbitMQ: a ``CallQueue`` and a Twisted service.

:class:`AMQPQueue` ties together one :class:`~.connection.Connection`, the queues it declares
on every connection (:mod:`.topology`), confirmed publishes (:mod:`.publisher`) and one
:class:`~.consumer.Consumer` per ``consume()`` call.  As a child of a process's service tree it
starts connecting when the tree starts and drains and closes when the tree stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txfaas.config import AMQPURL
from txfaas.model import Call
from txfaas.queue import DeliveryHandler, QueueRefused, QueueUnavailable
from txfaas.queue.amqp.connection import Connection, describe
from txfaas.queue.amqp.consumer import Consumer, ConsumerContext
from txfaas.queue.amqp.publisher import Publisher, Publishing
from txfaas.queue.amqp.topology import Declarations, Topology
from txfaas.retry import pick_tier


class AMQPQueue(Service):
    """Implements ``txfaas.queue.CallQueue`` on RabbitMQ.

    ``start()`` (or ``startService``) returns at once and connects in the background, so a
    process can start while the broker is down; ``ready(timeout)`` waits for a usable
    connection.  ``endpoint`` replaces the connection to ``url.host:url.port`` (tests point it
    at a TCP proxy); ``url`` still gives credentials, vhost and heartbeat.  With a
    :class:`Topology` (the worker's) it also declares what retries and dead letters need, and
    ``publish_delayed``/``dead_letter`` use it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: AMQPURL,
        *,
        declare: Sequence[str] = ("faas-request",),
        queue_type: str = "quorum",
        confirm_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        retry_policy: Callable[[int], float] | None = None,
        endpoint: Any = None,
        connection_name: str = "txfaas",
        topology: Topology | None = None,
    ) -> None:
        self._reactor = reactor
        self._connection = Connection(
            reactor,
            url,
            prepare=self._prepare,
            connected=self._connected,
            lost=self._lost,
            connect_timeout=connect_timeout,
            retry_policy=retry_policy,
            endpoint=endpoint,
            name=connection_name,
        )
        self._declarations = Declarations(self._connection, declare, queue_type=queue_type, topology=topology)
        self._publishing = Publishing(reactor, self._connection, confirm_timeout)
        self._topology = topology
        self._consumers: list[Consumer] = []
        self._closed: Deferred | None = None
        self._context = ConsumerContext(
            clock=reactor,
            timeout=connect_timeout,
            retry_delay=self._connection.retry_delay,
            connection=lambda: self._connection.current,
            declare=self._declarations.declare,
            publish_raw=self._publishing.publish,
            topology=topology,
        )

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while there is a connection with a usable publishing channel."""
        return self._publishing.live() is not None

    @property
    def queues(self) -> list[str]:
        """The queue names declared on every (re)connection."""
        return list(self._declarations.queues)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background and return at once (never fails on a down broker)."""
        if self._connection.closing:
            raise QueueUnavailable("the queue is closed")
        self._connection.start()

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self.start())
        d.addErrback(lambda f: self.log.failure("AMQP queue failed to start", f))

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    async def ready(self, timeout: float) -> None:
        """Wait for a usable connection; :class:`QueueUnavailable` after ``timeout`` seconds."""
        await self._publishing.usable(timeout)

    async def ping(self) -> None:
        if not self.connected:
            raise QueueUnavailable(f"not connected to the broker ({self._connection.last_error})")

    async def close(self) -> None:
        """Stop consuming and reconnecting, let the publishes in flight get their confirms,
        then close the connection (unacked messages go back to their queues)."""
        if self._closed is None:
            self._closed = Deferred.fromCoroutine(self._close())
            self._closed.addErrback(lambda f: self.log.failure("closing the AMQP queue failed", f))
        # Every caller waits on its own Deferred for the same closing.
        done: Deferred = Deferred()

        def finished(result: object) -> object:
            done.callback(None)
            return result

        self._closed.addCallback(finished)
        await done

    async def _close(self) -> None:
        self._connection.closing = True  # nothing reconnects, nothing new waits for a connection
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.deactivate()
        await self._publishing.drain()
        self._publishing.close()
        await self._connection.close()

    # -- connections -------------------------------------------------------------------------

    async def _prepare(self, conn: Any) -> Publisher:
        publisher = await self._publishing.open(conn)
        await self._declarations.declare_all(conn)
        return publisher

    def _connected(self, conn: Any, publisher: Publisher) -> None:
        self._publishing.install(conn, publisher)
        self.log.info("connected to the AMQP broker; queues {queues}", queues=self._declarations.queues)
        for consumer in list(self._consumers):
            consumer.start(conn)

    def _lost(self, conn: Any, reason: BaseException) -> None:
        self._publishing.lost()

    # -- declaring ---------------------------------------------------------------------------

    async def declare(self, queue: str) -> None:
        """Make sure the durable queue exists, now and after every reconnection (unless the
        broker refuses it: :class:`QueueRefused`, and it is not asked for again)."""
        declarations = self._declarations
        declarations.remember(queue)
        await self._publishing.usable(self._connection.connect_timeout)
        try:
            await declarations.declare(self._connection.current, queue)
        except QueueRefused:
            declarations.forget(queue)
            raise
        except QueueUnavailable:
            raise
        except Exception as e:
            raise QueueUnavailable(f"cannot declare queue {queue!r}: {describe(e)}") from None

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, call: Call) -> None:
        """Persist ``call`` on ``call.queue``; returns once the broker confirmed it.

        The whole call (waiting for a connection, then for the confirm) is bounded by
        ``confirm_timeout``; every failure is :class:`QueueUnavailable`."""
        await self._publishing.publish(call.call_id, "", call.queue, call)

    async def publish_delayed(self, call: Call, delay: float) -> float:
        """Put ``call`` on ``call.queue`` after about ``delay`` seconds, through a delay tier.

        Returns the tier's delay (the largest not above ``delay``), or 0 when the wait is
        too short for any tier and the call was published at once."""
        topology = self._need_topology()
        tier = pick_tier(topology.delay_tiers, delay)
        if tier is None:
            await self.publish(call)
            return 0.0
        await self._publishing.publish(call.call_id, topology.tier_name(tier), call.queue, call)
        return tier

    async def dead_letter(self, call: Call) -> None:
        """Put ``call`` (its ``dead`` mark set) on the dead-letter queue, confirmed."""
        topology = self._need_topology()
        await self._publishing.publish(call.call_id, "", topology.dead_letter_queue, call)

    def _need_topology(self) -> Topology:
        if self._topology is None:
            raise QueueUnavailable("this queue was built without a retry/dead-letter topology")
        return self._topology

    # -- consuming ---------------------------------------------------------------------------

    def consume(self, queues: Sequence[str], prefetch: int, handler: DeliveryHandler) -> None:
        """Deliver from ``queues`` to ``handler``, at most ``prefetch`` unsettled at once.

        Returns at once; consuming starts when connected and resumes after every loss."""
        if self._connection.closing:
            raise QueueUnavailable("the queue is closed")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        for queue in queues:
            self._declarations.remember(queue)
        consumer = Consumer(self._context, list(queues), prefetch, handler)
        self._consumers.append(consumer)
        if self._connection.is_open():
            consumer.start(self._connection.current)

    async def stop_consuming(self, queues: Sequence[str] | None = None) -> None:
        if queues is None:
            consumers, self._consumers = self._consumers, []
        else:
            consumers = [c for c in self._consumers if set(c.queues) & set(queues)]
            self._consumers = [c for c in self._consumers if c not in consumers]
        for consumer in consumers:
            await consumer.stop()
