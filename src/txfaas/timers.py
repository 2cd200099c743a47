"""Deadline timers that share one reactor call between many deadlines."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="txfaas.timers")


def _nothing() -> None:
    pass


class LazyTimer:
    """A deadline that moves on often and passes rarely, with one ``DelayedCall`` behind it.

    A connection's deadlines are set, moved and dropped for every request; with ``callLater``
    each of those is a timer made and cancelled in the reactor's heap.  Here :meth:`set` and
    :meth:`clear` only record the deadline (the armed call is moved only when the new deadline
    is sooner), and when the armed call comes due before the current deadline it re-arms for
    the rest.  ``fire`` runs at the deadline, as it would with ``callLater``.  :meth:`stop`
    when the owner is done with it (a pending call keeps its owner alive until it is due).
    """

    __slots__ = ("_armed", "_call", "_clock", "_fire", "_when")

    def __init__(self, clock: Any, fire: Callable[[], object]) -> None:
        self._clock = clock
        self._fire = fire
        self._when: float | None = None
        self._call: Any = None
        self._armed = 0.0

    @property
    def pending(self) -> bool:
        return self._when is not None

    def set(self, delay: float) -> None:
        """Fire ``delay`` seconds from now (replacing any deadline set before)."""
        when = self._when = self._clock.seconds() + delay
        call = self._call
        if call is None:
            self._armed = when
            self._call = self._clock.callLater(delay, self._due)
        elif when < self._armed:
            self._armed = when
            call.reset(delay)

    def clear(self) -> None:
        self._when = None

    def stop(self) -> None:
        """Done with: no deadline, no call in the reactor, and no reference to ``fire`` (its owner
        holds this timer: a cycle the cyclic GC would have to find)."""
        self._when = None
        self._fire = _nothing
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _due(self) -> None:
        self._call = None
        when = self._when
        if when is None:
            return
        delay = when - self._clock.seconds()
        if delay > 0:
            self._armed = when
            self._call = self._clock.callLater(delay, self._due)
            return
        self._when = None
        self._fire()


class QueuedTimer:
    """One timer of a :class:`TimerQueue` (``cancel``/``active`` as a ``DelayedCall``)."""

    __slots__ = ("_queue", "fire", "when")

    def __init__(self, when: float, fire: Callable[[], object] | None, queue: TimerQueue) -> None:
        self.when = when
        self.fire = fire
        self._queue = queue

    def active(self) -> bool:
        return self.fire is not None

    def cancel(self) -> None:
        if self.fire is not None:
            self.fire = None
            self._queue._cancelled += 1


class _Watched:
    """A Deferred cancelled at ``when`` unless it has fired by then (:meth:`TimerQueue.watch`)."""

    __slots__ = ("deferred", "when")

    def __init__(self, when: float, deferred: defer.Deferred[Any]) -> None:
        self.when = when
        self.deferred = deferred

    @property
    def fire(self) -> Callable[[], object] | None:
        d = self.deferred
        return None if d.called else d.cancel


class TimerQueue:
    """The one deadline queue: timers that come due in the order they were added, with one
    ``DelayedCall`` for all of them.

    Every user has one fixed timeout (a proxied call's deadline, a pooled connection's idle
    time, a broker's confirm, a Redis reply), so deadlines are added in order and a FIFO does:
    :meth:`add` a callable ``delay`` seconds from now (or at ``when``), or :meth:`watch` a
    Deferred, cancelled at its deadline unless it fired before (its waiter then sees
    ``CancelledError``: a timeout).  Finished entries are dropped when they reach the head,
    cancelled timers all at once when they are most of the queue.  (A deadline that moves
    with every request is a :class:`LazyTimer`.)
    """

    def __init__(self, clock: Any, delay: float = 0.0) -> None:
        self._clock = clock
        self.delay = delay
        self._queue: deque[QueuedTimer | _Watched] = deque()
        self._cancelled = 0
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._queue) - self._cancelled

    def add(self, fire: Callable[[], object], when: float | None = None) -> QueuedTimer:
        """Call ``fire`` ``delay`` seconds from now, or at ``when`` on the clock."""
        if when is None:
            when = self._clock.seconds() + self.delay
        timer = QueuedTimer(when, fire, self)
        self._append(timer)
        return timer

    def watch(self, d: defer.Deferred[Any], when: float) -> None:
        """Cancel ``d`` at ``when`` on the clock unless it has fired by then."""
        self._append(_Watched(when, d))

    def _append(self, entry: QueuedTimer | _Watched) -> None:
        queue = self._queue
        while queue and queue[0].fire is None:
            if isinstance(queue.popleft(), QueuedTimer):
                self._cancelled -= 1
        if self._cancelled > 1024 and self._cancelled * 2 > len(queue):
            self._queue = queue = deque(t for t in queue if t.fire is not None)
            self._cancelled = 0
        queue.append(entry)
        if self._call is None:
            self._schedule(self._clock.seconds())

    def _schedule(self, now: float) -> None:
        self._call = self._clock.callLater(max(0.0, self._queue[0].when - now), self._due)

    def _due(self) -> None:
        self._call = None
        queue = self._queue
        now = self._clock.seconds()
        while queue and (queue[0].fire is None or queue[0].when <= now):
            entry = queue.popleft()
            fire = entry.fire
            if isinstance(entry, QueuedTimer):
                entry.fire = None
                if fire is None:
                    self._cancelled -= 1
            if fire is None:
                continue
            try:
                fire()
            except Exception:
                log.failure("timer {timer!r} failed", timer=fire)
        if queue and self._call is None:
            self._schedule(now)

    def stop(self) -> None:
        """Cancel every timer (none fires, no Deferred is cancelled)."""
        for entry in self._queue:
            if isinstance(entry, QueuedTimer):
                entry.fire = None
        self._queue.clear()
        self._cancelled = 0
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


#: The name the AMQP queue and the Redis store know it by (``Deadlines(clock).watch(d, when)``).
Deadlines = TimerQueue
