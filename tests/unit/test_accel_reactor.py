"""txfaas._accel.reactor against Twisted's stock EPollReactor: the same exchange, the same events.

Each test drives a fresh reactor of each kind (not the global one) through one exchange on a
socket pair and compares what the protocols saw.  Data is compared as the bytes each side
received in order, not as reads: txfaas's reactor sends sooner, so reads may split differently.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from txfaas._accel import reactor as accel

KINDS = {"stock": epollreactor.EPollReactor, "txfaas": accel.EPollReactor}


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Writes what it sees to ``events`` (merging consecutive reads into one)."""

    close_on_eof = True  # else it may still write once the peer half-closed

    def __init__(self, name: str, events: list[Any]) -> None:
        self.name = name
        self.events = events
        self.received = b""

    def _add(self, kind: str, value: Any = None) -> None:
        self.events.append((self.name, kind, value))

    def connectionMade(self) -> None:
        self._add("made")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        last = self.events[-1] if self.events else None
        if last is not None and last[:2] == (self.name, "data"):
            self.events[-1] = (self.name, "data", last[2] + data)
        else:
            self._add("data", data)

    def readConnectionLost(self) -> None:
        self._add("read lost")
        if self.close_on_eof:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._add("write lost")

    def connectionLost(self, reason: Any) -> None:
        self._add("lost", reason.type.__name__)


class Ends(Factory):
    def __init__(self, name: str, events: list[Any], ends: list[Recorder]) -> None:
        self.name = name
        self.events = events
        self.ends = ends

    def buildProtocol(self, addr: Any) -> Recorder:
        end = Recorder(self.name, self.events)
        self.ends.append(end)
        return end


def _pump(reactor: Any, done: Callable[[], bool], passes: int = 2000) -> None:
    for _ in range(passes):
        if done():
            return
        reactor.iterate(0.001)
    raise AssertionError("the exchange did not finish")


def _exchange(kind: str, script: Callable[[Any, Recorder, Recorder], None]) -> list[Any]:
    reactor = KINDS[kind]()
    events: list[Any] = []
    ends: list[Recorder] = []
    left, right = socket.socketpair()
    try:
        for name, sock in (("a", left), ("b", right)):
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, Ends(name, events, ends))
            sock.close()
        script(reactor, ends[0], ends[1])
    finally:
        reactor.removeAll()
        reactor.waker.connectionLost(None)
        reactor._poller.close()
    return events


def _write_read_close(reactor: Any, a: Recorder, b: Recorder) -> None:
    a.transport.write(b"hello ")
    a.transport.writeSequence([b"wor", b"ld"])
    _pump(reactor, lambda: b.received == b"hello world")
    b.transport.write(b"back")
    _pump(reactor, lambda: a.received == b"back")
    a.transport.loseConnection()
    _pump(reactor, lambda: sum(e[1] == "lost" for e in a.events) == 2)


def _half_close(reactor: Any, a: Recorder, b: Recorder) -> None:
    b.close_on_eof = False
    a.transport.write(b"request")
    a.transport.loseWriteConnection()
    _pump(reactor, lambda: ("b", "read lost", None) in b.events)
    b.transport.write(b"answer")
    b.transport.loseConnection()
    _pump(reactor, lambda: sum(e[1] == "lost" for e in a.events) == 2)


def _producer(reactor: Any, a: Recorder, b: Recorder) -> None:
    """b streams 4 MiB through a push producer while a does not read, then a reads it all."""
    total = 4 << 20
    chunk = b"x" * 65536
    seen: list[str] = []

    @implementer(IPushProducer)
    class Stream:
        sent = 0
        paused = False

        def resumeProducing(self) -> None:
            seen.append("resume")
            self.paused = False
            self.more()

        def pauseProducing(self) -> None:
            seen.append("pause")
            self.paused = True

        def stopProducing(self) -> None:
            seen.append("stop")

        def more(self) -> None:
            while not self.paused and self.sent < total:
                self.sent += len(chunk)
                b.transport.write(chunk)
            if self.sent >= total and "done" not in seen:
                seen.append("done")
                b.transport.unregisterProducer()
                b.transport.loseConnection()

    a.transport.pauseProducing()
    stream = Stream()
    b.transport.registerProducer(stream, True)
    stream.more()
    _pump(reactor, lambda: "pause" in seen)
    a.transport.resumeProducing()
    _pump(reactor, lambda: len(a.received) == total and sum(e[1] == "lost" for e in a.events) == 2)
    # How often the producer was paused depends on how reads split; that it was, and resumed, not.
    a.events.append(("b", "producer", sorted(set(seen))))


@pytest.mark.parametrize("script", [_write_read_close, _half_close, _producer])
def test_the_same_exchange_gives_the_same_events_on_both_reactors(script: Any) -> None:
    stock = _exchange("stock", script)
    assert _exchange("txfaas", script) == stock


def test_the_probe_passes_on_this_twisted() -> None:
    assert accel.probe() is True


def test_the_probe_fails_when_the_flush_does_not_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_probed", None)
    monkeypatch.setattr(accel.EPollReactor, "flush", lambda self: None)
    assert accel.probe() is False
