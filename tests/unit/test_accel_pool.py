"""txfaas._accel.pool against Twisted's pool: the same puts, takes and idle time leave the same
number of connections kept, handed out and closed; only which one is handed out differs (the one
put last here, the one idle longest in Twisted's)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from txfaas import _accel
from txfaas._accel import http11
from txfaas._accel import pool as recent
from txfaas.http.pool import quiet_pool


class Idle:
    """A pooled connection, as the pool sees one."""

    state = "QUIESCENT"

    def __init__(self, name: int) -> None:
        self.name = name
        self.transport = self
        self.closed = False

    def loseConnection(self) -> None:
        self.closed = True


def run(pool_class: type, steps: list[tuple[str, int]]) -> tuple[list[int | None], list[int]]:
    """The connections handed out by each take (None: a new one was needed) and those closed."""
    clock = Clock()
    pool = pool_class(clock, persistent=True)
    pool.retryAutomatically = False
    pool.maxPersistentPerHost = 3
    made: list[Idle] = []
    taken: list[Any] = []

    class Endpoint:
        def connect(self, factory: Any) -> Any:
            from twisted.internet import defer

            connection = Idle(-1)
            return defer.succeed(connection)

    for step, n in steps:
        if step == "put":
            connection = Idle(len(made))
            made.append(connection)
            pool._putConnection(n, connection)
        elif step == "take":
            got: list[Any] = []
            pool.getConnection(n, Endpoint()).addCallback(got.append)
            taken.append(None if got[0].name < 0 else got[0].name)
        else:
            clock.advance(n)
    return taken, sorted(c.name for c in made if c.closed)


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 1)),
        st.tuples(st.just("take"), st.integers(0, 1)),
        st.tuples(st.just("wait"), st.sampled_from([1, 5])),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(_STEPS)
def test_the_same_connections_are_kept_handed_out_and_closed_as_by_twisteds_pool(steps) -> None:
    """Within an idle timeout (after one, which connection expired depends on which was taken)."""
    ours, ours_closed = run(recent.RecentFirstPool, steps)
    theirs, theirs_closed = run(HTTPConnectionPool, steps)
    assert [t is None for t in ours] == [t is None for t in theirs]
    assert len(ours_closed) == len(theirs_closed)


def test_the_connection_handed_out_is_the_one_put_last_and_a_full_pool_closes_the_oldest() -> None:
    taken, closed = run(recent.RecentFirstPool, [("put", 0)] * 4 + [("take", 0)])
    assert taken == [3] and closed == [0]
    taken, _ = run(HTTPConnectionPool, [("put", 0)] * 4 + [("take", 0)])
    assert taken == [1]  # Twisted's: the one idle longest


@pytest.mark.parametrize("pool_class", [recent.RecentFirstPool, HTTPConnectionPool])
@pytest.mark.parametrize("idle, closed", [(239.9, []), (240, [0])])
def test_an_idle_connection_is_closed_when_its_time_is_up(pool_class, idle, closed) -> None:
    taken, was_closed = run(pool_class, [("put", 0), ("wait", idle), ("take", 0)])
    assert was_closed == closed and taken == ([None] if closed else [0])


def test_the_probe_passes_here_and_fails_when_the_pool_hands_out_the_oldest(monkeypatch) -> None:
    assert recent.probe()
    monkeypatch.setattr(recent.RecentFirstPool, "_putConnection", HTTPConnectionPool._putConnection)
    assert not recent.probe()


@pytest.mark.parametrize("enabled", [True, False])
def test_quiet_pool_is_twisteds_pool_and_protocol_with_accelerations_off(monkeypatch, enabled) -> None:
    monkeypatch.setattr(_accel, "_enabled", enabled)
    pool = quiet_pool(Clock(), per_host=4, idle_timeout=7.0)
    assert (pool.maxPersistentPerHost, pool.cachedConnectionTimeout) == (4, 7.0)
    built = pool._factory(lambda protocol: None, "endpoint").buildProtocol(None)
    if enabled:
        assert type(pool) is recent.RecentFirstPool and isinstance(built, http11.HTTP11Connection)
    else:
        assert type(pool) is HTTPConnectionPool and not isinstance(built, http11.HTTP11Connection)
