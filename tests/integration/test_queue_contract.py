"""The queue contract (tests/queue_contract.py) on AMQPQueue and the real RabbitMQ.

Each case gets its own work, dead-letter and callback queues, retry exchange and delay tier,
and deletes them afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.integration.test_worker import delete_topology
from tests.queue_contract import CONTRACT, TIER
from tests.support import sleep, unique, wait_for
from txfaas.config import parse_amqp_url
from txfaas.queue.amqp import AMQPQueue, Topology


class RealHarness:
    def __init__(self, amqp_url: str) -> None:
        self.url = parse_amqp_url(amqp_url)
        self.prefix = unique("qc")
        self.work = self.prefix + ".work"
        self.dead_letter_queue = self.prefix + ".dead"
        self.topology = Topology(
            prefix=self.prefix,
            delay_tiers=(TIER,),
            dead_letter_queue=self.dead_letter_queue,
            callback_queue=self.prefix + ".callbacks",
        )
        self.made: list[AMQPQueue] = []
        self.queue = self.make()

    def make(self) -> AMQPQueue:
        queue = AMQPQueue(
            reactor, self.url, declare=(self.work,), topology=self.topology, retry_policy=lambda n: 0.2
        )
        self.made.append(queue)
        return queue

    async def open(self) -> AMQPQueue:
        queue = self.made[-1]
        await queue.start()
        await queue.ready(10)
        return queue

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        await wait_for(condition, timeout=10, what=what)

    async def quiet(self) -> None:
        await sleep(0.3)

    async def later(self, seconds: float) -> None:
        await sleep(seconds)

    async def reopen(self) -> AMQPQueue:
        self.make()
        return await self.open()

    async def close(self) -> None:
        for queue in self.made:
            await queue.close()
        await delete_topology(
            [self.work, self.dead_letter_queue, self.topology.callback_queue],
            self.prefix,
            f"{round(TIER * 1000)}ms",
        )


@pytest_twisted.async_yield_fixture
async def harness(amqp_url):
    h = RealHarness(amqp_url)
    await h.open()
    yield h
    await h.close()


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.__name__)
@pytest_twisted.ensureDeferred
async def test_amqp_queue_contract(harness, case):
    await case(harness)
