"""Speed-ups that rely on other projects' private names: kept here, and nowhere else.

One module per trick. Each has a ``probe()`` that checks the behaviour it relies on (not just
that the names exist); when the probe fails, or when accelerations are off, callers get the
stock Twisted, pika or txredisapi path. ``TXFAAS_ACCEL=0`` or ``--no-accel`` on any process
turns every one of them off; child processes inherit the choice through the environment.
"""

from __future__ import annotations

import os

ENV = "TXFAAS_ACCEL"
_OFF = frozenset({"0", "false", "no", "off"})
_enabled: bool | None = None


def enabled() -> bool:
    """True unless ``TXFAAS_ACCEL`` says off or :func:`disable` was called."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV, "1").strip().lower() not in _OFF
    return _enabled


def disable() -> None:
    """Turn every acceleration off in this process and in the processes it starts."""
    global _enabled
    _enabled = False
    os.environ[ENV] = "0"


def reset() -> None:
    """Read ``TXFAAS_ACCEL`` again on the next :func:`enabled` (for tests)."""
    global _enabled
    _enabled = None
