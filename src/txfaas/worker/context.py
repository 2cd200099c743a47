"""What every step of a message's handling shares: clock, settings, broker, store and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.model import Call
from txfaas.queue import CallQueue
from txfaas.worker.config import WorkerConfig
from txfaas.worker.metrics import WorkerMetrics
from txfaas.worker.records import RecordWriter


@attrs.frozen
class Context:
    """The worker's collaborators, given to each of its parts.

    ``store`` is read here; call records are written only through ``records``.  ``random``
    draws the retry jitter (tests pass a fixed one)."""

    clock: IReactorTime
    config: WorkerConfig
    queue: CallQueue
    store: Any
    records: RecordWriter
    metrics: WorkerMetrics
    random: Callable[[], float]

    log = Logger()

    def stale(self, kind: str, call: Call, why: str) -> None:
        """Drop a message a newer attempt, replay or delivery has made pointless."""
        self.metrics.stale.labels(kind).inc()
        self.log.info("call {call_id}: {why}; dropping this message", call_id=call.call_id, why=why)

    async def early(self, call: Call) -> bool:
        """A retry that left its delay tier before its due time: send it round again for the rest."""
        left = call.not_before - self.clock.seconds()
        tiers = self.config.delay_tiers
        if left <= 0 or (tiers and left < tiers[0] / 2):
            return False
        tier = await self.queue.publish_delayed(call, left)
        self.metrics.hops.inc()
        self.log.debug(
            "call {call_id}: {left:.3f}s early; waiting {tier:g}s more",
            call_id=call.call_id,
            left=left,
            tier=tier,
        )
        return True
