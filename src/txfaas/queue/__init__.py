"""The call queue: an interface, a RabbitMQ implementation (pika) and an in-memory one.

The queue knows nothing of HTTP, Klein or the processes that use it.  A
publish resolves only once the broker has confirmed the message; a consumer
receives :class:`Delivery` objects and must ack or nack each one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from txfaas.model import Call


class QueueError(Exception):
    """Base class of the queue's errors."""


class QueueUnavailable(QueueError):
    """The broker is unreachable, refused the message, or did not confirm it in time (-> 503)."""


class QueueRefused(QueueUnavailable):
    """The broker refused to declare a queue (access refused, other arguments): asking again
    will not help until someone changes the name or the queue."""


class Delivery(Protocol):
    """One message handed to a consumer."""

    call: Call
    #: True when the broker delivered this message before (a worker died, a channel closed).
    redelivered: bool
    #: How many times the broker delivered it before this time (quorum queues' x-delivery-count).
    delivery_count: int

    def ack(self) -> None:
        """Done with it: the broker forgets the message."""

    def nack(self, requeue: bool = True) -> None:
        """Give it back (``requeue``) or drop it to the queue's dead-letter route."""


DeliveryHandler = Callable[[Delivery], None]


class CallQueue(Protocol):
    async def start(self) -> None:
        """Start connecting (in the background) and declaring the queues given at construction.

        Returns at once and never fails because the broker is down: a gateway must start
        and answer 503 to async posts while it is unreachable.  Use :meth:`ready` to wait."""

    async def ready(self, timeout: float) -> None:
        """Wait until the queue is usable; :class:`QueueUnavailable` after ``timeout`` seconds."""

    async def declare(self, queue: str) -> None:
        """Make sure a (durable) queue exists."""

    async def publish(self, call: Call) -> None:
        """Put ``call`` on ``call.queue``, persistently; fire once the broker confirmed it.

        Raise :class:`QueueUnavailable` when the broker is unreachable, refuses the
        message (nack, unroutable) or does not confirm within the queue's bound."""

    async def publish_delayed(self, call: Call, delay: float) -> float:
        """Put ``call`` on ``call.queue`` in about ``delay`` seconds; fire once the broker has it.

        The wait is spent in the broker (a delay queue), not in this process: a restart
        loses nothing.  Returns the delay actually used, at most ``delay`` (0: published
        at once); ``call.not_before`` tells the consumer whether to send it round again."""

    async def dead_letter(self, call: Call) -> None:
        """Put ``call`` (``call.dead`` says why) on the dead-letter queue; fire once confirmed."""

    def consume(self, queues: list[str], prefetch: int, handler: DeliveryHandler) -> None:
        """Start delivering from ``queues``, at most ``prefetch`` unacknowledged at once.

        Consuming resumes by itself after a reconnection."""

    async def stop_consuming(self, queues: Sequence[str] | None = None) -> None:
        """Stop taking new messages (only from the consumers of ``queues``, if given); deliveries
        not yet acked stay owned until ack/nack/close."""

    async def ping(self) -> None:
        """Raise :class:`QueueUnavailable` unless the broker connection is up."""

    async def close(self) -> None:
        """Close the connection; unacknowledged messages go back to their queues."""
