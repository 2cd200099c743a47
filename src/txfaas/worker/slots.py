"""Bounded concurrency per key: the worker's callback deliveries per destination host."""

from __future__ import annotations

from collections import deque

from twisted.internet import defer


class KeyedSlots:
    """At most ``per_key`` holders of each key at once; the others wait, first come first served.

    :meth:`acquire` returns a Deferred that fires when the slot is the caller's (at once if
    one is free); cancelling it gives up the place in line.  Every slot obtained must be
    given back with :meth:`release`.
    """

    def __init__(self, per_key: int) -> None:
        if per_key < 1:
            raise ValueError("per_key must be at least 1")
        self.per_key = per_key
        self._busy: dict[str, int] = {}
        self._waiting: dict[str, deque[defer.Deferred[None]]] = {}

    def busy(self, key: str) -> int:
        """Slots of ``key`` held now."""
        return self._busy.get(key, 0)

    def waiting(self, key: str) -> int:
        """Callers waiting for a slot of ``key``."""
        return len(self._waiting.get(key, ()))

    def acquire(self, key: str) -> defer.Deferred[None]:
        """A slot of ``key``: at once if one is free, else in turn."""
        if self.busy(key) < self.per_key and not self.waiting(key):
            self._busy[key] = self.busy(key) + 1
            return defer.succeed(None)

        def leave(d: defer.Deferred[None]) -> None:
            line = self._waiting.get(key)
            if line is not None and d in line:
                line.remove(d)
                if not line:
                    del self._waiting[key]

        d: defer.Deferred[None] = defer.Deferred(leave)
        self._waiting.setdefault(key, deque()).append(d)
        return d

    def release(self, key: str) -> None:
        """Give a slot back: it passes straight to the next in line, if any."""
        line = self._waiting.get(key)
        if line:
            d = line.popleft()
            if not line:
                del self._waiting[key]
            d.callback(None)  # the slot passes straight to the next in line
            return
        left = self.busy(key) - 1
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)
