"""The reactor txfaas's processes run on: Twisted's epoll reactor, with two costs taken out and
finished messages sent at once when there is nothing else to do.

1. No per-event log context.

Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to ``_doReadOrWrite``
through ``twisted.python.log.callWithLogger``, which asks the selectable for its
``logPrefix()``, copies the legacy log context and pushes it, so that a message logged
with the *legacy* ``twisted.python.log`` API from inside that event is labelled with the
protocol's prefix as its ``system``.  That is four more Python frames and a dict copy per
event; a proxied call has four events (client readable, function writable, function
readable, client writable), and at one connection it was 8.5 % of the gateway's
instructions per call (callgrind).

txfaas logs with ``twisted.logger`` (whose events carry their namespace, not a legacy
context), so :class:`EPollReactor` dispatches each event directly.  What changes: a
legacy ``log.msg`` / ``log.err`` made inside an event (Twisted's own "Unhandled Error"
reports, for instance) says ``system: -`` instead of the connection's prefix.  Errors are
still caught and logged per event, as before: ``_doReadOrWrite`` logs an exception of
``doRead`` / ``doWrite`` and disconnects that selectable; anything else is logged here and
the other ready descriptors are still served.

2. Writes go out before the next poll, not after it.  Twisted's transports buffer what is
written and ask the reactor to watch the socket for writability (``addWriter``: an
``epoll_ctl``); the next poll reports it writable -- a loopback socket nearly always is --
``doWrite`` sends, and finding the buffer empty it stops watching (a second ``epoll_ctl``).
So every response costs a pass of the loop and three system calls more than its ``send``.
Here ``addWriter`` only notes the writer; once the pass's events and timed calls are done
(at the end of ``runUntilCurrent``, right before the reactor computes its timeout and
polls) each noted writer is given its ``doWrite`` as if epoll had reported it writable.
What it could not send (the socket's buffer is full) is then watched by epoll exactly as
before.  Everything written in one pass still goes out in one ``send`` per connection;
it only goes out sooner.  A proxied call at one connection makes 7 system calls instead
of 13 (strace).

3. A finished message goes out at once when the loop has nothing else to do.  A proxied
call's request to its function, and the response to its client once it is whole, are sent
when they are complete (:func:`send_now`), not at the end of the pass, if the last poll found
only that one descriptor ready: the bookkeeping that follows (the request's teardown, metrics,
returning the connection to the pool) then runs while the message is on its way, not before
it leaves.  Under load (several descriptors ready, or a message sent early already in this
pass) writes wait for the flush as above.  Still
one ``send`` per message; only a writer for which ``doWrite`` can do nothing but send is sent
early (see :meth:`EPollReactor.send_now`).

``twistd --reactor=txfaas-epoll`` selects it explicitly; every txfaas process installs it
by default (:func:`prefer`) unless a reactor was chosen already -- ``twistd --reactor=epoll
faas-gateway`` runs the stock one.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

try:
    from select import EPOLLOUT

    from twisted.internet.epollreactor import EPollReactor as _Stock
except ImportError:  # no epoll (not Linux): prefer() leaves Twisted's default reactor
    EPOLLOUT = 4
    _Stock = object  # type: ignore[assignment,misc]

log = Logger()

#: Flush passes before what is still waiting is left to epoll (a doWrite may make another
#: writer write: a resumed producer, say).
FLUSH_PASSES = 3

_ABSENT = object()


class EPollReactor(_Stock):  # type: ignore[misc,valid-type]
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
        at the end of the pass: sending in the middle of it wakes the peers (wrk, nginx, the
        function) while this process still has work, and on two cores the gateway then did
        24 % fewer calls a second at 50 connections (872fb54).  Once a pass, for the same
        reason: one read can finish many messages (a multiple ack, many Redis replies)."""
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


def send_now(transport: Any) -> None:
    """Send what ``transport`` holds now, if its reactor is :class:`EPollReactor` and it is a
    plain socket transport (anything else -- another reactor, a test's transport -- sends as
    it always does)."""
    send = getattr(getattr(transport, "reactor", None), "send_now", None)
    if send is not None:
        send(transport)


def install() -> None:
    """Install :class:`EPollReactor` as the global reactor (``twistd --reactor=txfaas-epoll``)."""
    from twisted.internet.main import installReactor

    installReactor(EPollReactor())


def prefer() -> bool:
    """Install :class:`EPollReactor` unless a reactor is installed already (chosen with
    ``twistd --reactor``, or imported by something) or epoll is missing; True if it did."""
    import sys

    from txfaas import _accel

    if not _accel.enabled() or "twisted.internet.reactor" in sys.modules or _Stock is object:
        return False
    install()
    return True


def global_reactor() -> Any:
    """The global reactor, :class:`EPollReactor` unless one was chosen already (each
    process's ``makeService`` starts here: twistd imports no reactor before it)."""
    prefer()
    from twisted.internet import reactor

    return reactor
