"""Instructions per call in the gateway process, counted by valgrind's callgrind.

Seconds on this shared two-core machine move by 5-10 % between runs; instruction counts
do not (the same binary and inputs give the same count whatever else runs).  So a change
to the hot path is judged here first, and by ``sync_proxy.py`` / ``async_bench.py`` after.

The gateway (``--redis memory: --amqp memory:``, one function whose URL is an nginx
``return 200``) runs under callgrind twice: once answering ``--warmup`` calls, once
``--warmup + --calls``.  The difference of the two totals over ``--calls`` is what one
more call costs, start-up and warm-up cancelled out.  Calls are made by a blocking client
in this process on ``--connections`` keep-alive connections, one request on each in turn
and then every answer read (so with more than one connection the gateway sees several
requests per pass of its loop, as under load)::

    python bench/instructions.py                       # GET /function/bench
    python bench/instructions.py --route sync-ns        # GET /function/bench.openfaas-fn
    python bench/instructions.py --route async          # POST /async-function/bench (202)
    python bench/instructions.py --connections 10 --calls 3000

With ``--redis`` / ``--amqp`` on the real services, the run keeps its keys under a prefix and its
calls on a queue of its own, and removes both when done.

Needs valgrind (``apt-get install valgrind``) and nginx.  A run takes a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    LOOPBACK,
    BenchError,
    Child,
    Nginx,
    auth_env,
    free_port,
    make_tempdir,
    nginx_function_conf,
    redis_delete_prefix,
    say,
    twistd_command,
    wait_http,
)

REQUESTS = {
    "sync": b"GET /function/bench HTTP/1.1\r\nHost: gw\r\nUser-Agent: instructions\r\nAccept: */*\r\n\r\n",
    # What faas-cli invoke sends: the name with its namespace.
    "sync-ns": (
        b"GET /function/bench.openfaas-fn HTTP/1.1\r\nHost: gw\r\nUser-Agent: instructions\r\nAccept: */*\r\n\r\n"
    ),
    "async": (
        b"POST /async-function/bench HTTP/1.1\r\nHost: gw\r\nUser-Agent: instructions\r\n"
        b'Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{"hello": 1}\n'
    ),
}
EXPECTED = {"sync": 200, "sync-ns": 200, "async": 202}


def read_response(sock: socket.socket, buffer: bytearray) -> int:
    """Read one response (Content-Length framed) off ``sock``; return its status code."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the gateway closed the connection")
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    if match is None:
        raise BenchError(f"no Content-Length in {head!r}")
    total = end + int(match.group(1))
    while len(buffer) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the gateway closed the connection mid-body")
        buffer += chunk
    del buffer[:total]
    return int(head.split(b" ", 2)[1])


def drive(port: int, request: bytes, expected: int, calls: int, connections: int) -> None:
    socks = [socket.create_connection((LOOPBACK, port)) for _ in range(connections)]
    buffers = [bytearray() for _ in socks]
    try:
        done = 0
        while done < calls:
            batch = min(connections, calls - done)
            for sock in socks[:batch]:
                sock.sendall(request)
            for sock, buffer in zip(socks[:batch], buffers[:batch], strict=True):
                code = read_response(sock, buffer)
                if code != expected:
                    raise BenchError(f"expected {expected}, got {code}")
            done += batch
    finally:
        for sock in socks:
            sock.close()


def total_instructions(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchError(f"no totals in {path}")


# ``--preload``: a file run in the gateway's process before twistd starts (to take a part out and
# see what it costs, say), then twistd with the arguments that follow.
_PRELOADED = "import runpy, sys; runpy.run_path({path!r}); from twisted.scripts.twistd import run; run()"


def function(upstream: int, run: str) -> dict:
    """The function called: nginx's ``return 200``, its async calls on a queue of this run's own."""
    url = f"http://{LOOPBACK}:{upstream}"
    return {"service": "bench", "image": "nginx", "url": url, "annotations": {"com.openfaas.queue": run}}


def clean_up(run: str, redis: str, amqp: str) -> None:
    """Remove what the calls left on the real services: the run's keys and its queue."""
    if redis != "memory:":
        redis_delete_prefix(redis, f"{run}:")
    if amqp != "memory:":
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(amqp))
        try:
            connection.channel().queue_delete(run)
        finally:
            connection.close()


def counted(
    directory: Path,
    upstream: int,
    route: str,
    calls: int,
    connections: int,
    tag: str,
    run: str,
    preload: Path | None = None,
    redis: str = "memory:",
    amqp: str = "memory:",
) -> int:
    """Total instructions of a gateway process that answered ``calls`` calls, then stopped."""
    functions = directory / "functions.json"
    functions.write_text(json.dumps([function(upstream, run)]))
    port = free_port()
    out = directory / f"callgrind-{tag}.out"
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise BenchError("valgrind is not installed (apt-get install valgrind)")
    argv = [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        *(
            twistd_command()
            if preload is None
            else [sys.executable, "-c", _PRELOADED.format(path=str(preload))]
        ),
        "-n",
        "--pidfile=",
        "faas-gateway",
        f"--listen=tcp:{port}:interface={LOOPBACK}",
        f"--redis={redis}",
        f"--redis-prefix={run}:",
        f"--amqp={amqp}",
        f"--functions={functions}",
    ]
    # A fixed hash seed: dict and set layouts, and so the count, the same from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0", **auth_env(directory)}
    child = Child(f"gateway-{tag}", argv, directory / f"gateway-{tag}.log", env)
    try:
        wait_http(f"http://{LOOPBACK}:{port}/healthz", child, timeout=180)
        drive(port, REQUESTS[route], EXPECTED[route], calls, connections)
    finally:
        child.stop()
    if not out.exists():
        raise BenchError(f"callgrind wrote nothing; see {child.log_path}:\n{child.tail()}")
    return total_instructions(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=sorted(REQUESTS), default="sync")
    parser.add_argument("--calls", type=int, default=2000, help="calls counted [2000]")
    parser.add_argument("--warmup", type=int, default=200, help="calls in both runs [200]")
    parser.add_argument("--connections", type=int, default=1, help="keep-alive connections [1]")
    parser.add_argument("--redis", default="memory:", help="the gateway's --redis [memory:]")
    parser.add_argument("--amqp", default="memory:", help="the gateway's --amqp [memory:]")
    parser.add_argument(
        "--preload", type=Path, help="a Python file run in the gateway's process first (to take a part out)"
    )
    args = parser.parse_args(argv)
    directory = make_tempdir("txfaas-instructions-")
    upstream = free_port()
    nginx = Nginx("function", directory, nginx_function_conf(directory, upstream))
    try:
        wait_http(f"http://{LOOPBACK}:{upstream}/", nginx, timeout=10)
        started = time.monotonic()
        # Keys and queue of this run's own: nothing it queues or records meets anyone else's.
        run = f"instructions-{uuid.uuid4().hex[:10]}"
        backends = {"run": run, "preload": args.preload, "redis": args.redis, "amqp": args.amqp}
        try:
            base = counted(directory, upstream, args.route, args.warmup, args.connections, "base", **backends)
            more = counted(
                directory,
                upstream,
                args.route,
                args.warmup + args.calls,
                args.connections,
                "more",
                **backends,
            )
        finally:
            clean_up(run, args.redis, args.amqp)
    finally:
        nginx.stop()
    per_call = (more - base) / args.calls
    say(
        f"{args.route} route, {args.connections} connection(s): {per_call:,.0f} instructions per call "
        f"(({more:,} - {base:,}) / {args.calls}; {time.monotonic() - started:.0f} s under callgrind)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
