"""The HTTP connection pool of the outgoing clients: Twisted's ``HTTPConnectionPool``.

With accelerations on (and their probes passing) the pool is :class:`txfaas._accel.pool.RecentFirstPool`
and builds :class:`txfaas._accel.http11.HTTP11Connection`s.
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool

from txfaas import _accel


def quiet_pool(
    reactor: Any, *, persistent: bool = True, per_host: int = 2, idle_timeout: float | None = None
) -> HTTPConnectionPool:
    """A pool keeping up to ``per_host`` idle connections per host, each for ``idle_timeout``
    seconds (Twisted's default, 240, when None)."""
    from txfaas._accel import http11
    from txfaas._accel import pool as recent

    fast = _accel.enabled()
    pool: HTTPConnectionPool
    if fast and recent.probe():
        pool = recent.RecentFirstPool(reactor, persistent=persistent)
    else:
        pool = HTTPConnectionPool(reactor, persistent=persistent)
    if fast and http11.probe():
        http11.install(pool)
    pool.maxPersistentPerHost = per_host
    if idle_timeout is not None:
        pool.cachedConnectionTimeout = idle_timeout  # type: ignore[assignment]
    return pool
