"""AMQPQueue's retry topology against the real RabbitMQ: delay tiers, dead letters, odd messages.

Each test declares its own retry prefix, tiers, dead-letter and callback queues, and deletes them.
"""

from __future__ import annotations

import time

import pika
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from tests.integration.test_amqp_queue import Admin
from tests.integration.test_worker import delete_topology
from tests.support import unique, wait_for
from txfaas.config import parse_amqp_url
from txfaas.model import Call, DeadMark
from txfaas.queue import QueueUnavailable
from txfaas.queue.amqp import CALL_HEADER, AMQPQueue, Topology

TIERS = "100ms,300ms"


class Setup:
    def __init__(self, amqp_url: str) -> None:
        self.prefix = unique("tq")
        self.work = self.prefix + ".work"
        self.topology = Topology(
            prefix=self.prefix,
            delay_tiers=(0.1, 0.3),
            dead_letter_queue=self.prefix + ".dead",
            callback_queue=self.prefix + ".callbacks",
        )
        self.queue = AMQPQueue(
            reactor,
            parse_amqp_url(amqp_url),
            declare=(self.work,),
            topology=self.topology,
            retry_policy=lambda attempt: 0.2,
        )

    async def open(self) -> Setup:
        await self.queue.start()
        await self.queue.ready(10)
        self.admin = await Admin().open()
        return self

    def receive(self, queues: list[str]) -> list:
        got: list = []

        def handler(delivery):
            got.append((time.monotonic(), delivery.call, delivery))
            delivery.ack()

        self.queue.consume(queues, 10, handler)
        return got

    async def close(self) -> None:
        await self.queue.close()
        await self.admin.close()
        await delete_topology(
            [self.work, self.topology.dead_letter_queue, self.topology.callback_queue], self.prefix, TIERS
        )


@pytest_twisted.async_yield_fixture
async def setup(amqp_url):
    s = await Setup(amqp_url).open()
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_a_delayed_call_comes_back_to_its_own_queue_after_its_tier(setup):
    """Published to the largest tier not above the wait, the call reappears on its queue once the
    tier's TTL expires (routed back by the queue's name), not as a dead letter."""
    got = setup.receive([setup.work])
    call = Call(call_id=unique("c"), function="fn", queue=setup.work, body=b"\x00body", attempt=2)
    sent = time.monotonic()
    assert await setup.queue.publish_delayed(call, 0.25) == 0.1
    assert await setup.queue.publish_delayed(call, 1.0) == 0.3
    await wait_for(lambda: len(got) == 2, timeout=5, what="both delayed calls")
    first, second = got
    assert 0.09 <= first[0] - sent < 0.28 and 0.29 <= second[0] - sent < 0.8
    assert first[1] == call  # intact; no dead mark although it went through a tier (x-death expired)
    assert first[1].dead is None


@pytest_twisted.ensureDeferred
async def test_a_wait_too_short_for_any_tier_goes_at_once(setup):
    got = setup.receive([setup.work])
    call = Call(call_id=unique("c"), function="fn", queue=setup.work)
    assert await setup.queue.publish_delayed(call, 0.01) == 0.0
    await wait_for(lambda: got, timeout=5, what="the call")


@pytest_twisted.ensureDeferred
async def test_the_callback_queue_is_bound_for_retries_too(setup):
    got = setup.receive([setup.topology.callback_queue])
    call = Call(call_id=unique("c"), function="fn", queue=setup.topology.callback_queue)
    await setup.queue.publish_delayed(call, 0.1)
    await wait_for(lambda: got, timeout=5, what="the delayed callback job")


@pytest_twisted.ensureDeferred
async def test_dead_letters_go_to_the_dead_letter_queue_with_their_mark(setup):
    got = setup.receive([setup.topology.dead_letter_queue])
    call = Call(call_id=unique("c"), function="fn", queue=setup.work, dead=DeadMark("max_age", 5.0, "old", 1))
    await setup.queue.dead_letter(call)
    await wait_for(lambda: got, timeout=5, what="the dead letter")
    assert got[0][1] == call


@pytest_twisted.ensureDeferred
async def test_a_delayed_publish_to_a_queue_that_is_not_bound_waits_in_its_tier(setup):
    """At-least-once dead-lettering: a tier cannot route the message yet, so it keeps it."""
    other = unique("tq-unbound")
    setup.admin.track(other)

    async def declare(channel):
        await channel.queue_declare(other, durable=True, arguments={"x-queue-type": "quorum"})

    await setup.admin._with_channel(declare)
    call = Call(call_id=unique("c"), function="fn", queue=other)
    await setup.queue.publish_delayed(call, 0.1)
    tier = setup.topology.tier_name(0.1)
    await wait_for(
        lambda: defer.Deferred.fromCoroutine(_count(setup.admin, tier)), timeout=5, what="it in the tier"
    )
    await setup.queue.declare(other)  # binds it to the retry exchange
    await wait_for(
        lambda: defer.Deferred.fromCoroutine(_count(setup.admin, other)), timeout=10, what="it in its queue"
    )


async def _count(admin: Admin, queue: str) -> int:
    return await admin.ready_count(queue) or 0


@pytest_twisted.ensureDeferred
async def test_an_undecodable_work_message_is_moved_to_the_dead_letter_queue_and_handed_over_there(setup):
    """Not a txfaas message: moved (confirmed, then acked) to the dead-letter queue, where the
    consumer gets a placeholder call marked ``undecodable`` with the raw body."""
    got_work = setup.receive([setup.work])
    got_dead = setup.receive([setup.topology.dead_letter_queue])
    await setup.admin.publish_raw(setup.work, b"garbage", pika.BasicProperties(message_id="raw-1"))
    await wait_for(lambda: got_dead, timeout=5, what="the moved message")
    call = got_dead[0][1]
    assert (call.call_id, call.function, call.body, call.dead.reason) == (
        "raw-1",
        "",
        b"garbage",
        "undecodable",
    )
    assert got_work == []
    assert await setup.admin.ready_count(setup.work) == 0


@pytest_twisted.ensureDeferred
async def test_delayed_publishes_and_dead_letters_need_a_topology(amqp_url):
    queue = AMQPQueue(reactor, parse_amqp_url(amqp_url), declare=())
    with pytest.raises(QueueUnavailable):
        await queue.publish_delayed(Call(call_id="c", function="f"), 1.0)
    with pytest.raises(QueueUnavailable):
        await queue.dead_letter(Call(call_id="c", function="f", dead=DeadMark("x", 1.0)))
    await queue.close()


def test_topology_names_and_tier_arguments():
    t = Topology(prefix="p", delay_tiers=(0.05, 2.0))
    assert (t.retry_exchange, t.tier_name(0.05), t.tier_name(2.0)) == (
        "p.retry",
        "p.delay.50",
        "p.delay.2000",
    )
    assert t.tier_arguments(0.05) == {
        "x-queue-type": "quorum",
        "x-message-ttl": 50,
        "x-dead-letter-exchange": "p.retry",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert CALL_HEADER == "txfaas-call"
