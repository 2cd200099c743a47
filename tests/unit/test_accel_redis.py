"""The accelerated txredisapi path (txfaas._accel.redis) against txredisapi's own."""

from __future__ import annotations

import functools

import pytest
import txredisapi
from hypothesis import given
from hypothesis import strategies as st

from txfaas._accel import redis as accel

ARGUMENT = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.binary(max_size=10).map(bytearray),
)


@pytest.fixture(autouse=True)
def fresh_probe():
    accel.probe.cache_clear()
    yield
    accel.probe.cache_clear()


def test_the_probe_passes_on_the_installed_txredisapi():
    assert accel.probe()


@given(st.lists(ARGUMENT, min_size=1, max_size=8))
def test_commands_are_the_bytes_txredisapi_writes(args):
    fast = accel.fast_protocol(txredisapi.RedisProtocol)()
    assert fast._build_command(*args) == txredisapi.RedisProtocol()._build_command(*args)


@given(st.lists(st.text(max_size=10), min_size=1, max_size=5))
def test_text_the_charset_cannot_encode_fails_as_in_txredisapi(args):
    fast = accel.fast_protocol(txredisapi.RedisProtocol)(charset="ascii")
    stock = txredisapi.RedisProtocol(charset="ascii")
    try:
        expected = stock._build_command(*args)
    except txredisapi.InvalidData:
        with pytest.raises(txredisapi.InvalidData):
            fast._build_command(*args)
    else:
        assert fast._build_command(*args) == expected


def test_install_builds_fast_connections_and_lists_the_ready_ones():
    factory = txredisapi.RedisFactory("test", None, 2, isLazy=True, convertNumbers=False)
    ready = accel.install(factory.handler)
    built = factory.buildProtocol(None)
    assert isinstance(built, txredisapi.RedisProtocol)
    assert type(built).__name__ == f"Fast{txredisapi.RedisProtocol.__name__}"
    assert ready == []
    connection = accel._Connection()
    factory.addConnection(connection)
    assert ready == [connection]


def test_the_probe_fails_when_the_pool_stops_listing_ready_connections(monkeypatch):
    monkeypatch.setattr(txredisapi.RedisFactory, "addConnection", lambda self, conn: None)
    assert not accel.probe()


def test_the_probe_fails_when_the_encoder_writes_other_bytes(monkeypatch):
    @functools.cache
    def drops_the_last_argument(base):
        class Broken(base):
            def _build_command(self, *args, **kwargs):
                return base._build_command(self, *args[:-1])

        return Broken

    monkeypatch.setattr(accel, "fast_protocol", drops_the_last_argument)
    assert not accel.probe()
