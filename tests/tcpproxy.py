"""A loopback TCP proxy for fault tests (cutting AMQP, Redis or HTTP connections under a client).

::

    proxy = TCPProxy(reactor, "127.0.0.1", 5672)
    port = proxy.listen()          # point the client at 127.0.0.1:port (or proxy.endpoint())
    proxy.drop_all()               # abort every proxied connection, both sides (the client sees a reset)
    proxy.hold()                   # accept new connections but forward nothing, ever (a black hole)
    await proxy.refuse()           # stop listening: new connections are refused
    proxy.forward()                # back to normal (listens again on the same port)
    await proxy.close()

Modes apply to new connections; ``drop_all`` is what ends the current ones.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

FORWARD = "forward"
HOLD = "hold"
REFUSE = "refuse"


class _Upstream(Protocol):
    """Proxy -> target side of one proxied connection."""

    def __init__(self, pair: _Downstream) -> None:
        self.pair = pair

    def dataReceived(self, data: bytes) -> None:
        if self.pair.mode == HOLD:
            return  # stalled: dropped
        self.pair.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.pair.upstream_lost()


class _Downstream(Protocol):
    """Client -> proxy side of one proxied connection."""

    log = Logger()

    def __init__(self, proxy: TCPProxy) -> None:
        self.proxy = proxy
        self.mode = proxy.mode
        self.upstream: _Upstream | None = None
        self.buffer: list[bytes] = []
        self.closed = False

    def connectionMade(self) -> None:
        self.proxy.connections.add(self)
        self.proxy.accepted += 1
        if self.mode == HOLD:
            return
        endpoint = TCP4ClientEndpoint(self.proxy.reactor, self.proxy.host, self.proxy.target_port, timeout=5)
        d = connectProtocol(endpoint, _Upstream(self))
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, upstream: _Upstream) -> None:
        if self.closed:
            upstream.transport.abortConnection()
            return
        self.upstream = upstream
        for chunk in self.buffer:
            upstream.transport.write(chunk)
        self.buffer = []

    def _failed(self, failure: Any) -> None:
        self.log.info("proxy could not reach its target: {e}", e=failure.value)
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.mode == HOLD:
            return  # swallowed: the client waits for an answer that never comes
        if self.upstream is None:
            self.buffer.append(data)
        else:
            self.upstream.transport.write(data)

    def upstream_lost(self) -> None:
        if not self.closed:
            self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.proxy.connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class TCPProxy:
    """Forwards 127.0.0.1:<port> to ``host:target_port``; faults on command."""

    def __init__(self, reactor: Any, host: str, target_port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.target_port = target_port
        self.mode = FORWARD
        self.port = 0
        self.connections: set[_Downstream] = set()
        self.accepted = 0
        self._listening: Any = None

    def listen(self, port: int = 0) -> int:
        factory = Factory.forProtocol(lambda: _Downstream(self))
        factory.noisy = False
        self._listening = self.reactor.listenTCP(port or self.port, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    def endpoint(self, timeout: float = 5) -> TCP4ClientEndpoint:
        """A client endpoint that connects through this proxy."""
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=timeout)

    def forward(self) -> None:
        """Proxy new connections normally (listening again if ``refuse`` stopped it)."""
        self.mode = FORWARD
        if self._listening is None:
            self.listen(self.port)

    def hold(self) -> None:
        """Accept new connections and never forward a byte either way."""
        self.mode = HOLD
        if self._listening is None:
            self.listen(self.port)

    def stall(self) -> None:
        """Stop forwarding on every connection, current and new, both ways (the bytes are
        dropped): what a peer sends never arrives, and it waits for answers that never come."""
        self.hold()
        for connection in self.connections:
            connection.mode = HOLD

    async def refuse(self) -> None:
        """Stop listening: new connections are refused until ``forward()``/``hold()``."""
        self.mode = REFUSE
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await listening.stopListening()

    def drop_all(self) -> int:
        """Abort every current connection (both sides); returns how many there were."""
        current = list(self.connections)
        for connection in current:
            connection.abort()
        return len(current)

    async def close(self) -> None:
        await self.refuse()
        self.drop_all()
        # Let the aborted connections finish closing before the test's reactor moves on.
        d: defer.Deferred = defer.Deferred()
        self.reactor.callLater(0, d.callback, None)
        await d
