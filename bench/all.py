"""The whole benchmark suite in one command: one table of every case against its baseline and target.

::

    scripts/bench [--rounds 3] [--quick] [--only sync|async|watchdog ...]
    .venv/bin/python bench/all.py ...      (the same, without the venv set-up)

It installs ``wrk`` and ``nginx`` with apt when they are missing, then runs, one after the
other (each starts and stops everything it needs, and interleaves its cases with their
baselines round by round):

1. ``sync_proxy.py --plot --gateway-workers 2``: gateway vs nginx ``proxy_pass`` vs direct nginx
   at 1, 10, 50 and 200 connections, and the gateway with ``--workers 2``;
2. ``async_bench.py --scaling-processes 2 --gateway-workers 2``: accept rate vs raw pika confirmed
   publishes (one gateway process, and ``--workers 2``), end to end, the 1,000 one-second calls
   through one worker process (``--max-inflight 1000``) and through ``--processes 2``
   (``--max-inflight 500`` each), exec_timeout lateness, memory;
3. ``watchdog_bench.py``: fork and http watchdogs directly vs through the gateway, 504 lateness.

Each writes its own JSON (and the sync one its PNG) into ``bench/results/all-<time>/``; this
reads them and prints ONE table: per case its figure (median of the rounds, min-max), its
baseline, the ratio (per round, then the median, where both were measured in the same round),
the target of the issue and met / NOT met; and the machine's noise as the scripts recorded it
(load averages, ``others``: the CPU the rest of the machine used meanwhile).  The same goes to
``bench/results/all-<time>.json`` and ``.txt``.

``--quick``: one round and short runs (a smoke run of the whole chain; its figures are not
comparable to the targets).  A script that fails is reported and the others still run; the
exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BenchError, ensure_commands, say, stop_on_signals, summary, write_results

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ORDER = ("sync", "async", "watchdog")
SCRIPTS = {"sync": "sync_proxy.py", "async": "async_bench.py", "watchdog": "watchdog_bench.py"}
#: the file name each script gives its JSON: ``<prefix>-<time>.json``
PREFIXES = {"sync": "sync_proxy", "async": "async_bench", "watchdog": "watchdog"}
GATEWAY_WORKERS = 2
WORKER_PROCESSES = 2
SWEEP = (1, 10, 50, 200)

# Issue 6's targets.
SYNC_RATIO_MIN = 0.12  # gateway (one process) / nginx proxy_pass throughput
ADDED_LATENCY_MS_MAX = 0.2  # at one connection, over direct
ACCEPT_RATIO_MIN = 0.25  # gateway 202/s / raw pika confirmed publishes/s
BURST_LAST_S_MAX = 3.0  # 1,000 concurrent one-second calls
LATENESS_MS_MAX = 100.0  # exec_timeout
WORKER_KIB_MAX = 50.0  # per in-flight call


def script_args(name: str, rounds: int, quick: bool, results: Path) -> list[str]:
    """The command-line arguments ``all.py`` gives each script."""
    common = [f"--rounds={1 if quick else rounds}", f"--results={results}"]
    if name == "sync":
        extra = ["--plot", f"--gateway-workers={GATEWAY_WORKERS}"]
        if quick:
            extra += ["--duration=2", "--warmup=1"]
    elif name == "async":
        extra = [f"--scaling-processes={WORKER_PROCESSES}", f"--gateway-workers={GATEWAY_WORKERS}"]
        if quick:
            extra += ["--duration=3", "--warmup=1", "--calls=500", "--pika-messages=5000"]
    elif name == "watchdog":
        extra = ["--duration=2", "--warmup=1", "--timeout-calls=5"] if quick else []
    else:
        raise ValueError(f"unknown benchmark {name!r}")
    return common + extra


def newest_result(directory: Path, prefix: str) -> Path | None:
    """The latest complete ``<prefix>-<time>.json`` in ``directory`` (not ``-partial``, not profiles)."""
    found = [
        p for p in directory.glob(f"{prefix}-*.json") if p.stem[len(prefix) + 1 :].replace("-", "").isdigit()
    ]
    return max(found, key=lambda p: p.stem, default=None)


# --------------------------------------------------------------------------- rows


@dataclass
class Target:
    """``op`` (">=" or "<=") ``value``, checked on the ``stat`` of the row's ``on`` (figure or ratio)."""

    op: str
    value: float
    on: str = "figure"
    stat: str = "median"

    def text(self, unit: str) -> str:
        what = "ratio" if self.on == "ratio" else ("max" if self.stat == "max" else "")
        unit = "" if self.on == "ratio" else f" {unit}"
        return f"{what} {self.op} {self.value:g}{unit}".strip()

    def check(self, row: Row) -> bool | None:
        s = row.ratio if self.on == "ratio" else row.figure
        value = None if s is None else s.get(self.stat)
        if value is None:
            return None
        return value >= self.value if self.op == ">=" else value <= self.value


@dataclass
class Row:
    group: str
    case: str
    unit: str
    figure: dict[str, Any] | None
    baseline_label: str = ""
    baseline: dict[str, Any] | None = None
    ratio: dict[str, Any] | None = None
    target: Target | None = None
    met: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.target is not None:
            self.met = self.target.check(self)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = (
            None if self.target is None else {**asdict(self.target), "text": self.target.text(self.unit)}
        )
        data["verdict"] = verdict(self)
        return data


def stat(values: Sequence[float | None], digits: int = 3) -> dict[str, Any] | None:
    """Median, min and max (and the values) of what was measured; None when nothing was."""
    got = [v for v in values if v is not None]
    return summary(got, digits) if got else None


def one(value: float | None) -> dict[str, Any] | None:
    """A figure measured once."""
    return None if value is None else stat([value], 2)


def per_round_ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> dict[str, Any] | None:
    """num/den round by round (both measured in the same rounds), then the median; a constant
    ``den`` (one value) divides every round; otherwise the ratio of the medians."""
    if not num or not den:
        return None
    a, b = num.get("runs") or [], den.get("runs") or []
    if a and len(b) == 1:
        b = b * len(a)
    if a and len(a) == len(b):
        return stat([x / y if y else None for x, y in zip(a, b, strict=True)])
    if num.get("median") is None or not den.get("median"):
        return None
    return stat([num["median"] / den["median"]])


def vs(
    group: str,
    case: str,
    unit: str,
    figure: dict[str, Any] | None,
    baseline_label: str,
    baseline: dict[str, Any] | None,
    target: Target | None = None,
) -> Row:
    """A row whose ratio is its figure over its baseline, round by round (:func:`per_round_ratio`)."""
    return Row(group, case, unit, figure, baseline_label, baseline, per_round_ratio(figure, baseline), target)


def _get(doc: Any, *path: Any) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def sync_rows(doc: dict[str, Any]) -> list[Row]:
    cases = doc["cases"]
    main = cases["sync_proxy"]
    conns = main["connections"]
    g = "sync"

    def t(level: str | int, key: str, metric: str) -> Any:
        return _get(cases, "concurrency", str(level), "targets", key, metric)

    rows = [
        Row(
            g,
            f"gateway req/s, {conns} conns (1 process)",
            "req/s",
            _get(main, "targets", "gateway", "rps"),
            "nginx proxy_pass",
            _get(main, "targets", "nginx", "rps"),
            _get(main, "ratios", "gateway/nginx"),
            Target(">=", SYNC_RATIO_MIN, on="ratio"),
        ),
        vs(
            g,
            "added p50 at 1 conn (over direct)",
            "ms",
            _get(cases, "added_latency_1conn", "gateway-direct", "p50_ms"),
            "nginx proxy_pass",
            _get(cases, "added_latency_1conn", "nginx-direct", "p50_ms"),
            Target("<=", ADDED_LATENCY_MS_MAX),
        ),
        vs(
            g,
            f"gateway CPU s per 10k calls, {conns} conns",
            "s",
            _get(main, "targets", "gateway", "cpu_s_per_10k"),
            "nginx proxy_pass",
            _get(main, "targets", "nginx", "cpu_s_per_10k"),
        ),
    ]
    for level in sorted(int(c) for c in cases.get("concurrency", {})):
        rows.append(
            Row(
                g,
                f"c={level}: gateway req/s",
                "req/s",
                t(level, "gateway", "rps"),
                "nginx proxy_pass",
                t(level, "nginx", "rps"),
                _get(cases, "concurrency", str(level), "ratios", "gateway/nginx"),
            )
        )
        rows.append(
            vs(
                g,
                f"c={level}: gateway p99",
                "ms",
                t(level, "gateway", "p99_ms"),
                "nginx proxy_pass",
                t(level, "nginx", "p99_ms"),
            )
        )
    if "gateway-workers" in main["targets"]:
        label = _get(doc, "targets", "gateway-workers", "label") or "gateway --workers"
        n = label.rsplit(" ", 1)[-1] if "--workers" in label else "N"
        rows.append(
            Row(
                g,
                f"gateway --workers {n} req/s, {conns} conns",
                "req/s",
                _get(main, "targets", "gateway-workers", "rps"),
                "1 process",
                _get(main, "targets", "gateway", "rps"),
                _get(main, "ratios", "gateway-workers/gateway"),
            )
        )
        rows.append(
            vs(
                g,
                f"gateway --workers {n} CPU s/10k calls",
                "s",
                _get(main, "targets", "gateway-workers", "cpu_s_per_10k"),
                "1 process",
                _get(main, "targets", "gateway", "cpu_s_per_10k"),
            )
        )
    return rows


def accept_workers_rows(w: dict[str, Any] | None, a: dict[str, Any], settings: dict[str, Any]) -> list[Row]:
    """The accept rate through ``faas-gateway --workers N``, when the async script measured it."""
    if not w:
        return []
    n = settings.get("gateway_workers", "?")
    return [
        Row(
            "async",
            f"  accept via --workers {n}",
            "/s",
            w.get("gateway_202_per_s"),
            "raw pika confirmed",
            a.get("pika_msgs_per_s"),
            w.get("ratio"),
            Target(">=", ACCEPT_RATIO_MIN, on="ratio"),
        ),
        Row(
            "async",
            f"  accept via --workers {n} vs 1 process",
            "/s",
            w.get("gateway_202_per_s"),
            "1 process",
            a.get("gateway_202_per_s"),
            w.get("ratio_to_one_process"),
        ),
        Row(
            "async",
            f"  accept CPU ms/call, {n} processes",
            "ms",
            w.get("gateway_cpu_ms_per_call"),
            "1 process",
            a.get("gateway_cpu_ms_per_call"),
        ),
    ]


def async_rows(doc: dict[str, Any]) -> list[Row]:
    cases = doc["cases"]
    rounds = doc.get("rounds", [])
    settings = doc.get("settings", {})
    a, e, b = cases["accept"], cases["e2e"], cases["burst"]
    g = "async"
    pika_us = [_get(r, "pika", "cpu_us_per_msg") for r in rounds]
    pika_cpu = stat([None if us is None else us / 1000 for us in pika_us])
    gateway_cpu = a.get("gateway_cpu_ms_per_call")
    burst_n = settings.get("burst", 1000)
    rows = [
        Row(
            g,
            f"accept 202/s, wrk -c{settings.get('connections', '?')}",
            "/s",
            a.get("gateway_202_per_s"),
            "raw pika confirmed",
            a.get("pika_msgs_per_s"),
            a.get("ratio"),
            Target(">=", ACCEPT_RATIO_MIN, on="ratio"),
        ),
        vs(
            g,
            "accept CPU ms per call",
            "ms",
            gateway_cpu,
            "pika client per msg",
            pika_cpu,
        ),
        *accept_workers_rows(cases.get("accept_workers"), a, settings),
        Row(g, f"end to end, {settings.get('calls', '?')} calls", "/s", e.get("completions_per_s")),
        Row(g, "end to end CPU ms/call: worker", "ms", e.get("worker_cpu_ms_per_call")),
        Row(g, "end to end CPU ms/call: gateway", "ms", e.get("gateway_cpu_ms_per_call")),
        vs(
            g,
            f"{burst_n} x 1-s calls: last callback",
            "s",
            b.get("last_callback_s"),
            "one call alone",
            stat([1.0]),
            Target("<=", BURST_LAST_S_MAX),
        ),
    ]
    scaled = cases.get("burst_processes")
    if scaled:
        n, each = scaled["processes"], scaled["max_inflight_each"]
        rows.append(
            Row(
                g,
                f"  same via --processes {n} ({each} each)",
                "s",
                scaled.get("last_callback_s"),
                "1 process (1000)",
                b.get("last_callback_s"),
                scaled.get("last_callback_ratio_to_one_process"),
            )
        )
        rows.append(
            Row(
                g,
                f"  worker CPU ms/call, {n} processes",
                "ms",
                scaled.get("worker_cpu_ms_per_call"),
                "1 process",
                b.get("worker_cpu_ms_per_call"),
                scaled.get("worker_cpu_ratio_to_one_process"),
            )
        )
    late = cases.get("timeout_lateness", {})
    rows.append(
        Row(
            g,
            f"exec_timeout lateness ({late.get('samples', 0)} calls)",
            "ms",
            late.get("total_ms"),
            target=Target("<=", LATENESS_MS_MAX, stat="max"),
        )
    )
    memory = cases.get("memory", {})
    rows.append(
        Row(
            g,
            "worker KiB per in-flight call",
            "KiB",
            one(_get(memory, "worker", "kib_per_call")),
            target=Target("<=", WORKER_KIB_MAX),
        )
    )
    rows.append(Row(g, "gateway KiB per held sync call", "KiB", one(_get(memory, "gateway", "kib_per_call"))))
    return rows


def watchdog_rows(doc: dict[str, Any]) -> list[Row]:
    g = "watchdog"
    rows = []
    for entry in doc.get("throughput", {}).values():
        label = f"{entry['mode']} c={entry['connections']}"
        rows.append(
            Row(
                g,
                f"{label}: via gateway req/s",
                "req/s",
                _get(entry, "gateway", "rps"),
                "watchdog directly",
                _get(entry, "direct", "rps"),
                _get(entry, "gateway/direct", "rps"),
            )
        )
        rows.append(
            vs(
                g,
                f"{label}: gateway CPU s/10k calls",
                "s",
                _get(entry, "gateway", "cpu_s_per_10k", "gateway"),
                "watchdog's own",
                _get(entry, "gateway", "cpu_s_per_10k", "watchdog"),
            )
        )
    for path in ("direct", "gateway"):
        f = _get(doc, "lateness", path)
        if f is None:
            continue
        late = {k: f["late_ms"][k] for k in ("median", "min", "max")}
        statuses = ", ".join(f"{n}x{code}" for code, n in sorted(f.get("statuses", {}).items()))
        rows.append(
            Row(
                g,
                f"504 lateness, {path} ({f['calls']} calls)",
                "ms",
                late,
                target=Target("<=", LATENESS_MS_MAX, stat="max"),
                note=statuses,
            )
        )
    return rows


ROWS = {"sync": sync_rows, "async": async_rows, "watchdog": watchdog_rows}


# --------------------------------------------------------------------------- noise


def noise(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """What the script recorded of the rest of the machine: load averages and ``others`` (cores)."""
    env = doc.get("environment", {})
    others: list[float] = []
    if name in ("sync", "watchdog"):
        for r in doc.get("runs", []):
            seconds = r.get("seconds") or 0
            if seconds:
                others.append(r.get("cpu_s", {}).get("others", 0.0) / seconds)
    elif name == "async":
        for r in doc.get("rounds", []):
            for case in ("accept", "accept_workers", "pika", "e2e", "burst", "burst_processes"):
                value = _get(r, case, "others_cores")
                if value is not None:
                    others.append(value)
    return {
        "load_before": [round(v, 2) for v in env.get("load_before", [])],
        "load_after": [round(v, 2) for v in env.get("load_after", [])],
        "others_cores": stat(others, 2),
        "txfaas_commit": env.get("txfaas_commit"),
    }


# --------------------------------------------------------------------------- output


def _digits(value: float) -> int:
    size = abs(value)
    return 0 if size >= 1000 else 1 if size >= 100 else 2 if size >= 10 else 3


def num(value: float | None, digits: int | None = None) -> str:
    """A figure with as many digits as its size deserves (or as ``digits`` says)."""
    if value is None:
        return "-"
    return f"{value:.{_digits(value) if digits is None else digits}f}"


def mm(s: dict[str, Any] | None, digits: int | None = None) -> str:
    if not s or s.get("median") is None:
        return "-"
    d = _digits(s["median"]) if digits is None else digits  # min and max as precise as the median
    if s["min"] == s["max"]:
        return num(s["median"], d)
    return f"{num(s['median'], d)} ({num(s['min'], d)}-{num(s['max'], d)})"


def verdict(row: Row) -> str:
    if row.target is None:
        return ""
    return {True: "met", False: "NOT met", None: "not measured"}[row.met]


def table(rows: list[Row], noises: dict[str, dict[str, Any]], header: str) -> str:
    cols = [
        ("case", 40),
        ("figure: median (min-max)", 30),
        ("baseline", 42),
        ("ratio", 24),
        ("target", 18),
        ("", 12),
    ]
    lines = [header, "", "".join(f"{title:<{w}}" for title, w in cols).rstrip()]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append(f"[{group}]")
        base = f"{row.baseline_label} {mm(row.baseline)}".strip() if row.baseline_label else ""
        cells = [
            row.case,
            f"{mm(row.figure)} {row.unit}" if row.figure else "- (not measured)",
            base,
            mm(row.ratio) if row.ratio else "",
            row.target.text(row.unit) if row.target else "",
            verdict(row) + (f"  [{row.note}]" if row.note else ""),
        ]
        lines.append("".join(f"{c:<{w}}" for c, (_, w) in zip(cells, cols, strict=True)).rstrip())
    lines += ["", "noise: load average (1, 5, 15 min) before -> after; others = CPU cores the rest of the"]
    lines += ["machine used during the runs (median, min-max), as each script recorded it"]
    for name, n in noises.items():
        before = "/".join(f"{v:.2f}" for v in n["load_before"]) or "?"
        after = "/".join(f"{v:.2f}" for v in n["load_after"]) or "?"
        lines.append(f"  {name:<9} load {before} -> {after}; others {mm(n['others_cores'], 2)} cores")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def run_script(name: str, argv: list[str], results: Path) -> tuple[int, Path | None]:
    """Run one benchmark to its end (its output goes to ours); its exit status and its JSON."""
    command = [sys.executable, str(BENCH / SCRIPTS[name]), *argv]
    say(f"\n=== {name}: {' '.join(command[1:])}")
    proc = subprocess.Popen(command, cwd=ROOT)
    try:
        status = proc.wait()
    except BaseException:
        # Ctrl-C reached it too (same process group); SIGTERM is passed on. Let it clean up.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    found = newest_result(results, PREFIXES[name]) if status == 0 else None
    return status, found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of every script (medians over them) [3]")
    p.add_argument("--quick", action="store_true", help="1 round and short runs: a smoke run of the chain")
    p.add_argument(
        "--only",
        action="append",
        choices=ORDER,
        help="run only this benchmark (repeat for several) [all three]",
    )
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where files go [bench/results]")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = args.results / f"all-{stamp}"
    sub = base  # the scripts' own files go into a folder of this run
    sub.mkdir(parents=True, exist_ok=True)
    names = [n for n in ORDER if not args.only or n in args.only]
    try:
        ensure_commands({"wrk": "wrk", "nginx": "nginx"})
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    load_before = os.getloadavg()
    started = time.monotonic()
    sources: dict[str, Any] = {}
    rows: list[Row] = []
    noises: dict[str, dict[str, Any]] = {}
    failed = []
    try:
        for name in names:
            status, path = run_script(name, script_args(name, args.rounds, args.quick, sub), sub)
            sources[name] = {"exit": status, "json": str(path) if path else None}
            if status != 0 or path is None:
                failed.append(name)
                say(f"=== {name}: FAILED (exit {status}); going on with the others")
                continue
            doc = json.loads(path.read_text())
            rows += ROWS[name](doc)
            noises[name] = noise(name, doc)
            if name == "sync" and doc.get("plot"):
                sources[name]["plot"] = doc["plot"]
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: each benchmark stopped what it had started\n")
        return 130
    rounds = 1 if args.quick else args.rounds
    header = (
        f"txfaas benchmark suite, {os.cpu_count()} cores, {stamp}: median of {rounds} round(s) (min-max); "
        "ratio = figure / baseline, per round then the median"
    )
    if args.quick:
        header += "\nQUICK smoke run: 1 round, short runs; the figures are not comparable to the targets"
    if rounds < 3:
        header += "\n(the issue asks for the median of at least 3 rounds)"
    text = table(rows, noises, header)
    plot = sources.get("sync", {}).get("plot")
    if plot:
        text += f"\n\nplot (req/s and p99 against connections {', '.join(map(str, SWEEP))}): {plot}"
    if failed:
        text += f"\n\nFAILED: {', '.join(failed)} (see its output above; a -partial.json may be in {sub})"
    result = {
        "benchmark": "all",
        "started": stamp,
        "settings": {"rounds": rounds, "quick": args.quick, "benchmarks": names},
        "environment": {
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "targets": {
            "sync gateway/nginx >=": SYNC_RATIO_MIN,
            "sync added p50 at 1 connection ms <=": ADDED_LATENCY_MS_MAX,
            "async accept / raw pika >=": ACCEPT_RATIO_MIN,
            "1000 one-second calls, last callback s <=": BURST_LAST_S_MAX,
            "exec_timeout lateness ms (max) <=": LATENESS_MS_MAX,
            "worker KiB per in-flight call <=": WORKER_KIB_MAX,
        },
        "sources": sources,
        "plot": plot,
        "failed": failed,
        "noise": noises,
        "cases": [r.to_json() for r in rows],
    }
    write_results(base, result, text, note=f"; each script's files: {sub}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
