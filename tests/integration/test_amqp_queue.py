"""AMQPQueue against the real RabbitMQ: confirms, routing, prefetch, redelivery, and recovery from
cut connections (through tests/tcpproxy.py) and channels the broker closes.

Every test uses its own uniquely named queues and deletes them afterwards.
"""

from __future__ import annotations

import os
import shutil
import time

import pika
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.support import free_port, missing, sleep, unique, wait_for
from tests.tcpproxy import TCPProxy
from txfaas.config import parse_amqp_url
from txfaas.model import Call
from txfaas.queue import QueueUnavailable
from txfaas.queue.amqp import CALL_HEADER, AMQPQueue


class Admin:
    """A separate plain pika connection, to look at and clean up queues behind AMQPQueue's back."""

    def __init__(self) -> None:
        self.conn = None
        self.to_delete: set[str] = set()

    async def open(self) -> Admin:
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        params = pika.ConnectionParameters(credentials=pika.PlainCredentials("guest", "guest"))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 5672)
        self.conn = await connectProtocol(endpoint, TwistedProtocolConnection(params))
        await self.conn.ready
        return self

    def track(self, *queues: str) -> None:
        self.to_delete.update(queues)

    async def _with_channel(self, use):
        channel = await self.conn.channel()
        try:
            return await use(channel)
        finally:
            if channel.is_open:
                channel.close()

    async def ready_count(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (not counting unacked ones); None if it does not exist."""

        async def count(channel):
            try:
                frame = await channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 404:
                    return None
                raise
            return frame.method.message_count

        return await self._with_channel(count)

    async def delete(self, queue: str) -> None:
        await self._with_channel(lambda channel: channel.queue_delete(queue))

    async def publish_raw(self, queue: str, body: bytes, properties=None) -> None:
        async def publish(channel):
            await channel.confirm_delivery()
            await channel.basic_publish("", queue, body, properties=properties, mandatory=True)

        await self._with_channel(publish)

    async def close(self) -> None:
        for queue in self.to_delete:
            try:
                await self.delete(queue)
            except Exception:
                pass
        closed = self.conn.closed
        self.conn.close()
        if closed is not None:
            await closed


@pytest_twisted.async_yield_fixture
async def admin(amqp_url):
    a = await Admin().open()
    yield a
    await a.close()


@pytest_twisted.async_yield_fixture
async def make_queue(amqp_url, admin):
    """Builds started AMQPQueues (fast retries) and closes them after the test."""
    made: list[AMQPQueue] = []

    async def make(declare=(), start=True, **kwargs) -> AMQPQueue:
        kwargs.setdefault("retry_policy", lambda attempt: 0.2)
        kwargs.setdefault("confirm_timeout", 5.0)
        q = AMQPQueue(reactor, parse_amqp_url(amqp_url), declare=tuple(declare), **kwargs)
        admin.track(*declare)
        made.append(q)
        if start:
            await q.start()
        return q

    yield make
    for q in made:
        await q.close()


@pytest_twisted.async_yield_fixture
async def proxy():
    p = TCPProxy(reactor, "127.0.0.1", 5672)
    p.listen()
    yield p
    await p.close()


def a_call(queue: str, n: int = 0, body: bytes = b"payload") -> Call:
    return Call(
        call_id=f"call-{n}-{unique('c')}",
        function="echo",
        body=body,
        queue=queue,
        accepted_at=time.time(),
    )


class Collector:
    """A consume handler that keeps every delivery (and optionally acks at once)."""

    def __init__(self, auto_ack: bool = False) -> None:
        self.deliveries: list = []
        self.auto_ack = auto_ack

    def __call__(self, delivery) -> None:
        self.deliveries.append(delivery)
        if self.auto_ack:
            delivery.ack()

    def ids(self) -> list[str]:
        return [d.call.call_id for d in self.deliveries]


async def publish_all(q: AMQPQueue, calls: list[Call]) -> list:
    """Publish concurrently; returns each outcome (None or the exception)."""
    results = await defer.DeferredList(
        [defer.Deferred.fromCoroutine(q.publish(c)) for c in calls], consumeErrors=True
    )
    return [None if ok else value.value for ok, value in results]


# --- publish / consume -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_trip_preserves_every_field_of_the_call_and_the_raw_binary_body(make_queue):
    name = unique("rt")
    q = await make_queue([name])
    await q.ready(10)
    body = bytes(range(256)) + b"\r\n\x00end"
    sent = Call(
        call_id=unique("id"),
        function="fn-a",
        method="PUT",
        path="/sub/path",
        query="a=1&b=%20x",
        headers=[("X-One", "1"), ("Content-Type", "application/octet-stream"), ("X-One", "again")],
        body=body,
        callback_url="http://127.0.0.1:9/cb?x=1",
        accepted_at=1700000000.5,
        queue=name,
        attempt=2,
    )
    await q.publish(sent)
    got = Collector(auto_ack=True)
    q.consume([name], 10, got)
    await wait_for(lambda: got.deliveries, what="the delivery")
    delivery = got.deliveries[0]
    assert delivery.call == sent
    assert delivery.call.body == body
    assert (delivery.redelivered, delivery.delivery_count) == (False, 0)


@pytest_twisted.ensureDeferred
async def test_publish_to_an_undeclared_queue_raises_queue_unavailable_instead_of_dropping(make_queue):
    q = await make_queue([])
    await q.ready(10)
    with pytest.raises(QueueUnavailable, match="no queue named"):
        await q.publish(a_call(unique("missing")))


@pytest_twisted.ensureDeferred
async def test_concurrent_publishes_to_existing_and_missing_queues_fail_exactly_the_missing_ones(
    make_queue, admin
):
    """Each outcome belongs to its own message (the unit tests pin pika's return/ack pairing)."""
    name = unique("mix")
    q = await make_queue([name])
    await q.ready(10)
    missing = unique("missing")
    calls = [a_call(name if i % 3 else missing, i) for i in range(300)]
    results = await publish_all(q, calls)
    for call, result in zip(calls, results, strict=True):
        if call.queue == missing:
            assert isinstance(result, QueueUnavailable), call.call_id
        else:
            assert result is None, (call.call_id, result)
    assert await admin.ready_count(name) == sum(1 for c in calls if c.queue == name)


@pytest_twisted.ensureDeferred
async def test_many_concurrent_publishes_are_all_confirmed_and_all_land_in_the_queue(make_queue, admin):
    name = unique("many")
    q = await make_queue([name])
    await q.ready(10)
    results = await publish_all(q, [a_call(name, i) for i in range(2000)])
    assert results == [None] * 2000
    assert await admin.ready_count(name) == 2000


@pytest_twisted.ensureDeferred
async def test_declare_creates_a_durable_quorum_queue_and_remembers_it(make_queue, admin):
    q = await make_queue([])
    await q.ready(10)
    name = unique("decl")
    admin.track(name)
    await q.declare(name)
    assert name in q.queues
    assert await admin.ready_count(name) == 0
    await q.publish(a_call(name))
    assert await admin.ready_count(name) == 1


@pytest_twisted.ensureDeferred
async def test_a_queue_the_broker_refuses_is_queue_refused_and_not_asked_for_again(make_queue, admin):
    from txfaas.queue import QueueRefused

    q = await make_queue([])
    await q.ready(10)
    with pytest.raises(QueueRefused, match="ACCESS_REFUSED"):
        await q.declare(f"amq.{unique('refused')}")
    assert not [name for name in q.queues if name.startswith("amq.")]
    name = unique("after-refusal")
    admin.track(name)
    await q.declare(name)  # the connection is still usable for the others
    await q.publish(a_call(name))
    assert await admin.ready_count(name) == 1


# --- broker unreachable ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_start_does_not_fail_and_publish_fails_within_confirm_timeout_when_the_broker_is_unreachable(
    make_queue,
):
    closed_port = free_port()
    q = await make_queue(
        ["faas-never"],
        confirm_timeout=1.0,
        endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", closed_port, timeout=1),
    )
    assert not q.connected
    with pytest.raises(QueueUnavailable):
        await q.ping()
    started = time.monotonic()
    with pytest.raises(QueueUnavailable, match="no broker connection") as info:
        await q.publish(a_call("faas-never"))
    took = time.monotonic() - started
    assert 0.8 < took < 2.5
    assert "refused" in str(info.value).lower()
    with pytest.raises(QueueUnavailable):
        await q.ready(0.3)


@pytest_twisted.ensureDeferred
async def test_publish_while_disconnected_waits_for_the_reconnection(make_queue, proxy):
    name = unique("wait")
    await proxy.refuse()
    q = await make_queue([name], endpoint=proxy.endpoint(), confirm_timeout=5.0)
    publishing = defer.Deferred.fromCoroutine(q.publish(a_call(name)))
    await sleep(0.5)
    assert not publishing.called
    proxy.forward()
    await publishing  # confirmed once the connection came back, within confirm_timeout


# --- consuming ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_prefetch_bounds_unsettled_deliveries_and_each_ack_lets_one_more_in(make_queue):
    name = unique("pf")
    q = await make_queue([name])
    await q.ready(10)
    await publish_all(q, [a_call(name, i) for i in range(10)])
    got = Collector()
    q.consume([name], 3, got)
    await wait_for(lambda: len(got.deliveries) == 3, what="3 deliveries")
    await sleep(0.3)
    assert len(got.deliveries) == 3
    got.deliveries[0].ack()
    await wait_for(lambda: len(got.deliveries) == 4, what="a 4th delivery")
    await sleep(0.3)
    assert len(got.deliveries) == 4


@pytest_twisted.ensureDeferred
async def test_prefetch_bounds_the_handler_across_several_queues(make_queue):
    a, b = unique("pfa"), unique("pfb")
    q = await make_queue([a, b])
    await q.ready(10)
    await publish_all(q, [a_call(a, i) for i in range(5)] + [a_call(b, i) for i in range(5)])
    got = Collector()
    q.consume([a, b], 4, got)
    await wait_for(lambda: len(got.deliveries) == 4, what="4 deliveries")
    await sleep(0.3)
    assert len(got.deliveries) == 4
    for d in got.deliveries[:]:
        d.ack()
    await wait_for(lambda: len(got.deliveries) == 8, what="4 more deliveries")


@pytest_twisted.ensureDeferred
async def test_nack_with_requeue_redelivers_marked_redelivered_with_a_delivery_count(make_queue):
    name = unique("nack")
    q = await make_queue([name])
    await q.ready(10)
    await q.publish(a_call(name))
    got = Collector()
    q.consume([name], 1, got)
    await wait_for(lambda: got.deliveries, what="first delivery")
    first = got.deliveries[0]
    assert (first.redelivered, first.delivery_count) == (False, 0)
    first.nack(requeue=True)
    await wait_for(lambda: len(got.deliveries) == 2, what="redelivery")
    again = got.deliveries[1]
    assert again.call.call_id == first.call.call_id
    assert again.redelivered is True
    assert again.delivery_count >= 1
    again.ack()


@pytest_twisted.ensureDeferred
async def test_a_message_that_does_not_decode_is_rejected_and_the_consumer_carries_on(make_queue, admin):
    name = unique("poison")
    q = await make_queue([name])
    await q.ready(10)
    await admin.publish_raw(name, b"not a call")  # no txfaas-call header
    await admin.publish_raw(name, b"x", pika.BasicProperties(headers={CALL_HEADER: "{not json"}))
    good = a_call(name)
    await q.publish(good)
    got = Collector(auto_ack=True)
    q.consume([name], 5, got)
    await wait_for(lambda: got.deliveries, what="the good delivery")
    await sleep(0.2)
    assert got.ids() == [good.call_id]
    assert await admin.ready_count(name) == 0  # the bad ones were rejected, not requeued


@pytest_twisted.ensureDeferred
async def test_stop_consuming_stops_new_deliveries_but_deliveries_in_progress_can_still_be_acked(
    make_queue, admin
):
    name = unique("stop")
    q = await make_queue([name])
    await q.ready(10)
    await q.publish(a_call(name, 1))
    got = Collector()
    q.consume([name], 5, got)
    await wait_for(lambda: got.deliveries, what="a delivery")
    await q.stop_consuming()
    await q.publish(a_call(name, 2))
    await sleep(0.3)
    assert len(got.deliveries) == 1
    got.deliveries[0].ack()
    await sleep(0.2)
    assert await admin.ready_count(name) == 1  # the second one waits in the queue


@pytest_twisted.ensureDeferred
async def test_close_gives_unacked_deliveries_back_to_the_broker(make_queue, admin):
    name = unique("close")
    q = await make_queue([name])
    await q.ready(10)
    await publish_all(q, [a_call(name, i) for i in range(3)])
    got = Collector()
    q.consume([name], 10, got)
    await wait_for(lambda: len(got.deliveries) == 3, what="3 deliveries")
    assert await admin.ready_count(name) == 0
    await q.close()
    assert not q.connected
    got.deliveries[0].ack()  # after close: a logged no-op, not an error

    async def all_back():
        return await admin.ready_count(name) == 3

    await wait_for(all_back, what="the 3 messages back in the queue")


# --- faults ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cut_connection_while_consuming_reconnects_redelivers_unacked_and_keeps_consuming(
    make_queue, proxy
):
    name = unique("cutc")
    publisher = await make_queue([name])
    consumer = await make_queue([name], endpoint=proxy.endpoint())
    await publisher.ready(10)
    await consumer.ready(10)
    first = [a_call(name, i) for i in range(3)]
    await publish_all(publisher, first)
    got = Collector()
    consumer.consume([name], 10, got)
    await wait_for(lambda: len(got.deliveries) == 3, what="3 deliveries")
    stale = list(got.deliveries)

    assert proxy.drop_all() >= 1
    await wait_for(lambda: len(got.deliveries) == 6, timeout=15, what="the 3 redeliveries")
    again = got.deliveries[3:]
    assert sorted(d.call.call_id for d in again) == sorted(c.call_id for c in first)
    assert all(d.redelivered for d in again)
    for d in stale:
        d.ack()  # their channel is gone: a logged no-op
    for d in again:
        d.ack()

    later = a_call(name, 99)
    await publisher.publish(later)
    await wait_for(lambda: later.call_id in got.ids(), what="a delivery after the reconnection")
    assert consumer.connected


@pytest_twisted.ensureDeferred
async def test_cut_connection_fails_publishes_in_flight_and_later_ones_succeed_after_reconnecting(
    make_queue, proxy
):
    name = unique("cutp")
    q = await make_queue([name], endpoint=proxy.endpoint(), confirm_timeout=5.0)
    await q.ready(10)
    started = time.monotonic()
    in_flight = [defer.Deferred.fromCoroutine(q.publish(a_call(name, i))) for i in range(50)]
    proxy.drop_all()  # before any confirm could come back
    results = await defer.DeferredList(in_flight, consumeErrors=True)
    assert time.monotonic() - started < 2.0  # failed at once, not after confirm_timeout
    assert all(not ok and isinstance(f.value, QueueUnavailable) for ok, f in results)
    await q.ready(10)
    await q.publish(a_call(name, 100))


@pytest_twisted.ensureDeferred
async def test_a_held_connection_never_becomes_ready_and_is_retried_until_the_broker_answers(
    make_queue, proxy
):
    """A TCP connection that accepts but never answers the AMQP handshake is dropped after
    connect_timeout and retried."""
    name = unique("hold")
    proxy.hold()
    q = await make_queue([name], endpoint=proxy.endpoint(), connect_timeout=0.5)
    with pytest.raises(QueueUnavailable):
        await q.ready(1.2)
    assert proxy.accepted >= 2  # dropped and tried again
    proxy.forward()
    await q.ready(10)
    await q.publish(a_call(name))


@pytest_twisted.ensureDeferred
async def test_deleting_the_consumed_queue_is_noticed_and_consuming_resumes_on_the_redeclared_queue(
    make_queue, admin
):
    name = unique("del")
    q = await make_queue([name])
    await q.ready(10)
    got = Collector(auto_ack=True)
    q.consume([name], 5, got)
    await q.publish(a_call(name, 1))
    await wait_for(lambda: len(got.deliveries) == 1, what="first delivery")
    await admin.delete(name)  # the broker cancels our consumer

    async def exists():
        return await admin.ready_count(name) is not None

    await wait_for(exists, timeout=10, interval=0.2, what="the queue redeclared")
    await q.publish(a_call(name, 2))
    await wait_for(lambda: len(got.deliveries) == 2, what="a delivery after the queue came back")


@pytest_twisted.ensureDeferred
async def test_a_consumer_channel_closed_by_the_broker_with_406_is_noticed_and_consuming_resumes(make_queue):
    """As the broker's consumer_timeout does: here by acking an unknown delivery tag."""
    name = unique("406")
    q = await make_queue([name])
    await q.ready(10)
    got = Collector()
    q.consume([name], 5, got)
    await q.publish(a_call(name, 1))
    await wait_for(lambda: got.deliveries, what="first delivery")
    channel = q._consumers[0].channel
    channel.basic_ack(delivery_tag=9999)  # PRECONDITION_FAILED - unknown delivery tag
    await wait_for(lambda: len(got.deliveries) == 2, timeout=10, what="the redelivery on a new channel")
    assert got.deliveries[1].redelivered
    got.deliveries[0].ack()  # old channel: no-op
    got.deliveries[1].ack()
    assert q._consumers[0].channel is not channel
    assert q.connected


@pytest_twisted.ensureDeferred
async def test_connection_closed_by_the_broker_is_noticed_and_everything_resumes(make_queue):
    """`rabbitmqctl close_connection` on our connection: queues redeclared, consuming resumes."""
    name = unique("ctl")
    conn_name = unique("txfaas-test")
    q = await make_queue([name], connection_name=conn_name)
    await q.ready(10)
    got = Collector(auto_ack=True)
    q.consume([name], 5, got)
    listing = await _rabbitmqctl("list_connections", "pid", "client_properties")
    pids = [line.split("\t")[0] for line in listing.splitlines() if conn_name in line]
    assert len(pids) == 1, listing
    await _rabbitmqctl("close_connection", pids[0], "test closes it")
    await wait_for(lambda: not q.connected, timeout=10, what="the loss noticed")
    await q.ready(10)
    call = a_call(name)
    await q.publish(call)
    await wait_for(lambda: call.call_id in got.ids(), what="a delivery after the broker closed us")


async def _rabbitmqctl(*args: str) -> str:
    from twisted.internet.utils import getProcessOutputAndValue

    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        missing("rabbitmqctl is not installed here")
    out, err, code = await getProcessOutputAndValue(ctl, ["-q", *args], env=dict(os.environ))
    assert code == 0, err
    return out.decode()


@pytest_twisted.ensureDeferred
async def test_a_queue_remembered_by_declare_is_declared_again_after_a_reconnection(make_queue, admin, proxy):
    q = await make_queue([], endpoint=proxy.endpoint())
    await q.ready(10)
    name = unique("again")
    admin.track(name)
    await q.declare(name)
    await admin.delete(name)
    assert await admin.ready_count(name) is None
    proxy.drop_all()
    await wait_for(lambda: not q.connected, what="the cut noticed")
    await q.ready(10)
    assert await admin.ready_count(name) == 0
