"""Slow callback receivers against ordinary calls: do ordinary callbacks wait behind them?

Issue 16's scenario, on loopback against the shared RabbitMQ and Redis (queues and keys of
its own, removed at the end)::

    .venv/bin/python bench/callback_starvation.py [--slow 300] [--ordinary 20]
        [--worker-arg=--callback-concurrency=100 ...]

A ``faas-gateway`` and one ``faas-worker`` (defaults: ``--max-inflight 100``,
``--callback-timeout 10s``), a function answering ``200 ok`` at once, a receiver on
127.0.0.2 that accepts every callback and never answers (``async_servers.py functions``'
``/hang``) and a normal receiver on 127.0.0.1.  ``--slow`` calls whose callback goes to the
silent receiver are posted first, then ``--ordinary`` calls with the normal receiver; the
figure is each ordinary call's callback latency (its post sent -> its callback arrived):
median and max.  Bounded: it gives up after ``--timeout`` seconds (default 120).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from async_bench import BENCH, Broker, Worker, client, get_json
from harness import LOOPBACK, BenchError, Child, free_port, redis_delete_prefix, run_main, say, wait_http

SILENT_HOST = "127.0.0.2"
TIER = "1s"


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    tag = uuid.uuid4().hex[:10]
    tmp = Path(stack.enter_context(_tempdir()))
    prefix = f"bench:{tag}:"
    work, callbacks, dead = f"bench-work-{tag}", f"bench-callbacks-{tag}", f"bench-dead-letter-{tag}"
    retry_prefix = f"bench-{tag}"
    broker = Broker(args.amqp)

    def clean_up() -> None:
        tier = f"{retry_prefix}.delay.1000"
        for queue in (work, callbacks, dead, tier):
            broker.delete(queue)
        for exchange in (f"{retry_prefix}.retry", tier):
            broker.delete_exchange(exchange)
        redis_delete_prefix(args.redis, prefix)

    stack.callback(clean_up)
    ports = {"functions": free_port(), "silent": free_port(), "receiver": free_port()}
    for name, role, host in (
        ("functions", "functions", LOOPBACK),
        ("silent", "functions", SILENT_HOST),
        ("receiver", "receiver", LOOPBACK),
    ):
        child = Child(
            name,
            [
                sys.executable,
                str(BENCH / "async_servers.py"),
                role,
                f"--port={ports[name]}",
                f"--host={host}",
            ],
            tmp / f"{name}.log",
        )
        stack.callback(child.stop)
        ready = "/stats" if role == "functions" else "/count?batch=x"
        wait_http(f"http://{host}:{ports[name]}{ready}", child)
    functions = tmp / "functions.json"
    functions.write_text(
        json.dumps(
            [
                {
                    "service": "bench-ok",
                    "image": "bench",
                    "url": f"http://{LOOPBACK}:{ports['functions']}/ok",
                    "annotations": {"com.openfaas.queue": work, "com.openfaas.retry.attempts": "1"},
                }
            ]
        )
    )
    common = [f"--redis={args.redis}", f"--redis-prefix={prefix}", f"--amqp={args.amqp}"]
    gateway_port, worker_port = free_port(), free_port()
    gateway = Worker(
        "gateway",
        tmp,
        "faas-gateway",
        [
            *common,
            f"--listen=tcp:{gateway_port}:interface={LOOPBACK}:backlog=4096",
            f"--functions={functions}",
            "--callback-allow=127.0.0.0/8",
        ],
    )
    stack.callback(gateway.stop)
    wait_http(f"http://{LOOPBACK}:{gateway_port}/healthz", gateway, timeout=30)
    worker = Worker(
        "worker",
        tmp,
        "faas-worker",
        [
            *common,
            f"--queue={work}",
            f"--listen=tcp:{worker_port}:interface={LOOPBACK}",
            "--callback-allow=127.0.0.0/8",
            "--drain-timeout=1s",
            f"--retry-prefix={retry_prefix}",
            f"--delay-tiers={TIER}",
            f"--callback-queue={callbacks}",
            f"--dead-letter-queue={dead}",
            "--callback-max-attempts=1",
            *args.worker_arg,
        ],
    )
    stack.callback(worker.stop)
    wait_http(f"http://{LOOPBACK}:{worker_port}/healthz", worker, timeout=30)

    url = f"http://{LOOPBACK}:{gateway_port}/async-function/bench-ok"
    silent_url = f"http://{SILENT_HOST}:{ports['silent']}/hang"
    receiver_url = f"http://{LOOPBACK}:{ports['receiver']}/callback"
    slow = client(
        "post",
        url,
        f"--count={args.slow}",
        "--concurrency=50",
        "--batch=slow",
        "--header",
        f"X-Callback-Url: {silent_url}",
    )
    ordinary = client(
        "post",
        url,
        f"--count={args.ordinary}",
        "--concurrency=1",
        "--batch=ordinary",
        "--header",
        f"X-Callback-Url: {receiver_url}",
    )
    for posted in (slow, ordinary):
        bad = [r for r in posted["results"] if r[3] != 202]
        if bad or posted["errors"]:
            raise BenchError(f"posts not accepted: {bad[:3]} {posted['errors'][:3]}")
    sent = {r[0]: r[1] for r in ordinary["results"]}
    deadline = time.monotonic() + args.timeout
    arrivals: dict[str, Any] = {}
    while time.monotonic() < deadline:
        arrivals = get_json(f"http://{LOOPBACK}:{ports['receiver']}/arrivals?batch=ordinary")
        if len(arrivals) >= args.ordinary:
            break
        time.sleep(0.05)
    latencies = sorted(arrivals[c][0] - sent[c] for c in arrivals if c in sent)
    silent = get_json(f"http://{SILENT_HOST}:{ports['silent']}/stats")
    report = {
        "slow_calls": args.slow,
        "ordinary_calls": args.ordinary,
        "ordinary_callbacks_received": len(latencies),
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_max_s": round(latencies[-1], 3) if latencies else None,
        "silent_receiver_holding": silent.get("hanging"),
        "worker_args": args.worker_arg,
    }
    say(json.dumps(report, indent=2))
    if len(latencies) < args.ordinary:
        say(f"only {len(latencies)} of {args.ordinary} ordinary callbacks within {args.timeout:g}s")
        return 1
    return 0


class _tempdir:
    def __enter__(self) -> str:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="txfaas-starvation-")
        return self._dir.name

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slow", type=int, default=300, help="calls called back to the silent receiver [300]")
    p.add_argument("--ordinary", type=int, default=20, help="calls called back to the normal receiver [20]")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds [120]")
    p.add_argument("--worker-arg", action="append", default=[], help="an extra faas-worker flag (repeatable)")
    p.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="RabbitMQ URL")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL")
    args = p.parse_args(argv)
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
