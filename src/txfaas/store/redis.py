"""The Redis store, through txredisapi.

Every command is bounded by a timeout on the injected clock (a lazy pool
pointed at a dead server would otherwise wait forever) and every failure to
reach Redis becomes :class:`StoreUnavailable`, so callers answer 503.

Keys (``prefix`` defaults to ``txfaas:``):

- ``{prefix}functions``: hash, function name -> JSON record
- ``{prefix}invocations``: hash, function name -> invocation count
- ``{prefix}call:{id}``: JSON call record, with the status TTL
- ``{prefix}result:{id}``: JSON function response, with the status TTL
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txfaas.config import RedisURL
from txfaas.model import CallRecord, CallResult, FunctionSpec
from txfaas.store import AlreadyExists, NotFound, StoreUnavailable


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


class RedisStore:
    """Functions and call records in Redis.  Implements ``FunctionStore`` and ``CallStore``."""

    log = Logger()

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        *,
        prefix: str = "txfaas:",
        timeout: float = 5.0,
        call_ttl: float = 24 * 3600,
    ) -> None:
        """``redis`` is a txredisapi connection (or pool) made with ``convertNumbers=False``."""
        self._redis = redis
        self._clock = clock
        self._prefix = prefix
        self._timeout = timeout
        self._call_ttl = max(1, int(call_ttl))
        self._functions = f"{prefix}functions"
        self._invocations = f"{prefix}invocations"

    @classmethod
    def connect(
        cls,
        url: RedisURL,
        clock: IReactorTime,
        *,
        poolsize: int = 4,
        **kwargs: Any,
    ) -> RedisStore:
        """Open a lazy, reconnecting txredisapi pool (imported here: it imports the global reactor)."""
        import txredisapi

        timeout = kwargs.get("timeout", 5.0)
        if url.unix_socket:
            pool = txredisapi.lazyUnixConnectionPool(
                url.unix_socket,
                dbid=url.db,
                poolsize=poolsize,
                password=url.password,
                replyTimeout=timeout,
                convertNumbers=False,
            )
        else:
            pool = txredisapi.lazyConnectionPool(
                url.host,
                url.port,
                dbid=url.db,
                poolsize=poolsize,
                password=url.password,
                connectTimeout=timeout,
                replyTimeout=timeout,
                convertNumbers=False,
            )
        return cls(pool, clock, **kwargs)

    def close(self) -> defer.Deferred:
        return defer.maybeDeferred(self._redis.disconnect)

    async def _run(self, what: str, d: defer.Deferred) -> Any:
        import txredisapi

        d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except (defer.TimeoutError, defer.CancelledError):
            raise StoreUnavailable(f"redis did not answer {what} within {self._timeout:g}s") from None
        except txredisapi.ConnectionError as e:
            raise StoreUnavailable(f"redis unreachable ({what}): {e}") from None
        except ConnectionError as e:
            raise StoreUnavailable(f"redis unreachable ({what}): {e}") from None

    async def ping(self) -> None:
        await self._run("PING", self._redis.ping())

    # --- functions ---------------------------------------------------------------------------

    async def list_functions(self) -> list[FunctionSpec]:
        raw = await self._run("HGETALL", self._redis.hgetall(self._functions))
        return [FunctionSpec.from_record(json.loads(raw[name])) for name in sorted(raw)]

    async def get_function(self, name: str) -> FunctionSpec | None:
        raw = await self._run("HGET", self._redis.hget(self._functions, name))
        return None if raw is None else FunctionSpec.from_record(json.loads(raw))

    async def create_function(self, spec: FunctionSpec) -> None:
        added = await self._run(
            "HSETNX", self._redis.hsetnx(self._functions, spec.service, _dumps(spec.to_record()))
        )
        if not added:
            raise AlreadyExists(spec.service)

    async def update_function(self, spec: FunctionSpec) -> None:
        old = await self.get_function(spec.service)
        if old is None:
            raise NotFound(spec.service)
        new = attrs.evolve(spec, created_at=old.created_at, replicas=old.replicas)
        await self._run("HSET", self._redis.hset(self._functions, spec.service, _dumps(new.to_record())))

    async def delete_function(self, name: str) -> None:
        removed = await self._run("HDEL", self._redis.hdel(self._functions, name))
        if not removed:
            raise NotFound(name)
        await self._run("HDEL", self._redis.hdel(self._invocations, name))

    async def scale_function(self, name: str, replicas: int) -> None:
        old = await self.get_function(name)
        if old is None:
            raise NotFound(name)
        new = attrs.evolve(old, replicas=replicas)
        await self._run("HSET", self._redis.hset(self._functions, name, _dumps(new.to_record())))

    async def add_invocations(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        await self._run(
            "HINCRBY",
            defer.gatherResults(
                [self._redis.hincrby(self._invocations, name, n) for name, n in counts.items()],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure),
        )

    async def invocation_counts(self, names: list[str]) -> dict[str, int]:
        if not names:
            return {}
        values = await self._run("HMGET", self._redis.hmget(self._invocations, names))
        return {name: int(v or 0) for name, v in zip(names, values, strict=True)}

    # --- calls -------------------------------------------------------------------------------

    def _call_key(self, call_id: str) -> str:
        return f"{self._prefix}call:{call_id}"

    def _result_key(self, call_id: str) -> str:
        return f"{self._prefix}result:{call_id}"

    async def create_call(self, record: CallRecord) -> CallRecord | None:
        key = self._call_key(record.call_id)
        created = await self._run(
            "SET NX",
            self._redis.set(key, _dumps(record.to_json()), expire=self._call_ttl, only_if_not_exists=True),
        )
        if created:
            return None
        existing = await self.get_call(record.call_id)
        # Expired between the two commands: it is ours now.
        return existing if existing is not None else await self.create_call(record)

    async def get_call(self, call_id: str) -> CallRecord | None:
        raw = await self._run("GET", self._redis.get(self._call_key(call_id)))
        return None if raw is None else CallRecord.from_json(json.loads(raw))

    async def put_call(self, record: CallRecord) -> None:
        await self._run(
            "SET",
            self._redis.set(self._call_key(record.call_id), _dumps(record.to_json()), expire=self._call_ttl),
        )

    async def put_result(self, call_id: str, result: CallResult) -> None:
        await self._run(
            "SET",
            self._redis.set(self._result_key(call_id), _dumps(result.to_json()), expire=self._call_ttl),
        )

    async def get_result(self, call_id: str) -> CallResult | None:
        raw = await self._run("GET", self._redis.get(self._result_key(call_id)))
        return None if raw is None else CallResult.from_json(json.loads(raw))
