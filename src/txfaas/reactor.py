"""The reactor txfaas's processes run on: Twisted's epoll reactor, minus a per-event log context.

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

``twistd --reactor=txfaas-epoll`` selects it explicitly; every txfaas process installs it
by default (:func:`prefer`) unless a reactor was chosen already -- ``twistd --reactor=epoll
faas-gateway`` runs the stock one.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.logger import Logger

log = Logger()


class EPollReactor(epollreactor.EPollReactor):
    """``epollreactor.EPollReactor`` whose ``doPoll`` calls ``_doReadOrWrite`` directly."""

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


def install() -> None:
    """Install :class:`EPollReactor` as the global reactor (``twistd --reactor=txfaas-epoll``)."""
    from twisted.internet.main import installReactor

    installReactor(EPollReactor())


def prefer() -> bool:
    """Install :class:`EPollReactor` unless a reactor is installed already (chosen with
    ``twistd --reactor``, or imported by something) or epoll is missing; True if it did."""
    import sys

    if "twisted.internet.reactor" in sys.modules:
        return False
    try:
        import select

        select.epoll  # noqa: B018 -- not on every platform
    except AttributeError:
        return False
    install()
    return True


def global_reactor() -> Any:
    """The global reactor, :class:`EPollReactor` unless one was chosen already (each
    process's ``makeService`` starts here: twistd imports no reactor before it)."""
    prefer()
    from twisted.internet import reactor

    return reactor
