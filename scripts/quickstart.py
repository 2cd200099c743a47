"""Start the whole txfaas system on this machine and print curl commands to try it.

Run through ``scripts/run`` (which sets up .venv first).  With RabbitMQ and Redis
answering on 127.0.0.1 it runs ``faas-gateway`` and ``faas-worker`` against them;
otherwise ``faas-local`` (gateway and worker in one process, in-memory queue and
store: nothing is durable).  Sample functions run under ``faas-watchdog``:

- ``echo``: returns its input;
- ``wordcount``: counts lines, words and bytes of its input;
- ``slow``: sleeps for the seconds it is given (exec_timeout 3s, so ``5`` times out).

A tiny callback receiver prints every callback it gets.  Ctrl-C stops everything.
This is a launcher script, not part of the txfaas package.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "docker" / "functions"
VENV_BIN = Path(sys.executable).parent
#: Variables that would change how the gateway finds its credentials (it generates its own here).
OWN_SETTINGS = ("TXFAAS_BASIC_AUTH_USER", "TXFAAS_BASIC_AUTH_PASSWORD", "basic_auth", "secret_mount_path")


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def free_port(preferred: int | None = None) -> int:
    if preferred and not answers(preferred):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        full_env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
        full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        proc = subprocess.Popen(
            [str(VENV_BIN / "twistd"), "-n", "--pidfile=", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=self.logdir,
        )
        self.children.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise SystemExit(f"quickstart: {name} exited with {proc.returncode}:\n" + "\n".join(tail))

    def stop(self) -> None:
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _name, proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_http(url: str, procs: Processes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"quickstart: {url} did not answer within {timeout:g}s")
        time.sleep(0.2)


def login_line(procs: Processes, name: str, timeout: float = 10) -> tuple[str, str]:
    """The ``faas-cli login`` line the gateway logged, and the password file it names."""
    deadline = time.monotonic() + timeout
    while True:
        log = (procs.logdir / f"{name}.log").read_text(errors="replace")
        match = re.search(r"log in with: (faas-cli login .* --password-stdin < (\S+))", log)
        if match:
            return match.group(1), match.group(2)
        if time.monotonic() > deadline:
            raise SystemExit(f"quickstart: the {name} logged no faas-cli login line; see {procs.logdir}")
        time.sleep(0.1)


class RunNames:
    """This run's own names on the shared RabbitMQ and Redis (never production's ``txfaas:``,
    ``faas-request`` and ``txfaas.*``), and their removal when it stops."""

    def __init__(self, base: str | None = None) -> None:
        from txfaas.queue.amqp import Topology
        from txfaas.retry import DEFAULT_TIERS

        self.base = base or f"txfaas-run-{os.urandom(3).hex()}"
        self.redis_prefix = self.base + ":"
        self.topology = Topology(
            prefix=self.base,
            dead_letter_queue=self.base + ".dead-letter",
            callback_queue=self.base + ".callbacks",
        )
        self.queues = [
            self.base,
            self.topology.dead_letter_queue,
            self.topology.callback_queue,
            *(self.topology.tier_name(t) for t in DEFAULT_TIERS),
        ]

    def gateway_args(self) -> list[str]:
        t = self.topology
        return [
            "--redis-prefix", self.redis_prefix,
            "--default-queue", self.base,
            # the worker's names below, which no function may take as its queue
            "--retry-prefix", t.prefix,
            "--dead-letter-queue", t.dead_letter_queue,
            "--callback-queue", t.callback_queue,
        ]  # fmt: skip

    def worker_args(self) -> list[str]:
        t = self.topology
        return [
            "--redis-prefix", self.redis_prefix,
            "--queue", self.base,
            "--retry-prefix", t.prefix,
            "--dead-letter-queue", t.dead_letter_queue,
            "--callback-queue", t.callback_queue,
        ]  # fmt: skip

    def function_queues(self, gateway: str, password_file: str) -> list[str]:
        """Queues named by the functions deployed now (``com.openfaas.queue``), asked of the gateway."""
        import base64

        token = base64.b64encode(f"admin:{Path(password_file).read_text().strip()}".encode()).decode()
        request = urllib.request.Request(
            f"{gateway}/system/functions", headers={"Authorization": f"Basic {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                functions = json.loads(response.read())
        except (OSError, ValueError):
            return []
        return [q for f in functions if (q := (f.get("annotations") or {}).get("com.openfaas.queue"))]

    def remove(self, extra_queues: list[str]) -> str:
        """Delete this run's queues, exchange and Redis keys; say what went."""
        import pika

        queues = list(dict.fromkeys([*self.queues, *extra_queues]))
        params = pika.ConnectionParameters("127.0.0.1", 5672, socket_timeout=5, blocked_connection_timeout=5)
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            for name in queues:
                channel.queue_delete(name)
            channel.exchange_delete(self.topology.retry_exchange)
        finally:
            connection.close()
        keys = redis_delete_prefix(self.redis_prefix)
        return f"removed {keys} Redis keys ({self.redis_prefix}*), {len(queues)} queues and an exchange ({self.base}*)"


class Redis:
    """A few lines of RESP over a socket: enough to find and delete this run's keys."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379) -> None:
        self._sock = socket.create_connection((host, port), timeout=5)
        self._reader = self._sock.makefile("rb")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def command(self, *args: str) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self._reader.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise OSError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if rest == b"-1" else self._reader.read(int(rest) + 2)[:-2].decode()
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        return rest.decode()

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (SCAN, not KEYS: the server is shared)."""
        pattern = prefix.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[")
        found, cursor = [], "0"
        while True:
            cursor, keys = self.command("SCAN", cursor, "MATCH", pattern + "*", "COUNT", "500")
            found.extend(keys)
            if cursor == "0":
                return found


def redis_delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix``; the count."""
    redis = Redis()
    try:
        keys = redis.keys(prefix)
        return sum(redis.command("DEL", *keys[i : i + 500]) for i in range(0, len(keys), 500))
    finally:
        redis.close()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops and cleans up as Ctrl-C does


class CallbackHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print(
            f"\n[callback] call {self.headers.get('X-Call-Id')} of {self.headers.get('X-Function-Name')}: "
            f"status {self.headers.get('X-Function-Status')}, "
            f"{self.headers.get('X-Duration-Seconds')}s, body {body[:200]!r}",
            flush=True,
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="gateway port (default 8080, else a free one)")
    parser.add_argument(
        "--local", action="store_true", help="in-memory mode even if RabbitMQ and Redis answer"
    )
    parser.add_argument("--exit-after", type=float, default=0, help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args()

    durable = not args.local and answers(5672) and answers(6379)
    signal.signal(signal.SIGTERM, _terminate)
    names = RunNames() if durable else None
    extra_queues: list[str] = []
    logdir = Path(tempfile.mkdtemp(prefix="txfaas-quickstart-"))
    procs = Processes(logdir)
    gateway_port = free_port(args.port)
    callback_port = free_port(8099)
    callback_server = http.server.ThreadingHTTPServer(("127.0.0.1", callback_port), CallbackHandler)
    threading.Thread(target=callback_server.serve_forever, daemon=True).start()

    functions = {
        "echo": ("echo.py", {}),
        "wordcount": ("wordcount.py", {}),
        "slow": ("sleep.py", {"exec_timeout": "3s"}),
    }
    deployments = []
    gateway = password_file = ""
    try:
        for name, (script, env) in functions.items():
            port = free_port()
            procs.start(
                f"fn-{name}",
                ["faas-watchdog", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                env={"fprocess": f"{sys.executable} {FUNCTIONS / script}", "mode": "fork", **env},
            )
            deployments.append(
                {
                    "service": name,
                    "image": f"txfaas/{name}",
                    "url": f"http://127.0.0.1:{port}",
                    "envVars": env,
                }
            )
        functions_file = logdir / "functions.json"
        functions_file.write_text(json.dumps(deployments, indent=2))

        common = ["--callback-allow", "127.0.0.0/8"]
        if names is not None:
            print(
                "quickstart: RabbitMQ and Redis answer on 127.0.0.1: calls are durable.\n"
                f"            Names of this run only: Redis keys {names.redis_prefix}*, queues and exchange "
                f"{names.base}*;\n            removed when it stops."
            )
            procs.start(
                "gateway",
                [
                    "faas-gateway",
                    "--listen",
                    f"tcp:{gateway_port}:interface=127.0.0.1",
                    "--functions",
                    str(functions_file),
                    *names.gateway_args(),
                    *common,
                ],
            )
            worker_port = free_port()
            procs.start(
                "worker",
                [
                    "faas-worker",
                    "--listen",
                    f"tcp:{worker_port}:interface=127.0.0.1",
                    *names.worker_args(),
                    *common,
                ],
            )
            wait_http(f"http://127.0.0.1:{worker_port}/healthz", procs)
        else:
            print(
                "quickstart: RabbitMQ or Redis does not answer on 127.0.0.1 (or --local was given):\n"
                "            gateway and worker run in ONE process on an in-memory queue and store.\n"
                "            NOTHING IS DURABLE in this mode: a restart forgets functions and calls."
            )
            procs.start(
                "local",
                [
                    "faas-local",
                    "--listen",
                    f"tcp:{gateway_port}:interface=127.0.0.1",
                    "--functions",
                    str(functions_file),
                    *common,
                ],
            )
        gateway = f"http://127.0.0.1:{gateway_port}"
        wait_http(f"{gateway}/healthz", procs)
        login, password_file = login_line(procs, "gateway" if durable else "local")
        auth = f'-u "admin:$(cat {password_file})"'
        callback = f"http://127.0.0.1:{callback_port}/"
        demo = f"demo-{os.urandom(3).hex()}"
        print(
            f"""
txfaas is running: gateway {gateway}, logs in {logdir}
Try:

# a synchronous call
curl -s {gateway}/function/echo -d 'hello txfaas'
curl -s {gateway}/function/wordcount -d 'one two three'
# an asynchronous call: 202 at once, the result reaches the callback receiver (printed here)
curl -s -i {gateway}/async-function/wordcount -d 'four five' -H 'X-Callback-Url: {callback}' -H 'X-Call-Id: {demo}'
# its status and its result (/system/* needs the gateway's basic-auth password)
curl -s {auth} {gateway}/system/calls/{demo}
curl -s {auth} {gateway}/system/calls/{demo}/result
# a call that outlasts its exec_timeout (3s): 504
curl -s -i {gateway}/function/slow -d 5
# the functions, OpenFaaS-style
curl -s {auth} {gateway}/system/functions

faas-cli logs in with the password the gateway generated on its first start (kept in {password_file}):
{login}

Ctrl-C stops everything.""",
            flush=True,
        )
        started = time.monotonic()
        while True:
            procs.check()
            time.sleep(0.5)
            if args.exit_after and time.monotonic() - started > args.exit_after:
                break
    except KeyboardInterrupt:
        print("\nquickstart: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if names is not None and password_file:
            extra_queues = names.function_queues(gateway, password_file)
        procs.stop()
        callback_server.shutdown()
        if names is not None:
            try:
                print(f"quickstart: {names.remove(extra_queues)}", flush=True)
            except Exception as e:  # say what was left, whatever went wrong
                print(f"quickstart: could not remove this run's names ({names.base}*): {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
