"""The sync-proxy benchmark: the gateway's ``/function/{name}`` against nginx, on loopback.

One command starts everything it needs and stops it again::

    .venv/bin/python bench/sync_proxy.py [--rounds 3] [--duration 10] [--connections 50]
        [--concurrency-sweep] [--plot] [--redis] [--profile 10]

Targets, all answering the same small request with ``200 "ok"``:

- ``direct``   (a) a private nginx ``return 200 "ok"`` (the function);
- ``nginx``    (b) a second private nginx ``proxy_pass``-ing to (a) with upstream keep-alive;
- ``gateway``  (c) ``twistd faas-gateway`` (memory store) with a function ``bench`` whose url is (a);
- ``gateway-redis`` (``--redis``) the same with the real Redis store (unique key prefix, removed after).

Cases, interleaved round by round so that noise hits every target alike:

- sync proxy: req/s and p50/p99 at ``--connections``, ratios c/b and c/a per round, then medianed;
- added latency at one connection: p50 (and p99) of each proxy minus that of (a), per round;
- CPU-seconds per 10,000 calls in the proxying process (``/proc/<pid>/stat`` utime+stime);
- with ``--concurrency-sweep`` (or ``--plot``): the same at 1, 10, 50 and 200 connections.

It prints one table and writes ``bench/results/sync_proxy-<time>.json`` and ``.txt`` (the table),
``.png`` with ``--plot``, ``-profile.txt`` and ``-profile.collapsed`` with ``--profile``, and
``-partial.json`` with the runs so far when it is stopped or fails midway.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    LOOPBACK,
    BenchError,
    Gateway,
    Nginx,
    WrkResult,
    children_of,
    cpu_per_10k,
    ensure_commands,
    ensure_python_module,
    environment,
    free_port,
    measured_wrk,
    nginx_function_conf,
    nginx_proxy_conf,
    partial_on_failure,
    post_script,
    prepare_run,
    py_spy,
    redis_delete_prefix,
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

BENCH = Path(__file__).resolve().parent
SWEEP = (1, 10, 50, 200)
# Goals: gateway / nginx proxy_pass throughput at 50 connections (issue 2: 0.06; issue 6, one
# gateway process: 0.12), and the gateway's added p50 latency at one connection (issue 6).
TARGET_RATIOS = {"issue 2": 0.06, "issue 6": 0.12}
TARGET_ADDED_P50_MS = 0.2


@dataclass
class Target:
    key: str
    label: str
    url: str
    #: the process group doing this target's work, for CPU per call
    worker: str


@dataclass
class Run:
    round: int
    connections: int
    target: str
    result: WrkResult

    def cpu_per_10k(self, group: str) -> float | None:
        return cpu_per_10k(self.result, group)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over them) [3]")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run [10]")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured run [2]")
    p.add_argument("--connections", type=int, default=50, help="connections of the main case [50]")
    p.add_argument(
        "--concurrency-sweep", action="store_true", help=f"also measure at {', '.join(map(str, SWEEP))}"
    )
    p.add_argument("--plot", action="store_true", help="write a PNG of req/s and p99 (implies the sweep)")
    p.add_argument(
        "--redis",
        nargs="?",
        const="redis://127.0.0.1:6379/0",
        default=None,
        metavar="URL",
        help="also run the gateway on the real Redis store [redis://127.0.0.1:6379/0]",
    )
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=0,
        metavar="N",
        help="also run the gateway with --workers N on the real Redis store (processes sharing the port)",
    )
    p.add_argument("--post-bytes", type=int, default=0, help="POST a body of this size instead of GET [0]")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after measuring, profile the gateway under load with py-spy for this long",
    )
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where files go [bench/results]")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.warmup < 0:
        p.error("--rounds, --duration and --connections must be positive, --warmup not negative")
    if args.plot:
        args.concurrency_sweep = True
    return args


def measure(
    args: argparse.Namespace,
    targets: list[Target],
    levels: list[int],
    watch: dict[str, Callable[[], list[int]]],
    script: Path | None,
    runs: list[Run],
) -> None:
    """Every round runs every level on every target in turn: a, b, c, a, b, c, ... (into ``runs``)."""
    total = args.rounds * len(levels) * len(targets)
    n = 0
    for rnd in range(1, args.rounds + 1):
        for connections in levels:
            for target in targets:
                n += 1
                result = measured_wrk(
                    target.url, connections, args.duration, args.warmup, script=script, watch=watch
                )
                if not result.requests:
                    raise BenchError(f"{target.label}: no request completed at {connections} connections")
                run = Run(rnd, connections, target.key, result)
                runs.append(run)
                errors = f"  ERRORS {result.errors}" if result.errors else ""
                others = result.cpu_s.get("others", 0.0) / result.seconds
                cpu = run.cpu_per_10k(target.worker)
                say(
                    f"[{n:>3}/{total}] round {rnd} c={connections:<3} {target.label:<22} "
                    f"{result.rps:>9.0f} req/s  p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
                    f"cpu {cpu:6.3f} s/10k  others {others:4.2f} cores{errors}"
                )


def analyse(runs: list[Run], targets: list[Target], levels: list[int], main_c: int) -> dict[str, Any]:
    by: dict[tuple[str, int, int], Run] = {(r.target, r.connections, r.round): r for r in runs}
    rounds = sorted({r.round for r in runs})
    keys = [t.key for t in targets]
    worker = {t.key: t.worker for t in targets}

    def level(c: int) -> dict[str, Any]:
        out: dict[str, Any] = {"targets": {}, "ratios": {}}
        for key in keys:
            mine = [by[key, c, r] for r in rounds]
            out["targets"][key] = {
                "rps": summary([m.result.rps for m in mine], 1),
                "p50_ms": summary([m.result.p50_ms for m in mine]),
                "p99_ms": summary([m.result.p99_ms for m in mine]),
                "cpu_s_per_10k": summary([m.cpu_per_10k(worker[key]) or 0.0 for m in mine]),
                "errors": sum(m.result.errors for m in mine),
            }
        # Throughput ratios per round (same round, same level), then the median.
        for num in keys:
            for den in keys:
                if keys.index(den) < keys.index(num):
                    values = [by[num, c, r].result.rps / by[den, c, r].result.rps for r in rounds]
                    out["ratios"][f"{num}/{den}"] = summary(values)
        return out

    cases: dict[str, Any] = {"sync_proxy": {"connections": main_c, **level(main_c)}}
    base = keys[0]
    added: dict[str, Any] = {}
    for key in keys[1:]:
        added[f"{key}-{base}"] = {
            "p50_ms": summary([by[key, 1, r].result.p50_ms - by[base, 1, r].result.p50_ms for r in rounds]),
            "p99_ms": summary([by[key, 1, r].result.p99_ms - by[base, 1, r].result.p99_ms for r in rounds]),
        }
    cases["added_latency_1conn"] = added
    cases["cpu_s_per_10k_calls"] = {
        "connections": main_c,
        **{key: cases["sync_proxy"]["targets"][key]["cpu_s_per_10k"] for key in keys},
    }
    cases["concurrency"] = {str(c): level(c) for c in levels}
    ratio = cases["sync_proxy"]["ratios"].get("gateway/nginx", {}).get("median")
    cases["sync_proxy"]["goals"] = {
        issue: {"gateway/nginx": target, "met": ratio is not None and ratio >= target}
        for issue, target in TARGET_RATIOS.items()
    }
    added_p50 = added.get(f"gateway-{base}", {}).get("p50_ms", {}).get("median")
    cases["added_latency_1conn_goal"] = {
        "p50_ms_max": TARGET_ADDED_P50_MS,
        "met": added_p50 is not None and added_p50 <= TARGET_ADDED_P50_MS,
    }
    return cases


def table(cases: dict[str, Any], targets: list[Target], rounds: int, levels: list[int]) -> str:
    labels = {t.key: t.label for t in targets}
    main = cases["sync_proxy"]
    lines = [
        f"sync proxy at {main['connections']} connections (median of {rounds} rounds, min-max)",
        f"{'target':<24}{'req/s':>26}{'p50 ms':>26}{'p99 ms':>26}{'CPU s/10k calls':>24}",
    ]
    for key, s in main["targets"].items():
        flag = f"  ({s['errors']} errors)" if s["errors"] else ""
        lines.append(
            f"{labels[key]:<24}{_mm(s['rps'], '.0f'):>26}{_mm(s['p50_ms'], '.3f'):>26}"
            f"{_mm(s['p99_ms'], '.3f'):>26}{_mm(s['cpu_s_per_10k'], '.3f'):>24}{flag}"
        )
    lines.append("")
    lines.append("throughput ratios (per round, then median; min-max)")
    for name, s in main["ratios"].items():
        lines.append(f"  {name:<28}{_mm(s, '.3f')}")
    if "gateway" in main["targets"] and "nginx" in main["targets"]:
        for issue, goal in main["goals"].items():
            verdict = "met" if goal["met"] else "NOT met"
            lines.append(f"  goal ({issue}) gateway/nginx >= {goal['gateway/nginx']}: {verdict}")
    lines.append("")
    lines.append("added latency at 1 connection (per round, then median; min-max)")
    for name, s in cases["added_latency_1conn"].items():
        lines.append(f"  {name:<28}p50 {_mm(s['p50_ms'], '+.3f')} ms   p99 {_mm(s['p99_ms'], '+.3f')} ms")
    if "gateway" in main["targets"]:
        goal = cases["added_latency_1conn_goal"]
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(f"  goal (issue 6) gateway p50 added <= {goal['p50_ms_max']} ms: {verdict}")
    if len(levels) > 2:
        lines.append("")
        lines.append("concurrency sweep: req/s (p99 ms), medians")
        lines.append(f"{'connections':<14}" + "".join(f"{labels[t.key]:>28}" for t in targets))
        for c in levels:
            row = cases["concurrency"][str(c)]["targets"]
            cells = "".join(
                f"{row[t.key]['rps']['median']:>18.0f} ({row[t.key]['p99_ms']['median']:6.2f})"
                for t in targets
            )
            lines.append(f"{c:<14}{cells}")
    return "\n".join(lines)


def plot(cases: dict[str, Any], targets: list[Target], levels: list[int], path: Path, title: str) -> None:
    ensure_python_module("matplotlib", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for t in targets:
        rows = [cases["concurrency"][str(c)]["targets"][t.key] for c in levels]
        for ax, metric in ((left, "rps"), (right, "p99_ms")):
            med = [r[metric]["median"] for r in rows]
            lo = [m - r[metric]["min"] for m, r in zip(med, rows, strict=True)]
            hi = [r[metric]["max"] - m for m, r in zip(med, rows, strict=True)]
            ax.errorbar(levels, med, yerr=[lo, hi], marker="o", capsize=3, label=t.label)
    for ax, ylabel in ((left, "requests/s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("connections")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    left.set_yscale("log")
    right.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(
    args: argparse.Namespace, gateway: Gateway, url: str, script: Path | None, out: Path
) -> dict[str, Any]:
    """py-spy on the gateway while wrk loads it; collapsed stacks plus a summary of the top costs."""
    spy = py_spy()
    collapsed = out.with_suffix(".collapsed")
    say(f"profiling the gateway (pid {gateway.pid}) for {args.profile:g}s with py-spy")
    recorder = subprocess.Popen(
        [spy, "record", "--nonblocking", "--nolineno", "-r", "250", "-d", f"{args.profile:g}",
         "-f", "raw", "-o", str(collapsed), "-p", str(gateway.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        load = run_wrk(url, args.connections, args.profile, script=script)
        _, err = recorder.communicate(timeout=args.profile + 30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    if recorder.returncode != 0 or not collapsed.exists():
        raise BenchError(f"py-spy failed ({recorder.returncode}): {err}")
    report = summarise_stacks(collapsed.read_text().splitlines())
    report["rps_while_profiled"] = round(load.rps, 1)
    lines = [
        f"py-spy, {args.profile:g}s at {args.connections} connections, {report['samples']} samples "
        f"({load.rps:.0f} req/s while sampled)",
        "",
        *stacks_text(report),
    ]
    out.write_text("\n".join(lines) + "\n")
    return report


_AREAS = (
    ("untilConcludes (twisted/python/util.py)", "socket send syscall (tcp writeSomeData)"),
    ("Connection.doRead (twisted/internet/tcp.py)", "socket recv syscall (tcp doRead)"),
    ("EPollReactor.doPoll", "epoll (reactor loop)"),
    ("txfaas/gateway/proxy.py", "txfaas proxy.py"),
    ("txfaas/headers.py", "txfaas headers.py"),
    ("txfaas/web/server.py", "txfaas web/server.py (LimitedSite/Request)"),
    ("txfaas/", "txfaas (other)"),
    ("treq/", "treq"),
    ("hyperlink/", "hyperlink (URL parsing)"),
    ("idna/", "idna"),
    ("http/cookiejar.py", "http.cookiejar (treq's cookie jar)"),
    ("urllib/parse.py", "urllib.parse"),
    ("uuid.py", "uuid (call ids)"),
    ("twisted/web/_newclient.py", "twisted.web client (_newclient)"),
    ("twisted/web/client.py", "twisted.web client (Agent, pool)"),
    ("twisted/web/http_headers.py", "twisted.web Headers"),
    ("twisted/web/", "twisted.web server (http.py, server.py)"),
    ("twisted/internet/defer.py", "twisted Deferreds"),
    ("twisted/internet/", "twisted.internet (reactor, tcp, timers)"),
    ("twisted/protocols/", "twisted.protocols (LineReceiver)"),
    ("twisted/logger/", "twisted.logger"),
    ("twisted/python/", "twisted.python (context, log wrappers)"),
    ("twisted/", "twisted (other)"),
    ("prometheus_client/", "prometheus_client"),
    ("zope/", "zope.interface"),
    ("attr/", "attrs"),
)
# The reactor's trunk (every sample passes through it): left out of the inclusive ranking.
_TRUNK = (
    "(twistd)",
    "twisted/scripts/",
    "twisted/application/",
    "twisted/python/log.py",
    "twisted/python/context.py",
    "ReactorBase.run ",
    "ReactorBase.mainLoop ",
    "EPollReactor.doPoll ",
    "_PollLikeMixin._doReadOrWrite ",
)


def summarise_stacks(lines: list[str], top: int = 40) -> dict[str, Any]:
    """Self time by area and inclusive time by function, from py-spy's collapsed stacks."""
    return _summarise_stacks(lines, _AREAS, _TRUNK, top)


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    ensure_commands({"wrk": "wrk", "nginx": "nginx"})
    stamp, base, tmp = prepare_run(stack, args.results, "sync_proxy", "txfaas-bench-")
    env = environment("wrk", "nginx")

    fn_port, px_port, gw_port = free_port(), free_port(), free_port()
    function = Nginx("function", tmp, nginx_function_conf(tmp, fn_port))
    stack.callback(function.stop)
    wait_http(f"http://{LOOPBACK}:{fn_port}/", function, body=b"ok")
    proxy = Nginx("proxy", tmp, nginx_proxy_conf(tmp, px_port, fn_port))
    stack.callback(proxy.stop)
    wait_http(f"http://{LOOPBACK}:{px_port}/", proxy, body=b"ok")

    deploy = [{"service": "bench", "image": "bench", "url": f"http://{LOOPBACK}:{fn_port}"}]
    gateway = Gateway("gateway", tmp, gw_port, deploy)
    stack.callback(gateway.stop)
    wait_http(f"http://{LOOPBACK}:{gw_port}/function/bench", gateway, body=b"ok")

    targets = [
        Target("direct", "(a) direct nginx", f"http://{LOOPBACK}:{fn_port}/", "function"),
        Target("nginx", "(b) nginx proxy_pass", f"http://{LOOPBACK}:{px_port}/", "nginx-proxy"),
        Target("gateway", "(c) gateway", f"http://{LOOPBACK}:{gw_port}/function/bench", "gateway"),
    ]
    watch: dict[str, Callable[[], list[int]]] = {
        "function": function.workers,
        "nginx-proxy": proxy.workers,
        "gateway": lambda: [gateway.pid],
    }
    if args.redis:
        prefix = f"bench:{uuid.uuid4().hex[:12]}:"
        # Registered before the gateway's stop, so it runs after the gateway has stopped.
        stack.callback(
            lambda: say(f"removed {redis_delete_prefix(args.redis, prefix)} redis keys under {prefix}")
        )
        rd_port = free_port()
        redis_gw = Gateway(
            "gateway-redis", tmp, rd_port, deploy, redis=args.redis, extra=[f"--redis-prefix={prefix}"]
        )
        stack.callback(redis_gw.stop)
        wait_http(f"http://{LOOPBACK}:{rd_port}/function/bench", redis_gw, body=b"ok")
        targets.append(
            Target(
                "gateway-redis",
                "(c') gateway, Redis",
                f"http://{LOOPBACK}:{rd_port}/function/bench",
                "gateway-redis",
            )
        )
        watch["gateway-redis"] = lambda: [redis_gw.pid]

    if args.gateway_workers > 1:
        prefix_w = f"bench:{uuid.uuid4().hex[:12]}:"
        redis_w = "redis://127.0.0.1:6379/0"
        stack.callback(lambda: say(f"removed {redis_delete_prefix(redis_w, prefix_w)} redis keys"))
        wk_port = free_port()
        workers_gw = Gateway(
            "gateway-workers",
            tmp,
            wk_port,
            deploy,
            redis=redis_w,
            extra=[
                f"--redis-prefix={prefix_w}",
                f"--workers={args.gateway_workers}",
                "--amqp=amqp://guest:guest@127.0.0.1:5672/%2F",
            ],
        )
        stack.callback(workers_gw.stop)
        wait_http(f"http://{LOOPBACK}:{wk_port}/function/bench", workers_gw, body=b"ok")
        time.sleep(3)  # the other processes start after the first answers
        targets.append(
            Target(
                "gateway-workers",
                f"(c'') gateway --workers {args.gateway_workers}",
                f"http://{LOOPBACK}:{wk_port}/function/bench",
                "gateway-workers",
            )
        )
        watch["gateway-workers"] = lambda: [workers_gw.pid, *children_of(workers_gw.pid)]

    script = post_script(tmp, args.post_bytes) if args.post_bytes else None
    levels = sorted({1, args.connections, *(SWEEP if args.concurrency_sweep else ())})
    request = f"POST {args.post_bytes} bytes" if args.post_bytes else "GET"
    say(
        f"sync proxy benchmark: {args.rounds} rounds x {len(levels)} levels x {len(targets)} targets, "
        f"{args.duration:g}s each after {args.warmup:g}s warm-up; {request}"
    )
    say(
        f"  nginx: worker_processes 1 for the function and 1 for the proxy (fair to the one-process gateway "
        f"on this {env['cpus']}-core machine); wrk threads = min(2, connections); {env['wrk']}"
    )
    results: dict[str, Any] = {
        "benchmark": "sync_proxy",
        "started": stamp,
        "environment": env,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "levels": levels,
            "request": request,
            "wrk_threads": "min(2, connections)",
            "nginx": "worker_processes 1 each for function and proxy; upstream keepalive 64; "
            "keepalive_requests unlimited",
            "gateway": "twistd faas-gateway, --redis memory: --amqp memory:, default pool size",
        },
        "targets": {t.key: {"label": t.label, "url": t.url, "cpu_of": t.worker} for t in targets},
    }
    runs: list[Run] = []

    def runs_json() -> list[dict[str, Any]]:
        return [
            {"round": r.round, "connections": r.connections, "target": r.target, **r.result.to_json()}
            for r in runs
        ]

    with partial_on_failure(base, results, lambda: {"runs": runs_json()} if runs else None):
        measure(args, targets, levels, watch, script, runs)
    env["load_after"] = os.getloadavg()
    cases = analyse(runs, targets, levels, args.connections)
    results.update(cases=cases, runs=runs_json())
    text = table(cases, targets, args.rounds, levels)
    if args.plot:
        png = base.with_suffix(".png")
        plot(cases, targets, levels, png, f"txfaas sync proxy, loopback, {env['cpus']} cores ({stamp})")
        results["plot"] = str(png)
    json_path = write_results(base, results, text)
    if args.plot:
        say(f"plot:    {results['plot']}")
    if args.profile:
        profile_path = Path(f"{base}-profile.txt")
        results["profile"] = profile(args, gateway, targets[2].url, script, profile_path)
        write_json(json_path, results)
        say(f"profile: {profile_path} (collapsed stacks: {profile_path.with_suffix('.collapsed').name})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
