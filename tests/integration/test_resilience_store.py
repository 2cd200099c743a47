"""RedisStore's resilience parts against the real Redis: atomic transitions and the dead letters."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from tests.store_contract import accel_fixture  # noqa: F401 (the accel fixture)
from tests.support import unique
from txfaas.config import parse_redis_url
from txfaas.model import Call, CallRecord, CallStatus, DeadLetter, DeadMark
from txfaas.store import NotFound
from txfaas.store.redis import RedisStore


@pytest_twisted.async_yield_fixture
async def store(redis_url, accel):
    prefix = unique("rstest") + ":"
    s = RedisStore.connect(parse_redis_url(redis_url), reactor, prefix=prefix, call_ttl=60)
    yield s
    keys = await s._redis.keys(f"{prefix}*")
    if keys:
        await s._redis.delete(keys)
    await s.close()


@pytest_twisted.ensureDeferred
async def test_transition_writes_only_from_the_allowed_statuses_and_attempts(store):
    queued = CallRecord("c1", "fn")
    with pytest.raises(NotFound):
        await store.transition_call(queued, CallStatus.CANCELLABLE)
    assert await store.transition_call(queued, CallStatus.CANCELLABLE, create=True) is None
    running = attrs.evolve(queued, status=CallStatus.RUNNING, attempts=2)
    assert await store.transition_call(running, CallStatus.CANCELLABLE) is None
    cancelled = attrs.evolve(queued, status=CallStatus.CANCELLED)
    assert await store.transition_call(cancelled, CallStatus.CANCELLABLE) == running
    older = attrs.evolve(running, attempts=1, status=CallStatus.RETRYING)
    assert await store.transition_call(older, {CallStatus.RUNNING}, attempts_at_most=1) == running
    assert await store.transition_call(older, {CallStatus.RUNNING}, attempts_at_most=2) is None
    assert await store.get_call("c1") == older
    assert 0 < await store._redis.ttl(store._call_key("c1")) <= 60


@pytest_twisted.ensureDeferred
async def test_concurrent_cancel_and_start_one_wins(store):
    """A cancel and a worker's start race from ``queued``: exactly one of them is written."""
    await store.create_call(CallRecord("c2", "fn"))
    for _ in range(20):
        await store.put_call(CallRecord("c2", "fn"))
        cancel = attrs.evolve(CallRecord("c2", "fn"), status=CallStatus.CANCELLED)
        start = attrs.evolve(CallRecord("c2", "fn"), status=CallStatus.RUNNING, attempts=1)
        results = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(store.transition_call(cancel, CallStatus.CANCELLABLE)),
                defer.Deferred.fromCoroutine(store.transition_call(start, {"queued", "retrying", "running"})),
            ]
        )
        assert sum(r is None for r in results) == 1, results
        winner = CallStatus.CANCELLED if results[0] is None else CallStatus.RUNNING
        assert (await store.get_call("c2")).status == winner


def _letter(call_id: str, function: str, at: float, body: bytes = b"") -> DeadLetter:
    return DeadLetter(
        Call(call_id=call_id, function=function, body=body, dead=DeadMark("max_age", at, "old", 2))
    )


@pytest_twisted.ensureDeferred
async def test_dead_letters_are_kept_whole_listed_by_function_and_removed_once(store):
    await store.put_dead_letter(_letter("c", "a", 3.0))
    await store.put_dead_letter(_letter("b", "b", 2.0))
    await store.put_dead_letter(_letter("a", "a", 1.0, body=bytes(range(256))))
    await store.put_dead_letter(_letter("a", "a", 1.0, body=bytes(range(256))))  # a duplicate: one kept
    assert [d.call_id for d in await store.list_dead_letters()] == ["a", "b", "c"]
    assert [d.call_id for d in await store.list_dead_letters("a")] == ["a", "c"]
    assert [d.call_id for d in await store.list_dead_letters(offset=1, limit=1)] == ["b"]
    assert (await store.count_dead_letters(), await store.count_dead_letters("a")) == (3, 2)
    kept = await store.get_dead_letter("a")
    assert kept == _letter("a", "a", 1.0, body=bytes(range(256)))
    assert await store._redis.ttl(store._dead_key("a")) == -1  # no TTL: kept until re-queued
    assert await store.remove_dead_letter("a") is True
    assert await store.remove_dead_letter("a") is False
    assert [d.call_id for d in await store.list_dead_letters("a")] == ["c"]
    assert await store.get_dead_letter("a") is None
