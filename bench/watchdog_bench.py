"""The watchdog benchmark: fork and http mode, directly and through the gateway; exec_timeout lateness.

One command, on loopback only, starting and stopping everything it uses::

    .venv/bin/python bench/watchdog_bench.py [--rounds 3] [--duration 8] [--warmup 2]
        [--connections 10] [--http-connections 50] [--body-bytes 100] [--timeout-calls 20]

Processes (each ``twistd -n --pidfile=`` of this venv, or a child of one):

- ``fork``: ``faas-watchdog --mode fork --fprocess cat``: a ``cat`` per request, echoing the body;
- ``http``: ``faas-watchdog --mode http`` whose fprocess is a private nginx (``worker_processes 1``,
  ``return 200 "ok"``, bench/harness.py's function config) that the watchdog starts, proxies to
  and stops: the trivial upstream (nginx, not ``http_echo.py``, so the upstream is never the
  bottleneck);
- ``sleep``: ``faas-watchdog --mode fork --fprocess "sleep 100.<tag>" --exec-timeout 1s``
  (the tag makes its processes ours alone to look for);
- ``faas-gateway --redis memory: --amqp memory: --functions <json>`` deploying the three by URL
  (``wd-fork``, ``wd-http``, ``wd-sleep``).

Throughput: every round runs, in turn, fork at ``--connections`` (directly, then through
``/function/wd-fork``), http at ``--connections`` and http at ``--http-connections`` (directly,
then through the gateway), each ``wrk --latency`` for ``--duration`` after ``--warmup`` seconds
of the same load, POSTing ``--body-bytes`` bytes.  Reported: req/s, p50, p99 (median of the
rounds, min-max), the ratios gateway/direct of each (per round, then the median), and CPU
seconds per 10,000 calls of the gateway, the watchdog and the function (fork: the reaped
``cat`` processes, from the watchdog's cutime/cstime; http: nginx).

exec_timeout lateness: ``--timeout-calls`` sequential POSTs to the sleep watchdog, directly and
through the gateway: response time - 1 s (median, max; goal: well under 100 ms), with the status
(504 expected) and the watchdog's ``X-Duration-Seconds``.  Then: are the ``sleep`` processes gone
(none left running, no zombie children of the watchdog)?  When the watchdogs are stopped, nothing
they started (cat, nginx, sleep) may be left either.

It prints one table and writes ``bench/results/watchdog-<time>.json`` and ``.txt``; stopped or
failed midway, ``-partial.json`` with what was measured.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    CLOCK_TICKS,
    LOOPBACK,
    BenchError,
    Gateway,
    Twistd,
    WrkResult,
    children_of,
    cpu_per_10k,
    direct_opener,
    ensure_commands,
    environment,
    free_port,
    measured_wrk,
    nginx_argv,
    nginx_function_conf,
    partial_on_failure,
    post_script,
    prepare_run,
    run_main,
    say,
    summary,
    wait_http,
    write_results,
)
from harness import median_min_max as _mm

BENCH = Path(__file__).resolve().parent
EXEC_TIMEOUT = 1.0  # seconds: the sleep watchdog's --exec-timeout
LATENESS_GOAL_MS = 100.0
# OpenFaaS variables the watchdog would otherwise read from our environment.
WATCHDOG_ENV = (
    "fprocess",
    "function_process",
    "mode",
    "upstream_url",
    "http_upstream_url",
    "port",
    "read_timeout",
    "write_timeout",
    "exec_timeout",
    "hard_timeout",
    "idle_timeout",
    "healthcheck_interval",
    "max_inflight",
    "content_type",
    "max_request",
    "max_response",
)


# --------------------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from ``/proc``."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def reaped_children_cpu(pid: int) -> float:
    """CPU-seconds of the children ``pid`` has waited for (``cutime + cstime`` of ``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ')' field 3 is at index 0: cutime (16) and cstime (17) are at 13 and 14.
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def pids_with_argv(argv: Sequence[str]) -> list[int]:
    """Processes whose command line is exactly ``argv`` (zombies have none, so are not found)."""
    want = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == want:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class WatchdogProcess(Twistd):
    """``twistd -n --pidfile= faas-watchdog ...`` on a free loopback port.

    :meth:`stop` stops it (SIGTERM: it drains, then kills and reaps what it started) and then
    looks for anything of the function left alive (the function runs in its own session, out of
    reach of :class:`Child`'s process-group kill): ``leftover`` names them; they are killed.
    """

    drop_env = WATCHDOG_ENV

    def __init__(self, name: str, directory: Path, args: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.leftover: list[str] = []
        super().__init__(
            name, directory, "faas-watchdog", [f"--listen=tcp:{self.port}:interface={LOOPBACK}", *args]
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        below = descendants(self.pid) if self.alive() else []
        super().stop(sig, timeout)
        deadline = time.monotonic() + 2.0
        alive = below
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if process_state(p) not in (None, "Z")]
            if alive:
                time.sleep(0.05)
        for pid in alive:
            try:
                self.leftover.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.leftover:
            say(f"warning: {self.name} left {self.leftover} running after it stopped (killed now)")


def nginx_upstream_argv(directory: Path, port: int) -> list[str]:
    """The command of a private nginx answering ``200 "ok"`` on ``port`` (config checked first)."""
    return nginx_argv(directory, "function", nginx_function_conf(directory, port))


# --------------------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Case:
    """One load shape: a watchdog mode at a number of connections, measured direct and via gateway."""

    mode: str
    connections: int

    @property
    def key(self) -> str:
        return f"{self.mode}-c{self.connections}"


@dataclass
class Run:
    round: int
    case: Case
    path: str  # "direct" or "gateway"
    result: WrkResult

    def per_10k(self, group: str) -> float | None:
        return cpu_per_10k(self.result, group)


@dataclass
class Stand:
    """What the throughput runs load: a watchdog per mode and the gateway in front of them."""

    watchdogs: dict[str, WatchdogProcess]
    gateway: Gateway
    gateway_url: str

    def url(self, mode: str, path: str) -> str:
        if path == "direct":
            return self.watchdogs[mode].url + "/"
        return f"{self.gateway_url}/function/wd-{mode}"

    def watch(self, mode: str) -> dict[str, Callable[[], list[int]]]:
        wd = self.watchdogs[mode]
        groups: dict[str, Callable[[], list[int]]] = {
            "gateway": lambda: [self.gateway.pid],
            "watchdog": lambda: [wd.pid],
        }
        if mode == "http":
            groups["function"] = lambda: descendants(wd.pid)
        return groups


def one_run(stand: Stand, case: Case, path: str, args: argparse.Namespace, script: Path) -> WrkResult:
    url = stand.url(case.mode, path)
    wd_pid = stand.watchdogs[case.mode].pid
    reaped: dict[str, float] = {}
    result = measured_wrk(
        url,
        case.connections,
        args.duration,
        args.warmup,
        script=script,
        watch=stand.watch(case.mode),
        before=lambda: reaped.update(before=reaped_children_cpu(wd_pid)),
    )
    if case.mode == "fork":
        # The cat processes: reaped by the watchdog during the run, so counted in its cutime; run_wrk
        # put their CPU under "others" (busy machine time no watched pid accounts for).
        spent = round(reaped_children_cpu(wd_pid) - reaped["before"], 3)
        result.cpu_s["function"] = spent
        result.cpu_s["others"] = round(max(0.0, result.cpu_s.get("others", 0.0) - spent), 3)
    if not result.requests:
        raise BenchError(f"{case.key} {path}: no request completed")
    return result


def measure(args: argparse.Namespace, stand: Stand, cases: list[Case], script: Path, runs: list[Run]) -> None:
    """Every round: each case direct then through the gateway, in turn (noise hits all alike)."""
    total = args.rounds * len(cases) * 2
    n = 0
    for rnd in range(1, args.rounds + 1):
        for case in cases:
            for path in ("direct", "gateway"):
                n += 1
                result = one_run(stand, case, path, args, script)
                run = Run(rnd, case, path, result)
                runs.append(run)
                errors = f"  ERRORS {result.errors}" if result.errors else ""
                others = result.cpu_s.get("others", 0.0) / result.seconds
                say(
                    f"[{n:>2}/{total}] round {rnd} {case.mode:<4} c={case.connections:<3} {path:<8}"
                    f"{result.rps:>8.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                    f"cpu s/10k: gateway {run.per_10k('gateway') or 0:5.2f} watchdog "
                    f"{run.per_10k('watchdog') or 0:5.2f} function {run.per_10k('function') or 0:5.2f}  "
                    f"others {others:4.2f} cores{errors}"
                )


def analyse_throughput(runs: list[Run], cases: list[Case]) -> dict[str, Any]:
    """Per case and path: medians (min-max); ratios gateway/direct per round, then the median."""
    by = {(r.case, r.path, r.round): r for r in runs}
    rounds = sorted({r.round for r in runs})
    out: dict[str, Any] = {}
    for case in cases:
        entry: dict[str, Any] = {"mode": case.mode, "connections": case.connections}
        for path in ("direct", "gateway"):
            mine = [by[case, path, r] for r in rounds]
            entry[path] = {
                "rps": summary([m.result.rps for m in mine], 1),
                "p50_ms": summary([m.result.p50_ms for m in mine]),
                "p99_ms": summary([m.result.p99_ms for m in mine]),
                "cpu_s_per_10k": {
                    group: summary([m.per_10k(group) or 0.0 for m in mine])
                    for group in ("gateway", "watchdog", "function")
                },
                "errors": sum(m.result.errors for m in mine),
            }
        entry["gateway/direct"] = {
            metric: summary(
                [
                    getattr(by[case, "gateway", r].result, metric)
                    / getattr(by[case, "direct", r].result, metric)
                    for r in rounds
                ]
            )
            for metric in ("rps", "p50_ms", "p99_ms")
        }
        out[case.key] = entry
    return out


# --------------------------------------------------------------------------- exec_timeout lateness


def timed_post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, float, str | None]:
    """POST ``body``; (status, seconds until the whole answer was read, X-Duration-Seconds)."""
    request = urllib.request.Request(url, data=body, method="POST")
    started = time.monotonic()
    try:
        with direct_opener().open(request, timeout=timeout) as response:
            response.read()
            status, headers = response.status, response.headers
    except urllib.error.HTTPError as e:
        e.read()
        status, headers = e.code, e.headers
    return status, time.monotonic() - started, headers.get("X-Duration-Seconds")


def lateness_figures(samples: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Median and max of (response time - timeout), in ms, and the statuses seen."""
    late = [s["elapsed_s"] * 1000.0 - timeout * 1000.0 for s in samples]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s["status"])] = statuses.get(str(s["status"]), 0) + 1
    return {
        "calls": len(samples),
        "late_ms": {
            "median": round(statistics.median(late), 1) if late else None,
            "max": round(max(late), 1) if late else None,
            "min": round(min(late), 1) if late else None,
        },
        "statuses": statuses,
        "samples": samples,
    }


def measure_lateness(url: str, calls: int, label: str) -> dict[str, Any]:
    samples = []
    for i in range(calls):
        status, elapsed, duration = timed_post(url, b"x" * 16)
        samples.append({"status": status, "elapsed_s": round(elapsed, 4), "x_duration_seconds": duration})
        if i == 0 or i == calls - 1:
            say(f"  {label} call {i + 1}/{calls}: {status} after {elapsed * 1000:.1f} ms")
    return lateness_figures(samples, EXEC_TIMEOUT)


def reaping(watchdog: WatchdogProcess, argv: Sequence[str], wait: float = 3.0) -> dict[str, Any]:
    """After the calls: no ``sleep`` of ours still running, no zombie below the watchdog."""
    deadline = time.monotonic() + wait
    while True:
        running = pids_with_argv(argv)
        zombies = [p for p in descendants(watchdog.pid) if process_state(p) == "Z"]
        below = descendants(watchdog.pid)
        if (not running and not below) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {"sleep_running": len(running), "zombies": len(zombies), "processes_below_watchdog": len(below)}


# --------------------------------------------------------------------------- report


def table(throughput: dict[str, Any], lateness: dict[str, Any], rounds: int, body_bytes: int) -> str:
    lines = [
        f"watchdog throughput, POST {body_bytes} bytes (median of {rounds} rounds, min-max)",
        f"{'mode':<6}{'conns':>6}  {'path':<9}{'req/s':>22}{'p50 ms':>24}{'p99 ms':>26}"
        f"{'CPU s/10k gw/wd/fn':>24}",
    ]
    for entry in throughput.values():
        for path in ("direct", "gateway"):
            s = entry[path]
            cpu = "/".join(
                f"{s['cpu_s_per_10k'][g]['median']:.2f}" for g in ("gateway", "watchdog", "function")
            )
            flag = f"  ({s['errors']} errors)" if s["errors"] else ""
            lines.append(
                f"{entry['mode']:<6}{entry['connections']:>6}  {path:<9}{_mm(s['rps'], '.0f'):>22}"
                f"{_mm(s['p50_ms'], '.2f'):>24}{_mm(s['p99_ms'], '.2f'):>26}{cpu:>24}{flag}"
            )
    lines += ["", "gateway/direct (per round, then median; min-max)"]
    lines.append(f"{'mode':<6}{'conns':>6}  {'req/s':>20}{'p50':>20}{'p99':>20}")
    for entry in throughput.values():
        r = entry["gateway/direct"]
        lines.append(
            f"{entry['mode']:<6}{entry['connections']:>6}  {_mm(r['rps'], '.3f'):>20}"
            f"{_mm(r['p50_ms'], '.2f'):>20}{_mm(r['p99_ms'], '.2f'):>20}"
        )
    lines += ["", f"exec_timeout {EXEC_TIMEOUT:g}s: response time - {EXEC_TIMEOUT:g}s, sequential calls"]
    for path in ("direct", "gateway"):
        f = lateness[path]
        verdict = (
            "met" if f["late_ms"]["max"] is not None and f["late_ms"]["max"] < LATENESS_GOAL_MS else "NOT met"
        )
        statuses = ", ".join(f"{n}x {code}" for code, n in sorted(f["statuses"].items()))
        lines.append(
            f"  {path:<9}{f['calls']:>3} calls  median {f['late_ms']['median']:+7.1f} ms  "
            f"max {f['late_ms']['max']:+7.1f} ms  [{statuses}]  goal max < {LATENESS_GOAL_MS:g} ms: {verdict}"
        )
    reaped = lateness["reaped"]
    lines.append(
        f"  reaped: {reaped['sleep_running']} sleep still running, {reaped['zombies']} zombies, "
        f"{reaped['processes_below_watchdog']} processes left below the watchdog"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over them) [3]")
    p.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run [8]")
    p.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run [2]")
    p.add_argument("--connections", type=int, default=10, help="connections for fork and http mode [10]")
    p.add_argument(
        "--http-connections", type=int, default=50, help="http mode also at this many connections [50]"
    )
    p.add_argument("--body-bytes", type=int, default=100, help="size of the POST body [100]")
    p.add_argument(
        "--timeout-calls", type=int, default=20, help="sequential exec_timeout calls per path [20]"
    )
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where files go [bench/results]")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.warmup < 0:
        p.error("--rounds, --duration and --connections must be positive, --warmup not negative")
    if args.body_bytes < 1 or args.timeout_calls < 1:
        p.error("--body-bytes and --timeout-calls must be positive")
    return args


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    ensure_commands({"wrk": "wrk", "nginx": "nginx"})
    stamp, base, tmp = prepare_run(stack, args.results, "watchdog", "txfaas-wdbench-")
    env = environment("wrk", "nginx")

    upstream_port = free_port()
    upstream_argv = nginx_upstream_argv(tmp, upstream_port)
    sleep_argv = ["sleep", f"100.{random.randrange(10**5, 10**6)}"]
    specs = {
        "fork": ["--mode=fork", "--fprocess=cat"],
        "http": [
            "--mode=http",
            f"--fprocess={shlex.join(upstream_argv)}",
            f"--upstream-url=http://{LOOPBACK}:{upstream_port}",
        ],
        "sleep": ["--mode=fork", f"--fprocess={shlex.join(sleep_argv)}", f"--exec-timeout={EXEC_TIMEOUT:g}s"],
    }
    watchdogs: dict[str, WatchdogProcess] = {}
    for mode, wd_args in specs.items():
        watchdogs[mode] = WatchdogProcess(f"watchdog-{mode}", tmp, wd_args)
        stack.callback(watchdogs[mode].stop)
    for wd in watchdogs.values():
        wait_http(wd.url + "/_/health", wd, timeout=30)
    wait_http(watchdogs["http"].url + "/", watchdogs["http"], body=b"ok")

    gw_port = free_port()
    deploy = [
        {"service": f"wd-{mode}", "image": f"bench/wd-{mode}", "url": wd.url}
        for mode, wd in watchdogs.items()
    ]
    gateway = Gateway("gateway", tmp, gw_port, deploy)
    stack.callback(gateway.stop)
    gateway_url = f"http://{LOOPBACK}:{gw_port}"
    wait_http(f"{gateway_url}/function/wd-http", gateway, body=b"ok", timeout=30)
    wait_http(f"{gateway_url}/function/wd-fork", gateway, timeout=30)

    stand = Stand({m: watchdogs[m] for m in ("fork", "http")}, gateway, gateway_url)
    cases = [Case("fork", args.connections), Case("http", args.connections)]
    if args.http_connections and args.http_connections != args.connections:
        cases.append(Case("http", args.http_connections))
    script = post_script(tmp, args.body_bytes)
    say(
        f"watchdog benchmark: {args.rounds} rounds x {len(cases)} cases x (direct, gateway), "
        f"{args.duration:g}s each after {args.warmup:g}s warm-up; POST {args.body_bytes} bytes"
    )
    say(
        f"  fork: fprocess=cat; http: fprocess=nginx (worker_processes 1, return 200) on :{upstream_port}; "
        f"gateway --redis memory: --amqp memory:; wrk threads = min(2, connections); {env['wrk']}"
    )
    results: dict[str, Any] = {
        "benchmark": "watchdog",
        "started": stamp,
        "environment": env,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "cases": [c.key for c in cases],
            "body_bytes": args.body_bytes,
            "timeout_calls": args.timeout_calls,
            "exec_timeout_s": EXEC_TIMEOUT,
            "fork": "faas-watchdog --mode fork --fprocess cat",
            "http": "faas-watchdog --mode http, fprocess = private nginx (worker_processes 1, return 200 ok)",
            "sleep": f"faas-watchdog --mode fork --fprocess '{shlex.join(sleep_argv)}' --exec-timeout 1s",
            "gateway": "twistd faas-gateway --redis memory: --amqp memory:, functions deployed by url",
            "wrk_threads": "min(2, connections)",
        },
        "watchdogs": {m: w.url for m, w in watchdogs.items()},
    }
    runs: list[Run] = []

    def runs_json() -> list[dict[str, Any]]:
        return [{"round": r.round, "case": r.case.key, "path": r.path, **r.result.to_json()} for r in runs]

    with partial_on_failure(base, results, lambda: {"runs": runs_json()} if runs else None):
        measure(args, stand, cases, script, runs)
        say(
            f"exec_timeout lateness: {args.timeout_calls} sequential calls each, directly and via the gateway"
        )
        sleeper = watchdogs["sleep"]
        lateness = {
            "direct": measure_lateness(sleeper.url + "/", args.timeout_calls, "direct"),
            "gateway": measure_lateness(f"{gateway_url}/function/wd-sleep", args.timeout_calls, "gateway"),
        }
        lateness["reaped"] = reaping(sleeper, sleep_argv)
    env["load_after"] = os.getloadavg()
    throughput = analyse_throughput(runs, cases)

    # Stop the watchdogs now (the stack would, too) to see that they leave nothing behind.
    for wd in watchdogs.values():
        wd.stop()
    leftover = {name: wd.leftover for name, wd in watchdogs.items()}
    results.update(throughput=throughput, lateness=lateness, left_after_stop=leftover, runs=runs_json())
    text = table(throughput, lateness, args.rounds, args.body_bytes)
    left = sum(len(v) for v in leftover.values())
    text += f"\n  after stopping the watchdogs: {left} of their processes left" + (
        f" {leftover}" if left else ""
    )
    write_results(base, results, text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
