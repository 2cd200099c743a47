"""Tests of the async benchmark's own parts: its arithmetic, its HTTP client and its servers.

Run with ``.venv/bin/pytest -p no:cacheprovider bench/test_async_bench.py`` (no service needed).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

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


def test_reached_figures_are_when_the_calls_reached_the_function_from_the_first_post():
    posted = {"started": 100.0, "results": []}
    figures = async_bench.reached_figures(posted, {"b.0": [100.7, 101.7], "b.1": [100.4, 0.0]})
    assert figures == {"reached_first_s": pytest.approx(0.4), "reached_last_s": pytest.approx(0.7)}
    assert async_bench.reached_figures(posted, {}) == {}


def test_stage_figures_split_each_call_at_the_function_and_at_the_workers_record():
    records = {
        "b.0": {"startedAt": 10.0, "finishedAt": 11.30},
        "b.1": {"startedAt": 10.1, "finishedAt": 11.50},
        "b.2": {"startedAt": 10.2},  # never finished: left out
    }
    times = {"b.0": [10.1, 11.1], "b.1": [10.4, 11.4], "b.2": [10.3, 0.0]}
    arrivals = {"b.0": [11.40, 200, 1], "b.1": [11.55, 200, 1]}
    figures = async_bench.stage_figures(arrivals, times, records)
    assert figures["start_to_function_p50_s"] == pytest.approx(0.2)  # median of 0.1 and 0.3
    assert figures["start_to_function_max_s"] == pytest.approx(0.3)
    assert figures["answer_to_record_max_s"] == pytest.approx(0.2)
    assert figures["record_to_callback_p50_s"] == pytest.approx(0.075)
    assert async_bench.stage_figures({}, {}, {}) == {}


def test_raw_redis_reads_status_integer_bulk_nil_and_array_replies():
    import socket
    import threading

    from harness import RawRedis

    server = socket.create_server(("127.0.0.1", 0))
    asked: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        replies = [b"+OK\r\n", b"*3\r\n$1\r\na\r\n$-1\r\n$4\r\nb\r\nc\r\n", b":7\r\n"]
        with conn:
            for reply in replies:
                asked.append(conn.recv(4096))
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with RawRedis(f"redis://127.0.0.1:{server.getsockname()[1]}/3") as redis:
        assert redis.command("MGET", "k1", "k2", "k3") == ["a", None, "b\r\nc"]
        assert redis.command("DEL", "k1") == 7
    thread.join(5)
    server.close()
    assert asked[0] == b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
    assert asked[1].startswith(b"*4\r\n$4\r\nMGET\r\n$2\r\nk1\r\n")


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


class _Timers:
    """``call_later`` for the servers' apps, advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[list] = []

    def call_later(self, delay: float, fn):
        timer = _Timer(self.now + delay, fn)
        self.calls.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in [t for t in self.calls if t.when <= self.now and not t.cancelled]:
            self.calls.remove(timer)
            timer.fn()


class _Timer:
    def __init__(self, when: float, fn) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def _serve(app) -> tuple[async_servers.Connection, _Transport]:
    connection = async_servers.Connection(app.handle)
    transport = _Transport()
    connection.connection_made(transport)
    return connection, transport


def _answers(written: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in ``written``."""
    out = []
    while written:
        head, _, rest = written.partition(b"\r\n\r\n")
        status, headers = async_client.parse_head(head + b"\r\n\r\n")
        length = int(headers["content-length"])
        out.append((status, rest[:length]))
        written = rest[length:]
    return out


def _post(path: bytes, call_id: bytes, body: bytes = b"body", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nX-Call-Id: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path,
        call_id,
        len(body),
        extra,
        body,
    )


def test_hanging_requests_are_counted_until_aborted_or_released():
    functions = async_servers.Functions(_Timers().call_later)
    first, _ = _serve(functions)
    second, second_out = _serve(functions)
    first.data_received(b"POST /hang/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    second.data_received(b"POST /hang/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert len(functions.hanging) == 2
    first.connection_lost(None)  # the caller aborted the connection
    assert len(functions.hanging) == 1 and functions.aborted == 1
    control, control_out = _serve(functions)
    control.data_received(b"POST /release HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert _answers(control_out.written) == [(200, b'{"released": 1}')]
    assert functions.hanging == set() and _answers(second_out.written) == [(200, b"released")]
    assert functions.served["hang"] == 1


def test_sleeping_function_answers_after_its_delay_and_not_before_and_keeps_its_times(monkeypatch):
    timers = _Timers()
    functions = async_servers.Functions(timers.call_later)
    times = iter([5.0, 6.0])
    monkeypatch.setattr(async_servers.time, "time", lambda: next(times))
    connection, out = _serve(functions)
    connection.data_received(_post(b"/sleep/", b"burst.7"))
    timers.advance(0.99)
    assert out.written == b"" and functions.sleeping == 1
    timers.advance(0.01)
    assert _answers(out.written) == [(200, b"slept")] and functions.sleeping == 0
    assert functions.times == {"burst.7": [5.0, 6.0]}


def test_a_sleeper_whose_caller_goes_away_is_counted_as_aborted_and_never_answered():
    timers = _Timers()
    functions = async_servers.Functions(timers.call_later)
    connection, out = _serve(functions)
    connection.data_received(_post(b"/sleep?s=0.5", b"b.1"))
    connection.connection_lost(None)
    timers.advance(1)
    assert functions.aborted == 1 and functions.sleeping == 0 and out.written == b""


def test_receiver_keeps_the_first_arrival_per_call_and_counts_redeliveries(monkeypatch):
    receiver = async_servers.Receiver()
    times = iter([5.0, 6.0, 7.0])
    monkeypatch.setattr(async_servers.time, "time", lambda: next(times))
    connection, out = _serve(receiver)
    for call_id, status in ((b"hang-r1.0", b"504"), (b"hang-r1.0", b"504"), (b"e2e-r1.3", b"200")):
        connection.data_received(_post(b"/callback", call_id, extra=b"X-Function-Status: %s\r\n" % status))
    assert receiver.batches["hang-r1"] == {"hang-r1.0": [5.0, 504, 2]}
    connection.data_received(b"GET /count?batch=e2e-r1 HTTP/1.1\r\n\r\n")
    assert _answers(out.written)[-1] == (200, b'{"count": 1}')


def test_the_servers_read_pipelined_chunked_and_split_requests_and_close_when_asked():
    receiver = async_servers.Receiver()
    connection, out = _serve(receiver)
    chunked = (
        b"POST /callback HTTP/1.1\r\nX-Call-Id: c.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
    )
    data = _post(b"/callback", b"c.0") + chunked + b"GET /count?batch=c HTTP/1.1\r\nConnection: close\r\n\r\n"
    for i in range(0, len(data), 7):  # in pieces that cut lines, sizes and bodies
        connection.data_received(data[i : i + 7])
    assert _answers(out.written) == [(200, b"ok"), (200, b"ok"), (200, b'{"count": 2}')]
    assert out.closed and b"Connection: close" in out.written.rsplit(b"HTTP/1.1", 1)[1]


def test_a_malformed_request_gets_400_and_the_connection_closed():
    connection, out = _serve(async_servers.Receiver())
    connection.data_received(b"NONSENSE\r\n\r\n")
    assert _answers(out.written)[0][0] == 400 and out.closed


def test_thousands_of_pipelined_requests_answered_at_once_without_recursion():
    connection, out = _serve(async_servers.Functions(_Timers().call_later))
    connection.data_received(b"GET /ok HTTP/1.1\r\n\r\n" * 5000)
    assert _answers(out.written) == [(200, b"ok")] * 5000


def test_the_pika_baseline_alternates_between_last_and_first():
    """Case (1)'s baseline runs last in odd rounds and first in even ones, so the broker still
    clearing the previous run's queue does not always fall on it."""
    assert async_bench.accept_order(1) == ["gateway", "workers", "pika"]
    assert async_bench.accept_order(2) == ["pika", "gateway", "workers"]
    assert async_bench.accept_order(3) == ["gateway", "workers", "pika"]
