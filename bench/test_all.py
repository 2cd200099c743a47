"""Tests of ``bench/all.py``: the command lines it gives each script, how it finds their results,
and the one table (figures, baselines, per-round ratios, targets and verdicts, noise) it makes of
their JSON; and of the worker-scaling case (3b) it asks ``async_bench.py`` for.

Run with ``.venv/bin/pytest -p no:cacheprovider bench/test_all.py`` (no service needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import all as suite
import async_bench
import sync_proxy
import watchdog_bench
from harness import summary


def s(*runs: float) -> dict:
    return summary(list(runs))


def by_case(rows: list[suite.Row]) -> dict[str, suite.Row]:
    return {r.case: r for r in rows}


# --------------------------------------------------------------------------- command lines


def test_full_run_asks_sync_for_the_plot_and_two_gateway_workers_and_async_for_two_worker_processes(
    tmp_path,
):
    sync = suite.script_args("sync", 3, False, tmp_path)
    assert "--rounds=3" in sync and "--plot" in sync and "--gateway-workers=2" in sync
    assert f"--results={tmp_path}" in sync
    assert "--scaling-processes=2" in suite.script_args("async", 3, False, tmp_path)
    assert "--gateway-workers=2" in suite.script_args("async", 3, False, tmp_path)
    assert suite.script_args("watchdog", 5, False, tmp_path) == ["--rounds=5", f"--results={tmp_path}"]


def test_quick_is_one_round_and_short_runs_whatever_rounds_says(tmp_path):
    for name in suite.ORDER:
        argv = suite.script_args(name, 3, True, tmp_path)
        assert "--rounds=1" in argv
        assert any(a.startswith("--duration=") for a in argv)


@pytest.mark.parametrize(
    ("name", "module"), [("sync", sync_proxy), ("async", async_bench), ("watchdog", watchdog_bench)]
)
@pytest.mark.parametrize("quick", [False, True])
def test_every_argument_given_to_a_script_is_one_it_accepts(tmp_path, name, module, quick):
    args = module.parse_args(suite.script_args(name, 3, quick, tmp_path))
    assert args.results == tmp_path


def test_the_newest_complete_result_is_found_not_a_partial_or_profile_file(tmp_path):
    for name in (
        "sync_proxy-20261128-010000.json",
        "sync_proxy-20261128-020000.json",
        "sync_proxy-20261128-030000-partial.json",
        "sync_proxy-20261128-040000-profile.json",
        "async_bench-20261128-050000.json",
    ):
        (tmp_path / name).write_text("{}")
    assert suite.newest_result(tmp_path, "sync_proxy") == tmp_path / "sync_proxy-20261128-020000.json"
    assert suite.newest_result(tmp_path, "watchdog") is None


# --------------------------------------------------------------------------- arithmetic


def test_ratio_is_taken_round_by_round_then_medianed_not_of_the_medians():
    # per round 10/5=2, 30/10=3, 20/4=5 -> median 3; the medians' ratio would be 20/5=4
    ratio = suite.per_round_ratio(s(10, 30, 20), s(5, 10, 4))
    assert (ratio["median"], ratio["min"], ratio["max"]) == (3.0, 2.0, 5.0)


def test_a_single_baseline_value_divides_every_round():
    assert suite.per_round_ratio(s(2, 4, 6), s(2))["runs"] == [1.0, 2.0, 3.0]


def test_no_ratio_without_both_figures():
    assert suite.per_round_ratio(None, s(1)) is None
    assert suite.per_round_ratio(s(1), None) is None


def test_target_on_the_ratio_is_checked_on_the_ratio_median():
    row = suite.Row(
        "g", "c", "req/s", s(100), "b", s(1000), s(0.11, 0.12, 0.2), suite.Target(">=", 0.12, "ratio")
    )
    assert row.met is True and suite.verdict(row) == "met"
    row = suite.Row(
        "g", "c", "req/s", s(100), "b", s(1000), s(0.11, 0.119, 0.2), suite.Target(">=", 0.12, "ratio")
    )
    assert row.met is False and suite.verdict(row) == "NOT met"


def test_target_on_the_max_fails_on_one_late_sample_though_the_median_is_fine():
    row = suite.Row("g", "c", "ms", s(5, 6, 101), target=suite.Target("<=", 100, stat="max"))
    assert row.met is False


def test_a_target_with_nothing_measured_is_not_measured_rather_than_met():
    row = suite.Row("g", "c", "KiB", None, target=suite.Target("<=", 50))
    assert suite.verdict(row) == "not measured"


def test_figures_keep_the_medians_precision_for_min_and_max():
    assert suite.mm(s(0.368, 0.331, 0.424)) == "0.368 (0.331-0.424)"
    assert suite.mm(s(15.76, 8.0, 20.44)) == "15.76 (8.00-20.44)"
    assert suite.mm(s(3024.4, 2580.2, 3047.0)) == "3024 (2580-3047)"
    assert suite.mm(s(13.89)) == "13.89"
    assert suite.mm(None) == "-"


# --------------------------------------------------------------------------- rows from each script's JSON


def _level(gw: float, ng: float, gw_p99: float, ng_p99: float, ratio: float) -> dict:
    target = lambda rps, p99: {"rps": s(rps), "p99_ms": s(p99), "cpu_s_per_10k": s(1.0)}  # noqa: E731
    return {
        "targets": {"gateway": target(gw, gw_p99), "nginx": target(ng, ng_p99)},
        "ratios": {"gateway/nginx": s(ratio)},
    }


SYNC = {
    "environment": {"load_before": [1.0, 2.0, 3.0], "load_after": [1.5, 2.0, 3.0], "txfaas_commit": "abc"},
    "targets": {"gateway-workers": {"label": "(c'') gateway --workers 2"}},
    "cases": {
        "sync_proxy": {
            "connections": 50,
            "targets": {
                "direct": {"rps": s(80000), "cpu_s_per_10k": s(0.07)},
                "nginx": {"rps": s(60000, 64000), "cpu_s_per_10k": s(0.13, 0.12)},
                "gateway": {"rps": s(7800, 8000), "cpu_s_per_10k": s(2.6, 2.4)},
                "gateway-workers": {"rps": s(9000, 12000), "cpu_s_per_10k": s(2.6, 3.0)},
            },
            "ratios": {"gateway/nginx": s(0.13, 0.125), "gateway-workers/gateway": s(1.15, 1.5)},
        },
        "added_latency_1conn": {
            "nginx-direct": {"p50_ms": s(0.02, 0.04), "p99_ms": s(1)},
            "gateway-direct": {"p50_ms": s(0.3, 0.2), "p99_ms": s(9)},
        },
        "concurrency": {str(c): _level(2000 + c, 40000, 10 + c, 2, 0.05) for c in (1, 10, 50, 200)},
    },
    "runs": [
        {"seconds": 10.0, "cpu_s": {"others": 5.0}},
        {"seconds": 10.0, "cpu_s": {"others": 10.0}},
    ],
}


def test_sync_rows_judge_the_one_process_gateway_against_nginx_and_the_added_latency():
    rows = by_case(suite.sync_rows(SYNC))
    main = rows["gateway req/s, 50 conns (1 process)"]
    assert main.baseline["median"] == 62000 and main.ratio["median"] == pytest.approx(0.1275, abs=0.001)
    assert main.met is True  # ratio >= 0.12
    added = rows["added p50 at 1 conn (over direct)"]
    assert added.figure["median"] == 0.25 and added.met is False  # > 0.2 ms
    assert added.ratio["runs"] == [15.0, 5.0]  # per round: 0.3/0.02, 0.2/0.04


def test_sync_rows_have_req_s_and_p99_at_every_level_of_the_sweep():
    rows = by_case(suite.sync_rows(SYNC))
    for c in (1, 10, 50, 200):
        assert rows[f"c={c}: gateway req/s"].figure["median"] == 2000 + c
        assert rows[f"c={c}: gateway req/s"].ratio["median"] == 0.05
        assert rows[f"c={c}: gateway p99"].ratio["median"] == pytest.approx((10 + c) / 2)


def test_sync_rows_show_the_workers_scaling_against_one_process():
    rows = by_case(suite.sync_rows(SYNC))
    scaling = rows["gateway --workers 2 req/s, 50 conns"]
    assert scaling.ratio["median"] == pytest.approx(1.325) and scaling.target is None
    cpu = rows["gateway --workers 2 CPU s/10k calls"]
    assert cpu.ratio["runs"] == [1.0, 1.25]


def test_sync_noise_is_others_cores_per_run_and_the_load_averages():
    n = suite.noise("sync", SYNC)
    assert n["others_cores"]["median"] == 0.75 and n["load_before"] == [1.0, 2.0, 3.0]


def _async_round(rps: float, pika: float, last: float, last2: float | None) -> dict:
    r = {
        "accept": {"others_cores": 0.5},
        "pika": {"rate": pika, "cpu_us_per_msg": 12.0, "others_cores": 0.4},
        "accept_ratio": rps / pika,
        "e2e": {"others_cores": 0.3},
        "burst": {"last_callback_s": last, "worker_cpu_ms_per_call": 2.0, "others_cores": 0.2},
    }
    if last2 is not None:
        r["burst_processes"] = {
            "processes": 2,
            "max_inflight_each": 500,
            "post_all_s": 0.8,
            "last_callback_s": last2,
            "worker_cpu_ms_per_call": 3.0,
            "others_cores": 0.1,
        }
    return r


def _async_doc(rounds: list[dict], worker_kib: float | None = 13.9) -> dict:
    cases = {
        "accept": {
            "gateway_202_per_s": s(*[r["accept_ratio"] * r["pika"]["rate"] for r in rounds]),
            "pika_msgs_per_s": s(*[r["pika"]["rate"] for r in rounds]),
            "ratio": s(*[r["accept_ratio"] for r in rounds]),
            "gateway_cpu_ms_per_call": s(*[0.42 for _ in rounds]),
        },
        "e2e": {
            "completions_per_s": s(300),
            "worker_cpu_ms_per_call": s(2),
            "gateway_cpu_ms_per_call": s(0.6),
        },
        "burst": {
            "last_callback_s": s(*[r["burst"]["last_callback_s"] for r in rounds]),
            "worker_cpu_ms_per_call": s(2.0),
        },
        **async_bench._analyse_scaling(rounds),
        "timeout_lateness": {"samples": 3, "total_ms": {"median": 5.0, "min": 3.0, "max": 120.0}},
        "memory": {} if worker_kib is None else {"worker": {"kib_per_call": worker_kib}},
    }
    return {
        "settings": {"connections": 50, "calls": 2000, "burst": 1000},
        "environment": {"load_before": [2, 2, 2], "load_after": [3, 3, 3]},
        "cases": cases,
        "rounds": rounds,
    }


def test_async_rows_judge_accept_burst_lateness_and_memory_by_the_issues_targets():
    doc = _async_doc([_async_round(3000, 10000, 2.5, 2.0), _async_round(2000, 10000, 3.5, 3.0)])
    rows = by_case(suite.async_rows(doc))
    accept = rows["accept 202/s, wrk -c50"]
    assert accept.ratio["median"] == 0.25 and accept.met is True
    assert rows["accept CPU ms per call"].ratio["median"] == pytest.approx(35.0)  # 0.42 ms / 12 us
    burst = rows["1000 x 1-s calls: last callback"]
    assert burst.figure["median"] == 3.0 and burst.met is True
    assert rows["exec_timeout lateness (3 calls)"].met is False  # max 120 ms
    assert rows["worker KiB per in-flight call"].met is True


def test_async_worker_scaling_rows_compare_two_processes_with_one_in_the_same_round():
    doc = _async_doc([_async_round(3000, 10000, 4.0, 2.0), _async_round(2000, 10000, 3.0, 3.0)])
    rows = by_case(suite.async_rows(doc))
    scaled = rows["  same via --processes 2 (500 each)"]
    assert scaled.ratio["runs"] == [0.5, 1.0]
    assert scaled.baseline["median"] == 3.5
    assert rows["  worker CPU ms/call, 2 processes"].ratio["median"] == 1.5


def test_async_without_scaling_or_memory_has_no_scaling_row_and_memory_not_measured():
    rows = by_case(suite.async_rows(_async_doc([_async_round(1, 10, 4, None)], worker_kib=None)))
    assert not any("--processes" in case for case in rows)
    assert suite.verdict(rows["worker KiB per in-flight call"]) == "not measured"


def test_async_noise_takes_others_of_every_case_of_every_round():
    n = suite.noise("async", _async_doc([_async_round(1, 10, 4, 2)]))
    assert sorted(n["others_cores"]["runs"]) == [0.1, 0.2, 0.3, 0.4, 0.5]


WATCHDOG = {
    "throughput": {
        "http-c50": {
            "mode": "http",
            "connections": 50,
            "direct": {"rps": s(3300)},
            "gateway": {"rps": s(1600), "cpu_s_per_10k": {"gateway": s(3.2, 3.4), "watchdog": s(3.2, 3.4)}},
            "gateway/direct": {"rps": s(0.48, 0.5)},
        }
    },
    "lateness": {
        "direct": {"calls": 20, "late_ms": {"median": 4.4, "min": 4.0, "max": 17.4}, "statuses": {"504": 20}},
        "gateway": {
            "calls": 20,
            "late_ms": {"median": 5.3, "min": 5.0, "max": 100.5},
            "statuses": {"504": 20},
        },
    },
}


def test_watchdog_rows_compare_the_gateway_path_with_the_watchdog_directly_and_judge_the_504s():
    rows = by_case(suite.watchdog_rows(WATCHDOG))
    http = rows["http c=50: via gateway req/s"]
    assert http.ratio["median"] == 0.49 and http.baseline["median"] == 3300
    assert rows["http c=50: gateway CPU s/10k calls"].ratio["runs"] == [1.0, 1.0]
    assert rows["504 lateness, direct (20 calls)"].met is True
    assert rows["504 lateness, gateway (20 calls)"].met is False  # max 100.5 ms
    assert rows["504 lateness, gateway (20 calls)"].note == "20x504"


def test_one_table_has_every_row_its_verdicts_and_each_scripts_noise():
    rows = suite.sync_rows(SYNC) + suite.watchdog_rows(WATCHDOG)
    text = suite.table(rows, {"sync": suite.noise("sync", SYNC)}, "header")
    lines = text.splitlines()
    assert lines[0] == "header"
    assert "[sync]" in lines and "[watchdog]" in lines
    main = next(line for line in lines if line.startswith("gateway req/s, 50 conns"))
    assert "7900 (7800-8000) req/s" in main and "nginx proxy_pass 62000" in main
    assert "ratio >= 0.12" in main and main.endswith("met")
    assert any(line.startswith("  sync") and "others 0.75 (0.50-1.00) cores" in line for line in lines)


def test_rows_serialise_with_their_target_text_and_verdict():
    row = by_case(suite.sync_rows(SYNC))["gateway req/s, 50 conns (1 process)"]
    data = json.loads(json.dumps(row.to_json()))
    assert data["target"]["text"] == "ratio >= 0.12" and data["verdict"] == "met"
    assert data["figure"]["median"] == 7900


# --------------------------------------------------------------------------- async_bench's scaling case


def test_async_scaling_case_ratios_are_per_round_against_the_one_process_burst():
    rounds = [_async_round(1, 10, 4.0, 2.0), _async_round(1, 10, 5.0, 4.0), _async_round(1, 10, 3.0, 3.3)]
    scaling = async_bench._analyse_scaling(rounds)["burst_processes"]
    assert scaling["last_callback_ratio_to_one_process"]["runs"] == [0.5, 0.8, 1.1]
    assert scaling["worker_cpu_ratio_to_one_process"]["median"] == 1.5
    assert (scaling["processes"], scaling["max_inflight_each"]) == (2, 500)
    assert async_bench._analyse_scaling([_async_round(1, 10, 4.0, None)]) == {}


def test_async_table_shows_the_scaling_rows_only_when_measured():
    cases = _async_doc([_async_round(1, 10, 4.0, 2.0)])["cases"]
    rows = async_bench._scaling_rows(cases["burst_processes"])
    assert rows[0][0].startswith("(3b) the same through --processes 2 (--max-inflight 500 each)")
    assert rows[1][1] == "0.500 (0.500-0.500)"
    assert async_bench._scaling_rows(None) == []


def test_async_bench_accepts_scaling_processes_and_defaults_to_off():
    assert async_bench.parse_args([]).scaling_processes == 0
    assert async_bench.parse_args(["--scaling-processes", "2"]).scaling_processes == 2


def test_parse_args_of_all_refuses_zero_rounds_and_unknown_benchmarks():
    with pytest.raises(SystemExit):
        suite.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "nope"])
    args = suite.parse_args(["--only", "sync", "--only", "watchdog"])
    assert isinstance(args, argparse.Namespace) and args.only == ["sync", "watchdog"]


def _with_accept_workers(r: dict, rps: float, many: float) -> dict:
    r["accept"].update(rps=rps, p99_ms=10.0, gateway_cpu_ms_per_call=0.25)
    r["accept_workers"] = {
        "rps": many,
        "p99_ms": 8.0,
        "gateway_cpu_ms_per_call": 0.3,
        "others_cores": 0.6,
        "errors": 0,
    }
    r["accept_workers_ratio"] = many / r["pika"]["rate"]
    return r


def test_async_accept_through_gateway_workers_is_judged_against_pika_and_one_process_per_round():
    rounds = [
        _with_accept_workers(_async_round(2000, 10000, 2.0, None), 2000, 3000),
        _with_accept_workers(_async_round(2500, 10000, 2.0, None), 2500, 2500),
    ]
    many = async_bench._analyse_accept_workers(rounds)["accept_workers"]
    assert many["ratio"]["runs"] == [0.3, 0.25]
    assert many["ratio_to_one_process"]["runs"] == [1.5, 1.0]
    assert async_bench._analyse_accept_workers([_async_round(1, 10, 1.0, None)]) == {}
    doc = _async_doc(rounds)
    doc["cases"]["accept_workers"] = many
    doc["settings"]["gateway_workers"] = 2
    rows = by_case(suite.async_rows(doc))
    row = rows["  accept via --workers 2"]
    assert row.ratio["median"] == pytest.approx(0.275) and row.met is True
    assert rows["  accept via --workers 2 vs 1 process"].ratio["median"] == 1.25
    table_rows = async_bench._accept_workers_rows(many, 2)
    assert table_rows[0][0] == "(1b) the same through --workers 2: 202/s"
    assert async_bench._accept_workers_rows(None, 2) == []
