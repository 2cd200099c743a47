"""The Redis store's connection: a txredisapi pool owned by a service, and bounded commands.

The store is a child service of each process's service tree: ``startService`` opens a lazy,
reconnecting pool and ``stopService`` closes it. Every command is bounded by a timeout on the
injected clock (a lazy pool pointed at a dead server would otherwise wait forever), and every
failure to reach Redis becomes :class:`~txfaas.store.StoreUnavailable`, so callers answer 503.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas import _accel
from txfaas.config import RedisURL
from txfaas.store import StoreUnavailable
from txfaas.timers import Deadlines


def dumps(data: Any) -> bytes:
    return orjson.dumps(data)


class _NotConnected:
    """Where commands go while the store is not started: each fails at once."""

    def __getattr__(self, command: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.fail(ConnectionError("the store is not started"))

        return fail


_NOT_CONNECTED = _NotConnected()


class RedisBase(Service):
    """A txredisapi pool, opened by ``startService`` and closed by ``stopService``."""

    log = Logger()

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        *,
        prefix: str = "txfaas:",
        timeout: float = 5.0,
        call_ttl: float = 24 * 3600,
        url: RedisURL | None = None,
        poolsize: int = 4,
    ) -> None:
        """``redis`` is a txredisapi connection (or pool) made with ``convertNumbers=False``, or
        None to open one for ``url`` when started."""
        self._handler = redis
        self._url = url
        self._poolsize = poolsize
        # The pool's ready connections, when the accelerated path may pick among them itself.
        self._connected: list[Any] = []
        self._closing: defer.Deferred[None] | None = None
        self._clock = clock
        self._prefix = prefix
        self._timeout = timeout
        self._call_ttl = max(1, int(call_ttl))
        self._set_ttl = (b"EX", b"%d" % self._call_ttl)
        self._functions = f"{prefix}functions"
        self._invocations = f"{prefix}invocations"
        self._namespaces = f"{prefix}namespaces"
        # One timer for every pending command's deadline instead of one each.
        self._deadlines = Deadlines(clock)

    @classmethod
    def from_url(cls, url: RedisURL, clock: IReactorTime, *, poolsize: int = 4, **kwargs: Any) -> Any:
        """A store that connects to ``url`` when started."""
        return cls(None, clock, url=url, poolsize=poolsize, **kwargs)

    @classmethod
    def connect(cls, url: RedisURL, clock: IReactorTime, *, poolsize: int = 4, **kwargs: Any) -> Any:
        """A store for ``url``, started (connecting in the background); ``close()`` stops it."""
        store = cls.from_url(url, clock, poolsize=poolsize, **kwargs)
        store.startService()
        return store

    def startService(self) -> None:
        super().startService()
        if self._handler is None and self._url is not None:
            self._handler = self._open(self._url)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.close()

    def _open(self, url: RedisURL) -> Any:
        """A lazy, reconnecting txredisapi pool (imported here: it imports the global reactor)."""
        import txredisapi

        # Database 0 is every connection's own: no SELECT on connect.  (txredisapi's SELECT, when
        # the connection drops during it, fails a Deferred of its own that nobody handles.)
        dbid = url.db or None
        if url.unix_socket:
            pool = txredisapi.lazyUnixConnectionPool(
                url.unix_socket,
                dbid=dbid,
                poolsize=self._poolsize,
                password=url.password,
                replyTimeout=self._timeout,
                convertNumbers=False,
            )
        else:
            pool = txredisapi.lazyConnectionPool(
                url.host,
                url.port,
                dbid=dbid,
                poolsize=self._poolsize,
                password=url.password,
                connectTimeout=self._timeout,
                replyTimeout=self._timeout,
                convertNumbers=False,
            )
        if _accel.enabled():
            from txfaas._accel import redis as accel

            if accel.probe():
                # Before the reactor's next turn: every connection of the pool is built after it.
                self._connected = accel.install(pool)
        return pool

    @property
    def _redis(self) -> Any:
        """Where the next command goes: a ready connection of the pool when the accelerated
        path knows them, else txredisapi's pool handler (which waits for a connection)."""
        for protocol in self._connected:
            if protocol.connected:
                return protocol
        if self._handler is None or self._closing is not None:
            return _NOT_CONNECTED
        return self._handler

    def close(self) -> defer.Deferred[None]:
        """Close the pool (once: a second call waits for the first)."""
        if self._closing is None:
            self._deadlines.stop()
            self._connected = []
            handler = self._handler
            self._closing = (
                defer.maybeDeferred(handler.disconnect) if handler is not None else defer.succeed(None)
            )
            self._closing.addCallback(lambda _: None)
            self._closing.addErrback(lambda f: self.log.failure("closing the Redis pool", f))
        done: defer.Deferred[None] = defer.Deferred()
        self._closing.addCallback(done.callback)
        return done

    async def _run(self, what: str, d: defer.Deferred[Any]) -> Any:
        import txredisapi

        deadline = self._clock.seconds() + self._timeout
        self._deadlines.watch(d, deadline)
        try:
            return await d
        except defer.CancelledError:
            if self._clock.seconds() < deadline:
                raise  # our caller gave up (cancelled): not Redis's fault
            raise StoreUnavailable(f"redis did not answer {what} within {self._timeout:g}s") from None
        except txredisapi.ConnectionError as e:
            raise StoreUnavailable(f"redis unreachable ({what}): {e}") from None
        except ConnectionError as e:
            raise StoreUnavailable(f"redis unreachable ({what}): {e}") from None

    async def ping(self) -> None:
        await self._run("PING", self._redis.ping())

    def _set(self, key: str, value: bytes, *flags: bytes) -> defer.Deferred[Any]:
        """``SET key value EX <call TTL> [flags]`` with every argument bytes already (none left
        for the encoder to convert)."""
        return self._redis.execute_command(b"SET", key.encode(), value, *self._set_ttl, *flags)
