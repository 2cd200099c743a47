"""Functions, their invocation counters and namespaces in Redis.

``{prefix}functions`` is a hash of :func:`~txfaas.model.store_key` -> JSON record (the default
namespace's functions under their bare name, others' as ``name.namespace``);
``{prefix}invocations`` holds the counters under the same keys, and ``{prefix}namespaces`` the
namespaces created through the API (name -> JSON ``{name, labels, annotations}``).
"""

from __future__ import annotations

import attrs
import orjson
from twisted.internet import defer

from txfaas.model import DEFAULT_NAMESPACE, FunctionSpec, Namespace, ref_key, store_key
from txfaas.store import AlreadyExists, NamespaceNotEmpty, NotFound, UnknownNamespace
from txfaas.store.redis import scripts
from txfaas.store.redis.base import RedisBase, dumps


class FunctionRecords(RedisBase):
    """``FunctionStore`` and ``NamespaceStore`` on Redis hashes."""

    async def list_functions(self, namespace: str | None = None) -> list[FunctionSpec]:
        raw = await self._run("HGETALL", self._redis.hgetall(self._functions))
        specs = [FunctionSpec.from_record(orjson.loads(raw[key]), key) for key in sorted(raw)]
        return specs if namespace is None else [s for s in specs if s.namespace == namespace]

    async def get_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> FunctionSpec | None:
        key = store_key(name, namespace)
        raw = await self._run("HGET", self._redis.hget(self._functions, key))
        return None if raw is None else FunctionSpec.from_record(orjson.loads(raw), key)

    async def create_function(self, spec: FunctionSpec, *, check_namespace: bool = False) -> None:
        added = await self._run(
            "EVAL create function",
            self._redis.eval(
                scripts.CREATE_FUNCTION,
                [self._functions, self._namespaces],
                [spec.key, dumps(spec.to_record()), spec.namespace if check_namespace else ""],
            ),
        )
        if int(added) == -1:
            raise UnknownNamespace(spec.namespace)
        if not int(added):
            raise AlreadyExists(spec.service)

    async def update_function(self, spec: FunctionSpec) -> None:
        old = await self.get_function(spec.service, spec.namespace)
        if old is None:
            raise NotFound(spec.service)
        new = attrs.evolve(spec, created_at=old.created_at, replicas=old.replicas)
        await self._run("HSET", self._redis.hset(self._functions, spec.key, dumps(new.to_record())))

    async def delete_function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        key = store_key(name, namespace)
        removed = await self._run("HDEL", self._redis.hdel(self._functions, key))
        if not removed:
            raise NotFound(name)
        await self._run("HDEL", self._redis.hdel(self._invocations, key))

    async def scale_function(self, name: str, replicas: int, namespace: str = DEFAULT_NAMESPACE) -> None:
        old = await self.get_function(name, namespace)
        if old is None:
            raise NotFound(name)
        new = attrs.evolve(old, replicas=replicas)
        await self._run("HSET", self._redis.hset(self._functions, old.key, dumps(new.to_record())))

    async def add_invocations(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        await self._run(
            "HINCRBY",
            defer.gatherResults(
                [self._redis.hincrby(self._invocations, ref_key(ref), n) for ref, n in counts.items()],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure),
        )

    async def invocation_counts(self, refs: list[str]) -> dict[str, int]:
        if not refs:
            return {}
        keys = [ref_key(ref) for ref in refs]
        values = await self._run("HMGET", self._redis.hmget(self._invocations, keys))
        return {ref: int(v or 0) for ref, v in zip(refs, values, strict=True)}

    @staticmethod
    def _namespace(name: str, raw: bytes | str) -> Namespace:
        data = orjson.loads(raw)
        return Namespace(name, dict(data.get("labels") or {}), dict(data.get("annotations") or {}))

    async def list_namespaces(self) -> list[Namespace]:
        raw = await self._run("HGETALL", self._redis.hgetall(self._namespaces))
        return [self._namespace(name, raw[name]) for name in sorted(raw)]

    async def get_namespace(self, name: str) -> Namespace | None:
        raw = await self._run("HGET", self._redis.hget(self._namespaces, name))
        return None if raw is None else self._namespace(name, raw)

    async def create_namespace(self, namespace: Namespace) -> None:
        added = await self._run(
            "HSETNX", self._redis.hsetnx(self._namespaces, namespace.name, dumps(namespace.to_json()))
        )
        if not int(added):
            raise AlreadyExists(namespace.name)

    async def put_namespace(self, namespace: Namespace) -> None:
        await self._run(
            "HSET", self._redis.hset(self._namespaces, namespace.name, dumps(namespace.to_json()))
        )

    async def delete_namespace(self, name: str) -> None:
        result = int(
            await self._run(
                "EVAL delete namespace",
                self._redis.eval(scripts.DELETE_NAMESPACE, [self._namespaces, self._functions], [name]),
            )
        )
        if result == 0:
            raise NotFound(name)
        if result == -1:
            raise NamespaceNotEmpty(name)
