"""Function logs in Redis: ``{prefix}logs:{namespace}:{name}`` is a stream (``ts`` in Unix
microseconds, ``instance``, ``text``) capped with ``MAXLEN ~``."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer

from txfaas.logs import LogEntry, parse_entry
from txfaas.store import LogLine
from txfaas.store.redis import scripts
from txfaas.store.redis.base import RedisBase


class LogRecords(RedisBase):
    """``LogStore`` on Redis streams."""

    def _log_key(self, name: str, namespace: str) -> bytes:
        return f"{self._prefix}logs:{namespace}:{name}".encode()

    async def append_logs(self, lines: Sequence[LogLine], max_lines: int) -> None:
        """One script per ``scripts.LOG_BATCH`` lines, all sent at once (one round trip); a line is one
        argument (packed here, unpacked by the script: the gateway's CPU is the scarce one)."""
        sent = []
        cap = b"%d" % max_lines
        for start in range(0, len(lines), scripts.LOG_BATCH):
            streams: dict[tuple[str, str], int] = {}
            instances: dict[bytes, int] = {}
            packed = []
            for name, namespace, timestamp, instance, text in lines[start : start + scripts.LOG_BATCH]:
                key = streams.get((name, namespace))
                if key is None:
                    key = streams[name, namespace] = len(streams) + 1
                who = instances.get(instance)
                if who is None:
                    who = instances[instance] = len(instances) + 1
                packed.append(b"%d %d %d %s" % (key, who, int(timestamp * 1_000_000), text))
            keys = [self._log_key(name, namespace) for name, namespace in streams]
            sent.append(
                self._redis.execute_command(
                    b"EVAL",
                    scripts.APPEND_LOGS,
                    b"%d" % len(keys),
                    *keys,
                    cap,
                    b"%d" % len(instances),
                    *instances,
                    *packed,
                )
            )
        await self._run(
            "EVAL append logs",
            defer.gatherResults(sent, consumeErrors=True).addErrback(lambda f: f.value.subFailure),
        )

    async def read_logs(
        self, name: str, namespace: str, *, after: str | None = None, since: float | None = None, count: int
    ) -> list[LogEntry]:
        if after is not None:
            start = b"(" + after.encode()
        elif since is not None:
            start = b"%d" % max(0, int(since * 1000))
        else:
            start = b"-"
        reply = await self._run(
            "XRANGE",
            self._redis.execute_command(
                b"XRANGE", self._log_key(name, namespace), start, b"+", b"COUNT", b"%d" % count
            ),
        )
        return [parse_entry(entry_id, fields) for entry_id, fields in reply or []]

    async def last_logs(self, name: str, namespace: str, count: int) -> list[LogEntry]:
        if count <= 0:
            return []
        reply = await self._run(
            "XREVRANGE",
            self._redis.execute_command(
                b"XREVRANGE", self._log_key(name, namespace), b"+", b"-", b"COUNT", b"%d" % count
            ),
        )
        return [parse_entry(entry_id, fields) for entry_id, fields in reversed(reply or [])]

    async def delete_logs(self, name: str, namespace: str) -> None:
        await self._run("DEL", self._redis.delete(self._log_key(name, namespace).decode()))
