"""Process plumbing shared by the twistd services: start-up failures, GC settling, listening.

Not pure (it talks to the reactor), but holds no policy of any one process.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txfaas.config import ConfigError

log = Logger(namespace="txfaas.service")


# --- start-up failures ----------------------------------------------------------------------
#
# One rule for every process: a start-up failure is ONE line naming the setting ("error: --listen
# tcp:8080: cannot listen (Address already in use)"), on stderr and in the log, and exit status 1;
# never a traceback.  Raise StartupError (or ConfigError) anywhere in start-up code, then:
#   - synchronous code that runs before any service started (makeService, privilegedStartService):
#     ``with exit_on_startup_error(): ...`` raises SystemExit, so nothing else starts;
#   - asynchronous start-up once services run: ``run_startup(reactor, coroutine_function)`` stops
#     the reactor (services stop in order) and exits 1 after shutdown (fail_startup).


class StartupError(Exception):
    """A start-up failure whose ``str()`` is the one line the operator sees (naming the setting)."""


def _line(message: str) -> str:
    return f"error: {message}"


def _message(failure: Failure) -> str:
    """The one line for a start-up failure: its own words for the expected kinds, else a summary."""
    if failure.check(StartupError, ConfigError):
        return str(failure.value)
    log.failure("start-up failed", failure)
    return f"start-up failed: {failure.getErrorMessage()}"


def fail_startup(reactor: IReactorCore, message: str) -> None:
    """Log one line, stop the reactor, and make the process exit with status 1.

    twistd has no exit status of its own: after the services have stopped, the
    process leaves with ``os._exit(1)`` so scripts see the failure.
    """
    log.critical("{message}", message=message)
    sys.stderr.write(_line(message) + "\n")
    sys.stderr.flush()

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


@contextmanager
def exit_on_startup_error() -> Iterator[None]:
    """Turn a :class:`StartupError` or :class:`~txfaas.config.ConfigError` raised inside into
    ``SystemExit`` with the one line: for code that runs before any service has started
    (``makeService``, ``privilegedStartService``), where stopping the reactor would still let
    the other services start."""
    try:
        yield
    except (StartupError, ConfigError) as e:
        # Only the SystemExit: logging is not set up yet, so a log event would print a second line.
        raise SystemExit(_line(str(e))) from None


def run_startup(reactor: IReactorCore, start: Callable[[], Any]) -> defer.Deferred:
    """Run an ``async`` start-up routine; any failure ends the process with one line."""
    d = defer.Deferred.fromCoroutine(start())
    d.addErrback(lambda failure: fail_startup(reactor, _message(failure)))
    return d


#: Net allocations between two young collections (CPython's default: 700).
YOUNG_GC_THRESHOLD = 10_000


def settle_gc(reactor: Any) -> None:
    """Tune the cyclic GC for a server whose calls are freed by reference counting.

    Once the reactor runs: collect, then ``gc.freeze`` what start-up made, so the full
    collections that steady traffic sets off leave the loaded modules and configuration out;
    and a young collection every ``YOUNG_GC_THRESHOLD`` net allocations rather than 700 (the
    hot paths leave no reference cycles; tests check).  Only from a process's ``makeService``,
    before the reactor runs: never in a test run.  docs/performance.rst has the figures."""
    if getattr(reactor, "running", True):
        return

    def settle() -> None:
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)
        log.debug("start-up objects frozen for the GC: {count}", count=gc.get_freeze_count())

    reactor.callWhenRunning(settle)


# --- listening ------------------------------------------------------------------------------


#: Pending connections the kernel queues for a listening socket (Twisted's own default is 50,
#: and SYNs past it are dropped under a burst of connections); Linux caps it at somaxconn.
DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=`` added, for an endpoint type that takes one and a
    description that does not set its own."""
    parts = re.split(r"(?<!\\):", description)
    kind = "tcp" if parts[0].isdigit() else parts[0]
    if kind not in _BACKLOG_TYPES or any(p.startswith("backlog=") for p in parts[1:]):
        return description
    return f"{description}:backlog={backlog}"


def server_endpoint(
    reactor: Any, description: str, setting: str = "--listen", backlog: int = DEFAULT_BACKLOG
) -> IStreamServerEndpoint:
    """``serverFromString`` (with ``backlog`` unless the description sets one); a description it
    cannot read is a :class:`StartupError` naming the setting."""
    try:
        return endpoints.serverFromString(reactor, with_backlog(description, backlog))
    except (ValueError, KeyError, TypeError) as e:
        raise StartupError(f"{setting} {description}: not a valid endpoint ({e})") from None


async def listen(
    reactor: Any,
    description: str,
    factory: Any,
    setting: str = "--listen",
    *,
    endpoint: IStreamServerEndpoint | None = None,
    backlog: int = DEFAULT_BACKLOG,
) -> IListeningPort:
    """Listen on a Twisted endpoint string (or on ``endpoint``, described by ``description``);
    a failure is a :class:`StartupError` naming the setting."""
    if endpoint is None:
        endpoint = server_endpoint(reactor, description, setting, backlog)
    try:
        return await endpoint.listen(factory)
    except Exception as e:  # CannotListenError and friends
        reason = getattr(e, "socketError", None) or e
        reason = getattr(reason, "strerror", None) or reason
        raise StartupError(f"{setting} {description}: cannot listen ({reason})") from None


class Listener(service.Service):
    """A listening port as a service: it opens in ``privilegedStartService`` and closes in ``stopService``.

    Opening before any service starts (and before twistd sheds privileges, for ports
    below 1024) means a port in use ends the process with one line and exit 1 while
    nothing else has started.  TCP, UNIX and SSL endpoints listen at once; one that
    answers later and fails ends the process through :func:`fail_startup`.  ``reactor``
    may be None when ``endpoint`` is given.

    Not a ``StreamServerEndpointService``: its synchronous failure and its waiting for the
    port are private attributes there (``_raiseSynchronously``, ``_waitingForPort``).
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        *,
        setting: str = "--listen",
        endpoint: IStreamServerEndpoint | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self._backlog = backlog
        self._reactor = reactor
        self._description = description
        self._factory = factory
        self._setting = setting
        self._endpoint = endpoint
        self._opening: defer.Deferred[Any] | None = None
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open()

    def startService(self) -> None:
        self._open()  # when started without the privileged phase (a parent that is already running)
        super().startService()

    def _open(self) -> None:
        if self._opening is not None:
            return
        d = defer.Deferred.fromCoroutine(
            listen(
                self._reactor,
                self._description,
                self._factory,
                self._setting,
                endpoint=self._endpoint,
                backlog=self._backlog,
            )
        )
        self._opening = d
        if d.called:
            outcome: list[Any] = []
            d.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                with exit_on_startup_error():
                    outcome[0].raiseException()
            self.port = outcome[0]
        else:
            d.addCallbacks(self._opened, lambda f: fail_startup(self._reactor, _message(f)))

    def _opened(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port, self._opening = self.port, None, None
        if port is None:
            return defer.succeed(None)
        stopped: defer.Deferred[None] = defer.maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopped


def parse_tcp_listen(description: str, backlog: int = DEFAULT_BACKLOG) -> tuple[str, int, int]:
    """``tcp:PORT[:interface=HOST][:backlog=N]`` -> (host, port, backlog), for SO_REUSEPORT
    listening (``backlog`` when the description sets none)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError(f"--workers needs a tcp:PORT endpoint, not {description!r}")
    port_text = parts[1][5:] if parts[1].startswith("port=") else parts[1]
    if not port_text.isdigit() or int(port_text) == 0:
        raise ValueError(f"--workers needs a fixed port, not {parts[1]!r}")
    host = "::" if parts[0] == "tcp6" else "0.0.0.0"
    for option in parts[2:]:
        key, _, value = option.partition("=")
        if key == "interface":
            host = value
        elif key == "backlog" and value.isdigit():
            backlog = int(value)
        else:
            raise ValueError(f"--workers: unsupported endpoint option {option!r}")
    return host, int(port_text), backlog


async def listen_reuseport(
    reactor: Any, description: str, factory: Any, setting: str = "--listen", *, backlog: int = DEFAULT_BACKLOG
) -> Any:
    """Listen with SO_REUSEPORT, so that several processes share the port (the kernel spreads connections)."""
    import socket

    try:
        host, port, backlog = parse_tcp_listen(description, backlog)
    except ValueError as e:
        raise StartupError(f"{setting} {description}: {e}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    except OSError as e:
        raise StartupError(f"{setting} {description}: cannot listen ({e.strerror})") from None
    finally:
        sock.close()  # the reactor holds its own duplicate


class OrderedMultiService(service.MultiService):
    """A ``MultiService`` whose children stop one after the other, last added first.

    ``MultiService`` calls every child's ``stopService`` at once; a process that must
    stop listening, then drain its work, then close its clients needs them in turn.
    """

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)

        async def stop_in_turn() -> None:
            for child in reversed(list(self)):
                try:
                    await defer.maybeDeferred(child.stopService)
                except Exception:
                    log.failure("error while stopping {child}", child=child)

        return defer.Deferred.fromCoroutine(stop_in_turn())
