"""Sealed secrets in Redis: ``{prefix}secrets:{namespace}`` is a hash of name -> Fernet token
(never a plaintext), and ``{prefix}secrets-key-check`` a token sealed with the key they were
sealed with."""

from __future__ import annotations

from collections.abc import Collection

from txfaas.store import AlreadyExists, NotFound
from txfaas.store.redis import scripts
from txfaas.store.redis.base import RedisBase


class SecretRecords(RedisBase):
    """``SecretStore`` on Redis hashes."""

    def _secrets_key(self, namespace: str) -> str:
        return f"{self._prefix}secrets:{namespace}"

    async def list_secrets(self, namespace: str) -> list[str]:
        names = await self._run("HKEYS", self._redis.hkeys(self._secrets_key(namespace)))
        return sorted(n.decode() if isinstance(n, bytes) else n for n in names)

    async def get_secret(self, namespace: str, name: str) -> bytes | None:
        raw = await self._run("HGET", self._redis.hget(self._secrets_key(namespace), name))
        return None if raw is None else raw.encode() if isinstance(raw, str) else raw

    async def create_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        added = await self._run("HSETNX", self._redis.hsetnx(self._secrets_key(namespace), name, sealed))
        if not added:
            raise AlreadyExists(name)

    async def update_secret(self, namespace: str, name: str, sealed: bytes) -> None:
        replaced = await self._run(
            "EVAL update secret",
            self._redis.eval(scripts.UPDATE_SECRET, [self._secrets_key(namespace)], [name, sealed]),
        )
        if not int(replaced):
            raise NotFound(name)

    async def delete_secret(self, namespace: str, name: str) -> None:
        removed = await self._run("HDEL", self._redis.hdel(self._secrets_key(namespace), name))
        if not removed:
            raise NotFound(name)

    async def missing_secrets(self, namespace: str, names: Collection[str]) -> list[str]:
        names = list(names)
        if not names:
            return []
        values = await self._run("HMGET", self._redis.hmget(self._secrets_key(namespace), names))
        return [name for name, value in zip(names, values, strict=True) if value is None]

    async def secrets_key_check(self, token: bytes | None) -> bytes | None:
        key = f"{self._prefix}secrets-key-check"
        if token is not None:
            await self._run("SET NX", self._redis.execute_command(b"SET", key.encode(), token, b"NX"))
        raw = await self._run("GET", self._redis.get(key))
        return raw.encode() if isinstance(raw, str) else raw
