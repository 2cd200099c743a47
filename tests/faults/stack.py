"""What a fault run starts, all private and on loopback.

- :class:`PrivateRabbit`: a RabbitMQ node of its own (``RABBITMQ_NODENAME=faults-…@localhost``,
  its own AMQP and distribution ports, mnesia and log dirs, config with a short
  ``consumer_timeout``), so ``stop_app``/``start_app`` never touch the shared broker.
- :class:`PrivateRedis`: ``redis-server`` as a child process (SIGSTOP/SIGCONT = "Redis paused").
- :class:`Stack`: those two, one ``faas-gateway`` and two ``faas-worker`` processes whose
  AMQP connections each go through their own :class:`tests.tcpproxy.TCPProxy`.

When a private node cannot start here, :meth:`Stack.start` falls back to the shared broker
(127.0.0.1:5672) with a unique queue name and says so loudly; the broker-restart fault is
then skipped (the runner checks :attr:`Stack.private_broker`).
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pika
import treq
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from tests.support import GATEWAY_AUTH, TwistdProcess, free_port, gateway_env, unique
from tests.tcpproxy import TCPProxy

SHARED_AMQP_PORT = 5672
RABBIT_USER = "rabbitmq"


class StackError(Exception):
    """Something the run needs could not be started."""


def quiet_port() -> int:
    """A free port below the ephemeral range, so no client connection holds it (a broker
    that restarts its listener must be able to bind it again)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


async def answers(reactor: Any, port: int, timeout: float = 1.0) -> bool:
    """Does something accept TCP connections on 127.0.0.1:port?"""
    from twisted.internet.protocol import Protocol

    try:
        protocol = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout), Protocol()
        )
    except Exception:
        return False
    protocol.transport.abortConnection()
    return True


async def poll(reactor: Any, check: Any, timeout: float, interval: float = 0.2) -> bool:
    """Await ``check()`` (async) until it is true or ``timeout`` seconds passed."""
    deadline = reactor.seconds() + timeout
    while True:
        if await check():
            return True
        if reactor.seconds() > deadline:
            return False
        await task.deferLater(reactor, interval, lambda: None)


class PrivateRabbit:
    """A RabbitMQ node of the run's own.  Commands run through the reactor (no blocking)."""

    log = Logger()

    def __init__(self, reactor: Any, workdir: Path, consumer_timeout: float) -> None:
        self._reactor = reactor
        self.dir = workdir / "rabbitmq"
        self.node = f"{unique('faults')}@localhost"
        self.port = quiet_port()
        self.dist_port = quiet_port()
        self.consumer_timeout = consumer_timeout
        self.started = False

    async def ctl(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        """``rabbitmqctl -n <our node> ...``: (exit code, output)."""
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            return 127, "rabbitmqctl not found"
        d = getProcessOutputAndValue(
            ctl, ["-n", self.node, *args], env=dict(os.environ), reactor=self._reactor
        )
        d.addTimeout(timeout, self._reactor)
        try:
            out, err, code = await d
        except defer.TimeoutError:
            return 124, f"rabbitmqctl {' '.join(args)}: no answer within {timeout:g}s"
        return code, (out + err).decode(errors="replace").strip()

    def _prepare(self) -> dict[str, str]:
        self.dir.mkdir(parents=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"consumer_timeout = {int(self.consumer_timeout * 1000)}\nloopback_users = none\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        if os.getuid() == 0:
            # rabbitmq-server run as root switches to the rabbitmq user (and its cookie).
            user = pwd.getpwnam(RABBIT_USER)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
        )
        return env

    async def start(self, timeout: float = 60) -> None:
        """Start the node and wait until it accepts AMQP connections; :class:`StackError` if not."""
        server = shutil.which("rabbitmq-server")
        if server is None:
            raise StackError("rabbitmq-server is not installed")
        try:
            env = self._prepare()
        except (OSError, KeyError) as e:
            raise StackError(f"cannot prepare {self.dir}: {e}") from None
        d = getProcessOutputAndValue(server, ["-detached"], env=env, reactor=self._reactor)
        d.addTimeout(timeout, self._reactor)
        out, err, code = await d
        self.started = True
        if code != 0:
            raise StackError(
                f"rabbitmq-server -detached exited {code}: {(out + err).decode(errors='replace')}"
            )
        code, text = await self.ctl("wait", "--timeout", str(int(timeout)), str(self.dir / "pid"))
        if code != 0 or not await self.wait_amqp(timeout):
            raise StackError(
                f"private node {self.node} did not start ({code}): {text[-500:]}\n{self.log_tail()}"
            )
        self.log.info("private RabbitMQ node {node} on 127.0.0.1:{port}", node=self.node, port=self.port)

    async def wait_amqp(self, timeout: float) -> bool:
        return await poll(self._reactor, lambda: answers(self._reactor, self.port), timeout)

    async def stop_app(self) -> None:
        code, text = await self.ctl("stop_app")
        if code != 0:
            raise StackError(f"stop_app failed ({code}): {text}")

    async def start_app(self, timeout: float = 60) -> None:
        """``start_app``, then wait until the node answers (``await_startup`` and the AMQP port)."""
        code, text = await self.ctl("start_app", timeout=timeout)
        if code != 0:
            raise StackError(f"start_app failed ({code}): {text}")
        code, text = await self.ctl("await_startup", timeout=timeout)
        if code != 0 or not await self.wait_amqp(timeout):
            raise StackError(f"the private node did not come back ({code}): {text}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "log" / f"{self.node}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {path})"

    def _pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def stop(self) -> None:
        """Halt the node (ours only: ``-n`` names it) and remove its files."""
        if not self.started:
            return
        pid = self._pid()
        code, text = await self.ctl("stop", timeout=30)
        if code != 0:
            self.log.warn("stopping the private node: {text}", text=text)
        if pid is not None:
            try:
                os.kill(pid, 0)
            except OSError:
                pass
            else:
                os.kill(pid, signal.SIGKILL)  # the node we started, by its own pid
        shutil.rmtree(self.dir, ignore_errors=True)
        self.started = False


class PrivateRedis:
    """``redis-server`` as this process's child, on its own port, keeping nothing on disk."""

    log = Logger()

    def __init__(self, reactor: Any, workdir: Path) -> None:
        self._reactor = reactor
        self.dir = workdir / "redis"
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 15) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise StackError("redis-server is not installed")
        self.dir.mkdir(parents=True)
        self.popen = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not await poll(self._reactor, lambda: answers(self._reactor, self.port), timeout):
            raise StackError(f"private redis-server did not answer on port {self.port}")

    def pause(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGCONT)
        self.paused = False

    async def stop(self) -> None:
        if self.popen is None:
            return
        popen, self.popen = self.popen, None
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGCONT)
            popen.terminate()

            async def exited() -> bool:
                return popen.poll() is not None

            if not await poll(self._reactor, exited, 10):
                popen.kill()
                popen.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class Admin:
    """A plain pika connection straight to the broker (no proxy): queue depths and raw publishes."""

    def __init__(self, reactor: Any, port: int) -> None:
        self._reactor = reactor
        self._port = port
        self._conn: Any = None

    async def _connection(self) -> Any:
        if self._conn is not None and self._conn.is_open:
            return self._conn
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        params = pika.ConnectionParameters(credentials=pika.PlainCredentials("guest", "guest"))
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self._port, timeout=5)
        conn = await connectProtocol(
            endpoint, TwistedProtocolConnection(params, custom_reactor=self._reactor)
        )
        await conn.ready
        # Fires (as an error when the broker closed it, e.g. stop_app) once; nobody waits on it.
        conn.closed.addErrback(lambda _: None)
        self._conn = conn
        return conn

    async def _with_channel(self, use: Any) -> Any:
        conn = await self._connection()
        channel = await conn.channel()
        try:
            return await use(channel)
        finally:
            if channel.is_open:
                channel.close()

    async def ready_count(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (a passive declare: exact, unlike ``list_queues`` on quorum
        queues); None when the queue does not exist or the broker does not answer."""

        async def count(channel: Any) -> int | None:
            frame = await channel.queue_declare(queue, passive=True)
            return frame.method.message_count

        d = defer.Deferred.fromCoroutine(self._with_channel(count))
        d.addTimeout(5, self._reactor)
        try:
            return await d
        except Exception:
            return None

    async def publish_raw(
        self, queue: str, body: bytes, headers: dict[str, Any] | None, message_id: str | None = None
    ) -> None:
        async def publish(channel: Any) -> None:
            await channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, headers=headers, message_id=message_id)
            await channel.basic_publish("", queue, body, properties=properties, mandatory=True)

        d = defer.Deferred.fromCoroutine(self._with_channel(publish))
        d.addTimeout(10, self._reactor)
        await d

    async def purge(self, queue: str) -> int:
        """Drop every ready message of ``queue`` (the self-test's sabotage); how many there were."""

        async def purge(channel: Any) -> int:
            frame = await channel.queue_purge(queue)
            return frame.method.message_count

        return await self._with_channel(purge)

    async def delete(self, queue: str) -> None:
        await self._with_channel(lambda channel: channel.queue_delete(queue))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            lost: defer.Deferred[None] = defer.Deferred()
            conn.closed.addBoth(lambda _: lost.callback(None))
            conn.close()
            lost.addTimeout(5, self._reactor)
            try:
                await lost
            except defer.TimeoutError:
                pass


class Worker:
    """One ``faas-worker`` slot: its AMQP proxy stays, its process is killed and restarted."""

    def __init__(self, index: int, proxy: TCPProxy) -> None:
        self.index = index
        self.proxy = proxy
        self.proc: TwistdProcess | None = None
        self.base = ""
        self.logs: list[Path] = []
        self.restarts = 0


class Stack:
    """Broker, Redis, gateway and workers for one run."""

    log = Logger()

    def __init__(self, reactor: Any, workdir: Path, *, workers: int = 2, max_inflight: int = 20,
                 exec_timeout: str = "5s", callback_timeout: str = "2s",
                 consumer_timeout: float = 120.0, private_broker: bool = True) -> None:  # fmt: skip
        self._reactor = reactor
        self.workdir = workdir
        self.want_private_broker = private_broker
        self.private_broker = False
        self.rabbit = PrivateRabbit(reactor, workdir, consumer_timeout)
        self.redis = PrivateRedis(reactor, workdir)
        self.queue = unique("faults-q")
        self.prefix = unique("faults") + ":"
        self.amqp_port = SHARED_AMQP_PORT
        self.gateway: TwistdProcess | None = None
        self.gateway_url = ""
        self.gateway_port = 0
        self.gateway_logs: list[Path] = []
        self.gateway_proxy: TCPProxy | None = None
        self.workers: list[Worker] = []
        self._n_workers = workers
        self._worker_flags = [
            "--max-inflight", str(max_inflight), "--exec-timeout", exec_timeout,
            "--callback-timeout", callback_timeout, "--consumer-timeout", f"{int(consumer_timeout)}s",
            "--drain-timeout", "5s", "--callback-allow", "127.0.0.0/8",
        ]  # fmt: skip
        self.admin: Admin | None = None
        self.notes: list[str] = []

    def _amqp_url(self, proxy: TCPProxy) -> str:
        return f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"

    async def start(self) -> None:
        rabbit = defer.Deferred.fromCoroutine(self._start_broker())
        redis = defer.Deferred.fromCoroutine(self.redis.start())
        await defer.gatherResults([rabbit, redis], consumeErrors=True).addErrback(
            lambda f: f.value.subFailure
        )
        self.admin = Admin(self._reactor, self.amqp_port)
        self.gateway_proxy = TCPProxy(self._reactor, "127.0.0.1", self.amqp_port)
        self.gateway_proxy.listen()
        for i in range(self._n_workers):
            proxy = TCPProxy(self._reactor, "127.0.0.1", self.amqp_port)
            proxy.listen()
            self.workers.append(Worker(i, proxy))
        self.gateway_port = free_port()
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        await self.start_gateway()

    async def start_gateway(self) -> None:
        """Start (or restart, on the same port) the gateway, and wait until it is healthy."""
        assert self.gateway_proxy is not None
        self.gateway = TwistdProcess(
            "faas-gateway",
            ["--listen", f"tcp:{self.gateway_port}:interface=127.0.0.1", "--redis", self.redis.url,
             "--redis-prefix", self.prefix, "--amqp", self._amqp_url(self.gateway_proxy),
             "--callback-allow", "127.0.0.0/8", "--confirm-timeout", "3s"],
            env=gateway_env(),
        )  # fmt: skip
        self.gateway_logs.append(self.gateway.log_path)
        await self.gateway.wait_http(self.gateway_url + "/healthz", status=200, timeout=30)

    def kill_gateway(self) -> None:
        """SIGKILL the gateway's process (group)."""
        assert self.gateway is not None
        self.gateway.kill()
        self.gateway._log.close()

    async def _start_broker(self) -> None:
        if self.want_private_broker:
            try:
                await self.rabbit.start()
            except Exception as e:
                note = (
                    f"!!! NO PRIVATE RABBITMQ NODE ({e}); falling back to the shared broker on 127.0.0.1:5672 "
                    f"with queue {self.queue}: the broker-restart fault is SKIPPED !!!"
                )
                self.log.error("{note}", note=note)
                self.notes.append(note)
                await self.rabbit.stop()
            else:
                self.private_broker = True
                self.amqp_port = self.rabbit.port
                return
        else:
            self.notes.append("shared broker requested: the broker-restart fault is skipped")

    async def deploy(self, name: str, url: str) -> None:
        """Deploy the function through the gateway, on the run's own queue (declared by the gateway)."""
        import json

        body = {"service": name, "image": "faults", "url": url,
                "annotations": {"com.openfaas.queue": self.queue}}  # fmt: skip
        response = await treq.post(
            self.gateway_url + "/system/functions", data=json.dumps(body).encode(), auth=GATEWAY_AUTH
        )
        text = await response.text()
        if response.code != 202:
            raise StackError(f"deploying {name}: {response.code} {text}")

    async def start_workers(self) -> None:
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.start_worker(w)) for w in self.workers], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure)

    async def start_worker(self, worker: Worker) -> None:
        port = free_port()
        worker.proc = TwistdProcess(
            "faas-worker",
            ["--amqp", self._amqp_url(worker.proxy), "--redis", self.redis.url, "--redis-prefix", self.prefix,
             "--queue", self.queue, "--listen", f"tcp:{port}:interface=127.0.0.1", *self._worker_flags],
        )  # fmt: skip
        worker.logs.append(worker.proc.log_path)
        worker.base = f"http://127.0.0.1:{port}"
        await worker.proc.wait_http(worker.base + "/healthz", status=200, timeout=30)

    def kill_worker(self, worker: Worker) -> None:
        """SIGKILL the worker's process (group)."""
        assert worker.proc is not None
        worker.proc.kill()
        worker.proc._log.close()

    def cut_amqp(self) -> int:
        """Abort every AMQP connection of the gateway and the workers (both sides)."""
        proxies = [self.gateway_proxy, *(w.proxy for w in self.workers)]
        return sum(p.drop_all() for p in proxies if p is not None)

    async def worker_in_flight(self) -> int | None:
        """Calls the workers hold now (their ``txfaas_worker_calls_in_flight``); None if one is down."""
        total = 0
        for worker in self.workers:
            try:
                response = await treq.get(worker.base + "/metrics", timeout=2)
                text = await response.text()
            except Exception:
                return None
            match = re.search(r"^txfaas_worker_calls_in_flight\s+([0-9.e+]+)", text, re.M)
            if match is None:
                return None
            total += int(float(match.group(1)))
        return total

    def worker_logs(self) -> str:
        out = []
        for worker in self.workers:
            for path in worker.logs:
                try:
                    out.append(path.read_text(errors="replace"))
                except OSError:
                    pass
        return "\n".join(out)

    def log_paths(self) -> list[str]:
        paths = [str(p) for w in self.workers for p in w.logs]
        paths += [str(p) for p in self.gateway_logs]
        return paths

    async def queue_names(self) -> list[str]:
        """Every queue of the private node (its metrics lag, so counts come from the Admin)."""
        if not self.private_broker:
            return [self.queue]
        code, text = await self.rabbit.ctl("list_queues", "name", "--quiet", "--no-table-headers", timeout=30)
        if code != 0:
            return [self.queue]
        return [line.strip() for line in text.splitlines() if line.strip()]

    async def close(self, keep_logs: bool = False) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        if self.gateway is not None:
            procs.append(self.gateway)
        if self.redis.paused:
            self.redis.resume()
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(p.stop(timeout=10)) for p in procs], consumeErrors=True
        )
        proxies = [self.gateway_proxy, *(w.proxy for w in self.workers)]
        for proxy in proxies:
            if proxy is not None:
                await proxy.close()
        if self.admin is not None:
            if not self.private_broker:
                try:
                    await self.admin.delete(self.queue)
                except Exception as e:
                    self.log.warn("deleting {queue}: {error}", queue=self.queue, error=e)
            await self.admin.close()
        await self.redis.stop()
        await self.rabbit.stop()
        if not keep_logs:
            for path in self.log_paths():
                Path(path).unlink(missing_ok=True)
