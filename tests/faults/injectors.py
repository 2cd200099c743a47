"""The faults, and when they happen during a run.

Each fault is injected, held for a while, undone, and written into the ledger as a
:class:`~tests.faults.ledger.FaultEvent` with its crash window (the time in which a worker or
a connection went away with deliveries still unacknowledged, so a call may run twice):

- ``worker_kill``: SIGKILL of one worker process (its group) while calls are running at the
  function, then a restart; the other worker keeps consuming.  Crash window: the kill.
- ``gateway_kill``: SIGKILL of the gateway while it publishes, then a restart on the same port.
  Odd rounds first stall its AMQP connection at the proxy (nothing it publishes arrives, no
  confirm comes back), so calls are claimed and never confirmed; even rounds kill it mid-stream,
  so some calls are confirmed and never recorded.  The load driver's clients retry under their
  own ``X-Call-Id``.  Crash window: from the kill until the gateway answers again.
- ``amqp_cut``: every AMQP connection of the gateway and the workers aborted at the TCP proxies
  (both sides see a reset).  Crash window: the cut.
- ``broker_restart``: ``rabbitmqctl stop_app`` on the private node, a pause, ``start_app``, then
  waiting until it answers again.  Crash window: from stop_app until it answers.
- ``redis_pause``: SIGSTOP of the private Redis for longer than the store's 5 s command timeout,
  then SIGCONT.  No crash window: the system must ride it out without running a call twice.
- ``callback_outage``: the receiver stops listening (callbacks refused), then answers 503, then
  200 again.  No crash window.
- ``poison``: messages published straight onto the work queue that no gateway would send.
  "Poison" here means what can be built without the worker's cooperation (nothing we send can
  crash the worker process itself):

  * ``undecodable``: a message whose ``txfaas-call`` metadata is not JSON (the worker must
    move it to the dead letters, or at least reject it without requeueing, and carry on);
  * ``unprocessable``: well-formed metadata for the run's function whose method is not ASCII,
    which the worker decodes and then fails to handle.  It must end somewhere visible
    (a final or ``dead_lettered`` status) instead of circulating forever.

  Poison messages are not accepted calls: they are reported on their own lines.

One more kind is a self-test of the ledger, never part of a normal run: ``purge`` kills both
workers, lets calls pile up in the queue and purges it, really losing the calls accepted
meanwhile (``scripts/faults --faults purge`` must report them lost and exit 1).
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
from twisted.internet import task
from twisted.logger import Logger

from tests.faults.ledger import FaultEvent, Ledger
from tests.faults.servers import CallbackReceiver, FunctionServer, payload
from tests.faults.stack import Stack
from txfaas.model import Call
from txfaas.queue.amqp import CALL_HEADER

KINDS = (
    "worker_kill",
    "gateway_kill",
    "amqp_cut",
    "broker_restart",
    "redis_pause",
    "callback_outage",
    "poison",
)
#: Faults that only prove the suite can see a loss (selected by name, never by default).
SELF_TESTS = ("purge",)
#: Faults that need the private broker.
NEEDS_PRIVATE_BROKER = frozenset({"broker_restart"})


@attrs.frozen
class Timings:
    """How long each fault is held (seconds)."""

    worker_down: float = 1.0
    #: How long the gateway's broker connection is stalled before the kill.
    gateway_stall: float = 1.0
    broker_down: float = 2.0
    redis_pause: float = 6.0
    callback_down: float = 3.0
    callback_error: float = 3.0


def plan(counts: dict[str, int]) -> list[str]:
    """The faults in the order they happen: round-robin over the kinds, each ``counts[kind]`` times."""
    left = dict(counts)
    out: list[str] = []
    while any(left.values()):
        for kind in KINDS + SELF_TESTS:
            if left.get(kind, 0) > 0:
                out.append(kind)
                left[kind] -= 1
    return out


class Injector:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        stack: Stack,
        ledger: Ledger,
        function: FunctionServer,
        receiver: CallbackReceiver,
        *,
        function_name: str,
        run_id: str,
        timings: Timings = Timings(),
    ) -> None:
        self._reactor = reactor
        self._stack = stack
        self._ledger = ledger
        self._function = function
        self._receiver = receiver
        self._function_name = function_name
        self._run_id = run_id
        self._timings = timings
        self._next_worker = 0
        self._gateway_kills = 0
        self._poisons = 0
        self.current: str | None = None

    async def _sleep(self, seconds: float) -> None:
        await task.deferLater(self._reactor, seconds, lambda: None)

    async def run(self, kinds: list[str], duration: float) -> None:
        """Inject ``kinds`` one after the other, spread evenly over ``duration`` seconds."""
        start = self._reactor.seconds()
        for i, kind in enumerate(kinds):
            wait = start + duration * (i + 0.5) / len(kinds) - self._reactor.seconds()
            if wait > 0:
                await self._sleep(wait)
            self.current = kind
            try:
                event = await self.inject(kind)
            finally:
                self.current = None
            self._ledger.events.append(event)
            self.log.info(
                "fault {i}/{n} {kind}: {detail} ({s:.1f}s)",
                i=i + 1,
                n=len(kinds),
                kind=kind,
                detail=event.detail,
                s=event.ended - event.started,
            )

    async def inject(self, kind: str) -> FaultEvent:
        method = getattr(self, kind)
        return await method()

    async def worker_kill(self) -> FaultEvent:
        worker = self._stack.workers[self._next_worker % len(self._stack.workers)]
        self._next_worker += 1
        running = self._function.running
        at = self._reactor.seconds()
        self._stack.kill_worker(worker)
        await self._sleep(self._timings.worker_down)
        await self._stack.start_worker(worker)
        worker.restarts += 1
        return FaultEvent(
            "worker_kill",
            at,
            self._reactor.seconds(),
            f"worker {worker.index} SIGKILLed with {running} call(s) running at the function; restarted",
            crash=(at, at),
        )

    async def gateway_kill(self) -> FaultEvent:
        proxy = self._stack.gateway_proxy
        assert proxy is not None
        self._gateway_kills += 1
        stalled = self._gateway_kills % 2 == 1
        if stalled:
            proxy.stall()
            await self._sleep(self._timings.gateway_stall)
        at = self._reactor.seconds()
        self._stack.kill_gateway()
        proxy.forward()
        await self._stack.start_gateway()
        back = self._reactor.seconds()
        how = (
            f"its broker connection stalled for {self._timings.gateway_stall:g}s" if stalled else "mid-stream"
        )
        return FaultEvent(
            "gateway_kill",
            at,
            back,
            f"gateway SIGKILLed {how}; answering again after {back - at:.1f}s",
            crash=(at, back),
        )

    async def amqp_cut(self) -> FaultEvent:
        at = self._reactor.seconds()
        n = self._stack.cut_amqp()
        return FaultEvent("amqp_cut", at, at, f"{n} AMQP connection(s) aborted", crash=(at, at))

    async def broker_restart(self) -> FaultEvent:
        at = self._reactor.seconds()
        await self._stack.rabbit.stop_app()
        await self._sleep(self._timings.broker_down)
        await self._stack.rabbit.start_app()
        back = self._reactor.seconds()
        return FaultEvent(
            "broker_restart",
            at,
            back,
            f"stop_app, {back - at:.1f}s until it answered again",
            crash=(at, back),
        )

    async def redis_pause(self) -> FaultEvent:
        at = self._reactor.seconds()
        self._stack.redis.pause()
        try:
            await self._sleep(self._timings.redis_pause)
        finally:
            self._stack.redis.resume()
        return FaultEvent(
            "redis_pause", at, self._reactor.seconds(), f"SIGSTOP {self._timings.redis_pause:g}s"
        )

    async def callback_outage(self) -> FaultEvent:
        at = self._reactor.seconds()
        await self._receiver.down()
        try:
            await self._sleep(self._timings.callback_down)
            self._receiver.error()
            await self._sleep(self._timings.callback_error)
        finally:
            self._receiver.up()
        return FaultEvent(
            "callback_outage",
            at,
            self._reactor.seconds(),
            f"receiver down {self._timings.callback_down:g}s, then 503 for {self._timings.callback_error:g}s",
        )

    async def poison(self) -> FaultEvent:
        at = self._reactor.seconds()
        admin = self._stack.admin
        assert admin is not None
        self._poisons += 1
        bad = f"{self._run_id}-poison-{self._poisons}-undecodable"
        await admin.publish_raw(self._stack.queue, b"\xff\xfe", {CALL_HEADER: "{not json"}, message_id=bad)
        self._ledger.poison[bad] = "undecodable"
        ugly = f"{self._run_id}-poison-{self._poisons}-unprocessable"
        meta = Call(
            call_id=ugly,
            function=self._function_name,
            method="P\u00d6ST",
            headers=[("X-Call-Id", ugly)],
            body=payload(ugly),
            callback_url=self._receiver.url,
            accepted_at=time.time(),
            queue=self._stack.queue,
        ).meta()
        await admin.publish_raw(
            self._stack.queue, payload(ugly), {CALL_HEADER: json.dumps(meta)}, message_id=ugly
        )
        self._ledger.poison[ugly] = "unprocessable"
        return FaultEvent("poison", at, self._reactor.seconds(), f"published {bad} and {ugly}")

    async def purge(self) -> FaultEvent:
        at = self._reactor.seconds()
        admin = self._stack.admin
        assert admin is not None
        for worker in self._stack.workers:
            self._stack.kill_worker(worker)
        await self._sleep(self._timings.worker_down + 1.0)
        purged = await admin.purge(self._stack.queue)
        await self._stack.start_workers()
        return FaultEvent(
            "purge",
            at,
            self._reactor.seconds(),
            f"SELF-TEST: every worker killed and {purged} queued message(s) purged: these calls are lost",
            crash=(at, self._reactor.seconds()),
        )
