"""Fixtures shared by every test.

- ``no_unhandled_errors`` (autouse): fails a test that left a Deferred's error unhandled
  (pytest-twisted does not check this, unlike trial).
- ``redis_url`` / ``amqp_url``: the real services on 127.0.0.1; skipped when missing,
  except under ``CI=true`` where a missing service fails the test.

The tests run on the reactor a txfaas process runs on: ``txfaas._accel.reactor`` when
accelerations are on, installed here before pytest-twisted would install Twisted's default
(it accepts a subclass of it); Twisted's stock epoll reactor under ``TXFAAS_ACCEL=0``.
"""

from __future__ import annotations

import gc
import socket

import pytest
from twisted.logger import globalLogPublisher

from txfaas.reactor import prefer

prefer()

SERVICES = {
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
}


@pytest.fixture(autouse=True)
def no_unhandled_errors():
    """Fail the test if a Deferred was garbage-collected with an unhandled error."""
    seen: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None and (
            "Unhandled error in Deferred" in str(event.get("log_format", ""))
            or event.get("log_namespace") == "twisted.internet.defer"
        ):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    if seen:
        failures = "\n".join(e["log_failure"].getTraceback() for e in seen)
        pytest.fail(f"{len(seen)} unhandled error(s) in Deferreds:\n{failures}")


def service_answers(name: str) -> bool:
    host, port = SERVICES[name]
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str) -> None:
    if service_answers(name):
        return
    from tests.support import missing  # it imports the reactor: not before prefer()

    missing(f"{name} does not answer on {SERVICES[name][0]}:{SERVICES[name][1]}")


@pytest.fixture
def redis_url() -> str:
    require_service("redis")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def amqp_url() -> str:
    require_service("rabbitmq")
    return "amqp://guest:guest@127.0.0.1:5672/%2F"
