"""AMQPQueue's own logic with a fake pika connection and channels, on a fake clock.

The fakes mimic pika's Twisted adapter (``TwistedProtocolConnection`` / ``TwistedChannel``):
``ready``/``closed`` Deferreds, ``basic_publish`` returning the confirm's Deferred, consumer
queues whose ``get()`` fails once the consumer is cancelled or the channel closes.
"""

from __future__ import annotations

import itertools
from typing import Any

import pika
import pika.exceptions
import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from txfaas.config import AMQPURL
from txfaas.model import Call
from txfaas.queue import QueueUnavailable
from txfaas.queue.amqp import CALL_HEADER, AMQPQueue

# --- fakes -------------------------------------------------------------------------------------


class FakeConsumerQueue:
    def __init__(self) -> None:
        self.q: defer.DeferredQueue = defer.DeferredQueue()
        self.closed: Exception | None = None

    def get(self) -> defer.Deferred:
        if self.closed:
            return defer.fail(self.closed)
        return self.q.get()

    def put(self, item: Any) -> None:
        self.q.put(item)

    def close(self, reason: Exception) -> None:
        self.closed = reason
        while self.q.waiting:
            self.q.waiting.pop().errback(reason)


class Message:
    def __init__(self, channel, tag, body, headers=None, redelivered=False, properties=None) -> None:
        self.channel = channel
        self.method = pika.spec.Basic.Deliver(
            delivery_tag=tag, redelivered=redelivered, routing_key="q", consumer_tag="ctag"
        )
        self.properties = properties or pika.BasicProperties(headers=headers)
        self.body = body


class FakeChannel:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.is_open = True
        self.on_closed: defer.Deferred = defer.Deferred()
        self.confirming = False
        self.published: list[tuple[str, bytes, Any, defer.Deferred]] = []
        self.return_callbacks: list = []
        self.qos: int | None = None
        self.declared: list[tuple[str, Any]] = []
        self.consumers: dict[str, tuple[str, FakeConsumerQueue]] = {}
        self.acks: list[int] = []
        self.nacks: list[tuple[int, bool]] = []
        self.cancelled: list[str] = []

    def _check(self) -> None:
        if not self.is_open:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")

    def confirm_delivery(self) -> defer.Deferred:
        self.confirming = True
        return defer.succeed(None)

    def add_on_return_callback(self, callback) -> None:
        self.return_callbacks.append(callback)

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        self._check()
        assert exchange == "" and mandatory
        d: defer.Deferred = defer.Deferred()
        self.published.append((routing_key, body, properties, d))
        return d

    def return_message(self, index: int) -> None:
        """The broker hands message ``index`` back (Basic.Return), as for a missing queue."""
        routing_key, body, properties, _ = self.published[index]
        for callback in self.return_callbacks:
            callback(Message(self, 0, body, properties=properties))

    def basic_qos(self, prefetch_count=0):
        self._check()
        self.qos = prefetch_count
        return defer.succeed(None)

    def queue_declare(self, queue, durable=False, arguments=None, passive=False):
        self._check()
        assert durable
        self.declared.append((queue, arguments))
        return defer.succeed(None)

    def basic_consume(self, queue):
        self._check()
        tag = f"ctag-{len(self.consumers) + 1}"
        consumer = FakeConsumerQueue()
        self.consumers[tag] = (queue, consumer)
        return defer.succeed((consumer, tag))

    def deliver(
        self, tag, call: Call | None = None, *, headers=None, body=b"", redelivered=False, queue=None
    ):
        """The broker delivers a message to the consumer of ``queue`` (the first one by default)."""
        if call is not None:
            headers = {CALL_HEADER: call.encode_meta().decode(), **(headers or {})}
            body = call.body
        consumer = next(c for q, c in self.consumers.values() if queue is None or q == queue)
        consumer.put(Message(self, tag, body, headers, redelivered))

    def basic_ack(self, delivery_tag=0, multiple=False):
        self._check()
        self.acks.append(delivery_tag)

    def basic_nack(self, delivery_tag=0, multiple=False, requeue=True):
        self._check()
        self.nacks.append((delivery_tag, requeue))

    def basic_cancel(self, consumer_tag=""):
        self._check()
        self.cancelled.append(consumer_tag)
        _, consumer = self.consumers.pop(consumer_tag)
        consumer.close(pika.exceptions.ConsumerCancelled())
        return defer.succeed(None)

    def broker_cancels(self, consumer_tag: str) -> None:
        _, consumer = self.consumers.pop(consumer_tag)
        consumer.close(pika.exceptions.ConsumerCancelled())

    def close(self, reply_code=0, reply_text="Normal shutdown"):
        self._check()
        self._closed(pika.exceptions.ChannelClosedByClient(reply_code, reply_text))

    def close_by_broker(self, code=406, text="PRECONDITION_FAILED - delivery acknowledgement timed out"):
        self._closed(pika.exceptions.ChannelClosedByBroker(code, text))

    def _closed(self, reason: Exception) -> None:
        if not self.is_open:
            return
        self.is_open = False
        for _, _, _, d in self.published:
            if not d.called:
                d.errback(reason)
        for _, consumer in self.consumers.values():
            consumer.close(reason)
        self.consumers = {}
        self.on_closed.callback(reason)


class FakeTransport:
    """Aborting it is the TCP connection ending: pika then fails ``ready`` or closes everything."""

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.aborted = False

    def abortConnection(self) -> None:
        if self.aborted:
            return
        self.aborted = True
        if self.conn.ready is not None:
            d, self.conn.ready = self.conn.ready, None
            d.errback(ConnectionLost())
        else:
            self.conn.lose()

    loseConnection = abortConnection


class FakeConnection:
    def __init__(self) -> None:
        self.ready: defer.Deferred | None = defer.Deferred()
        self.closed: defer.Deferred | None = None
        self.is_open = False
        self.transport = FakeTransport(self)
        self.channels: list[FakeChannel] = []

    def handshake(self) -> FakeConnection:
        self.is_open = True
        self.closed = defer.Deferred()
        d, self.ready = self.ready, None
        d.callback(self)
        return self

    def channel(self) -> defer.Deferred:
        if not self.is_open:
            raise pika.exceptions.ConnectionWrongStateError("Connection is closed.")
        channel = FakeChannel(self)
        self.channels.append(channel)
        return defer.succeed(channel)

    def lose(self, reason: Exception | None = None) -> None:
        """The TCP connection dies: channels close first, then ``closed`` fires (as pika does)."""
        reason = reason or pika.exceptions.StreamLostError("Stream connection lost")
        self.is_open = False
        for channel in self.channels:
            channel._closed(reason)
        d, self.closed = self.closed, None
        if d is not None:
            d.callback(reason)

    def close(self) -> defer.Deferred | None:
        closed = self.closed
        self.lose(pika.exceptions.ConnectionClosedByClient(200, "Normal shutdown"))
        return closed

    @property
    def publisher(self) -> FakeChannel:
        return next(c for c in self.channels if c.confirming)

    def consumer_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels if c.qos is not None]


# --- helpers -----------------------------------------------------------------------------------

counter = itertools.count()


def make(**kwargs) -> tuple[MemoryReactorClock, AMQPQueue]:
    reactor = MemoryReactorClock()
    kwargs.setdefault("retry_policy", lambda attempt: 2.0**attempt)
    kwargs.setdefault("declare", ("faas-request",))
    return reactor, AMQPQueue(reactor, AMQPURL(), **kwargs)


def connect(q: AMQPQueue) -> FakeConnection:
    conn = FakeConnection()
    q._connection.attach(conn)
    conn.handshake()
    return conn


def a_call(queue: str = "faas-request", body: bytes = b"body") -> Call:
    return Call(
        call_id=f"call-{next(counter)}", function="fn", body=body, queue=queue, accepted_at=1700000000.9
    )


def run(coro) -> list:
    """Start a coroutine; the list gets its result (or Failure) when it finishes."""
    out: list = []
    defer.Deferred.fromCoroutine(coro).addBoth(out.append)
    return out


def failed_with(out: list, kind: type[BaseException]) -> BaseException:
    assert len(out) == 1, out
    assert isinstance(out[0], Failure), out[0]
    assert out[0].check(kind), out[0]
    return out[0].value


class Collector:
    def __init__(self, auto_ack: bool = False) -> None:
        self.deliveries: list = []
        self.auto_ack = auto_ack

    def __call__(self, delivery) -> None:
        self.deliveries.append(delivery)
        if self.auto_ack:
            delivery.ack()


# --- construction and connection ---------------------------------------------------------------


def test_queue_type_must_be_quorum_or_classic():
    with pytest.raises(ValueError, match="queue_type"):
        AMQPQueue(MemoryReactorClock(), AMQPURL(), queue_type="stream")


def test_setup_declares_remembered_queues_durable_with_the_queue_type_and_opens_a_confirm_channel():
    _, q = make(declare=("a", "b"))
    conn = connect(q)
    declared = [d for c in conn.channels for d in c.declared]
    assert declared == [("a", {"x-queue-type": "quorum"}), ("b", {"x-queue-type": "quorum"})]
    assert conn.publisher.confirming
    assert q.connected

    _, classic = make(declare=("c",), queue_type="classic")
    conn = connect(classic)
    assert [d for c in conn.channels for d in c.declared] == [("c", None)]


def test_a_connection_whose_handshake_never_completes_is_aborted_after_connect_timeout():
    reactor, q = make(connect_timeout=3.0)
    conn = FakeConnection()
    q._connection.attach(conn)
    reactor.advance(2.9)
    assert not conn.transport.aborted
    reactor.advance(0.2)
    assert conn.transport.aborted
    assert not q.connected
    assert "not ready within 3s" in q._connection.last_error


def test_ping_raises_unless_connected_and_after_the_connection_is_lost():
    _, q = make()
    assert failed_with(run(q.ping()), QueueUnavailable)
    conn = connect(q)
    assert run(q.ping()) == [None]
    conn.lose()
    assert not q.connected
    assert failed_with(run(q.ping()), QueueUnavailable)


def test_ready_waits_for_the_connection_and_times_out_with_queue_unavailable():
    reactor, q = make()
    waiting = run(q.ready(5))
    assert waiting == []
    connect(q)
    assert waiting == [None]

    reactor, q = make()
    waiting = run(q.ready(5))
    reactor.advance(5.1)
    assert "no broker connection within 5s" in str(failed_with(waiting, QueueUnavailable))
    assert q._publishing._waiters == []  # the timed-out waiter does not linger


def test_retry_delays_grow_across_failed_handshakes_and_reset_after_a_good_connection():
    """ClientService restarts its own count on every TCP connect; ours must not."""
    _, q = make(retry_policy=lambda attempt: float(attempt))
    assert [q._connection._next_delay(1) for _ in range(3)] == [1.0, 2.0, 3.0]
    connect(q)
    assert q._connection._next_delay(1) == 1.0


# --- publishing --------------------------------------------------------------------------------


def test_publish_sends_a_persistent_mandatory_message_with_the_call_metadata_and_waits_for_the_confirm():
    _, q = make()
    conn = connect(q)
    call = a_call(body=b"\x00\xffraw")
    out = run(q.publish(call))
    routing_key, body, properties, confirm = conn.publisher.published[0]
    assert (routing_key, body) == ("faas-request", b"\x00\xffraw")
    assert properties.delivery_mode == 2
    assert properties.message_id == call.call_id
    assert properties.timestamp == 1700000000
    assert Call.decode(properties.headers[CALL_HEADER], body) == call
    assert out == []  # not before the broker confirmed
    confirm.callback(None)
    assert out == [None]


def test_publishes_are_pipelined_not_serialized_one_confirm_at_a_time():
    _, q = make()
    conn = connect(q)
    outs = [run(q.publish(a_call())) for _ in range(5)]
    assert len(conn.publisher.published) == 5  # all sent before any confirm
    for *_, confirm in reversed(conn.publisher.published):
        confirm.callback(None)
    assert outs == [[None]] * 5


def test_a_confirm_that_never_comes_fails_the_publish_after_confirm_timeout():
    """As under a broker memory alarm."""
    reactor, q = make(confirm_timeout=5.0)
    conn = connect(q)
    out = run(q.publish(a_call()))
    reactor.advance(1.0)
    later = run(q.publish(a_call()))
    conn.publisher.published[1][3].callback(None)  # the later one is confirmed; the first never is
    reactor.advance(3.9)
    assert out == [] and later == [None]
    reactor.advance(0.2)
    assert "did not confirm within 5s" in str(failed_with(out, QueueUnavailable))
    conn.publisher.published[0][3].callback(None)  # a confirm after the deadline is ignored
    third = run(q.publish(a_call()))
    reactor.advance(5.1)
    assert failed_with(third, QueueUnavailable)
    assert reactor.getDelayedCalls() == []  # nothing left pending


def test_a_nack_fails_the_publish():
    _, q = make()
    conn = connect(q)
    out = run(q.publish(a_call()))
    conn.publisher.published[0][3].errback(pika.exceptions.NackError([]))
    assert "nack" in str(failed_with(out, QueueUnavailable))


def test_a_returned_message_fails_its_own_publish_even_when_pika_pins_the_return_on_another():
    """Basic.Return for B, then one multiple Basic.Ack for A and B: pika errbacks A with
    UnroutableError and confirms B.  A reached its queue; B did not."""
    _, q = make()
    conn = connect(q)
    call_a, call_b = a_call("faas-request"), a_call("missing")
    out_a, out_b = run(q.publish(call_a)), run(q.publish(call_b))
    channel = conn.publisher
    channel.return_message(1)
    returned = channel.published[1]
    channel.published[0][3].errback(pika.exceptions.UnroutableError([returned]))
    channel.published[1][3].callback(None)
    assert out_a == [None]
    assert "no queue named 'missing'" in str(failed_with(out_b, QueueUnavailable))


def test_a_returned_message_attributed_correctly_by_pika_also_fails():
    _, q = make()
    conn = connect(q)
    out = run(q.publish(a_call("missing")))
    conn.publisher.return_message(0)
    conn.publisher.published[0][3].errback(pika.exceptions.UnroutableError([conn.publisher.published[0]]))
    assert "no queue named" in str(failed_with(out, QueueUnavailable))
    assert not conn.publisher.return_callbacks[0].__self__._returned  # counted off


def test_publishes_in_flight_fail_at_once_when_the_connection_is_lost_and_the_next_waits_for_a_new_one():
    reactor, q = make(confirm_timeout=5.0)
    conn = connect(q)
    outs = [run(q.publish(a_call())) for _ in range(3)]
    conn.lose()
    for out in outs:
        assert "lost before the broker confirmed" in str(failed_with(out, QueueUnavailable))
    later = run(q.publish(a_call()))
    reactor.advance(1)
    assert later == []
    new = connect(q)
    new.publisher.published[0][3].callback(None)
    assert later == [None]


def test_publish_while_disconnected_fails_after_confirm_timeout_overall():
    reactor, q = make(confirm_timeout=2.0)
    out = run(q.publish(a_call()))
    reactor.advance(2.1)
    assert "no broker connection within 2s" in str(failed_with(out, QueueUnavailable))


def test_the_confirm_wait_is_what_is_left_of_confirm_timeout_after_waiting_for_a_connection():
    reactor, q = make(confirm_timeout=2.0)
    out = run(q.publish(a_call()))
    reactor.advance(1.5)
    connect(q)
    reactor.advance(0.6)
    assert "did not confirm" in str(failed_with(out, QueueUnavailable))


def test_a_publishing_channel_closed_by_the_broker_is_reopened_on_the_same_connection():
    _, q = make()
    conn = connect(q)
    first = conn.publisher
    first.close_by_broker(504, "CHANNEL_ERROR")
    assert q.connected
    old, new = [c for c in conn.channels if c.confirming]
    assert old is first and new.is_open
    out = run(q.publish(a_call()))
    new.published[0][3].callback(None)
    assert out == [None]


def test_cancelling_a_publish_cancels_it_and_is_not_turned_into_queue_unavailable():
    """The gateway's handler is cancelled when its client goes away."""
    _, q = make()
    connect(q)
    d = defer.Deferred.fromCoroutine(q.publish(a_call()))
    out: list = []
    d.addBoth(out.append)
    d.cancel()
    assert out[0].check(defer.CancelledError)


# --- declaring ---------------------------------------------------------------------------------


def test_declare_remembers_the_queue_and_declares_it_again_on_every_connection():
    _, q = make(declare=())
    conn = connect(q)
    assert run(q.declare("extra")) == [None]
    assert ("extra", {"x-queue-type": "quorum"}) in [d for c in conn.channels for d in c.declared]
    conn.lose()
    again = connect(q)
    assert [d[0] for c in again.channels for d in c.declared] == ["extra"]


def test_declare_refused_by_the_broker_raises_queue_unavailable_and_keeps_the_publisher():
    _, q = make(declare=())
    conn = connect(q)

    def refuse(queue, durable=False, arguments=None, passive=False):
        channel = conn.channels[-1]
        channel.close_by_broker(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'")
        return defer.fail(pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED"))

    original = FakeConnection.channel

    def channel_refusing(self):
        d = original(self)
        self.channels[-1].queue_declare = refuse
        return d

    conn.channel = channel_refusing.__get__(conn)
    assert "PRECONDITION_FAILED" in str(failed_with(run(q.declare("old")), QueueUnavailable))
    assert q.connected


# --- consuming ---------------------------------------------------------------------------------


def test_consume_opens_its_own_channel_with_qos_and_a_consumer_per_queue():
    _, q = make(declare=())
    conn = connect(q)
    q.consume(["a", "b"], 7, Collector())
    [channel] = conn.consumer_channels()
    assert channel is not conn.publisher
    assert channel.qos == 7
    assert sorted(queue for queue, _ in channel.consumers.values()) == ["a", "b"]
    assert set(q.queues) == {"a", "b"}


def test_consume_before_connecting_starts_once_connected():
    _, q = make()
    got = Collector()
    q.consume(["faas-request"], 1, got)
    conn = connect(q)
    [channel] = conn.consumer_channels()
    call = a_call()
    channel.deliver(1, call)
    assert [d.call for d in got.deliveries] == [call]


def test_deliveries_carry_the_call_redelivered_and_the_delivery_count():
    _, q = make()
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 10, got)
    [channel] = conn.consumer_channels()
    channel.deliver(1, a_call())
    channel.deliver(2, a_call(), redelivered=True)
    channel.deliver(3, a_call(), redelivered=True, headers={"x-delivery-count": 4})
    assert [(d.redelivered, d.delivery_count) for d in got.deliveries] == [(False, 0), (True, 1), (True, 4)]


def test_ack_and_nack_reach_the_channel_that_delivered_and_settling_twice_is_an_error():
    _, q = make()
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 10, got)
    [channel] = conn.consumer_channels()
    for tag in (1, 2, 3):
        channel.deliver(tag, a_call())
    first, second, third = got.deliveries
    first.ack()
    second.nack()
    third.nack(requeue=False)
    assert channel.acks == [1]
    assert channel.nacks == [(2, True), (3, False)]
    with pytest.raises(RuntimeError, match="already settled"):
        first.nack()


def test_a_message_that_does_not_decode_is_rejected_without_requeue_and_never_reaches_the_handler():
    _, q = make()
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 10, got)
    [channel] = conn.consumer_channels()
    channel.deliver(1, headers=None, body=b"x")
    channel.deliver(2, headers={CALL_HEADER: "{broken"}, body=b"x")
    channel.deliver(3, headers={CALL_HEADER: '{"no": "callId"}'}, body=b"x")
    channel.deliver(4, headers={CALL_HEADER: b"\xff\xfe"}, body=b"x")
    good = a_call()
    channel.deliver(5, good)
    assert channel.nacks == [(1, False), (2, False), (3, False), (4, False)]
    assert [d.call for d in got.deliveries] == [good]


def test_a_handler_that_raises_does_not_stop_the_consumer():
    _, q = make()
    conn = connect(q)
    seen = []

    def handler(delivery):
        seen.append(delivery)
        raise ValueError("boom")

    q.consume(["faas-request"], 10, handler)
    [channel] = conn.consumer_channels()
    channel.deliver(1, a_call())
    channel.deliver(2, a_call())
    assert len(seen) == 2


def test_the_handler_never_holds_more_than_prefetch_deliveries_across_several_queues():
    """The broker's per-consumer qos lets prefetch through per queue; the rest waits here."""
    _, q = make(declare=())
    conn = connect(q)
    got = Collector()
    q.consume(["a", "b"], 2, got)
    [channel] = conn.consumer_channels()
    channel.deliver(1, a_call("a"), queue="a")
    channel.deliver(2, a_call("a"), queue="a")
    channel.deliver(3, a_call("b"), queue="b")
    channel.deliver(4, a_call("b"), queue="b")
    assert len(got.deliveries) == 2
    got.deliveries[0].ack()
    assert len(got.deliveries) == 3
    got.deliveries[1].nack()
    got.deliveries[2].ack()
    assert len(got.deliveries) == 4


def test_ack_after_the_delivering_channel_closed_is_a_logged_no_op():
    _, q = make()
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 10, got)
    [channel] = conn.consumer_channels()
    channel.deliver(1, a_call())
    channel.deliver(2, a_call())
    channel.close_by_broker()
    got.deliveries[0].ack()
    got.deliveries[1].nack()
    assert channel.acks == [] and channel.nacks == []


def test_a_consumer_channel_closed_by_the_broker_is_reopened_after_a_backoff_delay():
    reactor, q = make(retry_policy=lambda attempt: 3.0)
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 4, got)
    [channel] = conn.consumer_channels()
    channel.close_by_broker()  # e.g. consumer_timeout's 406
    opened = len(conn.channels)
    reactor.advance(2.9)
    assert len(conn.consumer_channels()) == 1
    reactor.advance(0.2)
    old, new = conn.consumer_channels()
    assert new.is_open and new.qos == 4
    assert [q for c in conn.channels[opened:] for q, _ in c.declared] == ["faas-request"]  # declared again
    call = a_call()
    new.deliver(1, call)
    assert got.deliveries[-1].call == call


def test_a_consumer_still_consumes_a_queue_whose_declaration_the_broker_refuses():
    """E.g. the queue exists as a classic queue: 406 inequivalent arg, yet it can be consumed."""
    _, q = make(declare=())
    conn = connect(q)
    original = FakeChannel.queue_declare

    def refuse(self, queue, durable=False, arguments=None, passive=False):
        self._closed(pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"))
        return defer.fail(pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED"))

    FakeChannel.queue_declare = refuse
    try:
        got = Collector()
        q.consume(["old"], 1, got)
    finally:
        FakeChannel.queue_declare = original
    [channel] = conn.consumer_channels()
    assert [queue for queue, _ in channel.consumers.values()] == ["old"]
    channel.deliver(1, a_call("old"))
    assert len(got.deliveries) == 1
    assert q.connected


def test_a_consumer_the_broker_cancels_is_restarted_on_a_new_channel():
    """RabbitMQ cancels consumers of a deleted queue but leaves the channel open."""
    reactor, q = make(retry_policy=lambda attempt: 1.0)
    conn = connect(q)
    q.consume(["faas-request"], 1, Collector())
    [channel] = conn.consumer_channels()
    [tag] = channel.consumers
    channel.broker_cancels(tag)
    assert not channel.is_open
    reactor.advance(1.1)
    assert len(conn.consumer_channels()) == 2
    assert conn.consumer_channels()[1].consumers


def test_consuming_resumes_on_the_next_connection_after_the_connection_is_lost():
    reactor, q = make()
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 1, got)
    conn.lose()
    reactor.advance(100)  # no restart on the dead connection
    assert len(conn.consumer_channels()) == 1
    new = connect(q)
    [channel] = new.consumer_channels()
    channel.deliver(1, a_call())
    assert len(got.deliveries) == 1


def test_stop_consuming_cancels_the_consumers_and_deliveries_in_progress_can_still_be_acked():
    reactor, q = make()
    conn = connect(q)
    got = Collector()
    q.consume(["faas-request"], 1, got)
    [channel] = conn.consumer_channels()
    channel.deliver(1, a_call())
    assert run(q.stop_consuming()) == [None]
    assert channel.cancelled == ["ctag-1"]
    assert channel.is_open
    got.deliveries[0].ack()
    assert channel.acks == [1]
    assert not channel.is_open  # drained: closed
    conn.lose()
    connect(q)
    reactor.advance(100)
    assert len(got.deliveries) == 1  # not consuming on the next connection


# --- closing -----------------------------------------------------------------------------------


def test_close_closes_the_connection_fails_waiters_and_later_calls():
    reactor, q = make()
    conn = connect(q)
    q.consume(["faas-request"], 1, Collector())
    assert run(q.close()) == [None]
    assert not conn.is_open
    assert not q.connected
    assert failed_with(run(q.publish(a_call())), QueueUnavailable)
    with pytest.raises(QueueUnavailable):
        q.consume(["faas-request"], 1, Collector())
    assert run(q.close()) == [None]  # twice is fine


def test_a_connection_that_finishes_its_handshake_after_close_is_closed_not_used():
    _, q = make()
    conn = FakeConnection()
    q._connection.attach(conn)
    run(q.close())
    conn.handshake()
    assert not conn.is_open
    assert not q.connected


def test_it_is_a_service_whose_stop_closes_the_queue():
    _, q = make()
    conn = connect(q)
    q.running = 1
    out: list = []
    q.stopService().addBoth(out.append)
    assert out == [None]
    assert not conn.is_open
    assert not q.running


def test_close_waits_for_the_confirms_of_publishes_already_sent_then_closes():
    """A publish sent before close() still gets its confirm (the gateway answers 202, not 503)."""
    _, q = make()
    conn = connect(q)
    published = run(q.publish(a_call()))
    closed = run(q.close())
    assert closed == [] and conn.is_open  # draining
    conn.publisher.published[0][3].callback(None)  # the broker confirms
    assert published == [None]
    assert closed == [None]
    assert not conn.is_open


def test_close_gives_up_on_confirms_after_the_confirm_timeout():
    reactor, q = make(confirm_timeout=2.0)
    conn = connect(q)
    published = run(q.publish(a_call()))
    closed = run(q.close())
    reactor.advance(2.0)
    assert failed_with(published, QueueUnavailable)
    assert closed == [None]
    assert not conn.is_open


def test_the_service_tree_starts_and_stops_it():
    """As a child of a MultiService: the tree's start connects, the tree's stop closes."""
    from twisted.application.service import MultiService

    reactor, q = make()
    top = MultiService()
    q.setServiceParent(top)
    top.startService()
    assert q._connection.started
    conn = connect(q)
    out: list = []
    top.stopService().addBoth(out.append)
    assert len(out) == 1
    assert not conn.is_open
