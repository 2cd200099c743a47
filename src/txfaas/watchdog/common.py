"""What the watchdog's HTTP front and its two runners (fork, http) share.

Pure: no reactor.  :class:`WatchdogConfig` is built once by ``tap.py`` from
flags and environment variables and handed down; nothing below it reads
``os.environ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

FORK = "fork"
HTTP = "http"
MODES = (FORK, HTTP)

TEXT_PLAIN = b"text/plain; charset=utf-8"


def _frozen_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class WatchdogConfig:
    """Everything the watchdog was told, validated.  Durations are seconds, 0 means no limit."""

    fprocess: tuple[str, ...]
    """The function's command, already split (``shlex``) into argv."""
    mode: str = FORK
    upstream_url: str | None = None
    """http mode: where the long-running ``fprocess`` listens (``http://127.0.0.1:5000``)."""
    listen: str = "tcp:8080"
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    exec_timeout: float = 10.0
    idle_timeout: float = 300.0
    healthcheck_interval: float = 5.0
    max_inflight: int = 0
    content_type: str | None = None
    max_request: int = 16 * 1024 * 1024
    max_response: int = 16 * 1024 * 1024
    environ: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    """The function's environment: the watchdog's own, captured once at start-up."""
    launcher: tuple[str, ...] = ()
    """Prefix that starts a program in a new session and process group (``setsid --``)."""

    @property
    def command(self) -> str:
        return " ".join(self.fprocess)


@attrs.frozen
class Invocation:
    """One request for the function, as the front hands it to a runner."""

    method: bytes
    uri: bytes
    """Path and query exactly as received (``/a/b?x=1``)."""
    path: bytes
    query: bytes
    headers: Headers
    body: bytes
    call_id: str = ""


@attrs.frozen
class FunctionResult:
    """What the function answered (or what the runner says about its failure)."""

    code: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    @classmethod
    def text(cls, code: int, message: str) -> FunctionResult:
        """A short plain-text answer written by the watchdog itself."""
        return cls(code, ((b"Content-Type", TEXT_PLAIN),), message.encode("utf-8") + b"\n")


class Runner(Protocol):
    """Runs the function: a process per call (fork) or a proxied long-running server (http)."""

    @property
    def ready(self) -> bool:
        """True when a call would be served now (drives ``/_/health``)."""

    def start(self) -> None:
        """Begin (start the long-running process, the reaper)."""

    def invoke(self, call: Invocation) -> Deferred[FunctionResult]:
        """Run one call.  Cancelling the Deferred must abort the work (kill, disconnect)."""

    def stop(self) -> Deferred[None]:
        """Kill whatever still runs and reap it; fires when nothing of the function is left."""
