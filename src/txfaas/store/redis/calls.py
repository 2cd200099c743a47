"""Call records, their results and the dead letters in Redis.

``{prefix}call:{id}`` and ``{prefix}result:{id}`` hold a call's record and its function's answer
(JSON, with the status TTL). ``{prefix}dead:{id}`` is a dead letter (the whole message, body in
base64, no TTL), indexed by time in the sorted sets ``{prefix}dead-letters`` and
``{prefix}dead-letters:fn:{store key}``. Transitions, claims and dead-letter writes are scripts
(:mod:`txfaas.store.redis.scripts`), so each is atomic.
"""

from __future__ import annotations

from collections.abc import Collection

import attrs
import orjson

from txfaas.model import DEFAULT_NAMESPACE, CallRecord, CallResult, CallStatus, DeadLetter
from txfaas.store import NotFound
from txfaas.store.redis import scripts
from txfaas.store.redis.base import RedisBase, dumps


class CallRecords(RedisBase):
    """``CallStore`` and ``DeadLetterStore`` on Redis strings and sorted sets."""

    def _call_key(self, call_id: str) -> str:
        return f"{self._prefix}call:{call_id}"

    def _result_key(self, call_id: str) -> str:
        return f"{self._prefix}result:{call_id}"

    async def create_call(self, record: CallRecord) -> CallRecord | None:
        key = self._call_key(record.call_id)
        created = await self._run(
            "SET NX",
            self._set(key, dumps(record.to_json()), b"NX"),
        )
        if created:
            return None
        existing = await self.get_call(record.call_id)
        # Expired between the two commands: it is ours now.
        return existing if existing is not None else await self.create_call(record)

    async def get_call(self, call_id: str) -> CallRecord | None:
        raw = await self._run("GET", self._redis.get(self._call_key(call_id)))
        return None if raw is None else CallRecord.from_json(orjson.loads(raw))

    async def put_call(self, record: CallRecord) -> None:
        await self._run(
            "SET",
            self._set(self._call_key(record.call_id), dumps(record.to_json())),
        )

    async def claim_call(
        self,
        record: CallRecord,
        window: float,
        *,
        replace: Collection[str] = (),
        replays_below: int | None = None,
    ) -> tuple[CallRecord | None, CallRecord | None]:
        claim = attrs.evolve(record, status=CallStatus.ACCEPTING, accepting_until=None)
        reply = await self._run(
            "EVAL claim",
            self._redis.eval(
                scripts.CLAIM,
                [self._call_key(record.call_id)],
                [
                    dumps(claim.to_json()),
                    repr(float(window)),
                    self._call_ttl,
                    "" if replays_below is None else str(replays_below),
                    *replace,
                ],
            ),
        )
        if int(reply[0]) == 1:
            return attrs.evolve(claim, accepting_until=float(reply[1])), None
        return None, CallRecord.from_json(orjson.loads(reply[1]))

    async def settle_claim(self, claim: CallRecord, record: CallRecord | None) -> CallRecord | None:
        reply = await self._run(
            "EVAL settle claim",
            self._redis.eval(
                scripts.SETTLE,
                [self._call_key(claim.call_id)],
                [
                    repr(claim.accepting_until),
                    b"" if record is None else dumps(record.to_json()),
                    self._call_ttl,
                ],
            ),
        )
        if int(reply[0]) == 1:
            return None
        return CallRecord.from_json(orjson.loads(reply[1]))

    async def put_result(self, call_id: str, result: CallResult) -> None:
        await self._run(
            "SET",
            self._set(self._result_key(call_id), dumps(result.to_json())),
        )

    async def get_result(self, call_id: str) -> CallResult | None:
        raw = await self._run("GET", self._redis.get(self._result_key(call_id)))
        return None if raw is None else CallResult.from_json(orjson.loads(raw))

    async def transition_call(
        self,
        record: CallRecord,
        from_statuses: Collection[str],
        *,
        create: bool = False,
        attempts_at_most: int | None = None,
        result: CallResult | None = None,
    ) -> CallRecord | None:
        reply = await self._run(
            "EVAL transition",
            self._redis.eval(
                scripts.TRANSITION,
                [self._call_key(record.call_id), self._result_key(record.call_id)],
                [
                    dumps(record.to_json()),
                    self._call_ttl,
                    "1" if create else "0",
                    "" if attempts_at_most is None else str(attempts_at_most),
                    b"" if result is None else dumps(result.to_json()),
                    *from_statuses,
                ],
            ),
        )
        if int(reply[0]) == 1:
            return None
        if len(reply) < 2:
            raise NotFound(record.call_id)
        return CallRecord.from_json(orjson.loads(reply[1]))

    def _dead_key(self, call_id: str) -> str:
        return f"{self._prefix}dead:{call_id}"

    def _dead_index(self, function: str | None = None) -> str:
        base = f"{self._prefix}dead-letters"
        return base if function is None else f"{base}:fn:{function}"

    async def put_dead_letter(self, letter: DeadLetter) -> None:
        await self._run(
            "EVAL put dead letter",
            self._redis.eval(
                scripts.PUT_DEAD,
                [self._dead_key(letter.call_id), self._dead_index(), self._dead_index(letter.key)],
                [dumps(letter.to_json()), repr(float(letter.mark.at)), letter.call_id],
            ),
        )

    async def get_dead_letter(self, call_id: str) -> DeadLetter | None:
        raw = await self._run("GET", self._redis.get(self._dead_key(call_id)))
        return None if raw is None else DeadLetter.from_json(orjson.loads(raw))

    async def list_dead_letters(
        self, function: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        if limit <= 0:
            return []
        ids = await self._run(
            "ZRANGE", self._redis.zrange(self._dead_index(function), offset, offset + limit - 1)
        )
        if not ids:
            return []
        raws = await self._run("MGET", self._redis.mget([self._dead_key(i) for i in ids]))
        return [DeadLetter.from_json(orjson.loads(raw)) for raw in raws if raw is not None]

    async def count_dead_letters(self, function: str | None = None) -> int:
        return int(await self._run("ZCARD", self._redis.zcard(self._dead_index(function))))

    async def remove_dead_letter(self, call_id: str) -> bool:
        removed = await self._run(
            "EVAL remove dead letter",
            self._redis.eval(
                scripts.REMOVE_DEAD,
                [self._dead_key(call_id), self._dead_index()],
                [call_id, self._dead_index(""), DEFAULT_NAMESPACE],
            ),
        )
        return bool(int(removed))
