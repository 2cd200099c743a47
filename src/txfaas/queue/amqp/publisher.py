"""Confirmed publishes: a confirm-mode channel per connection, reopened when the broker closes it.

A publish resolves when the broker confirmed the message and raises :class:`QueueUnavailable` on
a nack, an unroutable message (``mandatory``), a lost channel or connection, or no confirm
within ``confirm_timeout`` (a broker under a memory alarm never confirms).  Any number of
publishes may wait for their confirms at once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pika
import pika.exceptions
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txfaas import _accel
from txfaas.model import Call
from txfaas.queue import QueueUnavailable
from txfaas.queue.amqp.connection import Connection, abort, close_quietly, describe
from txfaas.queue.amqp.topology import CALL_HEADER
from txfaas.timers import Deadlines

_CALL_HEADER_BYTES = CALL_HEADER.encode()


def _one_write(channel: Any) -> Any:
    """pika's channel wrapped to publish a call in one write, or None (accelerations off, not
    pika's ``TwistedChannel``, or a pika the probe does not match)."""
    if not _accel.enabled():
        return None
    from txfaas._accel import pika_publish

    frames = pika_publish.FramePublisher.for_channel(channel)
    if frames is None or not pika_publish.probe():
        return None
    return frames


class Publisher:
    """The confirm-mode channel, and the messages the broker returned on it (unroutable)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._returned: Counter[str] = Counter()
        self._frames = _one_write(channel)

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

        pika pairs a Basic.Return with the lowest delivery tag of the next Basic.Ack, which is
        wrong when the broker acks several messages at once; the message id the broker handed
        back is what tells."""
        if self._returned[message_id] <= 0:
            return False
        self._returned[message_id] -= 1
        if not self._returned[message_id]:
            del self._returned[message_id]
        return True


class Publishing:
    """The publishing side of a queue: its :class:`Publisher` on ``connection``'s current
    connection, and publishes that wait for a usable one and then for their confirm."""

    log = Logger()

    def __init__(self, reactor: Any, connection: Connection, confirm_timeout: float) -> None:
        self._reactor = reactor
        self._connection = connection
        self.confirm_timeout = confirm_timeout
        self._pub: Publisher | None = None
        self._waiters: list[Deferred] = []
        self._deadlines = Deadlines(reactor)
        self._in_flight = 0  # publishes waiting for their confirm
        self._drain_waiters: list[Deferred] = []

    def live(self) -> Publisher | None:
        """The publisher, if its channel and connection are open.

        Checked, not just remembered: while pika tears a connection down it fails the pending
        confirms (whose callers may publish again at once) before it reports the channel and
        the connection closed."""
        pub = self._pub
        if pub is None or not self._connection.is_open() or not pub.channel.is_open:
            return None
        return pub

    async def open(self, conn: Any) -> Publisher:
        """A new publisher on ``conn`` (a channel in confirm mode)."""
        bounded = self._connection.bounded
        channel = await bounded(conn.channel())
        try:
            await bounded(channel.confirm_delivery())
        except Exception:
            close_quietly(channel)
            raise
        publisher = Publisher(channel)
        channel.add_on_return_callback(publisher.on_return)
        return publisher

    def install(self, conn: Any, publisher: Publisher) -> None:
        """Publish on ``publisher`` from now on, and wake every publish waiting for it."""
        self._pub = publisher
        publisher.channel.on_closed.addCallback(self._closed, conn, publisher)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def lost(self) -> None:
        """The connection went (and the publisher with it)."""
        self._pub = None

    async def drain(self) -> None:
        """Fail every publish waiting for a connection, then wait (up to ``confirm_timeout``)
        for the confirms of those already sent."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(QueueUnavailable("the queue is closed"))
        if self._in_flight:
            drained: Deferred = Deferred()
            self._drain_waiters.append(drained)
            try:
                await self._connection.bounded(drained, self.confirm_timeout)
            except defer.TimeoutError:
                self.log.warn("closing with {n} publish(es) not confirmed", n=self._in_flight)

    def close(self) -> None:
        """Stop the confirm timer and forget the publisher."""
        self._deadlines.stop()
        self._pub = None

    def _closed(self, reason: BaseException, conn: Any, publisher: Publisher) -> None:
        if self._pub is not publisher:
            return
        self._pub = None
        connection = self._connection
        if connection.closing or connection.current is not conn or not conn.is_open:
            return  # the connection went with it: the reconnection brings a new one
        self.log.warn("publishing channel closed: {reason}; reopening", reason=describe(reason))
        d = Deferred.fromCoroutine(self._reopen(conn))
        d.addErrback(lambda f: self.log.failure("reopening the publishing channel crashed", f))

    async def _reopen(self, conn: Any) -> None:
        connection = self._connection
        try:
            publisher = await self.open(conn)
        except Exception as e:
            if connection.current is conn and not connection.closing:
                self.log.warn(
                    "cannot reopen the publishing channel ({reason}); reconnecting", reason=describe(e)
                )
                abort(conn)
            return
        if connection.current is conn and not connection.closing:
            self.install(conn, publisher)
        else:
            close_quietly(publisher.channel)

    async def usable(self, timeout: float) -> Publisher:
        """The live publisher, waiting up to ``timeout`` seconds for one."""
        connection = self._connection
        if connection.closing:
            raise QueueUnavailable("the queue is closed")
        if self.live() is None:
            waiter: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
            self._waiters.append(waiter)
            try:
                await connection.bounded(waiter, timeout)
            except defer.TimeoutError:
                raise QueueUnavailable(
                    f"no broker connection within {timeout:g}s ({connection.last_error})"
                ) from None
        publisher = self.live()
        if publisher is None:
            raise QueueUnavailable(f"not connected to the broker ({connection.last_error})")
        return publisher

    async def publish(
        self, message_id: str, exchange: str, routing_key: str, message: Call | tuple[bytes, Any]
    ) -> None:
        """Publish ``message`` (a call, or a body and its pika properties) and wait for its confirm.

        The whole publish (waiting for a connection, then for the confirm) is bounded by
        ``confirm_timeout``; every failure is :class:`QueueUnavailable`."""
        clock = self._reactor
        timeout = self.confirm_timeout
        deadline = clock.seconds() + timeout
        # Encoded out of the try below: a call that cannot be encoded is a bug, not the broker's.
        meta = message.encode_meta() if isinstance(message, Call) else b""
        publisher = self.live()
        waited = publisher is None
        if publisher is None:
            publisher = await self.usable(timeout)
        try:
            if isinstance(message, Call):
                confirm = publisher.publish_call(message, meta, exchange, routing_key)
            else:
                confirm = publisher.publish(exchange, routing_key, *message)
        except Exception as e:
            raise QueueUnavailable(f"cannot publish: {describe(e)}") from None
        self._in_flight += 1
        try:
            if waited:
                await self._connection.bounded(confirm, deadline - clock.seconds())
            else:
                self._deadlines.watch(confirm, deadline)
                await confirm
        except defer.CancelledError:
            if clock.seconds() < deadline:
                raise  # our caller gave up (the gateway's client went away)
            raise QueueUnavailable(f"the broker did not confirm within {timeout:g}s") from None
        except defer.TimeoutError:
            raise QueueUnavailable(f"the broker did not confirm within {timeout:g}s") from None
        except pika.exceptions.UnroutableError:
            pass  # pika may pin another message's return on this one: decided below
        except pika.exceptions.NackError:
            publisher.take_return(message_id)
            raise QueueUnavailable("the broker refused the message (nack)") from None
        except Exception as e:
            raise QueueUnavailable(f"lost before the broker confirmed: {describe(e)}") from None
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._drain_waiters:
                drained, self._drain_waiters = self._drain_waiters, []
                for waiter in drained:
                    waiter.callback(None)
        if publisher.take_return(message_id):
            raise QueueUnavailable(
                f"no queue named {routing_key!r}" if not exchange else f"{exchange!r} routed it nowhere"
            )
