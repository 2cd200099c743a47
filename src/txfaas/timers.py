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


class TimerQueue:
    """Timers that all have the same delay, so they come due in the order they were set: one
    ``DelayedCall`` for all of them (a proxied call's deadline, a pooled connection's idle time).

    Cancelled timers are dropped when they reach the head, or all at once when they are most of
    the queue (one slow call at the head must not make the queue hold every call behind it).
    """

    def __init__(self, clock: Any, delay: float) -> None:
        self._clock = clock
        self.delay = delay
        self._queue: deque[QueuedTimer] = deque()
        self._cancelled = 0
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._queue) - self._cancelled

    def add(self, fire: Callable[[], object]) -> QueuedTimer:
        queue = self._queue
        while queue and queue[0].fire is None:
            queue.popleft()
            self._cancelled -= 1
        if self._cancelled > 1024 and self._cancelled * 2 > len(queue):
            self._queue = queue = deque(t for t in queue if t.fire is not None)
            self._cancelled = 0
        timer = QueuedTimer(self._clock.seconds() + self.delay, fire, self)
        queue.append(timer)
        if self._call is None:
            self._call = self._clock.callLater(self.delay, self._due)
        return timer

    def _due(self) -> None:
        self._call = None
        queue = self._queue
        now = self._clock.seconds()
        while queue and (queue[0].fire is None or queue[0].when <= now):
            timer = queue.popleft()
            fire, timer.fire = timer.fire, None
            if fire is None:
                self._cancelled -= 1
                continue
            try:
                fire()
            except Exception:
                log.failure("timer {timer!r} failed", timer=fire)
        if queue and self._call is None:
            self._call = self._clock.callLater(max(0.0, queue[0].when - now), self._due)

    def stop(self) -> None:
        """Cancel every timer (none fires)."""
        for timer in self._queue:
            timer.fire = None
        self._queue.clear()
        self._cancelled = 0
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


class Deadlines:
    """Cancels the Deferreds still pending at their deadline, with one timer for them all.

    ``addTimeout`` costs a DelayedCall per Deferred (about 6 µs here, a tenth of a publish)
    and another call to cancel it.  Every user here has one fixed timeout (the broker's
    confirm, a Redis reply), so deadlines are added in order and a FIFO will do."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._pending: deque[tuple[float, defer.Deferred]] = deque()
        self._timer: Any = None

    def watch(self, d: defer.Deferred, deadline: float) -> None:
        pending = self._pending
        while pending and pending[0][1].called:
            pending.popleft()
        pending.append((deadline, d))
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        delay = max(0.0, self._pending[0][0] - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        pending = self._pending
        while pending and (pending[0][1].called or pending[0][0] <= now):
            _, d = pending.popleft()
            if not d.called:
                d.cancel()  # its waiter sees CancelledError after the deadline: a timeout
        if pending and self._timer is None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
