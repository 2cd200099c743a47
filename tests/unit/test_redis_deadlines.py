"""RedisStore's command deadlines: one timer for all pending commands, and a caller's own
cancellation kept apart from Redis not answering."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from txfaas.store import StoreUnavailable
from txfaas.store.redis import RedisStore


class SilentRedis:
    """A txredisapi stand-in whose commands never answer (a stuck server)."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def get(self, key: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def start(store: RedisStore) -> list:
    out: list = []
    defer.Deferred.fromCoroutine(store.get_call("c1")).addBoth(out.append)
    return out


def test_a_command_unanswered_past_the_timeout_is_store_unavailable_naming_it():
    clock = Clock()
    store = RedisStore(SilentRedis(), clock, timeout=5.0)
    first = start(store)
    clock.advance(2)
    second = start(store)
    assert len(clock.getDelayedCalls()) == 1  # one timer for both
    clock.advance(3)
    assert first[0].check(StoreUnavailable) and "GET within 5s" in str(first[0].value)
    assert second == []
    clock.advance(2)
    assert second[0].check(StoreUnavailable)
    assert clock.getDelayedCalls() == []


def test_a_caller_that_gives_up_sees_its_cancellation_not_a_redis_timeout():
    clock = Clock()
    store = RedisStore(SilentRedis(), clock, timeout=5.0)
    out: list = []
    d = defer.Deferred.fromCoroutine(store.get_call("c1"))
    d.addBoth(out.append)
    clock.advance(1)
    d.cancel()
    assert out[0].check(defer.CancelledError)
