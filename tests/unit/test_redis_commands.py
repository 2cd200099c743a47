"""The store's txredisapi protocol writes each command exactly as txredisapi's own does."""

from __future__ import annotations

import pytest
import txredisapi

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
