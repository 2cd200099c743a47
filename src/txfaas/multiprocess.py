"""Several processes of one command: the child marker, the parent-death signal, shared metrics.

Imports no reactor: the taps use it before they choose one.  The supervisor is
:mod:`txfaas.supervisor`.
"""

from __future__ import annotations

import os
import sys

from twisted.logger import Logger

# --- several processes on one port -----------------------------------------------------------

log = Logger(namespace="txfaas.multiprocess")

CHILD_ENV = "TXFAAS_CHILD_INDEX"


def prepare_multiprocess_metrics(workers: int, parent_only: bool = False) -> None:
    """With several processes, prometheus_client keeps its values in a shared folder, so that any
    process's /metrics adds up all of them.  Must run before prometheus_client is imported --
    unless ``parent_only``: a supervisor that makes no metrics itself, only its children do."""
    import tempfile

    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if "prometheus_client" in sys.modules and not parent_only:
            raise RuntimeError("prometheus_client was imported before the multiprocess folder was set")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="txfaas-metrics-")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) is not None


def die_with_parent(sig: int = 15) -> bool:
    """Ask Linux to send this process ``sig`` (SIGTERM) when its parent dies.

    A child of ``--workers``/``--processes`` would otherwise outlive a parent that was
    SIGKILLed, keep the port (or the queue) and serve with nobody supervising it.  Returns
    False where the call is not available (not Linux).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before the call: then nobody would send the signal.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True
