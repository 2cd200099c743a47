"""The queue contract (tests/queue_contract.py) on the in-memory queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tests.queue_contract import CONTRACT
from txfaas.queue.memory import MemoryQueue


@attrs.define
class MemoryHarness:
    """Deliveries happen at once; time is a ``Clock``."""

    queue: MemoryQueue
    clock: Clock
    work: str = "work"
    dead_letter_queue: str = "dead"

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        assert condition(), f"no {what}"

    async def quiet(self) -> None:
        pass

    async def later(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def reopen(self) -> MemoryQueue:
        return self.queue


def finished(coroutine: Any) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "the coroutine did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.__name__)
def test_memory_queue_contract(case):
    clock = Clock()
    queue = MemoryQueue(["work"], clock=clock, dead_letter_queue="dead")
    finished(case(MemoryHarness(queue, clock)))
