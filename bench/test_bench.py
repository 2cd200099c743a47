"""Tests of the benchmark's own arithmetic: wrk parsing, per-round ratios, profile summaries.

Run with ``.venv/bin/pytest bench/test_bench.py`` (not part of the suite under tests/: the
benchmark is a tool, and these need no service).  The nginx config test runs only where
nginx is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import sync_proxy
from harness import BenchError, WrkResult, latency_ms, parse_wrk, summary

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:8080/function/bench
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    42.10ms   12.00ms 130.62ms   80.00%
    Req/Sec   560.00     50.00   700.00     70.00%
  Latency Distribution
     50%   34.65ms
     75%   45.00ms
     90%  100.00ms
     99%    1.31s
  11200 requests in 10.00s, 2.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   1120.00
Transfer/sec:    204.00KB
"""


def test_latency_units_are_converted_to_milliseconds():
    assert latency_ms("415.09us") == pytest.approx(0.41509)
    assert latency_ms("1.03ms") == pytest.approx(1.03)
    assert latency_ms("2.00s") == pytest.approx(2000.0)
    assert latency_ms("1.50m") == pytest.approx(90_000.0)
    with pytest.raises(ValueError):
        latency_ms("12 parsecs")


def test_parse_wrk_reads_rate_percentiles_counts_and_errors():
    result = parse_wrk(WRK_OUTPUT)
    assert result.rps == pytest.approx(1120.0)
    assert result.p50_ms == pytest.approx(34.65)
    assert result.p99_ms == pytest.approx(1310.0)  # '1.31s', not the 'Max' column
    assert result.requests == 11200
    assert result.seconds == pytest.approx(10.0)
    assert result.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 3}
    assert result.non_2xx == 7
    assert result.errors == 12


def test_parse_wrk_without_latency_distribution_is_an_error():
    """Without --latency there is no 50%/99% line: refuse rather than report zeros."""
    text = "\n".join(line for line in WRK_OUTPUT.splitlines() if "%  " not in line)
    with pytest.raises(BenchError):
        parse_wrk(text)


def test_run_wrk_refuses_non_loopback_targets():
    with pytest.raises(BenchError):
        harness.run_wrk("http://10.0.0.1:80/", 1, 1)


def _run(rnd, target, c, rps, p50, p99=1.0, requests=10_000, cpu=None):
    return sync_proxy.Run(rnd, c, target, WrkResult(rps, p50, p99, requests, 10.0, cpu_s=cpu or {}))


def _targets():
    return [
        sync_proxy.Target("direct", "(a)", "http://127.0.0.1:1/", "function"),
        sync_proxy.Target("nginx", "(b)", "http://127.0.0.1:2/", "nginx-proxy"),
        sync_proxy.Target("gateway", "(c)", "http://127.0.0.1:3/function/bench", "gateway"),
    ]


def test_ratios_are_taken_per_round_then_medianed():
    """c/b is the median of per-round ratios, so a noisy round moves numerator and denominator together."""
    runs = []
    # round: (a, b, c) req/s at 50 connections; at 1 connection the p50s feed the added latency.
    for rnd, (a, b, c) in enumerate([(100.0, 50.0, 5.0), (10.0, 5.0, 0.5), (100.0, 40.0, 1.0)], 1):
        runs += [_run(rnd, "direct", 50, a, 1.0), _run(rnd, "nginx", 50, b, 1.0)]
        runs += [_run(rnd, "gateway", 50, c, 1.0, cpu={"gateway": 3.5})]
        runs += [_run(rnd, "direct", 1, 1.0, 0.1 * rnd), _run(rnd, "nginx", 1, 1.0, 0.15 * rnd)]
        runs += [_run(rnd, "gateway", 1, 1.0, 0.1 * rnd + 0.5)]
    cases = sync_proxy.analyse(runs, _targets(), [1, 50], 50)
    ratios = cases["sync_proxy"]["ratios"]
    # Per round: 0.1, 0.1, 0.025 -> median 0.1 (the ratio of medians would be 5/40 = 0.125).
    assert ratios["gateway/nginx"]["median"] == pytest.approx(0.1)
    assert ratios["gateway/nginx"]["min"] == pytest.approx(0.025)
    assert ratios["gateway/direct"]["median"] == pytest.approx(0.05)
    assert ratios["nginx/direct"]["median"] == pytest.approx(0.5)
    assert cases["sync_proxy"]["targets"]["nginx"]["rps"]["median"] == pytest.approx(40.0)
    goals = cases["sync_proxy"]["goals"]
    assert goals["issue 2"]["met"] is True and goals["issue 6"]["met"] is False  # 0.1: >= 0.06, < 0.12
    assert cases["added_latency_1conn_goal"]["met"] is False  # +0.5 ms
    added = cases["added_latency_1conn"]
    assert added["gateway-direct"]["p50_ms"]["median"] == pytest.approx(0.5)
    assert added["nginx-direct"]["p50_ms"]["median"] == pytest.approx(0.1)
    # 3.5 CPU-seconds over 10,000 requests is 3.5 s per 10k calls.
    assert cases["cpu_s_per_10k_calls"]["gateway"]["median"] == pytest.approx(3.5)
    text = sync_proxy.table(cases, _targets(), 3, [1, 50])
    assert "goal (issue 2) gateway/nginx >= 0.06: met" in text
    assert "goal (issue 6) gateway/nginx >= 0.12: NOT met" in text
    assert "goal (issue 6) gateway p50 added <= 0.2 ms: NOT met" in text


def test_summary_keeps_runs_and_handles_no_values():
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
    assert summary([])["median"] is None


def test_stack_summary_counts_self_inclusive_and_areas_without_the_reactor_trunk():
    trunk = "<module> (twistd);ReactorBase.run (twisted/internet/base.py)"
    lines = [
        f"{trunk};FunctionProxy._proxy (txfaas/gateway/proxy.py);URL.from_text (hyperlink/_url.py) 30",
        f"{trunk};FunctionProxy._proxy (txfaas/gateway/proxy.py) 10",
        f"{trunk};Connection.writeSomeData (twisted/internet/tcp.py);untilConcludes (twisted/python/util.py) 60",
        "garbage line",
    ]
    report = sync_proxy.summarise_stacks(lines)
    assert report["samples"] == 100
    assert dict(report["self"])["URL.from_text (hyperlink/_url.py)"] == 30.0
    inclusive = dict(report["inclusive"])
    assert inclusive["FunctionProxy._proxy (txfaas/gateway/proxy.py)"] == 40.0
    assert not any("ReactorBase.run" in name for name in inclusive)
    areas = dict(report["self_by_area"])
    assert areas["socket send syscall (tcp writeSomeData)"] == 60.0
    assert areas["hyperlink (URL parsing)"] == 30.0


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_configs_are_accepted_by_nginx(tmp_path):
    tmp_path.chmod(0o755)
    for name, conf in (
        ("function", harness.nginx_function_conf(tmp_path, 18080)),
        ("proxy", harness.nginx_proxy_conf(tmp_path, 18081, 18080)),
    ):
        path = tmp_path / f"{name}.conf"
        path.write_text(conf)
        check = subprocess.run(
            ["nginx", "-t", "-p", str(tmp_path), "-e", str(tmp_path / "e.log"), "-c", str(path)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
    assert "keepalive 64;" in conf and 'proxy_set_header Connection "";' in conf


# --------------------------------------------------------------------------- the shared running helpers


def test_a_failed_run_leaves_a_partial_file_with_the_error_and_what_was_measured(tmp_path):
    results: dict = {"benchmark": "x"}
    with (
        pytest.raises(BenchError),
        harness.partial_on_failure(tmp_path / "x-1", results, lambda: {"runs": [1]}),
    ):
        raise BenchError("wrk failed")
    partial = json.loads((tmp_path / "x-1-partial.json").read_text())
    assert partial == {"benchmark": "x", "incomplete": "BenchError: wrk failed", "runs": [1]}


def test_no_partial_file_when_nothing_was_measured_yet(tmp_path):
    with pytest.raises(KeyboardInterrupt), harness.partial_on_failure(tmp_path / "x-1", {}, lambda: None):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_hung_wrk_is_run_once_more_warm_up_included_but_not_a_third_time(monkeypatch):
    calls = []

    def fake_run_wrk(url, connections, seconds, **kwargs):
        calls.append(seconds)
        if seconds == 10 and calls.count(10) == 1:
            raise harness.WrkTimeout("hung")
        return "result"

    monkeypatch.setattr(harness, "run_wrk", fake_run_wrk)
    assert harness.measured_wrk("http://127.0.0.1:1/", 1, 10, 2) == "result"
    assert calls == [2, 10, 2, 10]
    monkeypatch.setattr(harness, "run_wrk", lambda *a, **k: (_ for _ in ()).throw(harness.WrkTimeout("hung")))
    with pytest.raises(harness.WrkTimeout):
        harness.measured_wrk("http://127.0.0.1:1/", 1, 10, 0)


def test_run_main_stops_what_was_started_and_turns_errors_into_exit_statuses(monkeypatch):
    monkeypatch.setattr(harness, "stop_on_signals", lambda: None)
    stopped = []

    def failing(error):
        def run(args, stack):
            stack.callback(stopped.append, args)
            raise error

        return run

    assert harness.run_main(failing(BenchError("no wrk")), "a") == 1
    assert harness.run_main(failing(KeyboardInterrupt()), "b") == 130
    assert harness.run_main(lambda args, stack: 0, "c") == 0
    assert stopped == ["a", "b"]
