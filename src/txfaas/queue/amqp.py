"""The call queue on RabbitMQ, through pika's Twisted adapter.

One :class:`AMQPQueue` owns one AMQP connection, kept up by a
``ClientService`` with a backoff policy:

- a publishing channel in confirm mode: ``publish`` resolves when the broker
  confirmed the message, and raises :class:`QueueUnavailable` on a nack, an
  unroutable message (``mandatory``), a lost channel/connection, or no confirm
  within ``confirm_timeout`` (a broker under a memory alarm never confirms).
  Publishes are pipelined: any number may wait for their confirm at once.
- one consuming channel per ``consume()`` call, watched: a channel the broker
  closes (consumer timeout, queue deleted, access refused) or a lost connection
  is logged, and consuming resumes by itself with backoff (declare, qos, consume).
- the queues given at construction, to ``declare`` or to ``consume`` are
  remembered and declared again on every new connection.

With a :class:`Topology` (the worker passes one), it also declares what retries
and dead letters need, and ``publish_delayed``/``dead_letter`` use it:

- ``{prefix}.retry``: a direct exchange; every work queue (and the callback
  queue) is bound to it by its own name.
- one delay tier per TTL: a fanout exchange ``{prefix}.delay.{ms}`` and a quorum
  queue of the same name with ``x-message-ttl: ms``, dead-lettering to
  ``{prefix}.retry`` at-least-once (``x-dead-letter-strategy: at-least-once``,
  which needs ``x-overflow: reject-publish``).  A delayed message is published
  to the tier's exchange *with the target queue's name as routing key*; the
  fanout ignores the key, the tier queue keeps it, and when the TTL expires the
  broker dead-letters the message to ``{prefix}.retry`` with that same key,
  which routes it back to its queue.  If the target is not bound yet, the
  at-least-once strategy keeps the message in the tier until it is.
- the dead-letter queue and the callback queue (plain quorum queues).

Work queues keep their plain arguments (``x-queue-type`` only): adding
``x-delivery-limit``/``x-dead-letter-*`` to a queue that exists without them makes
every declare fail with 406, and gateway and worker would have to agree on them.
The delivery limit is enforced by the worker from the quorum queue's own
``x-delivery-count``; an operator may add a broker-side one with a policy (see
the README), and dead letters the broker makes that way are understood too (their
``x-death`` header gives the reason).

pika's Twisted adapter imports the global reactor, so it is imported only in
:meth:`AMQPQueue.start`; the rest of pika (spec, exceptions) does not.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs
import pika
import pika.exceptions
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from txfaas.config import AMQPURL
from txfaas.model import Call, DeadMark, DeadReason
from txfaas.queue import DeliveryHandler, QueueRefused, QueueUnavailable
from txfaas.queue.frames import FramePublisher
from txfaas.retry import DEFAULT_TIERS, pick_tier
from txfaas.timers import Deadlines

#: The message header carrying the call's metadata (JSON); the body is the raw request body.
CALL_HEADER = "txfaas-call"
_CALL_HEADER_BYTES = CALL_HEADER.encode()
QUEUE_TYPES = ("quorum", "classic")


@attrs.frozen
class Topology:
    """Names and delays of the retry/dead-letter topology (see the module docstring)."""

    prefix: str = "txfaas"
    delay_tiers: tuple[float, ...] = DEFAULT_TIERS
    dead_letter_queue: str = "txfaas.dead-letter"
    callback_queue: str = "txfaas.callbacks"

    @property
    def retry_exchange(self) -> str:
        return f"{self.prefix}.retry"

    def tier_name(self, tier: float) -> str:
        return f"{self.prefix}.delay.{round(tier * 1000)}"

    def tier_arguments(self, tier: float) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": round(tier * 1000),
            "x-dead-letter-exchange": self.retry_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


_BROKER_REASONS = {"delivery_limit": DeadReason.DELIVERY_LIMIT, "rejected": DeadReason.REJECTED}


def _broker_death(headers: dict[str, Any], call: Call, now: float) -> DeadMark | None:
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


def _describe(error: BaseException | None) -> str:
    """A short, one-line reason for logs and 503 bodies."""
    if error is None:
        return "unknown reason"
    if isinstance(error, pika.exceptions.ChannelClosed | pika.exceptions.ConnectionClosed):
        return f"{error.reply_code} {error.reply_text}"
    if isinstance(error, pika.exceptions.AMQPConnectionError) and all(isinstance(a, int) for a in error.args):
        return f"{type(error).__name__} (the AMQP handshake failed)"  # its only argument is an attempt count
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


def _close_quietly(channel: Any) -> None:
    try:
        if channel is not None and channel.is_open:
            channel.close()
    except Exception:  # already closing: nothing to do
        pass


def _abort(conn: Any) -> None:
    transport = getattr(conn, "transport", None)
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None) or transport.loseConnection
    try:
        abort()
    except Exception:  # already gone
        pass


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Wraps the broker endpoint to record why connecting failed (ClientService does not say)."""

    def __init__(self, endpoint: Any, failed: Callable[[BaseException], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred:
        d = self._endpoint.connect(factory)

        def failed(f: Any) -> Any:
            self._failed(f.value)
            return f

        return d.addErrback(failed)

    def __repr__(self) -> str:
        return f"<broker endpoint {self._endpoint!r}>"


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Any:
        return self._build()


class _Publisher:
    """The confirm-mode channel, and the messages the broker returned on it (unroutable)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._returned: Counter[str] = Counter()
        # One write per call, pika's bytes (None: not pika's TwistedChannel; basic_publish then).
        self._frames = FramePublisher.for_channel(channel)

    def publish_call(self, call: Call, meta: bytes, exchange: str, routing_key: str) -> Deferred:
        """Publish ``call`` (mandatory, persistent; ``meta`` its encoded metadata); the
        confirm's Deferred."""
        timestamp = int(call.accepted_at)
        if self._frames is not None:
            return self._frames.publish(
                exchange, routing_key, call.body, call.call_id, timestamp, ((_CALL_HEADER_BYTES, meta),)
            )
        properties = pika.BasicProperties(
            delivery_mode=2,
            message_id=call.call_id,
            timestamp=timestamp,
            headers={CALL_HEADER: meta.decode()},
        )
        return self.publish(exchange, routing_key, call.body, properties)

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Any) -> Deferred:
        """Publish a message as it is (mandatory); the confirm's Deferred."""
        return self.channel.basic_publish(
            exchange=exchange, routing_key=routing_key, body=body, properties=properties, mandatory=True
        )

    def on_return(self, message: Any) -> None:
        self._returned[message.properties.message_id] += 1

    def take_return(self, message_id: str) -> bool:
        """Was this message returned?  (Counts it off.)

        pika pairs a Basic.Return with the lowest delivery tag of the next
        Basic.Ack, which is wrong when the broker acks several messages at
        once; the message id the broker handed back is what tells."""
        if self._returned[message_id] <= 0:
            return False
        self._returned[message_id] -= 1
        if not self._returned[message_id]:
            del self._returned[message_id]
        return True


@attrs.define(eq=False)
class AMQPDelivery:
    """One message handed to a consumer; implements ``txfaas.queue.Delivery``."""

    call: Call
    redelivered: bool
    delivery_count: int
    _consumer: _Consumer = attrs.field(repr=False)
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


class _Consumer:
    """One ``consume()`` call: its own channel, restarted whenever it is lost.

    RabbitMQ applies ``basic_qos`` per consumer (quorum queues support no other
    mode), so with several queues the broker may deliver ``prefetch`` from each;
    the extra deliveries wait here, so the handler never holds more than
    ``prefetch`` unsettled deliveries, as with ``MemoryQueue``.
    """

    log = Logger()

    def __init__(self, owner: AMQPQueue, queues: list[str], prefetch: int, handler: DeliveryHandler) -> None:
        self.owner = owner
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
        channel = None
        timeout = self.owner._connect_timeout
        try:
            for queue in self.queues:
                # Again here (a deleted queue comes back), each on its own short-lived channel:
                # a queue that exists with other arguments is refused (logged), yet consumable.
                try:
                    await self.owner._declare(conn, queue)
                except QueueUnavailable:
                    pass
            channel = await self.owner._bounded(conn.channel(), timeout)
            channel.on_closed.addCallback(self._closed, channel)
            await self.owner._bounded(channel.basic_qos(prefetch_count=self.prefetch), timeout)
            if not self.active or self.owner._closing:
                _close_quietly(channel)
                return
            self.channel = channel
            self.tags = []
            for queue in self.queues:
                consumer, tag = await self.owner._bounded(channel.basic_consume(queue=queue), timeout)
                self.tags.append(tag)
                self._tag_queue[tag] = queue
                reading = Deferred.fromCoroutine(self._read(channel, consumer))
                reading.addErrback(lambda f: self.log.failure("reading deliveries failed", f))
        except Exception as e:
            if self.channel is channel:
                self.channel = None
            _close_quietly(channel)
            if self.active and not self.owner._closing:
                self.log.warn(
                    "could not consume from {queues}: {reason}", queues=self.queues, reason=_describe(e)
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
            _close_quietly(channel)

    def _closed(self, reason: BaseException, channel: Any) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        self.tags = []
        self._backlog.clear()  # the broker requeues them with the channel
        self.unsettled = 0
        if not self.active or self.owner._closing:
            return
        conn = self.owner._conn
        if conn is None or not conn.is_open:
            # The whole connection went: the reconnection restarts this consumer.
            self.log.info("consumer channel on {queues} lost with the connection", queues=self.queues)
            return
        # Closed by us (after the broker cancelled the consumer, already logged) or by the broker.
        log = self.log.info if isinstance(reason, pika.exceptions.ChannelClosedByClient) else self.log.warn
        log(
            "consumer channel on {queues} closed: {reason}; resuming",
            queues=self.queues,
            reason=_describe(reason),
        )
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._restart is not None and self._restart.active():
            return
        self._failures += 1
        delay = self.owner._retry_policy(self._failures)
        self._restart = self.owner._reactor.callLater(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart = None
        conn = self.owner._conn
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
            reason = _describe(e) if not isinstance(e, KeyError) else f"no {CALL_HEADER} header"
            placeholder = self._undecodable(channel, message, queue, reason)
            if placeholder is None:
                return
            call = placeholder
        if call.dead is None:
            dead = _broker_death(headers, call, self.owner._reactor.seconds())
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
            _close_quietly(channel)  # stopped and drained: the channel has no more use

    def _undecodable(self, channel: Any, message: Any, queue: str, reason: str) -> Call | None:
        """A message that is not a txfaas call.

        Without a topology it is rejected (dropped, as before).  With one, a work queue's is
        moved to the dead-letter queue as it is (published, confirmed, then acked), and one
        read from the dead-letter queue is handed over as a placeholder call to be kept."""
        method, properties = message.method, message.properties
        topology = self.owner._topology
        if topology is None:
            self.log.error(
                "undecodable message {tag} from {queue} ({reason}): rejected without requeue",
                tag=method.delivery_tag,
                queue=queue,
                reason=reason,
            )
            self._reject(channel, method.delivery_tag, requeue=False)
            return None
        now = self.owner._reactor.seconds()
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
            self.owner._publish_raw(
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
                reason=_describe(f.value),
                queue=queue,
            )
            self.owner._reactor.callLater(1.0, self._reject, channel, method.delivery_tag, True)

        d.addCallbacks(moved, failed)
        d.addErrback(lambda f: self.log.failure("moving an undecodable message failed", f))
        return None

    @staticmethod
    def _reject(channel: Any, tag: int, requeue: bool) -> None:
        try:
            if channel.is_open:
                channel.basic_nack(delivery_tag=tag, requeue=requeue)
        except Exception:
            _Consumer.log.failure("could not reject delivery {tag}", tag=tag)

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
                await self.owner._bounded(channel.basic_cancel(tag), self.owner._connect_timeout)
            except Exception as e:
                self.log.warn("could not cancel consumer {tag}: {reason}", tag=tag, reason=_describe(e))
        while self._backlog:  # received but never handed out
            self._reject(channel, self._backlog.popleft()._tag, requeue=True)
        if self.unsettled <= 0 and channel is self.channel:
            _close_quietly(channel)


class AMQPQueue(Service):
    """Implements ``txfaas.queue.CallQueue`` on RabbitMQ.  Also a Twisted ``Service``.

    ``start()`` returns at once and connects in the background, so a process can
    start while the broker is down; ``ready(timeout)`` waits for a usable
    connection.  ``endpoint`` replaces the connection to ``url.host:url.port``
    (tests point it at a TCP proxy); ``url`` still gives credentials, vhost,
    heartbeat.
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
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
        self._reactor = reactor
        self._url = url
        self._topology = topology
        extra = (topology.dead_letter_queue, topology.callback_queue) if topology is not None else ()
        self._queues: list[str] = list(dict.fromkeys([*declare, *extra]))
        self._queue_arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._retry_policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=10.0)
        self._endpoint = endpoint
        self._connection_name = connection_name
        self._service: ClientService | None = None
        self._conn: Any = None  # the connection in use, once set up
        self._pub: _Publisher | None = None
        self._protocols: set[Any] = set()  # every connection not yet lost
        self._consumers: list[_Consumer] = []
        self._waiters: list[Deferred] = []
        self._lost_waiters: list[Deferred] = []
        self._attempt = 0
        self._closing = False
        self._closed: Deferred | None = None
        self._last_error = "not connected yet"
        self._deadlines = Deadlines(reactor)

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while there is a connection with a usable publishing channel."""
        return self._live_publisher() is not None

    def _live_publisher(self) -> _Publisher | None:
        # Checked, not just remembered: while pika tears a connection down it fails the
        # pending confirms (whose callers may publish again at once) before it reports
        # the channel and the connection closed.
        pub, conn = self._pub, self._conn
        if pub is None or conn is None or not conn.is_open or not pub.channel.is_open:
            return None
        return pub

    @property
    def queues(self) -> list[str]:
        """The queue names declared on every (re)connection."""
        return list(self._queues)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background and return at once (never fails on a down broker)."""
        if self._service is not None:
            return
        if self._closing:
            raise QueueUnavailable("the queue is closed")
        endpoint = self._endpoint if self._endpoint is not None else self._default_endpoint()
        watched: Any = _WatchedEndpoint(endpoint, self._connect_failed)
        factory: Any = _ConnectionFactory(self._new_protocol)
        self._service = ClientService(watched, factory, retryPolicy=self._next_delay, clock=self._reactor)
        self._service.startService()

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self.start())
        d.addErrback(lambda f: self.log.failure("AMQP queue failed to start", f))

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    async def ready(self, timeout: float) -> None:
        """Wait for a usable connection; :class:`QueueUnavailable` after ``timeout`` seconds."""
        await self._usable(timeout)

    async def ping(self) -> None:
        if not self.connected:
            raise QueueUnavailable(f"not connected to the broker ({self._last_error})")

    async def close(self) -> None:
        """Stop consuming and reconnecting, close the connection (unacked messages go back)."""
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
        self._closing = True
        for consumer in self._consumers:
            consumer.deactivate()
        self._consumers = []
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(QueueUnavailable("the queue is closed"))
        conn = self._conn
        if conn is not None and conn.is_open:
            lost: Deferred = Deferred()
            self._lost_waiters.append(lost)
            try:
                conn.close()
                await self._bounded(lost, self._connect_timeout)
            except Exception as e:
                self.log.warn("AMQP connection did not close cleanly: {reason}", reason=_describe(e))
                _abort(conn)
        if self._service is not None:
            stopping = self._service.stopService()
            try:
                await self._bounded(stopping, self._connect_timeout)
            except Exception:
                for protocol in list(self._protocols):
                    _abort(protocol)
        self._deadlines.stop()
        self._conn = None
        self._pub = None

    # -- connections -------------------------------------------------------------------------

    def _default_endpoint(self) -> Any:
        endpoint: Any = HostnameEndpoint(
            self._reactor, self._url.host, self._url.port, timeout=self._connect_timeout
        )
        if self._url.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self._url.host), endpoint)
        return endpoint

    def _parameters(self) -> Any:
        return pika.ConnectionParameters(
            host=self._url.host,
            port=self._url.port,
            virtual_host=self._url.vhost,
            credentials=pika.PlainCredentials(self._url.username, self._url.password),
            heartbeat=self._url.heartbeat,
            client_properties={"connection_name": self._connection_name},
        )

    def _next_delay(self, _attempt: int) -> float:
        # Our own count: ClientService resets its own on every TCP connection, even one
        # whose AMQP handshake then fails, which would retry a refusing broker at full speed.
        self._attempt += 1
        return self._retry_policy(self._attempt)

    def _connect_failed(self, error: BaseException) -> None:
        self._last_error = f"cannot reach the broker: {_describe(error)}"
        if self._closing:
            return
        log = self.log.warn if self._attempt == 0 else self.log.info
        log("{error}; retrying", error=self._last_error)

    def _new_protocol(self) -> Any:
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        conn = TwistedProtocolConnection(self._parameters(), custom_reactor=self._reactor)
        self._attach(conn)
        return conn

    def _attach(self, conn: Any) -> None:
        """Set up a new connection once its handshake is done (tests pass fake connections here)."""
        self._protocols.add(conn)
        d = Deferred.fromCoroutine(self._setup(conn))
        d.addErrback(lambda f: self.log.failure("AMQP connection setup crashed", f))

    async def _setup(self, conn: Any) -> None:
        # The handshake is awaited here rather than in ClientService's prepareConnection:
        # a prepareConnection that fails while the TCP connection is up (refused login,
        # handshake timeout) leaves ClientService in a state where the later disconnect
        # raises automat's NoTransition.  So ClientService sees a plain TCP connection,
        # and a setup that fails or takes too long aborts it: ClientService retries.
        ready = conn.ready
        timed_out: list[bool] = []
        timer = self._reactor.callLater(self._connect_timeout, self._setup_timed_out, conn, timed_out)
        try:
            await ready
            closed = conn.closed  # .closed fires once and becomes None: keep this one
            closed.addCallback(self._connection_lost, conn)
            publisher = await self._open_publisher(conn)
            if self._topology is not None:
                await self._declare_topology(conn, self._topology)
            for queue in list(self._queues):
                try:
                    await self._declare(conn, queue)
                except QueueUnavailable:
                    pass  # refused by the broker (logged); the connection stays usable for the others
        except Exception as e:
            self._protocols.discard(conn)
            if not self._closing:
                why = f"not ready within {self._connect_timeout:g}s" if timed_out else _describe(e)
                self._last_error = f"AMQP connection setup failed: {why}"
                self.log.warn("{error}; retrying", error=self._last_error)
            _abort(conn)
            return
        finally:
            if timer.active():
                timer.cancel()
        if self._closing:
            conn.close()
            return
        self._conn = conn
        self._install_publisher(conn, publisher)
        self._attempt = 0
        self._last_error = "connected"
        self.log.info("connected to the AMQP broker; queues {queues}", queues=self._queues)
        for consumer in list(self._consumers):
            consumer.start(conn)

    def _setup_timed_out(self, conn: Any, timed_out: list[bool]) -> None:
        timed_out.append(True)
        _abort(conn)

    def _connection_lost(self, reason: BaseException, conn: Any) -> None:
        self._protocols.discard(conn)
        if self._conn is conn:
            self._conn = None
            self._pub = None
            if self._closing:
                self.log.info("AMQP connection closed")
            else:
                self._last_error = f"connection lost: {_describe(reason)}"
                self.log.warn("AMQP connection lost ({reason}); reconnecting", reason=_describe(reason))
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _open_publisher(self, conn: Any) -> _Publisher:
        channel = await self._bounded(conn.channel(), self._connect_timeout)
        try:
            await self._bounded(channel.confirm_delivery(), self._connect_timeout)
        except Exception:
            _close_quietly(channel)
            raise
        publisher = _Publisher(channel)
        channel.add_on_return_callback(publisher.on_return)
        return publisher

    def _install_publisher(self, conn: Any, publisher: _Publisher) -> None:
        self._pub = publisher
        publisher.channel.on_closed.addCallback(self._publisher_closed, conn, publisher)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _publisher_closed(self, reason: BaseException, conn: Any, publisher: _Publisher) -> None:
        if self._pub is not publisher:
            return
        self._pub = None
        if self._closing or self._conn is not conn or not conn.is_open:
            return  # the connection went with it: the reconnection brings a new one
        self.log.warn("publishing channel closed: {reason}; reopening", reason=_describe(reason))
        d = Deferred.fromCoroutine(self._reopen_publisher(conn))
        d.addErrback(lambda f: self.log.failure("reopening the publishing channel crashed", f))

    async def _reopen_publisher(self, conn: Any) -> None:
        try:
            publisher = await self._open_publisher(conn)
        except Exception as e:
            if self._conn is conn and not self._closing:
                self.log.warn(
                    "cannot reopen the publishing channel ({reason}); reconnecting", reason=_describe(e)
                )
                _abort(conn)
            return
        if self._conn is conn and not self._closing:
            self._install_publisher(conn, publisher)
        else:
            _close_quietly(publisher.channel)

    async def _usable(self, timeout: float) -> _Publisher:
        if self._closing:
            raise QueueUnavailable("the queue is closed")
        if self._live_publisher() is None:
            waiter: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
            self._waiters.append(waiter)
            try:
                await self._bounded(waiter, timeout)
            except defer.TimeoutError:
                raise QueueUnavailable(
                    f"no broker connection within {timeout:g}s ({self._last_error})"
                ) from None
        publisher = self._live_publisher()
        if publisher is None:
            raise QueueUnavailable(f"not connected to the broker ({self._last_error})")
        return publisher

    def _bounded(self, d: Deferred, timeout: float) -> Deferred:
        return d.addTimeout(max(timeout, 0.0), self._reactor)

    # -- declaring ---------------------------------------------------------------------------

    def _remember(self, queue: str) -> None:
        if queue not in self._queues:
            self._queues.append(queue)

    def _declare_on(self, channel: Any, queue: str) -> Deferred:
        return channel.queue_declare(queue, durable=True, arguments=self._queue_arguments)

    async def _declare(self, conn: Any, queue: str) -> None:
        """Declare on a short-lived channel: a refusal closes the channel, not the publisher."""
        channel = await self._bounded(conn.channel(), self._connect_timeout)
        try:
            try:
                await self._bounded(self._declare_on(channel, queue), self._connect_timeout)
            except pika.exceptions.ChannelClosedByBroker as e:
                # e.g. 406 PRECONDITION_FAILED: the queue exists with other arguments.  Not fatal
                # for the connection; logged on every connection until someone fixes it.
                self.log.error("cannot declare queue {queue}: {reason}", queue=queue, reason=_describe(e))
                # 403 (amq.*, no permission): the queue cannot be had.  Others (406: it exists
                # with other arguments) leave a queue that takes messages all the same.
                kind = QueueRefused if e.reply_code == 403 else QueueUnavailable
                raise kind(f"cannot declare queue {queue!r}: {_describe(e)}") from None
            await self._bind_for_retries(conn, channel, queue)
        finally:
            _close_quietly(channel)

    async def _bind_for_retries(self, conn: Any, channel: Any, queue: str) -> None:
        """Bind a work (or callback) queue to the retry exchange by its own name."""
        topology = self._topology
        if topology is None or queue == topology.dead_letter_queue:
            return
        try:
            if not channel.is_open:  # the declare was refused: bind on a fresh channel
                channel = await self._bounded(conn.channel(), self._connect_timeout)
            await self._bounded(
                channel.queue_bind(queue, topology.retry_exchange, routing_key=queue), self._connect_timeout
            )
        except Exception as e:
            self.log.error(
                "cannot bind queue {queue} to {exchange}: {reason}; its retries wait in the delay "
                "queues until it is bound",
                queue=queue,
                exchange=topology.retry_exchange,
                reason=_describe(e),
            )

    async def _declare_topology(self, conn: Any, topology: Topology) -> None:
        """The retry exchange and the delay tiers (exchange + TTL queue + binding each)."""
        channel = await self._bounded(conn.channel(), self._connect_timeout)
        name = topology.retry_exchange
        try:
            await self._bounded(
                channel.exchange_declare(name, exchange_type="direct", durable=True), self._connect_timeout
            )
            for tier in topology.delay_tiers:
                name = topology.tier_name(tier)
                await self._bounded(
                    channel.exchange_declare(name, exchange_type="fanout", durable=True),
                    self._connect_timeout,
                )
                await self._bounded(
                    channel.queue_declare(name, durable=True, arguments=topology.tier_arguments(tier)),
                    self._connect_timeout,
                )
                await self._bounded(channel.queue_bind(name, name), self._connect_timeout)
        except pika.exceptions.ChannelClosedByBroker as e:
            # Not fatal: plain publishing and consuming still work; delayed publishes fail (503/requeue).
            self.log.error(
                "cannot declare {name} (retry/delay topology): {reason}; delete it to let txfaas "
                "declare it again",
                name=name,
                reason=_describe(e),
            )
        finally:
            _close_quietly(channel)

    async def declare(self, queue: str) -> None:
        """Make sure the durable queue exists, now and after every reconnection (unless the
        broker refuses it: :class:`QueueRefused`, and it is not asked for again)."""
        self._remember(queue)
        await self._usable(self._connect_timeout)
        try:
            await self._declare(self._conn, queue)
        except QueueRefused:
            if queue in self._queues:
                self._queues.remove(queue)
            raise
        except QueueUnavailable:
            raise
        except Exception as e:
            raise QueueUnavailable(f"cannot declare queue {queue!r}: {_describe(e)}") from None

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, call: Call) -> None:
        """Persist ``call`` on ``call.queue``; returns once the broker confirmed it.

        The whole call (waiting for a connection, then for the confirm) is bounded by
        ``confirm_timeout``; every failure is :class:`QueueUnavailable`."""
        await self._publish_call(call, "", call.queue)

    async def publish_delayed(self, call: Call, delay: float) -> float:
        """Put ``call`` on ``call.queue`` after about ``delay`` seconds, through a delay tier.

        Returns the tier's delay (the largest not above ``delay``), or 0 when the wait is
        too short for any tier and the call was published at once."""
        topology = self._need_topology()
        tier = pick_tier(topology.delay_tiers, delay)
        if tier is None:
            await self.publish(call)
            return 0.0
        await self._publish_call(call, topology.tier_name(tier), call.queue)
        return tier

    async def dead_letter(self, call: Call) -> None:
        """Put ``call`` (its ``dead`` mark set) on the dead-letter queue, confirmed."""
        topology = self._need_topology()
        await self._publish_call(call, "", topology.dead_letter_queue)

    def _need_topology(self) -> Topology:
        if self._topology is None:
            raise QueueUnavailable("this queue was built without a retry/dead-letter topology")
        return self._topology

    async def _publish_call(self, call: Call, exchange: str, routing_key: str) -> None:
        await self._publish_raw(call.call_id, exchange, routing_key, call)

    async def _publish_raw(
        self, message_id: str, exchange: str, routing_key: str, message: Call | tuple[bytes, Any]
    ) -> None:
        """Publish ``message`` (a call, or a body and its pika properties) and wait for its confirm."""
        deadline = self._reactor.seconds() + self._confirm_timeout
        # Encoded out of the try below: a call that cannot be encoded is a bug, not the broker's.
        meta = message.encode_meta() if isinstance(message, Call) else b""
        publisher = self._live_publisher()
        waited = publisher is None
        if publisher is None:
            publisher = await self._usable(self._confirm_timeout)
        try:
            if isinstance(message, Call):
                confirm = publisher.publish_call(message, meta, exchange, routing_key)
            else:
                confirm = publisher.publish(exchange, routing_key, *message)
        except Exception as e:
            raise QueueUnavailable(f"cannot publish: {_describe(e)}") from None
        try:
            if waited:
                await self._bounded(confirm, deadline - self._reactor.seconds())
            else:
                self._deadlines.watch(confirm, deadline)
                await confirm
        except defer.CancelledError:
            if self._reactor.seconds() < deadline:
                raise  # our caller gave up (the gateway's client went away)
            raise QueueUnavailable(f"the broker did not confirm within {self._confirm_timeout:g}s") from None
        except defer.TimeoutError:
            raise QueueUnavailable(f"the broker did not confirm within {self._confirm_timeout:g}s") from None
        except pika.exceptions.UnroutableError:
            pass  # pika may pin another message's return on this one: decided below
        except pika.exceptions.NackError:
            publisher.take_return(message_id)
            raise QueueUnavailable("the broker refused the message (nack)") from None
        except Exception as e:
            raise QueueUnavailable(f"lost before the broker confirmed: {_describe(e)}") from None
        if publisher.take_return(message_id):
            raise QueueUnavailable(
                f"no queue named {routing_key!r}" if not exchange else f"{exchange!r} routed it nowhere"
            )

    # -- consuming ---------------------------------------------------------------------------

    def consume(self, queues: Sequence[str], prefetch: int, handler: DeliveryHandler) -> None:
        """Deliver from ``queues`` to ``handler``, at most ``prefetch`` unsettled at once.

        Returns at once; consuming starts when connected and resumes after every loss."""
        if self._closing:
            raise QueueUnavailable("the queue is closed")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        for queue in queues:
            self._remember(queue)
        consumer = _Consumer(self, list(queues), prefetch, handler)
        self._consumers.append(consumer)
        if self._conn is not None and self._conn.is_open:
            consumer.start(self._conn)

    async def stop_consuming(self, queues: Sequence[str] | None = None) -> None:
        if queues is None:
            consumers, self._consumers = self._consumers, []
        else:
            consumers = [c for c in self._consumers if set(c.queues) & set(queues)]
            self._consumers = [c for c in self._consumers if c not in consumers]
        for consumer in consumers:
            await consumer.stop()
