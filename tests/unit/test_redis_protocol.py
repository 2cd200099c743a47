"""txredisapi's ``HiredisProtocol`` (what the store runs on) reads replies exactly as its
pure-Python ``BaseRedisProtocol`` does, however the bytes are split across reads, and delivers
every reply a read holds before the read returns."""

from __future__ import annotations

from typing import Any

import txredisapi
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

SIMPLE = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=12)
LEAF = st.one_of(
    SIMPLE.map(lambda s: b"+" + s.encode() + b"\r\n"),
    SIMPLE.map(lambda s: b"-ERR " + s.encode() + b"\r\n"),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda n: b":%d\r\n" % n),
    st.binary(max_size=30).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.just(b"$-1\r\n"),
)


def _array(children: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(children) + b"".join(children)


# Errors only at the top: inside an array each parser keeps them in its own way.
NESTED = st.recursive(
    LEAF.filter(lambda r: not r.startswith(b"-")),
    lambda inner: st.lists(inner, max_size=4).map(_array),
    max_leaves=12,
)
REPLY = st.one_of(LEAF, NESTED)


def _protocol(cls: type, clock: Clock) -> Any:
    protocol = cls(convertNumbers=False)
    protocol.callLater = clock.callLater  # the pure-Python one reads on after a bulk reply later
    protocol.transport = StringTransport()  # no connectionMade: it would send SELECT and friends
    return protocol


def _read(cls: type, replies: list[bytes], cuts: list[int]) -> list[Any]:
    clock = Clock()
    protocol = _protocol(cls, clock)
    got: list[Any] = []
    for _ in replies:
        protocol.replyQueue.get().addCallback(got.append)
    data = b"".join(replies)
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        protocol.dataReceived(data[start:cut])
        start = cut
        while clock.getDelayedCalls():
            clock.advance(0)
    return [repr(g) if isinstance(g, Exception) else g for g in got]


@given(st.lists(REPLY, min_size=1, max_size=10), st.lists(st.integers(min_value=0), max_size=6))
def test_the_same_replies_whatever_the_reads(replies, cuts):
    assert _read(txredisapi.HiredisProtocol, replies, cuts) == _read(
        txredisapi.BaseRedisProtocol, replies, cuts
    )


def test_the_store_runs_on_hiredis():
    assert txredisapi.RedisProtocol is txredisapi.HiredisProtocol


def test_every_reply_of_a_read_is_delivered_at_once():
    clock = Clock()
    protocol = _protocol(txredisapi.RedisProtocol, clock)
    got: list[Any] = []
    n = 20_000
    for _ in range(n):
        protocol.replyQueue.get().addCallback(got.append)
    protocol.dataReceived(b"".join(b"$%d\r\nv%d\r\n" % (len(b"v%d" % i), i) for i in range(n)))
    assert got == [f"v{i}" for i in range(n)]
    assert clock.getDelayedCalls() == []
    assert protocol.transport.producerState == "producing"  # never paused
