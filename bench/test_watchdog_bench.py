"""Tests of the watchdog benchmark's own arithmetic and process checks (no service, no wrk).

Run with ``.venv/bin/pytest -p no:cacheprovider bench/test_watchdog_bench.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WrkResult
from watchdog_bench import Case, Run, analyse_throughput, descendants, lateness_figures, pids_with_argv


def _run(rnd: int, case: Case, path: str, rps: float, p50: float, p99: float, **cpu: float) -> Run:
    result = WrkResult(rps=rps, p50_ms=p50, p99_ms=p99, requests=int(rps * 8), seconds=8.0, cpu_s=cpu)
    return Run(rnd, case, path, result)


def test_ratios_are_gateway_over_direct_per_round_then_the_median() -> None:
    """Each round's gateway figure is divided by the same round's direct one; the median of those is
    reported (not the ratio of the medians), for req/s, p50 and p99."""
    case = Case("http", 10)
    runs = [
        _run(1, case, "direct", 1000, 2.0, 10.0),
        _run(1, case, "gateway", 500, 6.0, 20.0),
        _run(2, case, "direct", 4000, 1.0, 10.0),
        _run(2, case, "gateway", 1000, 4.0, 40.0),
        _run(3, case, "direct", 2000, 2.0, 5.0),
        _run(3, case, "gateway", 600, 5.0, 15.0),
    ]
    out = analyse_throughput(runs, [case])["http-c10"]
    assert out["gateway/direct"]["rps"]["runs"] == [0.5, 0.25, 0.3]
    assert out["gateway/direct"]["rps"]["median"] == 0.3  # the ratio of medians would be 0.3 too: check p50
    assert out["gateway/direct"]["p50_ms"]["median"] == 3.0  # runs 3.0, 4.0, 2.5 (medians: 5.0/2.0 = 2.5)
    assert out["gateway/direct"]["p99_ms"]["median"] == 3.0  # runs 2.0, 4.0, 3.0
    assert out["direct"]["rps"]["median"] == 2000
    assert out["gateway"]["p99_ms"]["max"] == 40.0


def test_cpu_per_10k_calls_divides_by_the_requests_of_the_run() -> None:
    """CPU seconds of a group over a run / requests completed * 10,000; a group not watched counts 0."""
    case = Case("fork", 10)
    runs = [
        _run(1, case, "direct", 250, 30.0, 90.0, watchdog=0.4, function=0.5),  # 2000 requests
        _run(1, case, "gateway", 500, 20.0, 80.0, gateway=0.8, watchdog=0.6, function=1.0),  # 4000
    ]
    out = analyse_throughput(runs, [case])["fork-c10"]
    assert out["direct"]["cpu_s_per_10k"]["watchdog"]["median"] == 2.0
    assert out["direct"]["cpu_s_per_10k"]["function"]["median"] == 2.5
    assert out["direct"]["cpu_s_per_10k"]["gateway"]["median"] == 0.0
    assert out["gateway"]["cpu_s_per_10k"]["gateway"]["median"] == 2.0


def test_lateness_is_response_time_minus_the_exec_timeout_in_ms() -> None:
    """Late = elapsed - 1 s, in milliseconds; median and max; statuses counted."""
    samples = [
        {"status": 504, "elapsed_s": 1.004},
        {"status": 504, "elapsed_s": 1.010},
        {"status": 200, "elapsed_s": 1.250},
    ]
    out = lateness_figures(samples, 1.0)
    assert out["late_ms"] == {"median": 10.0, "max": 250.0, "min": 4.0}
    assert out["statuses"] == {"504": 2, "200": 1}
    assert out["calls"] == 3


def test_process_lookups_find_our_own_child_and_its_exact_command_line() -> None:
    """descendants() sees a child of this process; pids_with_argv() matches the whole argv exactly, so
    another program's 'sleep 100' is not taken for the benchmark's tagged one."""
    argv = ["sleep", "30.424242"]
    child = subprocess.Popen(argv)
    try:
        # Popen may return before the child has exec'd (its /proc cmdline is empty until then).
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            os.sched_yield()
        assert child.pid in descendants(os.getpid())
        assert pids_with_argv(argv) == [child.pid]
        assert pids_with_argv(["sleep", "30.42424"]) == []
    finally:
        child.kill()
        child.wait()
    assert pids_with_argv(argv) == []
