"""Tests of the async benchmark's own parts: its arithmetic, its HTTP client and its servers.

Run with ``.venv/bin/pytest -p no:cacheprovider bench/test_async_bench.py`` (no service needed).
"""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import async_bench
import async_client
import async_servers


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _read(data: bytes):
    async def go():
        return await async_client.read_response(_reader(data))

    return asyncio.run(go())


# --------------------------------------------------------------------------- the client


def test_request_carries_host_length_headers_and_the_exact_body():
    raw = async_client.build_request(
        "127.0.0.1:9", "/async-function/f?x=1", [("X-Call-Id", "b.1")], b"\x00ab"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /async-function/f?x=1 HTTP/1.1"
    assert b"Host: 127.0.0.1:9" in lines and b"Content-Length: 3" in lines and b"X-Call-Id: b.1" in lines
    assert body == b"\x00ab"


def test_response_with_content_length_is_read_to_its_end_and_no_further():
    status, headers, body = _read(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nX-A: b\r\n\r\nokNEXT")
    assert (status, body, headers["x-a"]) == (202, b"ok", "b")


def test_chunked_response_is_reassembled_with_its_trailers_consumed():
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1;x=y\r\nc\r\n0\r\nT: 1\r\n\r\nNEXT"
    )

    async def go():
        reader = _reader(data)
        got = await async_client.read_response(reader)
        return got, await reader.read()

    (status, _, body), rest = asyncio.run(go())
    assert (status, body, rest) == (200, b"abc", b"NEXT")


def test_response_without_length_is_read_to_close_and_marks_the_connection_closed():
    _, headers, body = _read(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert body == b"all of it" and headers["connection"] == "close"


def test_a_bad_status_line_is_an_error():
    with pytest.raises(async_client.HTTPError):
        async_client.parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


# --------------------------------------------------------------------------- the arithmetic


def test_burst_figures_measure_from_the_first_post():
    posted = {"started": 100.0, "results": [["b.0", 100.0, 100.5, 202], ["b.1", 100.1, 101.0, 202]]}
    arrivals = {"b.0": [101.5, 200, 1], "b.1": [102.0, 200, 2]}
    figures = async_bench.burst_figures(posted, arrivals)
    assert figures["post_all_s"] == pytest.approx(1.0)
    assert figures["first_callback_s"] == pytest.approx(1.5)
    assert figures["last_callback_s"] == pytest.approx(2.0)
    assert figures["completions_per_s"] == pytest.approx(1.0)  # 2 calls in 2 s
    assert figures["answers"] == {"202": 2}
    assert figures["callback_statuses"] == {"200": 2}
    assert figures["duplicate_callbacks"] == 1


def test_lateness_is_measured_from_started_at_plus_the_timeout_and_split_at_finished_at():
    late = async_bench.lateness(arrival=11.030, started_at=10.0, finished_at=11.004, timeout=1.0)
    assert late == {
        "total_ms": pytest.approx(30.0),
        "timer_ms": pytest.approx(4.0),
        "after_timer_ms": pytest.approx(26.0),
    }


def test_memory_per_call_is_rss_growth_over_calls():
    assert async_bench.per_call_kib(60_000, 110_000, 1000) == pytest.approx(50.0)


def _round(rnd: int, gateway: float, pika: float, last: float, late: float) -> dict:
    accept = {
        "rps": gateway,
        "p99_ms": 1.0,
        "errors": 0,
        "gateway_cpu_ms_per_call": 0.5,
        "rabbitmq_cpu_ms_per_call": 0.1,
        "redis_cpu_ms_per_call": 0.01,
        "others_cores": 0.1,
    }
    sample = {"total_ms": late, "timer_ms": 1.0, "after_timer_ms": late - 1.0}
    return {
        "round": rnd,
        "accept": accept,
        "pika": {"rate": pika, "rabbitmq_cpu_ms_per_call": 0.05, "others_cores": 0.1},
        "accept_ratio": gateway / pika,
        "e2e": {
            "completions_per_s": 500.0,
            "post_all_s": 1.0,
            "last_callback_s": 4.0,
            "gateway_cpu_ms_per_call": 0.5,
            "worker_cpu_ms_per_call": 1.0,
            "others_cores": 0.1,
        },
        "burst": {
            "post_all_s": 0.5,
            "first_callback_s": 1.1,
            "last_callback_s": last,
            "worker_cpu_ms_per_call": 1.0,
            "others_cores": 0.1,
        },
        "timeout": {"samples": [sample]},
    }


def test_goals_use_the_median_ratio_and_burst_time_but_the_worst_lateness():
    rounds = [
        _round(1, 3000, 10_000, 2.0, 20.0),
        _round(2, 1000, 10_000, 5.0, 150.0),
        _round(3, 2600, 10_000, 2.5, 30.0),
    ]
    memory = {"worker": {"kib_per_call": 12.0, "calls": 1000, "idle_kib": 1, "loaded_kib": 2, "after_kib": 2}}
    cases = async_bench.analyse(rounds, memory)
    assert cases["accept"]["ratio"]["median"] == pytest.approx(0.26)
    assert cases["burst"]["last_callback_s"]["median"] == pytest.approx(2.5)
    assert cases["timeout_lateness"]["total_ms"]["max"] == pytest.approx(150.0)
    goals = cases["goals"]
    assert goals["accept_ratio >= 0.25"] == "met"
    assert goals["burst last callback <= 3 s"] == "met"
    assert goals["exec_timeout lateness (max) <= 100 ms"] == "NOT met"
    assert goals["worker memory <= 50 KiB per in-flight call"] == "met"
    args = async_bench.parse_args([])
    text = async_bench.table(cases, args, 3)
    assert "ratio gateway / pika (goal >= 0.25)" in text and "0.260 (0.100-0.300)" in text


def test_goals_not_measured_are_said_so():
    cases = async_bench.analyse([_round(1, 100, 10_000, 9.0, 1.0)], {})
    assert cases["goals"]["worker memory <= 50 KiB per in-flight call"] == "not measured"
    assert cases["goals"]["accept_ratio >= 0.25"] == "NOT met"


def test_stack_summary_groups_self_time_by_area_and_leaves_out_the_trunk():
    trunk = "<module> (twistd);ReactorBase.run (twisted/internet/base.py)"
    lines = [
        f"{trunk};GatewayApp._accept (txfaas/gateway/app.py);_parseContentType (twisted/web/http.py) 30",
        f"{trunk};GatewayApp._accept (txfaas/gateway/app.py);execute_command (txredisapi.py) 70",
    ]
    report = async_bench.summarise_stacks(lines)
    assert report["samples"] == 100
    assert dict(report["self_by_area"]) == {"txredisapi": 70.0, "twisted.web server": 30.0}
    inclusive = dict(report["inclusive"])
    assert inclusive["GatewayApp._accept (txfaas/gateway/app.py)"] == 100.0
    assert not any("ReactorBase.run" in name for name in inclusive)


# --------------------------------------------------------------------------- the servers


def _request(path: bytes, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None) -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.path = path
    request.content = io.BytesIO(b"body")
    request.method = method
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


def test_hanging_requests_are_counted_until_aborted_or_released():
    functions = async_servers.Functions(Clock())
    first, second = _request(b"/hang/"), _request(b"/hang/x")
    assert functions.render(first) is NOT_DONE_YET and functions.render(second) is NOT_DONE_YET
    assert len(functions.hanging) == 2
    first.processingFailed(Exception("the worker gave up"))  # the caller aborted the connection
    assert len(functions.hanging) == 1 and functions.aborted == 1
    release = _request(b"/release", b"POST")
    assert b'"released": 1' in functions.render(release)
    assert functions.hanging == set() and second.finished and b"".join(second.written) == b"released"


def test_sleeping_function_answers_after_its_delay_and_not_before():
    clock = Clock()
    functions = async_servers.Functions(clock)
    request = _request(b"/sleep/")
    assert functions.render(request) is NOT_DONE_YET
    clock.advance(0.99)
    assert not request.finished and functions.sleeping == 1
    clock.advance(0.01)
    assert request.finished and b"".join(request.written) == b"slept" and functions.sleeping == 0


def test_receiver_keeps_the_first_arrival_per_call_and_counts_redeliveries(monkeypatch):
    receiver = async_servers.Receiver()
    times = iter([5.0, 6.0, 7.0])
    monkeypatch.setattr(async_servers.time, "time", lambda: next(times))
    for call_id, status in ((b"hang-r1.0", b"504"), (b"hang-r1.0", b"504"), (b"e2e-r1.3", b"200")):
        receiver.render_POST(
            _request(b"/callback", b"POST", {b"X-Call-Id": call_id, b"X-Function-Status": status})
        )
    assert receiver.batches["hang-r1"] == {"hang-r1.0": [5.0, 504, 2]}
    count = _request(b"/count")
    count.args = {b"batch": [b"e2e-r1"]}
    assert receiver.render_GET(count) == b'{"count": 1}'
