"""What the queue declares on the broker, and the names it gives things.

Work queues are durable and keep their plain arguments (``x-queue-type`` only): adding
``x-delivery-limit``/``x-dead-letter-*`` to a queue that exists without them makes every
declare fail with 406, and gateway and worker would have to agree on them.  The worker
enforces the delivery limit from the quorum queue's own ``x-delivery-count``.

With a :class:`Topology` (the worker's), retries and dead letters get:

- ``{prefix}.retry``: a direct exchange; every work queue (and the callback queue) is bound to
  it by its own name.
- one delay tier per TTL: a fanout exchange ``{prefix}.delay.{ms}`` and a quorum queue of the
  same name with ``x-message-ttl: ms``, dead-lettering to ``{prefix}.retry`` at-least-once.  A
  delayed message goes to the tier's exchange with its target queue's name as routing key; when
  the TTL expires the broker dead-letters it to ``{prefix}.retry`` with that key, which routes it
  back to its queue (and keeps it in the tier until that queue is bound).
- the dead-letter queue and the callback queue (plain quorum queues).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import pika.exceptions
from twisted.logger import Logger

from txfaas.queue import QueueRefused, QueueUnavailable
from txfaas.queue.amqp.connection import close_quietly, describe
from txfaas.retry import DEFAULT_TIERS

#: The message header carrying the call's metadata (JSON); the body is the raw request body.
CALL_HEADER = "txfaas-call"
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


class Declarations:
    """The queues to declare on every connection, and how each is declared.

    Every declaration runs on its own short-lived channel, so a refusal closes that channel,
    not the publisher's.  ``connection`` bounds each step with its connect timeout.
    """

    log = Logger()

    def __init__(
        self,
        connection: Any,
        queues: Sequence[str],
        *,
        queue_type: str = "quorum",
        topology: Topology | None = None,
    ) -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
        self._connection = connection
        self.topology = topology
        extra = (topology.dead_letter_queue, topology.callback_queue) if topology is not None else ()
        self.queues: list[str] = list(dict.fromkeys([*queues, *extra]))
        self._arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None

    def remember(self, queue: str) -> None:
        """Declare ``queue`` on every later connection too."""
        if queue not in self.queues:
            self.queues.append(queue)

    def forget(self, queue: str) -> None:
        if queue in self.queues:
            self.queues.remove(queue)

    async def declare_all(self, conn: Any) -> None:
        """The topology, then every remembered queue; a queue the broker refuses is logged."""
        if self.topology is not None:
            await self._declare_topology(conn, self.topology)
        for queue in list(self.queues):
            try:
                await self.declare(conn, queue)
            except QueueUnavailable:
                pass  # refused by the broker (logged); the connection stays usable for the others

    async def declare(self, conn: Any, queue: str) -> None:
        """Declare one durable queue (and bind it for retries).

        :class:`QueueRefused` for a 403 (the queue cannot be had), :class:`QueueUnavailable`
        for another refusal (406: it exists with other arguments, yet takes messages)."""
        bounded = self._connection.bounded
        channel = await bounded(conn.channel())
        try:
            try:
                await bounded(channel.queue_declare(queue, durable=True, arguments=self._arguments))
            except pika.exceptions.ChannelClosedByBroker as e:
                # Not fatal for the connection; logged on every connection until someone fixes it.
                self.log.error("cannot declare queue {queue}: {reason}", queue=queue, reason=describe(e))
                kind = QueueRefused if e.reply_code == 403 else QueueUnavailable
                raise kind(f"cannot declare queue {queue!r}: {describe(e)}") from None
            await self._bind_for_retries(conn, channel, queue)
        finally:
            close_quietly(channel)

    async def _bind_for_retries(self, conn: Any, channel: Any, queue: str) -> None:
        """Bind a work (or callback) queue to the retry exchange by its own name."""
        topology = self.topology
        if topology is None or queue == topology.dead_letter_queue:
            return
        bounded = self._connection.bounded
        try:
            if not channel.is_open:  # the declare was refused: bind on a fresh channel
                channel = await bounded(conn.channel())
            await bounded(channel.queue_bind(queue, topology.retry_exchange, routing_key=queue))
        except Exception as e:
            self.log.error(
                "cannot bind queue {queue} to {exchange}: {reason}; its retries wait in the delay "
                "queues until it is bound",
                queue=queue,
                exchange=topology.retry_exchange,
                reason=describe(e),
            )

    async def _declare_topology(self, conn: Any, topology: Topology) -> None:
        """The retry exchange and the delay tiers (exchange + TTL queue + binding each)."""
        bounded = self._connection.bounded
        channel = await bounded(conn.channel())
        name = topology.retry_exchange
        try:
            await bounded(channel.exchange_declare(name, exchange_type="direct", durable=True))
            for tier in topology.delay_tiers:
                name = topology.tier_name(tier)
                await bounded(channel.exchange_declare(name, exchange_type="fanout", durable=True))
                await bounded(
                    channel.queue_declare(name, durable=True, arguments=topology.tier_arguments(tier))
                )
                await bounded(channel.queue_bind(name, name))
        except pika.exceptions.ChannelClosedByBroker as e:
            # Not fatal: plain publishing and consuming still work; delayed publishes fail (503/requeue).
            self.log.error(
                "cannot declare {name} (retry/delay topology): {reason}; delete it to let txfaas "
                "declare it again",
                name=name,
                reason=describe(e),
            )
        finally:
            close_quietly(channel)
