"""One AMQP connection, kept up by a ``ClientService`` with a backoff policy.

:class:`Connection` makes pika ``TwistedProtocolConnection`` s and, on each, waits for the AMQP
handshake and runs its owner's ``prepare`` (open channels, declare queues) within
``connect_timeout``; a connection that fails either is aborted, and ``ClientService`` tries again
after the next backoff delay.  pika's Twisted adapter imports the global reactor, so it is
imported only when the first connection is made.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pika
import pika.exceptions
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from txfaas.config import AMQPURL


def describe(error: BaseException | None) -> str:
    """A short, one-line reason for logs and 503 bodies."""
    if error is None:
        return "unknown reason"
    if isinstance(error, pika.exceptions.ChannelClosed | pika.exceptions.ConnectionClosed):
        return f"{error.reply_code} {error.reply_text}"
    if isinstance(error, pika.exceptions.AMQPConnectionError) and all(isinstance(a, int) for a in error.args):
        return f"{type(error).__name__} (the AMQP handshake failed)"  # its only argument is an attempt count
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


def close_quietly(channel: Any) -> None:
    """Close ``channel`` unless it is closed or closing already."""
    try:
        if channel is not None and channel.is_open:
            channel.close()
    except Exception:  # already closing: nothing to do
        pass


def abort(conn: Any) -> None:
    """Drop ``conn``'s TCP connection at once (pika then fails everything pending on it)."""
    transport = getattr(conn, "transport", None)
    if transport is None:
        return
    stop = getattr(transport, "abortConnection", None) or transport.loseConnection
    try:
        stop()
    except Exception:  # already gone
        pass


def bounded(d: Deferred, timeout: float, clock: Any) -> Deferred:
    """``d``, cancelled after ``timeout`` seconds on ``clock`` (``TimeoutError`` then)."""
    return d.addTimeout(max(timeout, 0.0), clock)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Wraps the broker endpoint to record why connecting failed (ClientService does not say)."""

    def __init__(self, endpoint: Any, failed: Callable[[BaseException], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred:
        d = self._endpoint.connect(factory)

        def failed(f: Any) -> Any:
            self._failed(f.value)
            return f

        return d.addErrback(failed)

    def __repr__(self) -> str:
        return f"<broker endpoint {self._endpoint!r}>"


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Any:
        return self._build()


class Connection:
    """Keeps one prepared AMQP connection to the broker at ``url`` (or ``endpoint``).

    ``prepare(conn)`` runs on every new connection once its handshake is done; what it returns
    goes to ``connected(conn, prepared)``, and ``lost(conn, reason)`` is told when that
    connection ends.  :attr:`current` is the prepared connection, None while there is none.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: AMQPURL,
        *,
        prepare: Callable[[Any], Awaitable[Any]],
        connected: Callable[[Any, Any], None],
        lost: Callable[[Any, BaseException], None],
        connect_timeout: float = 5.0,
        retry_policy: Callable[[int], float] | None = None,
        endpoint: Any = None,
        name: str = "txfaas",
    ) -> None:
        self._reactor = reactor
        self._url = url
        self._prepare = prepare
        self._connected = connected
        self._lost = lost
        self.connect_timeout = connect_timeout
        self._retry_policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=10.0)
        self._endpoint = endpoint
        self._name = name
        self._service: ClientService | None = None
        self._protocols: set[Any] = set()  # every connection not yet lost
        self._lost_waiters: list[Deferred] = []
        self._attempt = 0
        #: The prepared connection in use; None while down.
        self.current: Any = None
        #: True once :meth:`close` was called: nothing reconnects any more.
        self.closing = False
        #: Why there is no connection (or "connected"), for logs and 503 bodies.
        self.last_error = "not connected yet"

    @property
    def started(self) -> bool:
        return self._service is not None

    def is_open(self) -> bool:
        conn = self.current
        return conn is not None and conn.is_open

    def retry_delay(self, attempt: int) -> float:
        """The backoff policy's delay before retry number ``attempt``."""
        return self._retry_policy(attempt)

    def bounded(self, d: Deferred, timeout: float | None = None) -> Deferred:
        """``d`` with a timeout (``connect_timeout`` unless given) on this connection's clock."""
        return bounded(d, self.connect_timeout if timeout is None else timeout, self._reactor)

    def start(self) -> None:
        """Start connecting in the background (never fails on a down broker)."""
        if self._service is not None or self.closing:
            return
        endpoint = self._endpoint if self._endpoint is not None else self._default_endpoint()
        watched: Any = _WatchedEndpoint(endpoint, self._connect_failed)
        factory: Any = _ConnectionFactory(self._new_protocol)
        self._service = ClientService(watched, factory, retryPolicy=self._next_delay, clock=self._reactor)
        self._service.startService()

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self.closing = True
        conn = self.current
        if conn is not None and conn.is_open:
            lost: Deferred = Deferred()
            self._lost_waiters.append(lost)
            try:
                conn.close()
                await self.bounded(lost)
            except Exception as e:
                self.log.warn("AMQP connection did not close cleanly: {reason}", reason=describe(e))
                abort(conn)
        if self._service is not None:
            stopping = self._service.stopService()
            try:
                await self.bounded(stopping)
            except Exception:
                for protocol in list(self._protocols):
                    abort(protocol)
        self.current = None

    def _default_endpoint(self) -> Any:
        url = self._url
        endpoint: Any = HostnameEndpoint(self._reactor, url.host, url.port, timeout=self.connect_timeout)
        if url.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(url.host), endpoint)
        return endpoint

    def _parameters(self) -> Any:
        url = self._url
        return pika.ConnectionParameters(
            host=url.host,
            port=url.port,
            virtual_host=url.vhost,
            credentials=pika.PlainCredentials(url.username, url.password),
            heartbeat=url.heartbeat,
            client_properties={"connection_name": self._name},
        )

    def _next_delay(self, _attempt: int) -> float:
        # Our own count: ClientService resets its own on every TCP connection, even one
        # whose AMQP handshake then fails, which would retry a refusing broker at full speed.
        self._attempt += 1
        return self._retry_policy(self._attempt)

    def _connect_failed(self, error: BaseException) -> None:
        self.last_error = f"cannot reach the broker: {describe(error)}"
        if self.closing:
            return
        log = self.log.warn if self._attempt == 0 else self.log.info
        log("{error}; retrying", error=self.last_error)

    def _new_protocol(self) -> Any:
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        conn = TwistedProtocolConnection(self._parameters(), custom_reactor=self._reactor)
        self.attach(conn)
        return conn

    def attach(self, conn: Any) -> None:
        """Set up a new connection once its handshake is done (tests pass fake connections here)."""
        self._protocols.add(conn)
        d = Deferred.fromCoroutine(self._setup(conn))
        d.addErrback(lambda f: self.log.failure("AMQP connection setup crashed", f))

    async def _setup(self, conn: Any) -> None:
        # The handshake is awaited here rather than in ClientService's prepareConnection:
        # a prepareConnection that fails while the TCP connection is up (refused login,
        # handshake timeout) leaves ClientService in a state where the later disconnect
        # raises automat's NoTransition.  So ClientService sees a plain TCP connection,
        # and a setup that fails or takes too long aborts it: ClientService retries.
        ready = conn.ready
        timed_out: list[bool] = []
        timer = self._reactor.callLater(self.connect_timeout, self._setup_timed_out, conn, timed_out)
        try:
            await ready
            closed = conn.closed  # .closed fires once and becomes None: keep this one
            closed.addCallback(self._connection_lost, conn)
            prepared = await self._prepare(conn)
        except Exception as e:
            self._protocols.discard(conn)
            if not self.closing:
                why = f"not ready within {self.connect_timeout:g}s" if timed_out else describe(e)
                self.last_error = f"AMQP connection setup failed: {why}"
                self.log.warn("{error}; retrying", error=self.last_error)
            abort(conn)
            return
        finally:
            if timer.active():
                timer.cancel()
        if self.closing:
            conn.close()
            return
        self.current = conn
        self._attempt = 0
        self.last_error = "connected"
        self._connected(conn, prepared)

    def _setup_timed_out(self, conn: Any, timed_out: list[bool]) -> None:
        timed_out.append(True)
        abort(conn)

    def _connection_lost(self, reason: BaseException, conn: Any) -> None:
        self._protocols.discard(conn)
        if self.current is conn:
            self.current = None
            if self.closing:
                self.log.info("AMQP connection closed")
            else:
                self.last_error = f"connection lost: {describe(reason)}"
                self.log.warn("AMQP connection lost ({reason}); reconnecting", reason=describe(reason))
            self._lost(conn, reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)
