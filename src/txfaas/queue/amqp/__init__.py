"""The call queue on RabbitMQ, through pika's Twisted adapter.

:mod:`.connection` keeps the connection up, :mod:`.topology` declares the queues and names
them, :mod:`.publisher` publishes with confirms, :mod:`.consumer` consumes; :class:`AMQPQueue`
(in :mod:`.service`) is the ``CallQueue`` and service made of them.
"""

from txfaas.queue.amqp.consumer import AMQPDelivery
from txfaas.queue.amqp.service import AMQPQueue
from txfaas.queue.amqp.topology import CALL_HEADER, QUEUE_TYPES, Topology

__all__ = ["CALL_HEADER", "QUEUE_TYPES", "AMQPDelivery", "AMQPQueue", "Topology"]
