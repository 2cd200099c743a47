"""The store's txredisapi protocol writes each command exactly as txredisapi's own does."""

from __future__ import annotations

import pytest
import txredisapi
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txfaas.store.redis import commands_protocol

CASES = [
    ("PING",),
    ("SET", "txfaas:call:abc", b'{"a": 1}', "EX", 86400, "NX"),
    ("GET", ""),
    ("SET", b"", b"\x00\r\n\xff"),
    ("HSET", "f\u00e9", "\u2603 snow", -12, 3.25, bytearray(b"raw"), 10**20),
    ("EVALSHA", "0" * 40, 2, "k1", "k2", "", "1", 0),
]


@pytest.mark.parametrize("args", CASES)
def test_the_same_bytes_as_txredisapi(args):
    ours = commands_protocol()()
    theirs = txredisapi.RedisProtocol()
    assert ours._build_command(*args) == theirs._build_command(*args)


def test_text_that_the_charset_cannot_encode_is_refused_as_txredisapi_does():
    ours = commands_protocol()(charset="ascii")
    with pytest.raises(txredisapi.InvalidData):
        ours._build_command("SET", "k", "\u2603")


def test_it_is_txredisapis_protocol():
    assert issubclass(commands_protocol(), txredisapi.RedisProtocol)
    assert commands_protocol() is commands_protocol()


# --- replies --------------------------------------------------------------------------------

REPLIES = (
    b"$5\r\nhello\r\n$0\r\n\r\n+OK\r\n$-1\r\n:7\r\n-ERR no such key\r\n"
    b"*3\r\n$1\r\na\r\n:2\r\n$-1\r\n*0\r\n$6\r\nb\r\n\r\nx\r\n$3\r\nend\r\n"
)


def _expected() -> list:
    return [
        "hello",
        "",
        "OK",
        None,
        7,
        txredisapi.ResponseError("ERR no such key"),
        ["a", 2, None],
        [],
        "b\r\n\r\nx",
        "end",
    ]


def _connected(clock: Clock) -> tuple[txredisapi.RedisProtocol, StringTransport, list]:
    protocol = commands_protocol()(convertNumbers=False)
    protocol.callLater = clock.callLater  # txredisapi's own would defer the rest of a read here
    transport = StringTransport()
    protocol.transport = transport  # (no connectionMade: it would send SELECT and friends)
    got: list = []
    return protocol, transport, got


def _wait(protocol: txredisapi.RedisProtocol, got: list, n: int) -> None:
    for _ in range(n):
        protocol.replyQueue.get().addCallback(got.append)


def _same(got: list, expected: list) -> None:
    assert [repr(g) if isinstance(g, Exception) else g for g in got] == [
        repr(e) if isinstance(e, Exception) else e for e in expected
    ]


def test_every_reply_of_a_read_is_delivered_before_the_read_returns():
    """txredisapi reads what follows a bulk reply on a later pass of the reactor (callLater(0),
    transport paused): one reply per pass when many are in flight.  Ours reads them all now."""
    clock = Clock()
    protocol, transport, got = _connected(clock)
    _wait(protocol, got, len(_expected()))
    protocol.dataReceived(REPLIES)
    _same(got, _expected())
    assert clock.getDelayedCalls() == []
    assert transport.producerState == "producing"  # never paused


@pytest.mark.parametrize("cut", range(1, len(REPLIES)))
def test_replies_cut_anywhere_across_two_reads(cut):
    protocol, _, got = _connected(Clock())
    _wait(protocol, got, len(_expected()))
    protocol.dataReceived(REPLIES[:cut])
    protocol.dataReceived(REPLIES[cut:])
    _same(got, _expected())


def test_replies_a_byte_at_a_time():
    protocol, _, got = _connected(Clock())
    _wait(protocol, got, len(_expected()))
    for i in range(len(REPLIES)):
        protocol.dataReceived(REPLIES[i : i + 1])
    _same(got, _expected())


def test_thousands_of_bulk_replies_in_one_read_without_recursion():
    clock = Clock()
    protocol, _, got = _connected(clock)
    n = 20_000  # far deeper than Python's recursion limit, had each reply read the next
    _wait(protocol, got, n)
    protocol.dataReceived(b"".join(b"$%d\r\nv%d\r\n" % (len(b"v%d" % i), i) for i in range(n)))
    assert got == [f"v{i}" for i in range(n)]
    assert clock.getDelayedCalls() == []
