"""Process plumbing shared by the twistd services: listening, start-up failures, body limits.

Not pure (it talks to the reactor), but holds no policy of any one process.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import Logger
from twisted.web import server

log = Logger(namespace="txfaas.runtime")


def fail_startup(reactor: IReactorCore, message: str) -> None:
    """Log one line, stop the reactor, and make the process exit with status 1.

    twistd has no exit status of its own: after the services have stopped, the
    process leaves with ``os._exit(1)`` so scripts see the failure.
    """
    log.critical("{message}", message=message)
    sys.stderr.write(f"error: {message}\n")
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


async def listen(reactor: Any, description: str, factory: Any, setting: str = "--listen") -> IListeningPort:
    """Listen on a Twisted endpoint string; a failure is one line naming the setting."""
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise StartupError(f"{setting} {description}: not a valid endpoint ({e})") from None
    try:
        return await endpoint.listen(factory)
    except Exception as e:  # CannotListenError and friends
        reason = getattr(e, "socketError", None) or e
        raise StartupError(f"{setting} {description}: cannot listen ({reason})") from None


class StartupError(Exception):
    """A start-up failure whose ``str()`` is the one line the operator sees."""


def run_startup(reactor: IReactorCore, start: Callable[[], Any]) -> defer.Deferred:
    """Run an ``async`` start-up routine; any failure ends the process with one line."""

    def failed(failure: Any) -> None:
        if failure.check(StartupError):
            fail_startup(reactor, str(failure.value))
        else:
            log.failure("start-up failed", failure)
            fail_startup(reactor, f"start-up failed: {failure.getErrorMessage()}")

    d = defer.Deferred.fromCoroutine(start())
    d.addErrback(failed)
    return d


class LimitedRequest(server.Request):
    """A request that refuses an over-limit body before reading it (413) and bounds reading time.

    The site provides ``body_limit(path: bytes) -> int | None``, ``clock``,
    ``read_timeout`` and ``write_timeout`` (seconds, 0 = none).  A declared
    Content-Length over the limit is refused at once; a chunked body is counted
    as it arrives.  A client that has not sent its whole request within
    ``read_timeout`` gets 408 and is disconnected (Twisted's
    idle timeout resets on every byte, so a trickling client would never be dropped).
    A response not complete within ``write_timeout`` of the request's arrival has
    its connection aborted.
    """

    _limit: int | None = None
    _received = 0
    _refused = False
    _read_timer: Any = None
    _write_timer: Any = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        timeout = getattr(site, "read_timeout", 0)
        if timeout:
            self._read_timer = site.clock.callLater(timeout, self._read_timed_out)

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        path = getattr(self.channel, "_path", b"") or b""
        self._limit = site.body_limit(path) if site is not None and hasattr(site, "body_limit") else None
        if self._limit is not None and length is not None and length > self._limit:
            self._refuse(413, f"request body of {length} bytes is over the limit of {self._limit} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self._refuse(413, f"request body is over the limit of {self._limit} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._read_timer is not None and self._read_timer.active():
            self._read_timer.cancel()
        self._read_timer = None
        if self._refused:
            return
        site = getattr(self.channel, "site", None)
        timeout = getattr(site, "write_timeout", 0)
        if timeout:
            self._write_timer = site.clock.callLater(timeout, self._write_timed_out)
        super().requestReceived(command, path, version)

    def finish(self) -> Any:
        self._stop_timers()
        return super().finish()

    def connectionLost(self, reason: Any) -> None:
        self._stop_timers()
        super().connectionLost(reason)

    def _stop_timers(self) -> None:
        for timer in (self._read_timer, self._write_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._read_timer = self._write_timer = None

    def _write_timed_out(self) -> None:
        """The response was not complete within the write timeout: cut the connection."""
        self._write_timer = None
        log.warn("response to {uri} not written within the write timeout: closing", uri=self.uri)
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()

    def _read_timed_out(self) -> None:
        self._read_timer = None
        self._refuse(408, "request not received within the read timeout")

    def _refuse(self, code: int, message: str) -> None:
        """Answer directly on the transport and close: the request never reaches a resource."""
        self._refused = True
        reason = {408: b"Request Timeout", 413: b"Content Too Large"}.get(code, b"Error")
        body = message.encode() + b"\n"
        transport = self.channel.transport
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (code, reason, len(body), body)
        )
        transport.loseConnection()


class LimitedSite(server.Site):
    """A ``Site`` whose requests are :class:`LimitedRequest` s with the given limits."""

    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: Any,
        clock: Any,
        *,
        body_limit: Callable[[bytes], int | None] = lambda path: None,
        read_timeout: float = 0,
        write_timeout: float = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=clock, **kwargs)
        self.clock = clock
        self.body_limit = body_limit
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        """No access log line per request: the hot path stays quiet (metrics count requests)."""


# --- several processes on one port -----------------------------------------------------------

CHILD_ENV = "TXFAAS_CHILD_INDEX"


def parse_tcp_listen(description: str) -> tuple[str, int, int]:
    """``tcp:PORT[:interface=HOST][:backlog=N]`` -> (host, port, backlog), for SO_REUSEPORT listening."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError(f"--workers needs a tcp:PORT endpoint, not {description!r}")
    port_text = parts[1][5:] if parts[1].startswith("port=") else parts[1]
    if not port_text.isdigit() or int(port_text) == 0:
        raise ValueError(f"--workers needs a fixed port, not {parts[1]!r}")
    host = "::" if parts[0] == "tcp6" else "0.0.0.0"
    backlog = 50
    for option in parts[2:]:
        key, _, value = option.partition("=")
        if key == "interface":
            host = value
        elif key == "backlog" and value.isdigit():
            backlog = int(value)
        else:
            raise ValueError(f"--workers: unsupported endpoint option {option!r}")
    return host, int(port_text), backlog


async def listen_reuseport(reactor: Any, description: str, factory: Any, setting: str = "--listen") -> Any:
    """Listen with SO_REUSEPORT, so that several processes share the port (the kernel spreads connections)."""
    import socket

    try:
        host, port, backlog = parse_tcp_listen(description)
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


def prepare_multiprocess_metrics(workers: int) -> None:
    """With several processes, prometheus_client keeps its values in a shared folder, so that any
    process's /metrics adds up all of them.  Must run before prometheus_client is imported."""
    import tempfile

    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if "prometheus_client" in sys.modules:
            raise RuntimeError("prometheus_client was imported before the multiprocess folder was set")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="txfaas-metrics-")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) is not None


class ChildProcesses(service.Service):
    """Runs ``count`` more copies of this very twistd command (marked as children), restarts one
    that dies, and stops them all (SIGTERM, then waits) when the service stops."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: list[str] | None = None,
        restart_delay: float = 1.0,
        grace: float = 1.0,
    ) -> None:
        self._grace = grace
        self._reactor = reactor
        self._count = count
        self._argv = list(argv if argv is not None else [sys.executable, *sys.argv])
        self._restart_delay = restart_delay
        self._children: dict[int, Any] = {}
        self._ended: dict[int, defer.Deferred] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._count + 1):
            self._spawn(index)

    def alive(self) -> list[int]:
        """The indices of the children running now."""
        return sorted(self._children)

    def _spawn(self, index: int) -> None:
        from twisted.internet import protocol

        owner = self
        ended: defer.Deferred[None] = defer.Deferred()

        class Child(protocol.ProcessProtocol):
            def processEnded(self, reason: Any) -> None:
                owner._ended_child(index, self.transport.pid, reason, ended)

        env = dict(os.environ)
        env[CHILD_ENV] = str(index)
        transport = self._reactor.spawnProcess(
            Child(), self._argv[0], self._argv, env=env, childFDs={0: "w", 1: 1, 2: 2}
        )
        self._children[index] = transport
        self._ended[index] = ended
        self.log.info("started process {index} (pid {pid})", index=index, pid=transport.pid)

    def _ended_child(self, index: int, pid: int | None, reason: Any, ended: defer.Deferred) -> None:
        self._children.pop(index, None)
        ended.callback(None)
        if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)
        if not self._stopping:
            self.log.warn(
                "process {index} ended ({reason}); restarting it in {delay}s",
                index=index,
                reason=reason.getErrorMessage(),
                delay=self._restart_delay,
            )
            self._reactor.callLater(self._restart_delay, lambda: self._stopping or self._spawn(index))

    def stopService(self) -> defer.Deferred:
        """Stop the children.  A SIGTERM sent to the whole process group (systemd, Ctrl-C) has
        reached them already, and a second one would make Twisted log a traceback: they get
        ``grace`` seconds to leave on their own before they are sent SIGTERM."""
        super().stopService()
        self._stopping = True

        def terminate() -> None:
            for transport in list(self._children.values()):
                try:
                    transport.signalProcess("TERM")
                except Exception:  # already gone
                    pass

        timer = self._reactor.callLater(self._grace, terminate)
        ended = defer.DeferredList(list(self._ended.values()), consumeErrors=True)
        ended.addBoth(lambda result: (timer.active() and timer.cancel()) or result)
        return ended


def quiet_pool(reactor: Any, *, persistent: bool = True, per_host: int = 2) -> Any:
    """An ``HTTPConnectionPool`` whose connection factories do not log "Starting factory" /
    "Stopping factory" for every new connection (noise at info level on busy paths)."""
    from twisted.web import client

    class QuietFactory(client._HTTP11ClientFactory):
        noisy = False

    pool = client.HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = per_host
    pool._factory = QuietFactory
    return pool
