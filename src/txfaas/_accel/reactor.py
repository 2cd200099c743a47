"""Twisted's epoll reactor with its events dispatched directly and its writes sent sooner.

Relies on ``EPollReactor``'s private ``_doReadOrWrite``, ``_poller``, ``_selectables`` and
``_writes``, and replaces its ``doPoll``; :func:`probe` runs a socket pair through the
overridden paths on the Twisted in use.

1. ``doPoll`` calls ``_doReadOrWrite`` without Twisted's per-event legacy log context
   (``callWithLogger``): txfaas logs with ``twisted.logger``.  A legacy ``log.msg`` made
   inside an event says ``system: -`` instead of the connection's prefix; errors are still
   caught and logged per event.
2. ``addWriter`` only notes the writer; at the end of ``runUntilCurrent`` each noted writer
   gets its ``doWrite`` as if epoll had reported it writable, and only what it could not
   send is watched by epoll.  One ``send`` per connection per pass, with no ``epoll_ctl``.
3. :meth:`EPollReactor.send_now` sends a finished message at once when the last poll found
   at most one descriptor ready, so the bookkeeping after it runs while it travels.

docs/performance.rst has the measurements.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

try:
    from select import EPOLLOUT

    from twisted.internet.epollreactor import EPollReactor as _Stock
except ImportError:  # no epoll (not Linux): prefer() leaves Twisted's default reactor
    EPOLLOUT = 4  # type: ignore[misc]  # select's value, where select has none
    _Stock = object  # type: ignore[assignment,misc]

log = Logger()

#: Flush passes before what is still waiting is left to epoll (a doWrite may make another
#: writer write: a resumed producer, say).
FLUSH_PASSES = 3

_ABSENT = object()


class EPollReactor(_Stock):
    """``epollreactor.EPollReactor`` whose ``doPoll`` calls ``_doReadOrWrite`` directly and
    whose writers are flushed before the next poll (see the module's documentation)."""

    def __init__(self) -> None:
        # Writers noted by addWriter and not watched by epoll yet, in order (a dict as an
        # ordered set); a writer is either here or in ``_writes``, never both.
        self._unflushed: dict[Any, None] = {}
        # send_now acts only when the last poll found at most one descriptor ready, and once a
        # pass (a read with many replies finishing many messages is a busy pass too).
        self._quiet = True
        super().__init__()

    def addWriter(self, writer: Any) -> None:
        unflushed = self._unflushed
        if writer in unflushed or writer.fileno() in self._writes:
            return
        unflushed[writer] = None

    def removeWriter(self, writer: Any) -> None:
        self._unflushed.pop(writer, None)
        super().removeWriter(writer)

    def getWriters(self) -> list[Any]:
        return super().getWriters() + list(self._unflushed)

    def removeAll(self) -> list[Any]:
        removed = super().removeAll()
        pending = [w for w in self._unflushed if w not in removed]
        self._unflushed.clear()
        return removed + pending

    def runUntilCurrent(self) -> None:
        super().runUntilCurrent()
        if self._unflushed:
            self.flush()

    def flush(self) -> None:
        """Give every noted writer its ``doWrite`` now; watch with epoll what is left."""
        unflushed = self._unflushed
        dispatch = self._doReadOrWrite
        for _ in range(FLUSH_PASSES):
            for writer in list(unflushed):
                if writer not in unflushed:
                    continue  # stopped writing meanwhile
                try:
                    dispatch(writer, -1, EPOLLOUT)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.failure("flushing {writer}", writer=writer)
                # Still noted: data it could not send yet (or written again from its own
                # doWrite): from now on epoll says when it can take more.
                if unflushed.pop(writer, _ABSENT) is not _ABSENT:
                    self._watch(writer)
            if not unflushed:
                return
        for writer in list(unflushed):
            del unflushed[writer]
            self._watch(writer)

    def send_now(self, writer: Any) -> None:
        """Give ``writer`` its ``doWrite`` now if the last poll found at most one descriptor
        ready and nothing was sent early since (the loop has nothing else to do in this pass),
        ``writer`` is waiting for the flush, and its ``doWrite`` can do nothing but send: not a
        connection being closed or half-closed (its ``doWrite`` would close it), not one whose
        producer it paused or whose producer is a pull producer (it would ask it for more), not
        TLS.  What could not be sent, and an error (a
        connection reset), are left to the flush, which handles them as always (the send is
        repeated and fails the same way, and the connection is lost).

        Under load (several descriptors ready at once) everything still waits for the flush
        at the end of the pass: sending in the middle of it wakes the peers while this process
        still has work.  Once a pass, for the same reason: one read can finish many messages
        (a multiple ack, many Redis replies)."""
        if (
            not self._quiet
            or writer not in self._unflushed
            or writer.disconnecting
            or getattr(writer, "_writeDisconnecting", False)  # (doWrite would half-close it)
            or writer.producerPaused
            or (writer.producer is not None and not writer.streamingProducer)
            or getattr(writer, "TLS", False)
        ):
            return
        self._quiet = False  # the rest of this pass waits for the flush
        try:
            writer.doWrite()
        except Exception:
            # Not expected (doWrite returns its errors); the flush meets it again if the
            # writer still waits, and loses the connection.
            log.failure("sending at once on {writer}", writer=writer)

    def _watch(self, writer: Any) -> None:
        try:
            super().addWriter(writer)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.failure("watching {writer} for writability", writer=writer)

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        self._quiet = len(events) <= 1
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this same poll
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure("handling an event of {selectable}", selectable=selectable)

    doIteration = doPoll


def probe() -> bool:
    """True if the overridden paths work on this Twisted: a write on a socket pair goes out at
    the end of ``runUntilCurrent`` without epoll watching it, the answer is read through
    ``doPoll``, and a closed connection is closed by the flush."""
    global _probed
    if _probed is None:
        _probed = _Stock is not object and _round_trip()
    return _probed


_probed: bool | None = None


def _round_trip() -> bool:
    import socket

    from twisted.internet.protocol import Factory, Protocol

    received: list[bytes] = []
    protocols: list[Protocol] = []

    class Peer(Protocol):
        def connectionMade(self) -> None:
            protocols.append(self)

        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    try:
        reactor = EPollReactor()
    except Exception:
        return False
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        reactor.adoptStreamConnection(left.fileno(), socket.AF_UNIX, Factory.forProtocol(Peer))
        transport: Any = protocols[0].transport
        transport.write(b"ping")
        if transport.fileno() in reactor._writes:
            return False
        reactor.runUntilCurrent()
        if right.recv(16) != b"ping":
            return False
        right.sendall(b"pong")
        reactor.doPoll(0)
        if b"".join(received) != b"pong":
            return False
        transport.loseConnection()
        reactor.runUntilCurrent()
        return right.recv(16) == b""
    except Exception:
        return False
    finally:
        reactor.removeAll()
        left.close()
        right.close()
        reactor.waker.connectionLost(None)
        reactor._poller.close()


def install() -> None:
    """Install :class:`EPollReactor` as the global reactor (``twistd --reactor=txfaas-epoll``)."""
    from twisted.internet.main import installReactor

    installReactor(EPollReactor())
