"""txredisapi without its per-command overhead: a one-``join`` command encoder and commands
sent straight to a connected protocol of the pool.

txredisapi encodes each argument, and its length, through a chain of ``isinstance`` tests
into a ``bytearray``; :func:`fast_protocol` writes the same RESP array in one ``join``. Its
pool handler costs every command a closure, an ``inlineCallbacks`` generator and two more
Deferreds to pick a connection that any connected one would do for (the store sends no
blocking commands); :func:`connected` gives the factory's list of ready connections, so the
store can pick one itself and fall back on the handler while none is up.

Relies on ``ConnectionHandler._factory``, ``RedisFactory.protocol``/``pool`` and
``BaseRedisProtocol._build_command``/``_encode_value``; :func:`probe` checks what they do.
"""

from __future__ import annotations

import functools
from typing import Any

#: Commands whose bytes the probe compares with txredisapi's own encoding.
SAMPLES: tuple[tuple[Any, ...], ...] = (
    ("PING",),
    ("SET", "txfaas:call:abc", b'{"a": 1}', "EX", 86400, "NX"),
    ("HSET", "f\u00e9", "\u2603", -12, 3.25, bytearray(b"raw"), 10**20, b""),
)


@functools.cache
def fast_protocol(base: Any) -> Any:
    """``base`` (a txredisapi protocol class) with the one-``join`` command encoder."""

    class FastCommands(base):
        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            parts = [b"*%d\r\n" % len(args)]
            encode = self._encode_value
            for arg in args:
                if arg.__class__ is not bytes:
                    arg = encode(arg)
                parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
            return b"".join(parts)

    FastCommands.__name__ = FastCommands.__qualname__ = f"Fast{base.__name__}"
    return FastCommands


def install(handler: Any) -> list[Any]:
    """Make ``handler``'s pool build :func:`fast_protocol` connections from now on (call it
    before the reactor runs: the pool connects after) and return its list of ready ones."""
    factory = handler._factory
    factory.protocol = fast_protocol(factory.protocol)
    pool: list[Any] = factory.pool
    return pool


class _Connection:
    """What the probe hands the pool as a ready connection."""

    connected = 1

    def whenDisconnected(self) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred()


@functools.cache
def probe() -> bool:
    """True if a pool's handler leads to its factory, the factory builds the protocol class it
    is given and lists a connection once it is ready, and the fast encoder writes exactly the
    bytes txredisapi's own does."""
    try:
        import txredisapi

        factory = txredisapi.RedisFactory("probe", None, 1, isLazy=True, convertNumbers=False)
        handler = factory.handler
        pool = install(handler)
        built: Any = factory.buildProtocol(None)
        if not isinstance(built, fast_protocol(txredisapi.RedisProtocol)):
            return False
        ready = _Connection()
        factory.addConnection(ready)
        if pool is not factory.pool or pool != [ready]:
            return False
        stock = txredisapi.RedisProtocol()
        return all(built._build_command(*args) == stock._build_command(*args) for args in SAMPLES)
    except Exception:
        return False
