"""Helpers for tests: Deferred results for pytest functions; for integration tests, real twistd
processes, loopback HTTP servers, polling.

Everything here waits on the reactor (``deferLater``), never with ``time.sleep``,
so servers running inside the test process keep answering while a test waits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import treq
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

ROOT = Path(__file__).resolve().parent.parent

_case = SynchronousTestCase()
#: Twisted's synchronous checks of a Deferred's result, for pytest functions.
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


#: The credentials every test gateway is started with (see :func:`gateway_env`); send them to /system/*.
GATEWAY_AUTH = ("admin", uuid.uuid4().hex)


def gateway_env(auth: tuple[str, str] = GATEWAY_AUTH) -> dict[str, str]:
    """The environment that gives a ``faas-gateway``/``faas-local`` these basic-auth credentials."""
    return {"TXFAAS_BASIC_AUTH_USER": auth[0], "TXFAAS_BASIC_AUTH_PASSWORD": auth[1]}


_STATE_ROOT: list[str] = []


def _fresh_state_dir() -> str:
    """A new folder under one per test session, removed when the session ends."""
    if not _STATE_ROOT:
        _STATE_ROOT.append(tempfile.mkdtemp(prefix="txfaas-state-"))
        atexit.register(shutil.rmtree, _STATE_ROOT[0], True)
    return tempfile.mkdtemp(dir=_STATE_ROOT[0])


def _twistd_env(env: dict[str, str] | None) -> dict[str, str]:
    """The test's environment plus ``env``; a fresh state dir, so nothing lands in the user's."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if "TXFAAS_STATE_DIR" not in full_env:
        full_env["TXFAAS_STATE_DIR"] = _fresh_state_dir()
    return full_env


def twistd_command() -> list[str]:
    """The ``twistd`` of the Python running the tests (its venv's script, else the module)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(interval)


class TwistdProcess:
    """``twistd -n <plugin> ...`` as a child process, logging to a file."""

    def __init__(self, plugin: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.plugin = plugin
        self.args = args
        self.log_path = Path(tempfile.mkstemp(prefix=f"{plugin}-", suffix=".log")[1])
        full_env = _twistd_env(env)
        self.state_dir = Path(full_env["TXFAAS_STATE_DIR"])
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [*twistd_command(), "-n", "--pidfile=", plugin, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    async def wait_http(
        self, url: str, timeout: float = 20.0, status: int | None = None, auth: tuple[str, str] | None = None
    ) -> None:
        """Wait until ``url`` answers (with ``status`` when given); fail early if the process died."""

        async def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.plugin} exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                response = await treq.get(url, timeout=2, auth=auth)
                await response.content()
            except Exception:
                return False
            return status is None or response.code == status

        try:
            await wait_for(ready, timeout=timeout, what=f"{self.plugin} at {url}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- {self.plugin} log ---\n{self.tail()}") from None

    async def wait_exit(self, timeout: float = 15.0) -> int:
        await wait_for(lambda: self.popen.poll() is not None, timeout=timeout, what=f"{self.plugin} exit")
        return self.popen.returncode

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    async def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                await self.wait_exit(timeout)
            except AssertionError:
                self.kill()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)


def missing(what: str) -> NoReturn:
    """Skip the test for want of ``what``; under ``CI=true`` fail it instead, so CI runs every test."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: a missing service is a failure)")
    pytest.skip(what)


def run_twistd_sync(plugin: str, args: list[str], timeout: float = 30, env: dict | None = None):
    """Run a twistd command to completion (for --help and start-up errors)."""
    full_env = _twistd_env(env)
    return subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", plugin, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=tempfile.gettempdir(),
    )


class Recorder(resource.Resource):
    """A loopback HTTP server that records every request and answers as told.

    ``respond(request) -> (status, headers, body)`` or a Deferred of it; default 200 "ok".
    """

    isLeaf = True

    def __init__(self, respond: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.respond = respond
        self.disconnected: list[str] = []
        self.arrived: defer.Deferred | None = None

    def render(self, request: server.Request) -> Any:
        body = request.content.read()
        record = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "path": request.path.decode(),
            "headers": {
                k.decode().lower(): [v.decode("latin-1") for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            "body": body,
            "time": time.monotonic(),
        }
        self.requests.append(record)
        gone: list[bool] = []

        def lost(_: Any) -> None:
            gone.append(True)
            self.disconnected.append(record["uri"])

        request.notifyFinish().addErrback(lost)
        answer = self.respond(request) if self.respond else (200, {}, b"ok")
        if isinstance(answer, defer.Deferred):
            answer.addCallback(lambda a: None if gone else self._write(request, a))
            answer.addErrback(lambda _: None)
            return server.NOT_DONE_YET
        return self._finish(request, answer)

    def _write(self, request: server.Request, answer: tuple) -> None:
        request.write(self._finish(request, answer))
        request.finish()

    @staticmethod
    def _finish(request: server.Request, answer: tuple) -> bytes:
        status, headers, body = answer
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


def never_answer(_request: server.Request) -> defer.Deferred:
    """A ``respond`` for a function that hangs until its client goes away."""
    return defer.Deferred()


def listen_http(res: resource.Resource, port: int = 0):
    """Serve ``res`` on 127.0.0.1; returns the listening port (``.getHost().port``)."""
    site = server.Site(res)
    site.displayTracebacks = False
    return reactor.listenTCP(port, site, interface="127.0.0.1")


async def delete_queues(*names: str, host: str = "127.0.0.1", port: int = 5672) -> None:
    """Delete test queues on the broker through a short-lived pika connection."""
    import pika
    from pika.adapters.twisted_connection import TwistedProtocolConnection
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    params = pika.ConnectionParameters(credentials=pika.PlainCredentials("guest", "guest"))
    conn = await connectProtocol(TCP4ClientEndpoint(reactor, host, port), TwistedProtocolConnection(params))
    await conn.ready
    closed = conn.closed
    try:
        channel = await conn.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        conn.close()
        if closed is not None:
            await closed


async def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (test isolation)."""
    from txfaas.config import parse_redis_url
    from txfaas.store.redis import RedisStore

    store = RedisStore.connect(parse_redis_url(redis_url), reactor, prefix=prefix)
    try:
        keys = await store._redis.keys(f"{prefix}*")
        if keys:
            await store._redis.delete(keys)
    finally:
        await store.close()
