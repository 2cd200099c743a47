"""txfaas._accel.reactor: epoll without the per-event legacy log context, writes flushed sooner;
and txfaas.reactor, which installs it only when accelerations are on."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

import pytest
from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.logger import globalLogPublisher

from txfaas import reactor as txreactor
from txfaas._accel.reactor import EPollReactor


class _Poller:
    """Stands in for ``select.epoll`` in ``doPoll``: returns the events it was given, once."""

    def __init__(self, events: list[tuple[int, int]]) -> None:
        self.events = events
        self.timeouts: list[float] = []
        self.unregistered: list[int] = []

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        events, self.events = self.events, []
        return events

    def unregister(self, fd: int) -> None:
        self.unregistered.append(fd)


class _Selectable(FileDescriptor):
    def __init__(self, fd: int, reactor: object, read: object = None) -> None:
        super().__init__(reactor=reactor)
        self.fd = fd
        self.reads = 0
        self.lost: list[object] = []
        self._read = read

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> object:
        self.reads += 1
        if isinstance(self._read, BaseException):
            raise self._read
        return self._read

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


@pytest.fixture
def reactor():
    r = EPollReactor()
    poller = r._poller
    yield r
    r.waker.connectionLost(None)  # closes its descriptors
    poller.close()


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _serve(reactor, selectables: list[_Selectable], events: list[tuple[int, int]]) -> _Poller:
    for s in selectables:
        reactor._selectables[s.fd] = s
        reactor._reads.add(s.fd)
    reactor._poller = _Poller(events)
    return reactor._poller


def test_it_is_twisteds_epoll_reactor(reactor):
    assert isinstance(reactor, epollreactor.EPollReactor)
    assert reactor.doIteration == reactor.doPoll


def test_each_ready_descriptor_is_read_and_none_waits_forever_by_default(reactor):
    a, b = _Selectable(1001, reactor), _Selectable(1002, reactor)
    poller = _serve(reactor, [a, b], [(1001, select.EPOLLIN), (1002, select.EPOLLIN)])
    reactor.doPoll(None)
    assert (a.reads, b.reads) == (1, 1)
    assert poller.timeouts == [-1]


def test_a_descriptor_removed_by_an_earlier_event_of_the_same_poll_is_skipped(reactor):
    class Remover(_Selectable):
        def doRead(self) -> object:
            del reactor._selectables[1002]
            return super().doRead()

    a, b = Remover(1001, reactor), _Selectable(1002, reactor)
    _serve(reactor, [a, b], [(1001, select.EPOLLIN), (1002, select.EPOLLIN)])
    reactor.doPoll(0)
    assert (a.reads, b.reads) == (1, 0)


def test_a_failing_read_disconnects_that_descriptor_only_and_is_logged(reactor, logged):
    bad, good = _Selectable(1001, reactor, read=ValueError("boom")), _Selectable(1002, reactor)
    _serve(reactor, [bad, good], [(1001, select.EPOLLIN), (1002, select.EPOLLIN)])
    poller = reactor._poller
    reactor.doPoll(0)
    assert len(bad.lost) == 1 and bad.lost[0].check(ValueError)
    assert poller.unregistered == [1001]
    assert good.reads == 1 and good.lost == []
    assert any(e.get("isError") or e.get("log_failure") for e in logged)


def test_an_error_past_twisteds_own_handling_is_logged_and_the_poll_goes_on(reactor, logged):
    class BrokenLoss(_Selectable):
        def connectionLost(self, reason: object) -> None:
            raise RuntimeError("connectionLost broke")

    bad = BrokenLoss(1001, reactor, read=ValueError("boom"))
    good = _Selectable(1002, reactor)
    _serve(reactor, [bad, good], [(1001, select.EPOLLIN), (1002, select.EPOLLIN)])
    reactor.doPoll(0)  # does not raise
    assert good.reads == 1
    failures = [e["log_failure"] for e in logged if "log_failure" in e]
    assert any(f.check(RuntimeError) for f in failures)


def test_it_carries_real_traffic(reactor):
    """A socket pair through the real epoll: what is written arrives."""
    from twisted.internet.protocol import Protocol
    from twisted.internet.tcp import Connection  # noqa: F401 -- adoptStreamConnection below

    left, right = socket.socketpair()
    received: list[bytes] = []

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    from twisted.internet.protocol import Factory

    reactor.adoptStreamConnection(left.fileno(), socket.AF_UNIX, Factory.forProtocol(Collect))
    left.close()
    right.sendall(b"hello")
    for _ in range(20):
        reactor.iterate(0.05)
        if received:
            break
    right.close()
    assert b"".join(received) == b"hello"


def test_prefer_leaves_an_installed_reactor_alone():
    from twisted.internet import reactor as installed

    assert txreactor.prefer() is False
    assert txreactor.global_reactor() is installed


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("", "txfaas._accel.reactor.EPollReactor"),
        # Accelerations off: Twisted's own epoll reactor.
        (
            "from txfaas import _accel; _accel.disable()\n",
            "twisted.internet.epollreactor.EPollReactor",
        ),
        # Without epoll (not Linux): Twisted's default, whatever it is there.
        (
            "import builtins\n_real = builtins.__import__\n"
            "def _no_epoll(name, *a, **k):\n"
            "    if name == 'twisted.internet.epollreactor':\n"
            "        raise ImportError(name)\n"
            "    return _real(name, *a, **k)\n"
            "builtins.__import__ = _no_epoll\n",
            "twisted.internet.pollreactor.PollReactor",
        ),
        # A reactor chosen first (twistd --reactor=...) is kept.
        (
            "from twisted.internet import pollreactor; pollreactor.install()\n",
            "twisted.internet.pollreactor.PollReactor",
        ),
    ],
)
def test_global_reactor_in_a_fresh_process(setup, expected):
    probe = (
        setup + "from txfaas.reactor import global_reactor\n"
        "r = global_reactor()\n"
        "print(type(r).__module__ + '.' + type(r).__name__)\n"
    )
    env = {**os.environ, "TXFAAS_ACCEL": "1"}  # the setup turns them off where it means to
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == expected


# --- writes flushed before the next poll ---------------------------------------------------------


class _Writer(_Selectable):
    """Counts its doWrite calls; ``then`` runs inside doWrite; stops writing unless ``keep``."""

    def __init__(self, fd: int, reactor: object, keep: bool = False, then: object = None) -> None:
        super().__init__(fd, reactor)
        self.writes = 0
        self.keep = keep
        self.then = then

    def doWrite(self) -> object:
        self.writes += 1
        if self.then is not None:
            self.then()
        if not self.keep:
            self.stopWriting()
        return None


def _pair(reactor):
    """A connected socket pair: the left end adopted as a TCP-like transport of ``reactor``."""
    from twisted.internet.protocol import Factory, Protocol

    left, right = socket.socketpair()
    right.setblocking(False)
    protocols: list[Protocol] = []

    class Keep(Protocol):
        def connectionMade(self) -> None:
            protocols.append(self)

    reactor.adoptStreamConnection(left.fileno(), socket.AF_UNIX, Factory.forProtocol(Keep))
    left.close()
    return protocols[0], right


def _received(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_write_is_sent_by_the_end_of_the_pass_without_watching_the_socket(reactor):
    protocol, peer = _pair(reactor)
    fd = protocol.transport.fileno()
    protocol.transport.write(b"hello ")
    protocol.transport.write(b"world")
    assert fd not in reactor._writes  # no epoll_ctl for it
    assert protocol.transport in reactor.getWriters()  # but it is a writer until flushed
    reactor.runUntilCurrent()  # timed calls, then the flush: no poll
    assert _received(peer) == b"hello world"
    assert fd not in reactor._writes and protocol.transport not in reactor.getWriters()
    protocol.transport.loseConnection()
    reactor.runUntilCurrent()
    assert _received(peer) == b""  # closed at the flush too
    peer.close()


def test_what_the_socket_cannot_take_is_left_to_epoll(reactor):
    protocol, peer = _pair(reactor)
    big = b"x" * (16 << 20)  # far over a socket pair's buffer
    protocol.transport.write(big)
    reactor.runUntilCurrent()
    assert protocol.transport.fileno() in reactor._writes  # watched for writability now
    assert protocol.transport not in reactor._unflushed
    got = len(_received(peer))
    assert 0 < got < len(big)
    for _ in range(2000):
        if got >= len(big):
            break
        reactor.iterate(0.01)
        got += len(_received(peer))
    assert got == len(big)
    assert protocol.transport.fileno() not in reactor._writes  # done: not watched any more
    protocol.transport.loseConnection()
    reactor.iterate(0)
    peer.close()


def test_a_writer_that_stopped_before_the_flush_is_not_flushed(reactor):
    w = _Writer(1001, reactor)
    w.startWriting()
    w.stopWriting()
    reactor.runUntilCurrent()
    assert w.writes == 0 and reactor.getWriters() == []


def test_a_write_made_from_a_doWrite_goes_out_in_the_same_flush(reactor):
    second = _Writer(1002, reactor)
    first = _Writer(1001, reactor, then=second.startWriting)
    first.startWriting()
    reactor.runUntilCurrent()
    assert (first.writes, second.writes) == (1, 1)
    assert reactor.getWriters() == []


def test_a_writer_that_keeps_writing_is_watched_after_the_last_pass(reactor, monkeypatch):
    poller = _Poller([])
    registered: list[tuple[int, int]] = []
    poller.register = lambda fd, flags: registered.append((fd, flags))  # type: ignore[attr-defined]
    monkeypatch.setattr(reactor, "_poller", poller)
    w = _Writer(1001, reactor, keep=True)
    w.startWriting()
    reactor.runUntilCurrent()
    assert w.writes == 1  # one doWrite, then epoll's turn
    assert registered == [(1001, select.EPOLLOUT)] and 1001 in reactor._writes


def test_a_failing_doWrite_disconnects_that_writer_only(reactor, logged, monkeypatch):
    monkeypatch.setattr(reactor, "_poller", _Poller([]))

    class Bad(_Writer):
        def doWrite(self) -> object:
            raise OSError("broken pipe")

    bad, good = Bad(1001, reactor), _Writer(1002, reactor)
    bad.startWriting()
    good.startWriting()
    reactor.runUntilCurrent()
    assert len(bad.lost) == 1 and bad.lost[0].check(OSError)
    assert good.writes == 1 and good.lost == []
    assert reactor.getWriters() == []


def test_remove_all_returns_the_writers_not_flushed_yet(reactor):
    w = _Writer(1001, reactor)
    w.startWriting()
    assert w in reactor.removeAll()
    assert reactor.getWriters() == []
    reactor.runUntilCurrent()
    assert w.writes == 0


# --- send_now: a finished message goes out at once ------------------------------------------


def test_send_now_sends_at_once_and_leaves_nothing_for_the_flush(reactor):
    protocol, peer = _pair(reactor)
    transport = protocol.transport
    transport.write(b"a whole response")
    txreactor.send_now(transport)
    assert _received(peer) == b"a whole response"  # no pass of the loop needed
    assert transport not in reactor.getWriters() and transport.fileno() not in reactor._writes
    reactor.runUntilCurrent()
    assert _received(peer) == b""
    transport.loseConnection()
    reactor.runUntilCurrent()
    peer.close()


def test_send_now_leaves_what_the_socket_cannot_take_to_the_flush(reactor):
    protocol, peer = _pair(reactor)
    transport = protocol.transport
    big = b"x" * (16 << 20)
    transport.write(big)
    txreactor.send_now(transport)
    got = len(_received(peer))
    assert 0 < got < len(big)
    assert transport in reactor._unflushed  # the flush hands the rest to epoll, as before
    reactor.runUntilCurrent()
    assert transport.fileno() in reactor._writes
    transport.abortConnection()
    reactor.iterate(0)
    peer.close()


@pytest.mark.parametrize("state", ["disconnecting", "half-closed", "producer paused", "pull producer", "TLS"])
def test_send_now_leaves_a_writer_whose_doWrite_would_do_more_than_send(reactor, state):
    from twisted.internet.interfaces import IPullProducer, IPushProducer
    from zope.interface import implementer

    @implementer(IPushProducer, IPullProducer)
    class Producer:
        resumed = 0

        def resumeProducing(self):
            self.resumed += 1

        def pauseProducing(self):
            pass

        def stopProducing(self):
            pass

    protocol, peer = _pair(reactor)
    transport = protocol.transport
    producer = Producer()
    if state == "producer paused":
        transport.registerProducer(producer, True)
        transport.producerPaused = True
    elif state == "pull producer":
        transport.registerProducer(producer, False)
        producer.resumed = 0  # (registering a pull producer asks it for data once)
    transport.write(b"data")
    if state == "disconnecting":
        transport.loseConnection()
    elif state == "half-closed":
        transport.loseWriteConnection()
    elif state == "TLS":
        transport.TLS = True  # (after the write: a TLS transport's write goes through TLS)
    txreactor.send_now(transport)
    assert _received(peer) == b""  # nothing sent early
    assert transport in reactor._unflushed and producer.resumed == 0
    transport.TLS = False
    if state in ("producer paused", "pull producer"):
        transport.producerPaused = False
        transport.unregisterProducer()
    reactor.runUntilCurrent()
    assert _received(peer) == b"data"  # the flush sends it as always
    transport.abortConnection()
    reactor.iterate(0)
    peer.close()


def test_send_now_leaves_a_failed_send_to_the_flush_which_loses_the_connection(reactor, monkeypatch):
    monkeypatch.setattr(reactor, "_poller", _Poller([]))
    w = _Writer(1001, reactor)
    calls: list[int] = []

    def failing() -> object:
        calls.append(1)
        from twisted.internet.main import CONNECTION_LOST

        return CONNECTION_LOST

    w.doWrite = failing  # type: ignore[method-assign]
    w.startWriting()
    reactor.send_now(w)
    assert calls == [1] and w.lost == [] and w in reactor._unflushed
    reactor.runUntilCurrent()
    assert calls == [1, 1] and len(w.lost) == 1


def test_send_now_ignores_what_the_reactor_does_not_hold(reactor):
    w = _Writer(1001, reactor)
    reactor.send_now(w)  # not writing: nothing to do
    assert w.writes == 0
    txreactor.send_now(object())  # no reactor at all (a test's transport)


def test_send_now_waits_for_the_flush_when_the_poll_found_several_ready(reactor):
    protocol, peer = _pair(reactor)
    transport = protocol.transport
    poller = _Poller([(transport.fileno(), select.EPOLLIN), (9999, select.EPOLLIN)])
    real = reactor._poller
    reactor._poller = poller
    reactor.doPoll(0)  # two ready (one of them unknown): busy
    reactor._poller = real
    transport.write(b"under load")
    txreactor.send_now(transport)
    assert _received(peer) == b""
    reactor.runUntilCurrent()  # the flush, as always
    assert _received(peer) == b"under load"
    reactor._poller = _Poller([(transport.fileno(), select.EPOLLIN)])
    reactor.doPoll(0)  # one ready: the loop has only that to do
    reactor._poller = real
    transport.write(b"alone")
    txreactor.send_now(transport)
    assert _received(peer) == b"alone"
    transport.abortConnection()
    reactor.iterate(0)
    peer.close()


def test_send_now_sends_once_a_pass(reactor):
    """A read that finishes many messages (a multiple ack for many accepted calls) is a busy
    pass: the first goes at once, the others wait for the flush."""
    (first, peer1), (second, peer2) = _pair(reactor), _pair(reactor)
    first.transport.write(b"one")
    second.transport.write(b"two")
    txreactor.send_now(first.transport)
    txreactor.send_now(second.transport)
    assert (_received(peer1), _received(peer2)) == (b"one", b"")
    reactor.runUntilCurrent()
    assert _received(peer2) == b"two"
    for protocol, peer in ((first, peer1), (second, peer2)):
        protocol.transport.abortConnection()
        peer.close()
    reactor.iterate(0)
