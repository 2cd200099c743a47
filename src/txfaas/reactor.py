"""Which reactor a txfaas process runs on, and sending a finished message at once.

With accelerations on (:mod:`txfaas._accel`) and their probe passing, every process installs
:class:`txfaas._accel.reactor.EPollReactor` unless a reactor was chosen already
(``twistd --reactor=...``); otherwise Twisted's default.  :func:`send_now` does nothing on any
other reactor.
"""

from __future__ import annotations

import sys
from typing import Any


def prefer() -> bool:
    """Install txfaas's reactor unless accelerations are off, its probe fails, or a reactor is
    installed already; True if it did."""
    from txfaas import _accel

    if not _accel.enabled() or "twisted.internet.reactor" in sys.modules:
        return False
    from txfaas._accel import reactor as accel

    if not accel.probe():
        return False
    accel.install()
    return True


def global_reactor() -> Any:
    """The global reactor, txfaas's unless one was chosen already (each process's
    ``makeService`` starts here: twistd imports no reactor before it)."""
    prefer()
    from twisted.internet import reactor

    return reactor


def send_now(transport: Any) -> None:
    """Send what ``transport`` holds now, if its reactor can (txfaas's); elsewhere -- the stock
    reactor, a test's transport -- the transport sends as it always does."""
    send = getattr(getattr(transport, "reactor", None), "send_now", None)
    if send is not None:
        send(transport)
