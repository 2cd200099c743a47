"""Public in-memory fakes, for txfaas's own tests and for people testing code around it."""

from txfaas.queue.memory import MemoryDelivery, MemoryQueue
from txfaas.store.memory import MemoryStore

__all__ = ["MemoryDelivery", "MemoryQueue", "MemoryStore"]
