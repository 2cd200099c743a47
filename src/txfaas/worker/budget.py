"""A byte budget: how much of the functions' answers the worker holds at once (--max-answer-memory)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet import defer


class ByteBudget:
    """At most ``capacity`` bytes reserved at once; reservations wait in line, first come first
    served (a big one is not passed over forever by small ones).

    :meth:`reserve` returns a Deferred that fires once the bytes are the caller's; cancelling
    it leaves the line.  Every reservation granted must be given back with :meth:`release`.
    ``on_free`` is called whenever a release leaves room (the worker resumes taking messages).
    """

    def __init__(self, capacity: int, on_free: Callable[[], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 byte")
        self.capacity = capacity
        self.held = 0
        self.peak = 0
        self.on_free = on_free
        self._line: deque[tuple[int, defer.Deferred[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Reservations waiting in line."""
        return len(self._line)

    @property
    def full(self) -> bool:
        """No room left, or someone already waits for some."""
        return self.held >= self.capacity or bool(self._line)

    def try_reserve(self, n: int) -> bool:
        """Take ``n`` bytes now if they fit and nobody waits; else take nothing."""
        if self._line or self.held + n > self.capacity:
            return False
        self._take(n)
        return True

    def reserve(self, n: int) -> defer.Deferred[None]:
        """Take ``n`` bytes once they fit, after those already waiting."""
        if n > self.capacity:
            raise ValueError(f"{n} bytes is more than the whole budget ({self.capacity})")
        if self.try_reserve(n):
            return defer.succeed(None)

        def leave(d: defer.Deferred[None]) -> None:
            for entry in self._line:
                if entry[1] is d:
                    self._line.remove(entry)
                    break
            self._grant()  # the one behind may fit now

        d: defer.Deferred[None] = defer.Deferred(leave)
        self._line.append((n, d))
        return d

    def release(self, n: int) -> None:
        """Give back ``n`` bytes: grant the reservations that now fit, in line."""
        if n <= 0:
            return
        self.held = max(0, self.held - n)
        self._grant()
        if self.on_free is not None and not self.full:
            self.on_free()

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def _grant(self) -> None:
        while self._line and self.held + self._line[0][0] <= self.capacity:
            n, d = self._line.popleft()
            self._take(n)
            d.callback(None)
