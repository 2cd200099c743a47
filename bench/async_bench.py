"""The async benchmark: accept rate, end-to-end rate, a 1,000-call burst, exec_timeout lateness, memory.

One command starts everything it needs on loopback (against the shared RabbitMQ and
Redis, with its own queues and Redis key prefix) and removes it all again::

    .venv/bin/python bench/async_bench.py [--rounds 3] [--calls 2000] [--burst 1000]
        [--duration 10] [--connections 50] [--profile SECONDS]

Processes (each its own, so none shares the load driver's CPU):

- ``faas-gateway`` and ``faas-worker`` as ``twistd -n`` of this venv, ``--redis-prefix
  bench:<tag>:``; the functions use two queues of their own (``com.openfaas.queue``):
  ``bench-accept-<tag>`` (never consumed: case 1) and ``bench-work-<tag>`` (the worker's
  ``--queue``); the worker's retry topology is private too (``--retry-prefix bench-<tag>``,
  one delay tier, its own callback and dead-letter queues) and every function has one attempt;
- ``async_servers.py functions`` (``/ok``, ``/sleep`` 1 s, ``/hang``) and
  ``async_servers.py receiver`` (callback arrival times), Twisted web servers;
- ``wrk`` (case 1), ``async_client.py`` (posts with call ids and callbacks; held requests),
  ``pika_baseline.py`` (raw pika confirmed publishes, case 1's baseline).

Cases, every round in this order (the worker is started after case 1 and stopped after 4):

1. accept rate: ``wrk`` POSTs of ``--size`` bytes to ``/async-function/bench-accept`` (202s/s),
   and raw pika publish-with-confirms (``--pika-in-flight`` outstanding) to the same quorum
   queue, after the gateways in odd rounds and before them in even ones (:func:`accept_order`);
   ratio per round, then the median.  Goal: >= 0.25.
2. end to end: ``--calls`` posts with ``X-Callback-Url`` to the trivial function, 100 at a
   time; completions/s = calls / (last callback - first post).
3. burst: ``--burst`` calls to a function sleeping 1 s, all at once (one connection each),
   worker ``--max-inflight`` = burst: time to post them all and time to the last callback;
   when the last call reached the function; and, per call (median and slowest), three stages
   the worker answers for: its start of the call (``startedAt`` in the call's record, read
   from Redis) to the request reaching the function, the function's answer to the worker's
   recorded outcome (``finishedAt``), and that record to the callback's arrival.
   Goal: last callback <= 3 s.
1b. with ``--gateway-workers N``: the same accept rate through a second gateway started with
   ``--workers N`` (its processes' CPU summed), against the same pika run.
3b. with ``--scaling-processes N``: the same burst through ``faas-worker --processes N
   --max-inflight burst/N`` (started once all N consume), against (3)'s one process.
4. exec_timeout lateness: 20 calls (one every 100 ms) to a function that never answers and
   has ``txfaas.timeout: 1s``: callback arrival - (record's startedAt + 1 s), split into the
   timer (finishedAt - startedAt - 1 s) and the rest.  Goal: <= 100 ms.

Then once, on fresh processes: memory per in-flight call.  The worker's RSS (``VmRSS``)
idle after a warm-up vs with ``--burst`` calls hanging (exec timeout 5 min); the gateway's
idle vs with ``--burst`` synchronous calls held open on the hanging function.  Goal:
<= 50 KiB per call in the worker.

It prints one table and writes ``bench/results/async_bench-<time>.json`` and ``.txt``;
with ``--profile`` also py-spy summaries of the gateway accepting and of the worker
running a burst (``-profile-*.txt`` and collapsed stacks).  Stopped or failed midway, it
writes ``-partial.json`` with what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import (
    LOOPBACK,
    BenchError,
    Child,
    children_cpu_seconds,
    children_of,
    cpu_seconds,
    direct_opener,
    ensure_commands,
    environment,
    free_port,
    http_get,
    machine_busy_seconds,
    measured_wrk,
    partial_on_failure,
    post_script,
    prepare_run,
    py_spy,
    redis_address,
    redis_delete_prefix,
    redis_mget,
    run_main,
    run_wrk,
    say,
    stacks_text,
    summary,
    wait_http,
    write_json,
    write_results,
)
from harness import median_min_max as _mm
from harness import summarise_stacks as _summarise_stacks

from txfaas.config import parse_duration

BENCH = Path(__file__).resolve().parent
GOALS = {
    "accept_ratio_min": 0.25,
    "burst_last_callback_s_max": 3.0,
    "timeout_lateness_ms_max": 100.0,
    "worker_kib_per_call_max": 50.0,
}
HANG_TIMEOUT = 1.0  # the hanging function's own txfaas.timeout in case 4
HANG_CALLS = 20
HANG_INTERVAL = 0.1
E2E_CONCURRENCY = 100
DELAY_TIER = "1s"  # the worker's only delay queue (no call of the benchmark is retried)


# --------------------------------------------------------------------------- processes


class Twistd(harness.Twistd):
    """``twistd -n --pidfile= <plugin> ...`` of this venv, with no ``TXFAAS_*`` settings inherited."""

    # Environment the processes would otherwise take settings from.
    drop_env = ("upstream_timeout", "read_timeout", "write_timeout", "basic_auth", "max_inflight")


class Worker(Twistd):
    metrics_url = ""


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def steady_rss(pid: int, samples: int = 5, interval: float = 0.2) -> int:
    values = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        values.append(rss_kib(pid))
    return int(statistics.median(values))


def pids_named(command: str) -> list[int]:
    """Pids whose command name (``/proc/<pid>/comm``) is ``command``: the shared broker and Redis,
    to count the CPU they spend on our load (read only; nothing is sent to them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def listener_pids(port: int, command: str) -> list[int]:
    """The process listening on loopback ``port`` (``ss -ltnp``), else every process named ``command``.

    A private broker another test starts and stops must not be counted (nor make the sums go down)."""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    found = sorted({int(pid) for pid in re.findall(r"pid=(\d+)", out)})
    return found or pids_named(command)


class CpuMeter:
    """CPU-seconds of named process groups from now until :meth:`stop`, plus the load driver's
    children (clients, reaped) and ``others``: what the rest of the shared machine used meanwhile."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self._pids = {name: get() for name, get in groups.items()}
        self._before = {name: cpu_seconds(pids) for name, pids in self._pids.items()}
        self._busy = machine_busy_seconds()
        self._children = children_cpu_seconds()
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        used = {name: cpu_seconds(pids) - self._before[name] for name, pids in self._pids.items()}
        used["clients"] = children_cpu_seconds() - self._children
        elapsed = time.monotonic() - self._started
        others = machine_busy_seconds() - self._busy - sum(used.values())
        out = {name: round(v, 3) for name, v in used.items()}
        out["others_cores"] = round(max(0.0, others) / elapsed, 2) if elapsed > 0 else 0.0
        out["elapsed_s"] = round(elapsed, 3)
        return out


def http_post(url: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with direct_opener().open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> Any:
    code, body = http_get(url, timeout=10.0, auth=harness.BENCH_AUTH)
    if code != 200:
        raise BenchError(f"GET {url}: {code} {body[:200]!r}")
    return json.loads(body)


class Broker:
    """Queue housekeeping on the shared RabbitMQ (a short blocking pika connection each time)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, action: Any) -> Any:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            return action(conn.channel())
        finally:
            conn.close()

    def purge(self, queue: str) -> int:
        return self._run(lambda ch: ch.queue_purge(queue).method.message_count)

    def _delete(self, what: str, action: Any) -> None:
        import pika

        try:
            self._run(action)
        except pika.exceptions.AMQPError as e:
            say(f"warning: could not delete {what}: {e}")

    def delete(self, queue: str) -> None:
        self._delete(f"queue {queue}", lambda ch: ch.queue_delete(queue))

    def delete_exchange(self, exchange: str) -> None:
        self._delete(f"exchange {exchange}", lambda ch: ch.exchange_delete(exchange))

    def depth(self, queue: str) -> int:
        return self._run(lambda ch: ch.queue_declare(queue, passive=True).method.message_count)

    def consumers(self, queue: str) -> int:
        return self._run(lambda ch: ch.queue_declare(queue, passive=True).method.consumer_count)


@dataclass
class Bench:
    """What one run started: ports, names, the processes, and how to reach them."""

    args: argparse.Namespace
    tmp: Path
    tag: str
    prefix: str
    accept_queue: str
    work_queue: str
    #: the worker's retry topology, private to this run: <prefix>.retry, <prefix>.delay.1000,
    #: and its callback-retry and dead-letter queues (shared defaults would mix with other runs)
    retry_prefix: str
    callback_queue: str
    dead_letter_queue: str
    functions_file: Path
    functions_port: int
    receiver_port: int
    broker: Broker
    stack: ExitStack
    #: name -> how to find its pids (the shared RabbitMQ and Redis, by the port they listen on)
    services: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    functions: Child | None = None
    receiver: Child | None = None
    gateways: list[Twistd] = field(default_factory=list)

    @property
    def functions_url(self) -> str:
        return f"http://{LOOPBACK}:{self.functions_port}"

    @property
    def callback_url(self) -> str:
        return f"http://{LOOPBACK}:{self.receiver_port}/callback"

    def start_gateway(self, name: str, workers: int = 1) -> tuple[Twistd, str]:
        port = free_port()
        gateway = Twistd(
            name,
            self.tmp,
            "faas-gateway",
            [
                f"--listen=tcp:{port}:interface={LOOPBACK}:backlog=4096",
                f"--redis={self.args.redis}",
                f"--redis-prefix={self.prefix}",
                f"--amqp={self.args.amqp}",
                f"--functions={self.functions_file}",
                "--callback-allow=127.0.0.0/8",
                *([f"--workers={workers}"] if workers > 1 else []),
            ],
        )
        self.stack.callback(gateway.stop)
        base = f"http://{LOOPBACK}:{port}"
        wait_http(base + "/healthz", gateway, timeout=30)
        return gateway, base

    def start_worker(
        self, name: str, max_inflight: int, exec_timeout: str = "30s", processes: int = 1
    ) -> Worker:
        """A ``faas-worker`` on the work queue; with ``processes`` > 1 a supervisor of that many
        worker processes, returned once every one of them consumes the queue."""
        port = free_port()
        worker = Worker(
            name,
            self.tmp,
            "faas-worker",
            [
                f"--amqp={self.args.amqp}",
                f"--redis={self.args.redis}",
                f"--redis-prefix={self.prefix}",
                f"--queue={self.work_queue}",
                f"--listen=tcp:{port}:interface={LOOPBACK}",
                "--callback-allow=127.0.0.0/8",
                f"--max-inflight={max_inflight}",
                f"--exec-timeout={exec_timeout}",
                "--drain-timeout=1s",
                f"--retry-prefix={self.retry_prefix}",
                f"--delay-tiers={DELAY_TIER}",
                f"--callback-queue={self.callback_queue}",
                f"--dead-letter-queue={self.dead_letter_queue}",
                *([f"--processes={processes}"] if processes > 1 else []),
            ],
        )
        self.stack.callback(worker.stop)
        wait_http(f"http://{LOOPBACK}:{port}/healthz", worker, timeout=30)
        if processes > 1:
            _wait(
                lambda: self.broker.consumers(self.work_queue) >= processes,
                60,
                f"{processes} worker processes consuming {self.work_queue}",
            )
        worker.metrics_url = f"http://{LOOPBACK}:{port}/metrics"
        return worker

    def hanging(self) -> int:
        return int(get_json(self.functions_url + "/stats")["hanging"])

    def release(self) -> int:
        code, body = http_post(self.functions_url + "/release")
        if code != 200:
            raise BenchError(f"release: {code} {body!r}")
        return int(json.loads(body)["released"])

    def function_times(self, batch: str) -> dict[str, list[float]]:
        """When each ``/sleep`` call of ``batch`` reached the function, and was answered."""
        times = get_json(self.functions_url + "/times")
        return {k: v for k, v in times.items() if k.rpartition(".")[0] == batch}

    def call_records(self, call_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The calls' status records, as the gateway and worker left them in Redis."""
        keys = [f"{self.prefix}call:{call_id}" for call_id in call_ids]
        values = redis_mget(self.args.redis, keys)
        return {c: json.loads(v) for c, v in zip(call_ids, values, strict=True) if v is not None}

    def callbacks(self, batch: str) -> dict[str, list[Any]]:
        return get_json(f"http://{LOOPBACK}:{self.receiver_port}/arrivals?batch={batch}")

    def wait_callbacks(self, batch: str, count: int, timeout: float) -> dict[str, list[Any]]:
        """Wait until the receiver has ``count`` distinct callbacks of ``batch``; return them."""
        deadline = time.monotonic() + timeout
        url = f"http://{LOOPBACK}:{self.receiver_port}/count?batch={batch}"
        got = 0
        while time.monotonic() < deadline:
            got = get_json(url)["count"]
            if got >= count:
                return self.callbacks(batch)
            time.sleep(0.02)
        raise BenchError(f"only {got} of {count} callbacks of {batch} within {timeout:g}s")


def client(*argv: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``async_client.py`` to completion; its JSON answer."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "async_client.py"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise BenchError(
            f"async_client {' '.join(argv[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout)


def post_calls(
    bench: Bench,
    url: str,
    count: int,
    concurrency: int,
    batch: str,
    interval: float = 0.0,
    callback: bool = True,
) -> dict[str, Any]:
    argv = ["post", url, f"--count={count}", f"--concurrency={concurrency}", f"--batch={batch}"]
    argv += [f"--body-bytes={bench.args.size}"]
    if callback:
        argv += ["--header", f"X-Callback-Url: {bench.callback_url}"]
    if interval:
        argv += [f"--interval={interval}"]
    return client(*argv)


def statuses(results: list[list[Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r[3])] = counts.get(str(r[3]), 0) + 1
    return counts


# --------------------------------------------------------------------------- arithmetic


def burst_figures(posted: dict[str, Any], arrivals: dict[str, list[Any]]) -> dict[str, Any]:
    """Times from the first post: all answered (202s), first and last callback; rates."""
    started = posted["started"]
    answered = [r[2] for r in posted["results"]]
    arrived = [a[0] for a in arrivals.values()]
    n = len(posted["results"])
    last = max(arrived) - started
    return {
        "calls": n,
        "post_all_s": round(max(answered) - started, 4),
        "first_callback_s": round(min(arrived) - started, 4),
        "last_callback_s": round(last, 4),
        "accepts_per_s": round(n / (max(answered) - started), 1),
        "completions_per_s": round(n / last, 1),
        "answers": statuses(posted["results"]),
        "callback_statuses": _count(str(a[1]) for a in arrivals.values()),
        "duplicate_callbacks": sum(a[2] - 1 for a in arrivals.values()),
    }


def reached_figures(posted: dict[str, Any], times: dict[str, list[float]]) -> dict[str, Any]:
    """When the burst's calls reached the function (the worker sent them), from the first post."""
    if not times:
        return {}
    started = posted["started"]
    reached = sorted(t[0] for t in times.values())
    return {
        "reached_first_s": round(reached[0] - started, 4),
        "reached_last_s": round(reached[-1] - started, 4),
    }


#: The stages of a burst call that the worker answers for: from its own record (startedAt,
#: finishedAt), the function server's times (reached, answered) and the callbacks' arrivals.
STAGES = ("start_to_function", "answer_to_record", "record_to_callback")


def stage_figures(
    arrivals: dict[str, list[Any]], times: dict[str, list[float]], records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Median and max seconds, over the calls, of three stages: the worker's start of a call
    (``startedAt``) to its request reaching the function; the function's answer to the worker's
    recorded outcome (``finishedAt``); that record to the callback's arrival.  A worker that
    takes its Redis replies or its sockets late shows here, not in the totals alone."""
    spans: dict[str, list[float]] = {name: [] for name in STAGES}
    for call_id, record in records.items():
        started, finished = record.get("startedAt"), record.get("finishedAt")
        at_function = times.get(call_id)
        if started is None or finished is None or not at_function or not at_function[1]:
            continue
        spans["start_to_function"].append(at_function[0] - started)
        spans["answer_to_record"].append(finished - at_function[1])
        if call_id in arrivals:
            spans["record_to_callback"].append(arrivals[call_id][0] - finished)
    out: dict[str, Any] = {}
    for name, values in spans.items():
        if values:
            out[f"{name}_p50_s"] = round(statistics.median(values), 4)
            out[f"{name}_max_s"] = round(max(values), 4)
    return out


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def lateness(arrival: float, started_at: float, finished_at: float, timeout: float) -> dict[str, float]:
    """How late a timed-out call's callback is (ms): in all, the timer's part, and what follows it."""
    due = started_at + timeout
    return {
        "total_ms": round((arrival - due) * 1000, 2),
        "timer_ms": round((finished_at - due) * 1000, 2),
        "after_timer_ms": round((arrival - finished_at) * 1000, 2),
    }


def per_call_kib(idle_kib: int, loaded_kib: int, calls: int) -> float:
    return round((loaded_kib - idle_kib) / calls, 2)


# --------------------------------------------------------------------------- cases


def case_accept(bench: Bench, gateway: Twistd, url: str, script: Path) -> dict[str, Any]:
    args = bench.args
    # With --workers N: the parent and its N - 1 children.
    watch = {"gateway": lambda: [gateway.pid, *children_of(gateway.pid)], **bench.services}
    result = measured_wrk(url, args.connections, args.duration, args.warmup, script=script, watch=watch)
    queued = bench.broker.purge(bench.accept_queue)
    out = result.to_json()
    out["queued"] = queued
    for name in ("gateway", *bench.services):
        out[f"{name}_cpu_ms_per_call"] = round(result.cpu_s[name] / max(1, result.requests) * 1000, 4)
    out["others_cores"] = round(result.cpu_s["others"] / result.seconds, 2)
    return out


def case_pika(bench: Bench) -> dict[str, Any]:
    args = bench.args
    broker = bench.services["rabbitmq"]()
    broker_before, busy_before = cpu_seconds(broker), machine_busy_seconds()
    client_before = children_cpu_seconds()
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "pika_baseline.py"),
            f"--url={args.amqp}",
            f"--queue={bench.accept_queue}",
            f"--messages={args.pika_messages}",
            f"--in-flight={args.pika_in_flight}",
            f"--size={args.size}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise BenchError(f"pika_baseline failed ({done.returncode}):\n{done.stderr[-2000:]}")
    elapsed = time.monotonic() - started
    broker_cpu = cpu_seconds(broker) - broker_before
    busy = machine_busy_seconds() - busy_before
    client_cpu = children_cpu_seconds() - client_before
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["rabbitmq_cpu_ms_per_call"] = round(broker_cpu / args.pika_messages * 1000, 4)
    # Everything but the broker and the pika process (which also starts up: a rough figure).
    out["others_cores"] = round(max(0.0, busy - broker_cpu - client_cpu) / elapsed, 2)
    out["queued"] = bench.broker.purge(bench.accept_queue)
    return out


def _meter(bench: Bench, gateway: Twistd, worker: Twistd) -> CpuMeter:
    servers = [c.pid for c in (bench.functions, bench.receiver) if c is not None]
    return CpuMeter(
        {
            "gateway": lambda: [gateway.pid],
            # a supervisor's worker processes too (--processes N)
            "worker": lambda: [worker.pid, *children_of(worker.pid)],
            **bench.services,
            "servers": lambda: servers,
        }
    )


def _with_cpu(figures: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    n = figures["calls"]
    figures["cpu_s"] = cpu
    figures["gateway_cpu_ms_per_call"] = round(cpu["gateway"] / n * 1000, 4)
    figures["worker_cpu_ms_per_call"] = round(cpu["worker"] / n * 1000, 4)
    figures["others_cores"] = cpu["others_cores"]
    return figures


def case_e2e(bench: Bench, gateway: Twistd, gateway_url: str, worker: Twistd, rnd: int) -> dict[str, Any]:
    batch = f"e2e-r{rnd}"
    n = bench.args.calls
    meter = _meter(bench, gateway, worker)
    posted = post_calls(bench, gateway_url + "/async-function/bench-ok", n, E2E_CONCURRENCY, batch)
    arrivals = bench.wait_callbacks(batch, n, timeout=max(60.0, n / 20))
    return _with_cpu(burst_figures(posted, arrivals), meter.stop())


def case_burst(
    bench: Bench, gateway: Twistd, gateway_url: str, worker: Twistd, rnd: int, batch: str = ""
) -> dict[str, Any]:
    batch = batch or f"burst-r{rnd}"
    n = bench.args.burst
    meter = _meter(bench, gateway, worker)
    posted = post_calls(bench, gateway_url + "/async-function/bench-sleep", n, n, batch)
    arrivals = bench.wait_callbacks(batch, n, timeout=max(60.0, n / 10))
    figures = _with_cpu(burst_figures(posted, arrivals), meter.stop())
    times = bench.function_times(batch)
    figures.update(reached_figures(posted, times))
    figures.update(stage_figures(arrivals, times, bench.call_records(list(arrivals))))
    return figures


def case_burst_processes(bench: Bench, gateway: Twistd, gateway_url: str, rnd: int) -> dict[str, Any]:
    """(3b) The burst again through ``faas-worker --processes N`` sharing the burst's in-flight calls
    (``--max-inflight`` burst / N each), after the one-process worker of the same round."""
    n = bench.args.scaling_processes
    per_process = -(-bench.args.burst // n)
    worker = bench.start_worker(f"worker-p{n}-r{rnd}", max_inflight=per_process, processes=n)
    try:
        figures = case_burst(bench, gateway, gateway_url, worker, rnd, batch=f"burst-p{n}-r{rnd}")
    finally:
        worker.stop()
    return {"processes": n, "max_inflight_each": per_process, **figures}


def case_timeout(bench: Bench, gateway_url: str, rnd: int) -> dict[str, Any]:
    batch = f"hang-r{rnd}"
    posted = post_calls(
        bench,
        gateway_url + "/async-function/bench-hang",
        HANG_CALLS,
        HANG_CALLS,
        batch,
        interval=HANG_INTERVAL,
    )
    arrivals = bench.wait_callbacks(batch, HANG_CALLS, timeout=30 + HANG_CALLS * HANG_INTERVAL)
    samples = []
    for call_id, (arrival, status, _deliveries) in sorted(arrivals.items()):
        record = get_json(f"{gateway_url}/system/calls/{call_id}")
        if record.get("startedAt") is None or record.get("finishedAt") is None:
            raise BenchError(f"call {call_id}: record without startedAt/finishedAt: {record}")
        samples.append(
            {
                "call_id": call_id,
                "callback_status": status,
                "record_status": record.get("statusCode"),
                **lateness(arrival, record["startedAt"], record["finishedAt"], HANG_TIMEOUT),
            }
        )
    left = bench.release()  # none should be left: the worker aborted them all
    return {"answers": statuses(posted["results"]), "samples": samples, "left_hanging": left}


def _cpu_line(figures: dict[str, Any]) -> str:
    return (
        f"CPU ms/call: gateway {figures['gateway_cpu_ms_per_call']:.3f} "
        f"worker {figures['worker_cpu_ms_per_call']:.3f}; others {figures['others_cores']:.2f} cores"
    )


def _accept_line(rnd: int, label: str, accept: dict[str, Any]) -> str:
    return (
        f"round {rnd}: (1) {label} {accept['rps']:8.0f} 202/s  p50 {accept['p50_ms']:.2f} ms  "
        f"p99 {accept['p99_ms']:.2f} ms  errors {accept['errors']}  queued {accept['queued']}  "
        f"CPU ms/call: gateway {accept['gateway_cpu_ms_per_call']:.3f} "
        f"rabbitmq {accept['rabbitmq_cpu_ms_per_call']:.3f} redis {accept['redis_cpu_ms_per_call']:.3f}  "
        f"others {accept['others_cores']:.2f} cores"
    )


def accept_order(rnd: int) -> list[str]:
    """Case (1)'s runs in round ``rnd``: the raw pika baseline last in odd rounds, first in even ones.

    Each run ends by purging the queue it filled (tens of thousands of messages), and RabbitMQ is
    still freeing them while the next run starts: measured here, whichever of two gateways ran
    second did 10-30 % worse.  Alternating keeps that from always falling on the baseline."""
    gateways = ["gateway", "workers"]
    return [*gateways, "pika"] if rnd % 2 else ["pika", *gateways]


def run_round(
    bench: Bench,
    rnd: int,
    gateway: Twistd,
    gateway_url: str,
    script: Path,
    multi: tuple[Twistd, str] | None = None,
) -> dict[str, Any]:
    """One round; ``multi``: a gateway started with ``--workers N``, whose accept rate is measured
    right after the one-process gateway's, against the same pika run."""
    args = bench.args
    out: dict[str, Any] = {"round": rnd, "accept_order": accept_order(rnd)}
    for case in out["accept_order"]:
        if case == "pika":
            out["pika"] = case_pika(bench)
        elif case == "gateway":
            accept = out["accept"] = case_accept(
                bench, gateway, gateway_url + "/async-function/bench-accept", script
            )
            say(_accept_line(rnd, "gateway accepts", accept))
        elif multi is not None:
            many, many_url = multi
            accept_many = case_accept(bench, many, many_url + "/async-function/bench-accept", script)
            out["accept_workers"] = accept_many
            say(_accept_line(rnd, f"--workers {args.gateway_workers}", accept_many))
    accept, pika_run = out["accept"], out["pika"]
    out["accept_ratio"] = round(accept["rps"] / pika_run["rate"], 4)
    if multi is not None:
        out["accept_workers_ratio"] = round(out["accept_workers"]["rps"] / pika_run["rate"], 4)
    say(
        f"round {rnd}: (1) raw pika        {pika_run['rate']:8.0f} msg/s  ratio {out['accept_ratio']:.3f}"
        + (f" (--workers: {out['accept_workers_ratio']:.3f})" if multi is not None else "")
        + f"  CPU ms/msg: pika {pika_run['cpu_us_per_msg'] / 1000:.3f} "
        f"rabbitmq {pika_run['rabbitmq_cpu_ms_per_call']:.3f}  others {pika_run['others_cores']:.2f} cores"
    )
    worker = bench.start_worker(f"worker-r{rnd}", max_inflight=max(args.burst, E2E_CONCURRENCY))
    try:
        e2e = case_e2e(bench, gateway, gateway_url, worker, rnd)
        out["e2e"] = e2e
        say(
            f"round {rnd}: (2) end to end     {e2e['completions_per_s']:8.0f} completions/s "
            f"({e2e['calls']} calls in {e2e['last_callback_s']:.2f} s; posted in {e2e['post_all_s']:.2f} s; "
            f"answers {e2e['answers']}, callbacks {e2e['callback_statuses']}); {_cpu_line(e2e)}"
        )
        burst = case_burst(bench, gateway, gateway_url, worker, rnd)
        out["burst"] = burst
        say(
            f"round {rnd}: (3) burst of {burst['calls']}: posted in {burst['post_all_s']:.2f} s, "
            f"first callback {burst['first_callback_s']:.2f} s, last {burst['last_callback_s']:.2f} s "
            f"(answers {burst['answers']}, callbacks {burst['callback_statuses']}); {_cpu_line(burst)}"
        )
        hang = case_timeout(bench, gateway_url, rnd)
        out["timeout"] = hang
        totals = [s["total_ms"] for s in hang["samples"]]
        timers = [s["timer_ms"] for s in hang["samples"]]
        say(
            f"round {rnd}: (4) exec_timeout lateness: median {statistics.median(totals):.1f} ms, "
            f"max {max(totals):.1f} ms (timer part median {statistics.median(timers):.1f} ms); "
            f"callbacks {_count(str(s['callback_status']) for s in hang['samples'])}"
        )
    finally:
        worker.stop()
    if args.scaling_processes > 1:
        scaled = case_burst_processes(bench, gateway, gateway_url, rnd)
        out["burst_processes"] = scaled
        say(
            f"round {rnd}: (3b) burst of {scaled['calls']} through {scaled['processes']} worker processes "
            f"(--max-inflight {scaled['max_inflight_each']} each): posted in {scaled['post_all_s']:.2f} s, "
            f"last callback {scaled['last_callback_s']:.2f} s (one process: {out['burst']['last_callback_s']:.2f} s; "
            f"callbacks {scaled['callback_statuses']}); {_cpu_line(scaled)}"
        )
    return out


def memory_worker(bench: Bench, gateway_url: str) -> dict[str, Any]:
    n = bench.args.burst
    worker = bench.start_worker("worker-mem", max_inflight=n, exec_timeout="5m")
    try:
        post_calls(bench, gateway_url + "/async-function/bench-ok", 200, 50, "memwarm")
        bench.wait_callbacks("memwarm", 200, timeout=60)
        time.sleep(1.0)
        idle = steady_rss(worker.pid)
        posted = post_calls(bench, gateway_url + "/async-function/bench-hold", n, E2E_CONCURRENCY, "memhold")
        _wait(lambda: bench.hanging() >= n, 60, f"{n} calls hanging in the function")
        time.sleep(1.0)
        loaded = steady_rss(worker.pid)
        in_flight = _metric(worker.metrics_url, "txfaas_worker_calls_in_flight")
        released = bench.release()
        bench.wait_callbacks("memhold", n, timeout=60)
        time.sleep(1.0)
        after = steady_rss(worker.pid)
    finally:
        worker.stop()
    return {
        "calls": n,
        "answers": statuses(posted["results"]),
        "in_flight_metric": in_flight,
        "released": released,
        "idle_kib": idle,
        "loaded_kib": loaded,
        "after_kib": after,
        "kib_per_call": per_call_kib(idle, loaded, n),
    }


def memory_gateway(bench: Bench) -> dict[str, Any]:
    n = bench.args.burst
    gateway, url = bench.start_gateway("gateway-mem")
    holder = None
    try:
        warm = client("post", url + "/function/bench-ok", "--count=200", "--concurrency=50", "--batch=gwarm")
        time.sleep(1.0)
        idle = steady_rss(gateway.pid)
        holder = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "async_client.py"),
                "hold",
                url + "/function/bench-hold",
                f"--count={n}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = holder.stdout.readline() if holder.stdout else ""
        if line.strip() != "sent":
            raise BenchError(f"the holding client did not start: {line!r}")
        _wait(lambda: bench.hanging() >= n, 60, f"{n} synchronous calls hanging in the function")
        time.sleep(1.0)
        loaded = steady_rss(gateway.pid)
        released = bench.release()
        out, _ = holder.communicate("go\n", timeout=60)
        held = json.loads(out)
        time.sleep(1.0)
        after = steady_rss(gateway.pid)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        gateway.stop()
    return {
        "calls": n,
        "warmup_answers": statuses(warm["results"]),
        "released": released,
        "answered": held["answered"],
        "idle_kib": idle,
        "loaded_kib": loaded,
        "after_kib": after,
        "kib_per_call": per_call_kib(idle, loaded, n),
    }


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


def _metric(url: str, name: str) -> float | None:
    code, body = http_get(url)
    if code != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


# --------------------------------------------------------------------------- analysis and output


def analyse(rounds: list[dict[str, Any]], memory: dict[str, Any]) -> dict[str, Any]:
    done = [r for r in rounds if "timeout" in r]
    samples = [s for r in done for s in r["timeout"]["samples"]]
    cases: dict[str, Any] = {
        "accept": {
            "gateway_202_per_s": summary([r["accept"]["rps"] for r in rounds], 1),
            "gateway_p99_ms": summary([r["accept"]["p99_ms"] for r in rounds]),
            "gateway_cpu_ms_per_call": summary([r["accept"]["gateway_cpu_ms_per_call"] for r in rounds]),
            "rabbitmq_cpu_ms_per_202": summary([r["accept"]["rabbitmq_cpu_ms_per_call"] for r in rounds]),
            "redis_cpu_ms_per_202": summary([r["accept"]["redis_cpu_ms_per_call"] for r in rounds]),
            "others_cores": summary([r["accept"]["others_cores"] for r in rounds], 2),
            "pika_rabbitmq_cpu_ms_per_msg": summary([r["pika"]["rabbitmq_cpu_ms_per_call"] for r in rounds]),
            "pika_others_cores": summary([r["pika"]["others_cores"] for r in rounds], 2),
            "errors": sum(r["accept"]["errors"] for r in rounds),
            "pika_msgs_per_s": summary([r["pika"]["rate"] for r in rounds], 1),
            "ratio": summary([r["accept_ratio"] for r in rounds]),
        },
        "e2e": {
            "completions_per_s": summary([r["e2e"]["completions_per_s"] for r in done], 1),
            "post_all_s": summary([r["e2e"]["post_all_s"] for r in done]),
            "last_callback_s": summary([r["e2e"]["last_callback_s"] for r in done]),
            "gateway_cpu_ms_per_call": summary([r["e2e"]["gateway_cpu_ms_per_call"] for r in done]),
            "worker_cpu_ms_per_call": summary([r["e2e"]["worker_cpu_ms_per_call"] for r in done]),
            "others_cores": summary([r["e2e"]["others_cores"] for r in done], 2),
        },
        "burst": {
            "post_all_s": summary([r["burst"]["post_all_s"] for r in done]),
            "first_callback_s": summary([r["burst"]["first_callback_s"] for r in done]),
            "reached_last_s": summary([r["burst"].get("reached_last_s", 0.0) for r in done]),
            **{
                f"{stage}_{q}_s": summary([r["burst"].get(f"{stage}_{q}_s", 0.0) for r in done])
                for stage in STAGES
                for q in ("p50", "max")
            },
            "last_callback_s": summary([r["burst"]["last_callback_s"] for r in done]),
            "worker_cpu_ms_per_call": summary([r["burst"]["worker_cpu_ms_per_call"] for r in done]),
            "others_cores": summary([r["burst"]["others_cores"] for r in done], 2),
        },
        **_analyse_scaling(done),
        **_analyse_accept_workers(rounds),
        "timeout_lateness": {
            "samples": len(samples),
            "total_ms": summary([s["total_ms"] for s in samples], 2),
            "timer_ms": summary([s["timer_ms"] for s in samples], 2),
            "after_timer_ms": summary([s["after_timer_ms"] for s in samples], 2),
        },
        "memory": memory,
    }
    for key in ("total_ms", "timer_ms", "after_timer_ms"):
        cases["timeout_lateness"][key].pop("runs")
    ratio = cases["accept"]["ratio"]["median"]
    last = cases["burst"]["last_callback_s"]["median"]
    late = cases["timeout_lateness"]["total_ms"]["max"]
    worker_kib = memory.get("worker", {}).get("kib_per_call")
    cases["goals"] = {
        "accept_ratio >= 0.25": _met(ratio, lambda v: v >= GOALS["accept_ratio_min"]),
        "burst last callback <= 3 s": _met(last, lambda v: v <= GOALS["burst_last_callback_s_max"]),
        "exec_timeout lateness (max) <= 100 ms": _met(late, lambda v: v <= GOALS["timeout_lateness_ms_max"]),
        "worker memory <= 50 KiB per in-flight call": _met(
            worker_kib, lambda v: v <= GOALS["worker_kib_per_call_max"]
        ),
    }
    return cases


def _analyse_scaling(done: list[dict[str, Any]]) -> dict[str, Any]:
    """(3b) when measured: the burst through N worker processes, and its ratio to the one-process
    burst of the same round (last callback, then worker CPU per call), medianed."""
    scaled = [r for r in done if "burst_processes" in r]
    if not scaled:
        return {}
    return {
        "burst_processes": {
            "processes": scaled[0]["burst_processes"]["processes"],
            "max_inflight_each": scaled[0]["burst_processes"]["max_inflight_each"],
            "post_all_s": summary([r["burst_processes"]["post_all_s"] for r in scaled]),
            "last_callback_s": summary([r["burst_processes"]["last_callback_s"] for r in scaled]),
            "worker_cpu_ms_per_call": summary(
                [r["burst_processes"]["worker_cpu_ms_per_call"] for r in scaled]
            ),
            "others_cores": summary([r["burst_processes"]["others_cores"] for r in scaled], 2),
            "last_callback_ratio_to_one_process": summary(
                [r["burst_processes"]["last_callback_s"] / r["burst"]["last_callback_s"] for r in scaled]
            ),
            "worker_cpu_ratio_to_one_process": summary(
                [
                    r["burst_processes"]["worker_cpu_ms_per_call"] / r["burst"]["worker_cpu_ms_per_call"]
                    for r in scaled
                ]
            ),
        }
    }


def _analyse_accept_workers(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """(1b) when measured: the accept rate of the ``--workers N`` gateway, its ratio to raw pika and
    to the one-process gateway of the same round, medianed."""
    many = [r for r in rounds if "accept_workers" in r]
    if not many:
        return {}
    return {
        "accept_workers": {
            "gateway_202_per_s": summary([r["accept_workers"]["rps"] for r in many], 1),
            "gateway_p99_ms": summary([r["accept_workers"]["p99_ms"] for r in many]),
            "gateway_cpu_ms_per_call": summary(
                [r["accept_workers"]["gateway_cpu_ms_per_call"] for r in many]
            ),
            "others_cores": summary([r["accept_workers"]["others_cores"] for r in many], 2),
            "errors": sum(r["accept_workers"]["errors"] for r in many),
            "ratio": summary([r["accept_workers_ratio"] for r in many]),
            "ratio_to_one_process": summary([r["accept_workers"]["rps"] / r["accept"]["rps"] for r in many]),
        }
    }


def _accept_workers_rows(w: dict[str, Any] | None, workers: int) -> list[tuple[str, str]]:
    if not w:
        return []
    return [
        (f"(1b) the same through --workers {workers}: 202/s", _mm(w["gateway_202_per_s"], ".0f")),
        ("    gateway CPU ms per 202 (all processes)", _mm(w["gateway_cpu_ms_per_call"], ".3f")),
        ("    ratio to one process (same round)", _mm(w["ratio_to_one_process"], ".3f")),
        ("    ratio gateway / pika (goal >= 0.25)", _mm(w["ratio"], ".3f")),
        ("    rest of the machine meanwhile, cores", _mm(w["others_cores"], ".2f")),
    ]


def _met(value: Any, test: Any) -> str:
    if value is None:
        return "not measured"
    return "met" if test(value) else "NOT met"


def _scaling_rows(s: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not s:
        return []
    return [
        (
            f"(3b) the same through --processes {s['processes']} (--max-inflight {s['max_inflight_each']} each): "
            "last callback, s",
            _mm(s["last_callback_s"], ".2f"),
        ),
        ("    ratio to one process (same round)", _mm(s["last_callback_ratio_to_one_process"], ".3f")),
        ("    worker CPU ms per call (all processes)", _mm(s["worker_cpu_ms_per_call"], ".3f")),
        ("    rest of the machine meanwhile, cores", _mm(s["others_cores"], ".2f")),
    ]


def table(cases: dict[str, Any], args: argparse.Namespace, rounds: int) -> str:
    a, e, b, t, m = (cases[k] for k in ("accept", "e2e", "burst", "timeout_lateness", "memory"))
    rows = [
        (
            f"(1) gateway 202/s, {args.size} B POSTs, wrk -c{args.connections}",
            _mm(a["gateway_202_per_s"], ".0f"),
        ),
        ("    gateway p99 ms", _mm(a["gateway_p99_ms"], ".2f")),
        ("    gateway CPU ms per 202", _mm(a["gateway_cpu_ms_per_call"], ".3f")),
        (
            "    rabbitmq / redis CPU ms per 202",
            f"{_mm(a['rabbitmq_cpu_ms_per_202'], '.3f')} / {_mm(a['redis_cpu_ms_per_202'], '.3f')}",
        ),
        ("    rest of the machine meanwhile, cores", _mm(a["others_cores"], ".2f")),
        (
            f"    raw pika confirmed publishes/s ({args.pika_in_flight} in flight)",
            _mm(a["pika_msgs_per_s"], ".0f"),
        ),
        ("    rabbitmq CPU ms per pika message", _mm(a["pika_rabbitmq_cpu_ms_per_msg"], ".3f")),
        ("    rest of the machine meanwhile, cores", _mm(a["pika_others_cores"], ".2f")),
        ("    ratio gateway / pika (goal >= 0.25)", _mm(a["ratio"], ".3f")),
        *_accept_workers_rows(cases.get("accept_workers"), args.gateway_workers),
        (f"(2) end-to-end completions/s ({args.calls} calls)", _mm(e["completions_per_s"], ".0f")),
        ("    time to post them all, s", _mm(e["post_all_s"], ".2f")),
        (
            "    CPU ms per call: gateway / worker",
            f"{_mm(e['gateway_cpu_ms_per_call'], '.3f')} / {_mm(e['worker_cpu_ms_per_call'], '.3f')}",
        ),
        ("    rest of the machine meanwhile, cores", _mm(e["others_cores"], ".2f")),
        (f"(3) burst of {args.burst} 1-s calls: all posted, s", _mm(b["post_all_s"], ".2f")),
        ("    last call reached the function, s", _mm(b["reached_last_s"], ".2f")),
        *(
            (
                f"    {label}, s: median call / slowest",
                f"{_mm(b[f'{stage}_p50_s'], '.3f')} / {_mm(b[f'{stage}_max_s'], '.3f')}",
            )
            for stage, label in (
                ("start_to_function", "worker start -> function reached"),
                ("answer_to_record", "function answered -> worker recorded"),
                ("record_to_callback", "recorded -> callback arrived"),
            )
        ),
        ("    first callback, s", _mm(b["first_callback_s"], ".2f")),
        ("    last callback, s (goal <= 3)", _mm(b["last_callback_s"], ".2f")),
        ("    worker CPU ms per call", _mm(b["worker_cpu_ms_per_call"], ".3f")),
        ("    rest of the machine meanwhile, cores", _mm(b["others_cores"], ".2f")),
        *_scaling_rows(cases.get("burst_processes")),
        (f"(4) exec_timeout lateness ms, {t['samples']} calls (goal max <= 100)", _mm(t["total_ms"], ".1f")),
        ("    of which the timer (finishedAt - startedAt - 1 s)", _mm(t["timer_ms"], ".1f")),
        ("    of which recording + callback delivery", _mm(t["after_timer_ms"], ".1f")),
    ]
    for who in ("worker", "gateway"):
        mem = m.get(who)
        if mem:
            what = "async calls" if who == "worker" else "sync calls"
            rows.append(
                (
                    f"memory: {who} KiB per in-flight call ({mem['calls']} {what})",
                    f"{mem['kib_per_call']:.1f}  (RSS {mem['idle_kib'] / 1024:.1f} -> "
                    f"{mem['loaded_kib'] / 1024:.1f} MiB, {mem['after_kib'] / 1024:.1f} after)",
                )
            )
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"async benchmark: median of {rounds} rounds (min-max)", ""]
    lines += [f"{label:<{width}}{value}" for label, value in rows]
    lines += ["", "goals:"] + [f"  {goal}: {verdict}" for goal, verdict in cases["goals"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- profiling

_AREAS = (
    ("txfaas/gateway/", "txfaas gateway"),
    ("txfaas/worker/", "txfaas worker"),
    ("txfaas/queue/", "txfaas queue (amqp.py)"),
    ("txfaas/store/", "txfaas store (redis.py)"),
    ("txfaas/", "txfaas (other)"),
    ("pika/", "pika"),
    ("txredisapi", "txredisapi"),
    ("klein/", "klein"),
    ("werkzeug/", "werkzeug (klein routing)"),
    ("untilConcludes (twisted/python/util.py)", "socket send syscall"),
    ("Connection.doRead (twisted/internet/tcp.py)", "socket recv syscall"),
    ("EPollReactor.doPoll", "epoll"),
    ("twisted/web/_newclient.py", "twisted.web client"),
    ("twisted/web/client.py", "twisted.web client"),
    ("twisted/web/", "twisted.web server"),
    ("twisted/internet/defer.py", "twisted Deferreds"),
    ("twisted/internet/", "twisted.internet"),
    ("twisted/logger/", "twisted.logger"),
    ("twisted/python/", "twisted.python"),
    ("twisted/", "twisted (other)"),
    ("json/", "json"),
    ("uuid.py", "uuid"),
    ("prometheus_client/", "prometheus_client"),
    ("attr/", "attrs"),
)
_TRUNK = ("twisted/scripts/", "twisted/application/app.py", "ReactorBase.run ", "ReactorBase.mainLoop ")


def summarise_stacks(lines: list[str], top: int = 30) -> dict[str, Any]:
    """Self time by area and inclusive time by function, from py-spy's collapsed stacks."""
    return _summarise_stacks(
        lines, _AREAS, _TRUNK, top, threads_area="other threads (Twisted's thread pool: getaddrinfo)"
    )


class Spy:
    """py-spy sampling one process (250 Hz, idle excluded) until :meth:`finish`."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.collapsed = out.with_suffix(".collapsed")
        self._proc = subprocess.Popen(
            [py_spy(), "record", "--nonblocking", "--nolineno", "-r", "250", "-f", "raw",
             "-o", str(self.collapsed), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def finish(self) -> dict[str, Any]:
        """Stop sampling (SIGINT makes py-spy write its file); summarise into ``out``."""
        self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        if not self.collapsed.exists():
            raise BenchError(f"py-spy wrote nothing ({self._proc.returncode}): {err}")
        report = summarise_stacks(self.collapsed.read_text().splitlines())
        lines = [f"{report['samples']} samples", "", *stacks_text(report)]
        self.out.write_text("\n".join(lines) + "\n")
        return report


def profile(bench: Bench, gateway: Twistd, gateway_url: str, script: Path, base: Path) -> dict[str, Any]:
    """py-spy on the gateway accepting (case 1), then on the worker and the gateway in cases 2 and 3."""
    args = bench.args
    reports: dict[str, Any] = {}
    say(f"profiling the gateway (pid {gateway.pid}) accepting, {args.profile}s")
    spy = Spy(gateway.pid, Path(f"{base}-profile-accept-gateway.txt"))
    time.sleep(0.5)
    load = run_wrk(
        gateway_url + "/async-function/bench-accept", args.connections, args.profile, script=script
    )
    reports["accept_gateway"] = {**spy.finish(), "rps_while_profiled": load.rps}
    bench.broker.purge(bench.accept_queue)
    worker = bench.start_worker("worker-profile", max_inflight=max(args.burst, E2E_CONCURRENCY))
    try:
        for case, run_case in (("e2e", case_e2e), ("burst", case_burst)):
            say(f"profiling the worker (pid {worker.pid}) and the gateway in the {case} case")
            spies = {who: Spy(pid, Path(f"{base}-profile-{case}-{who}.txt")) for who, pid in
                     (("worker", worker.pid), ("gateway", gateway.pid))}  # fmt: skip
            time.sleep(0.5)
            figures = run_case(bench, gateway, gateway_url, worker, 90 + len(reports))
            for who, spy in spies.items():
                reports[f"{case}_{who}"] = spy.finish()
            reports[f"{case}_figures_while_profiled"] = figures
    finally:
        worker.stop()
    return reports


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of cases 1-4 (medians over them) [3]")
    p.add_argument("--calls", type=int, default=2000, help="calls of the end-to-end case (2) [2000]")
    p.add_argument(
        "--burst", type=int, default=1000, help="calls posted at once in (3) and held for memory [1000]"
    )
    p.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run in (1) [10]")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk load before each (1) run [2]")
    p.add_argument("--connections", type=int, default=50, help="wrk connections in (1) [50]")
    p.add_argument("--size", type=int, default=256, help="body bytes of every post and pika message [256]")
    p.add_argument("--pika-messages", type=int, default=30000, help="messages per pika baseline run [30000]")
    p.add_argument("--pika-in-flight", type=int, default=200, help="unconfirmed pika publishes [200]")
    p.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="RabbitMQ URL")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument(
        "--scaling-processes",
        type=int,
        default=0,
        metavar="N",
        help="each round, also run (3) through faas-worker --processes N --max-inflight burst/N [off]",
    )
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        metavar="N",
        help="each round, also measure (1) on a gateway started with --workers N [off]",
    )
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS", help="then profile with py-spy")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where files go [bench/results]")
    args = p.parse_args(argv)
    if min(args.rounds, args.calls, args.burst, args.connections) < 1 or args.duration <= 0:
        p.error("--rounds, --calls, --burst, --connections and --duration must be positive")
    return args


def functions_json(bench: Bench) -> list[dict[str, Any]]:
    def fn(name: str, route: str, queue: str, **annotations: str) -> dict[str, Any]:
        # One attempt: a timed-out call's callback comes at once, not after retries.
        annotations = {"com.openfaas.queue": queue, "com.openfaas.retry.attempts": "1", **annotations}
        return {
            "service": name,
            "image": "bench",
            "url": f"{bench.functions_url}/{route}",
            "annotations": annotations,
        }

    return [
        fn("bench-accept", "ok", bench.accept_queue),
        fn("bench-ok", "ok", bench.work_queue),
        fn("bench-sleep", "sleep", bench.work_queue),
        fn("bench-hang", "hang", bench.work_queue, **{"txfaas.timeout": f"{HANG_TIMEOUT:g}s"}),
        fn("bench-hold", "hang", bench.work_queue),
    ]


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    ensure_commands({"wrk": "wrk"})
    stamp, base, tmp = prepare_run(stack, args.results, "async_bench", "txfaas-async-bench-")
    tag = uuid.uuid4().hex[:10]
    bench = Bench(
        args=args,
        tmp=tmp,
        tag=tag,
        prefix=f"bench:{tag}:",
        accept_queue=f"bench-accept-{tag}",
        work_queue=f"bench-work-{tag}",
        retry_prefix=f"bench-{tag}",
        callback_queue=f"bench-callbacks-{tag}",
        dead_letter_queue=f"bench-dead-letter-{tag}",
        functions_file=tmp / "functions.json",
        functions_port=free_port(),
        receiver_port=free_port(),
        broker=Broker(args.amqp),
        stack=stack,
    )
    redis_port = redis_address(args.redis)[1]
    amqp_port = urlsplit(args.amqp).port or 5672
    bench.services = {
        "rabbitmq": lambda: listener_pids(amqp_port, "beam.smp"),
        "redis": lambda: listener_pids(redis_port, "redis-server"),
    }

    def clean_up() -> None:
        tier = f"{bench.retry_prefix}.delay.{round(parse_duration(DELAY_TIER) * 1000)}"
        queues = [bench.accept_queue, bench.work_queue, bench.callback_queue, bench.dead_letter_queue, tier]
        for queue in queues:
            bench.broker.delete(queue)
        for exchange in (f"{bench.retry_prefix}.retry", tier):  # a delay tier is a queue and an exchange
            bench.broker.delete_exchange(exchange)
        removed = redis_delete_prefix(args.redis, bench.prefix)
        say(
            f"removed queues {', '.join(queues)}, exchange {bench.retry_prefix}.retry and {removed} redis keys"
        )

    # Registered first, so it runs last: after every process it started has stopped.
    stack.callback(clean_up)
    env = environment("wrk")
    servers = []
    for role, port, ready in (
        ("functions", bench.functions_port, "/stats"),
        ("receiver", bench.receiver_port, "/count?batch=x"),
    ):
        child = Child(
            role,
            [sys.executable, str(BENCH / "async_servers.py"), role, f"--port={port}"],
            tmp / f"{role}.log",
        )
        stack.callback(child.stop)
        servers.append(child)
        wait_http(f"http://{LOOPBACK}:{port}{ready}", child)
    bench.functions, bench.receiver = servers
    bench.functions_file.write_text(json.dumps(functions_json(bench)))
    gateway, gateway_url = bench.start_gateway("gateway")
    multi = None
    if args.gateway_workers > 1:
        multi = bench.start_gateway(f"gateway-w{args.gateway_workers}", workers=args.gateway_workers)
    script = post_script(tmp, args.size)
    say(
        f"async benchmark: {args.rounds} rounds; queues {bench.accept_queue}, {bench.work_queue}; "
        f"redis prefix {bench.prefix}; {env['cpus']} cores, load {env['load_before'][0]:.2f}"
    )
    results: dict[str, Any] = {
        "benchmark": "async_bench",
        "started": stamp,
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goals": GOALS,
    }
    rounds: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    with partial_on_failure(base, results, lambda: {"rounds": rounds, "memory": memory} if rounds else None):
        for rnd in range(1, args.rounds + 1):
            rounds.append(run_round(bench, rnd, gateway, gateway_url, script, multi))
        if not args.no_memory:
            memory["worker"] = memory_worker(bench, gateway_url)
            w = memory["worker"]
            say(
                f"memory: worker {w['kib_per_call']:.1f} KiB per in-flight call "
                f"({w['idle_kib']} -> {w['loaded_kib']} KiB with {w['calls']} hanging; in-flight metric "
                f"{w['in_flight_metric']})"
            )
            memory["gateway"] = memory_gateway(bench)
            g = memory["gateway"]
            say(
                f"memory: gateway {g['kib_per_call']:.1f} KiB per in-flight sync call "
                f"({g['idle_kib']} -> {g['loaded_kib']} KiB with {g['calls']} held)"
            )
    env["load_after"] = os.getloadavg()
    cases = analyse(rounds, memory)
    results.update(cases=cases, rounds=rounds)
    text = table(cases, args, len(rounds))
    json_path = write_results(base, results, text)
    if args.profile:
        results["profile"] = profile(bench, gateway, gateway_url, script, base)
        write_json(json_path, results)
        say(f"profiles: {base}-profile-*.txt")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
