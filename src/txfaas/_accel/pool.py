"""A connection pool that hands out the connection used last (Twisted's takes the one idle longest).

It overrides ``HTTPConnectionPool._putConnection`` and reads its ``_connections``, ``_timeouts``,
``_reactor`` and ``_removeConnection``; :func:`probe` checks a pool made here keeps, hands out and
expires connections as that code expects.  ``tests/unit/test_accel_pool.py`` runs the same
operations on it and on Twisted's pool.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.web.client import HTTPConnectionPool

from txfaas.timers import TimerQueue


class RecentFirstPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` that hands out the connection used last (Twisted's takes the one
    idle longest).

    After a burst, a pool sized for concurrency holds hundreds of idle connections; taking the
    oldest first rotates light traffic through all of them, cold ones included.  Most recent
    first keeps light traffic on a few warm connections; the rest expire after
    ``cachedConnectionTimeout``.  When full, the connection idle longest is closed, as in
    Twisted's.  The idle timers share one reactor timer (:class:`TimerQueue`): a connection comes
    back to the pool after every request.
    """

    _idle: TimerQueue | None = None

    def cached(self, key: Any) -> Any:
        """An idle connection for ``key`` taken out of the pool, or None: what ``getConnection``
        does first, without a Deferred (:class:`txfaas._accel.agent.OriginAgent` retries a
        failed idempotent request itself)."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                return connection
        return None

    def _putConnection(self, key: Any, connection: Any) -> None:
        if connection.state != "QUIESCENT":
            self._log.error("BUG: non-quiescent protocol added to the connection pool")
            return
        connections = self._connections.setdefault(key, [])
        if len(connections) >= self.maxPersistentPerHost:
            dropped = connections.pop()  # idle longest: at the end
            dropped.transport.loseConnection()
            self._timeouts.pop(dropped).cancel()
        connections.insert(0, connection)  # getConnection takes connections[0]
        idle = self._idle
        if idle is None or idle.delay != self.cachedConnectionTimeout:
            idle = self._idle = TimerQueue(self._reactor, self.cachedConnectionTimeout)
        self._timeouts[connection] = idle.add(partial(self._removeConnection, key, connection))


def probe() -> bool:
    """True when a :class:`RecentFirstPool` keeps connections, hands out the one put last, closes
    the one idle longest when full, and closes idle ones when their time is up."""
    from twisted.internet.task import Clock

    class Idle:
        state = "QUIESCENT"

        def __init__(self) -> None:
            self.transport = self
            self.closed = False

        def loseConnection(self) -> None:
            self.closed = True

    try:
        clock = Clock()
        pool = RecentFirstPool(clock, persistent=True)
        pool.maxPersistentPerHost = 2
        a, b, c = Idle(), Idle(), Idle()
        for connection in (a, b, c):
            pool._putConnection("k", connection)
        taken: list[Any] = []
        no_endpoint: Any = None  # never used: the connections are idle already
        pool.getConnection("k", no_endpoint).addCallback(taken.append)
        if not a.closed or b.closed or c.closed or len(taken) != 1:
            return False
        if getattr(taken[0], "_clientProtocol", taken[0]) is not c:  # (inside the retrying wrapper)
            return False
        pool._putConnection("k", c)
        clock.advance(pool.cachedConnectionTimeout)
        return b.closed and c.closed and not pool._connections.get("k")
    except Exception:
        return False
