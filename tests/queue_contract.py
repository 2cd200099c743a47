"""What every call queue must do: run against the in-memory queue (tests/unit/test_queue_contract.py)
and the AMQP queue on the real RabbitMQ (tests/integration/test_queue_contract.py).

Each case takes a :class:`Harness`, which hides how time passes: the in-memory queue delivers
at once and its delays run on a ``Clock``; the real one needs real time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from txfaas.model import Call, DeadMark, DeadReason
from txfaas.queue import CallQueue, Delivery, QueueUnavailable

#: The delay tier the real queue is built with; the in-memory one delays exactly.
TIER = 1.0

_ids = itertools.count()


class Harness(Protocol):
    queue: CallQueue
    #: A declared work queue, and the dead-letter queue.
    work: str
    dead_letter_queue: str

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (within a bound) until ``condition()``; fail the test otherwise."""

    async def quiet(self) -> None:
        """Give a queue the time to deliver something it should not."""

    async def later(self, seconds: float) -> None:
        """Let ``seconds`` pass."""

    async def reopen(self) -> CallQueue:
        """A queue on the same broker after ``queue`` was closed (the in-memory one: itself)."""


class Received:
    """A consume handler that keeps every delivery."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def ids(self) -> list[str]:
        return [d.call.call_id for d in self.deliveries]

    async def count(self, harness: Harness, n: int) -> list[Delivery]:
        await harness.until(lambda: len(self.deliveries) >= n, f"{n} deliveries")
        return self.deliveries


def a_call(queue: str, body: bytes = b"payload", **kwargs: Any) -> Call:
    return Call(call_id=f"contract-{next(_ids)}", function="echo", body=body, queue=queue, **kwargs)


async def published_calls_arrive_whole_and_in_order(h: Harness) -> None:
    calls = [a_call(h.work, body=bytes([n]) * n, path="/p", query="a=1") for n in range(3)]
    for call in calls:
        await h.queue.publish(call)  # returns once the queue holds it
    got = Received()
    h.queue.consume([h.work], 10, got)
    deliveries = await got.count(h, 3)
    assert [d.call for d in deliveries] == calls
    assert [(d.redelivered, d.delivery_count) for d in deliveries] == [(False, 0)] * 3
    for d in deliveries:
        d.ack()


async def an_acked_call_is_gone(h: Harness) -> None:
    await h.queue.publish(a_call(h.work))
    first = Received()
    h.queue.consume([h.work], 1, first)
    (delivery,) = await first.count(h, 1)
    delivery.ack()
    await h.queue.stop_consuming([h.work])
    again = Received()
    h.queue.consume([h.work], 1, again)
    await h.quiet()
    assert again.deliveries == []


async def a_requeued_call_comes_back_counted(h: Harness) -> None:
    call = a_call(h.work)
    await h.queue.publish(call)
    got = Received()
    h.queue.consume([h.work], 1, got)
    (first,) = await got.count(h, 1)
    first.nack(requeue=True)
    second = (await got.count(h, 2))[1]
    assert (second.call, second.redelivered, second.delivery_count) == (call, True, 1)
    second.nack(requeue=True)
    third = (await got.count(h, 3))[2]
    assert (third.redelivered, third.delivery_count) == (True, 2)
    third.ack()


async def a_rejected_call_is_not_delivered_again(h: Harness) -> None:
    await h.queue.publish(a_call(h.work))
    got = Received()
    h.queue.consume([h.work], 1, got)
    (delivery,) = await got.count(h, 1)
    delivery.nack(requeue=False)
    await h.quiet()
    assert len(got.deliveries) == 1


async def prefetch_bounds_the_unsettled_deliveries(h: Harness) -> None:
    for _ in range(3):
        await h.queue.publish(a_call(h.work))
    got = Received()
    h.queue.consume([h.work], 2, got)
    await got.count(h, 2)
    await h.quiet()
    assert len(got.deliveries) == 2
    got.deliveries[0].ack()
    await got.count(h, 3)
    for d in got.deliveries[1:]:
        d.ack()


async def settling_twice_is_an_error(h: Harness) -> None:
    await h.queue.publish(a_call(h.work))
    got = Received()
    h.queue.consume([h.work], 1, got)
    (delivery,) = await got.count(h, 1)
    delivery.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        delivery.nack()


async def stopped_consumers_take_nothing_new_but_settle_what_they_hold(h: Harness) -> None:
    await h.queue.publish(a_call(h.work))
    got = Received()
    h.queue.consume([h.work], 5, got)
    (held,) = await got.count(h, 1)
    await h.queue.stop_consuming([h.work])
    await h.queue.publish(a_call(h.work))
    await h.quiet()
    assert len(got.deliveries) == 1
    held.ack()
    later = Received()
    h.queue.consume([h.work], 5, later)
    await later.count(h, 1)  # the second call waited in the queue
    later.deliveries[0].ack()


async def publishing_to_a_queue_that_does_not_exist_fails(h: Harness) -> None:
    with pytest.raises(QueueUnavailable):
        await h.queue.publish(a_call(f"{h.work}-missing"))


async def a_dead_letter_keeps_its_mark(h: Harness) -> None:
    mark = DeadMark(DeadReason.DELIVERY_LIMIT, 1_700_000_000.0, "failed 3 times", attempts=3)
    call = a_call(h.work, dead=mark, attempt=3)
    await h.queue.dead_letter(call)
    got = Received()
    h.queue.consume([h.dead_letter_queue], 1, got)
    (delivery,) = await got.count(h, 1)
    assert delivery.call == call
    delivery.ack()


async def a_delayed_call_arrives_after_its_delay_not_before(h: Harness) -> None:
    call = a_call(h.work, attempt=2)
    got = Received()
    h.queue.consume([h.work], 1, got)
    assert await h.queue.publish_delayed(call, TIER) == TIER
    await h.later(TIER * 0.3)
    assert got.deliveries == []
    await h.later(TIER * 0.8)
    (delivery,) = await got.count(h, 1)
    assert delivery.call == call
    delivery.ack()


async def closing_gives_unsettled_calls_back(h: Harness) -> None:
    call = a_call(h.work)
    await h.queue.publish(call)
    got = Received()
    h.queue.consume([h.work], 1, got)
    await got.count(h, 1)
    await h.queue.close()
    queue = await h.reopen()
    again = Received()
    queue.consume([h.work], 1, again)
    (delivery,) = await again.count(h, 1)
    assert (delivery.call, delivery.redelivered, delivery.delivery_count) == (call, True, 1)
    delivery.ack()


async def ping_answers_while_usable(h: Harness) -> None:
    await h.queue.ping()
    await h.queue.ready(5)


CONTRACT = [
    published_calls_arrive_whole_and_in_order,
    an_acked_call_is_gone,
    a_requeued_call_comes_back_counted,
    a_rejected_call_is_not_delivered_again,
    prefetch_bounds_the_unsettled_deliveries,
    settling_twice_is_an_error,
    stopped_consumers_take_nothing_new_but_settle_what_they_hold,
    publishing_to_a_queue_that_does_not_exist_fails,
    a_dead_letter_keeps_its_mark,
    a_delayed_call_arrives_after_its_delay_not_before,
    closing_gives_unsettled_calls_back,
    ping_answers_while_usable,
]
