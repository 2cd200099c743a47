"""Function logs: the invocation log written by the gateway, /system/logs as faas-cli reads it."""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from tests.support import successResultOf
from tests.unit.gateway_fixtures import GatewayTestCase, set_up
from txfaas.gateway.app import AppSettings
from txfaas.invocation_log import InvocationLog
from txfaas.logs import LogQuery, invocation_line, parse_rfc3339
from txfaas.model import ValidationError
from txfaas.store import StoreUnavailable
from txfaas.store.memory import MemoryStore


def args(query: str) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for part in query.split("&"):
        k, _, v = part.partition("=")
        out.setdefault(k.encode(), []).append(v.encode())
    return out


def test_what_faas_cli_sends_by_default() -> None:
    """``faas-cli logs echo``: follow=true, tail=-1 (no limit), no namespace, no since."""
    q = LogQuery.from_args(args("follow=true&name=echo&tail=-1"))
    assert q == LogQuery("echo", "openfaas-fn", None, None, None, True)


def test_every_parameter() -> None:
    q = LogQuery.from_args(
        args("follow=false&instance=gw-1&name=echo&namespace=dev&since=2024-05-01T10:00:00Z&tail=5")
    )
    assert (q.name, q.namespace, q.instance, q.tail, q.follow) == ("echo", "dev", "gw-1", 5, False)
    assert q.since == datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()


def test_name_dot_namespace() -> None:
    assert LogQuery.from_args(args("name=echo.dev")).namespace == "dev"
    with pytest.raises(ValidationError):
        LogQuery.from_args(args("name=echo.dev&namespace=prod"))


def test_rfc3339_forms() -> None:
    base = datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()
    assert parse_rfc3339("2024-05-01T12:00:00+02:00", "since") == base
    assert round(parse_rfc3339("2024-05-01T10:00:00.123456789Z", "since") - (base + 0.123456), 7) == 0


def test_bad_values_name_the_parameter() -> None:
    for query, field in [
        ("", "name"),
        ("name=Bad_Name", "name"),
        ("name=echo&tail=many", "tail"),
        ("name=echo&since=yesterday", "since"),
        ("name=echo&since=2024-05-01T10:00:00", "since"),  # no zone
        ("name=echo&since=2024-13-01T10:00:00Z", "since"),
        ("name=echo&follow=yes", "follow"),
        ("name=echo&namespace=NOPE", "namespace"),
    ]:
        with pytest.raises(ValidationError) as caught:
            LogQuery.from_args(args(query))
            pytest.fail(f"no ValidationError for {query!r}")
        assert caught.value.field == field, query


def test_logfmt_with_error_quoted() -> None:
    assert (
        invocation_line(b"abc", b"sync", b"GET", b"/a/b", 200, 0.0012346, 1, None)
        == b"call=abc kind=sync method=GET path=/a/b status=200 duration=0.001235s attempt=1"
    )
    assert (
        invocation_line("abc", b"async", "POST", "/", 502, 1.5, 3, 'refused "x"')
        == b'call=abc kind=async method=POST path=/ status=502 duration=1.500000s attempt=3 error="refused \\"x\\""'
    )


def test_a_path_with_spaces_quotes_or_equals_is_quoted() -> None:
    for path, shown in [
        (b"/a b", b'"/a b"'),
        (b'/q"', b'"/q\\""'),
        (b"/k=v", b'"/k=v"'),
        (b"/\\", b'"/\\\\"'),
    ]:
        line = invocation_line(b"c", b"sync", b"GET", path, 200, 0.0, 1, None)
        assert (b" path=" + shown + b" status=") in line


class InvocationRig:
    """An :class:`InvocationLog` on a MemoryStore and a Clock, counting the store's writes."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.appends: list[int] = []
        append = self.store.append_logs

        async def counting(lines: Any, max_lines: int) -> None:
            self.appends.append(len(lines))
            await append(lines, max_lines)

        self.store.append_logs = counting  # type: ignore[method-assign]
        self.log = InvocationLog(self.store, self.clock, "gw-1", max_lines=3, interval=0.25, buffer=5)

    def call(self, n: int = 1, name: str = "echo") -> None:
        for i in range(n):
            self.log.call(name, "", f"id{i}", b"sync", b"GET", [b"x"], 200, 0.5)


@pytest.fixture
def rig() -> InvocationRig:
    return InvocationRig()


@pytest.fixture
def log_events() -> Iterator[list[dict]]:
    """Every event logged during the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_one_write_per_interval_and_no_timer_when_idle(rig: InvocationRig) -> None:
    assert rig.clock.getDelayedCalls() == []
    rig.call(3)
    assert len(rig.clock.getDelayedCalls()) == 1  # one timer for the batch
    assert rig.appends == []
    rig.clock.advance(0.25)
    assert rig.appends == [3]
    assert rig.clock.getDelayedCalls() == []
    texts = [e.text for e in rig.store.logs["openfaas-fn", "echo"]]
    assert texts[0] == "call=id0 kind=sync method=GET path=/x status=200 duration=0.500000s attempt=1"
    assert {e.instance for e in rig.store.logs["openfaas-fn", "echo"]} == {"gw-1"}


def test_each_log_is_capped(rig: InvocationRig) -> None:
    rig.call(5)
    rig.clock.advance(0.25)
    assert [e.text[:7] for e in rig.store.logs["openfaas-fn", "echo"]] == ["call=id"] * 3
    assert rig.store.logs["openfaas-fn", "echo"][-1].text.startswith("call=id4")


def test_a_full_buffer_drops_and_says_so(rig: InvocationRig, log_events: list[dict]) -> None:
    rig.call(8)
    rig.clock.advance(0.25)
    assert rig.appends == [5]
    warnings = [e for e in log_events if e.get("log_level") == LogLevel.warn]
    assert [e["dropped"] for e in warnings] == [3]


def test_a_store_down_loses_the_batch_with_a_warning_and_the_next_one_is_written(
    rig: InvocationRig, log_events: list[dict]
) -> None:
    rig.store.available = False
    rig.call(2)
    rig.clock.advance(0.25)
    assert [e["count"] for e in log_events if e.get("log_level") == LogLevel.warn] == [2]
    rig.store.available = True
    rig.call(1)
    rig.clock.advance(0.25)
    assert len(rig.store.logs["openfaas-fn", "echo"]) == 1


def test_lines_made_while_writing_go_in_the_next_batch(rig: InvocationRig) -> None:
    gate: defer.Deferred[None] = defer.Deferred()

    async def slow(lines: Any, max_lines: int) -> None:
        rig.appends.append(len(lines))
        await gate

    rig.store.append_logs = slow  # type: ignore[method-assign]
    rig.call(2)
    rig.clock.advance(0.25)
    rig.call(1)
    assert rig.clock.getDelayedCalls() == []  # one write at a time
    gate.callback(None)
    assert len(rig.clock.getDelayedCalls()) == 1
    rig.clock.advance(0.25)
    assert rig.appends == [2, 1]


def test_stop_writes_what_waits(rig: InvocationRig) -> None:
    rig.call(2)
    successResultOf(defer.Deferred.fromCoroutine(rig.log.stop()))
    assert len(rig.store.logs["openfaas-fn", "echo"]) == 2
    assert rig.clock.getDelayedCalls() == []


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.ended: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.ended = reason

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.data.splitlines()]


class LogsTestCase(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.invocations = InvocationLog(self.store, self.clock, "gw-1")
        self.build(invocations=self.invocations)

    def add(
        self, text: str, name: str = "echo", namespace: str = "openfaas-fn", instance: str = "gw-1"
    ) -> None:
        line = (name, namespace, self.clock.seconds(), instance.encode(), text.encode())
        self.successResultOf(defer.Deferred.fromCoroutine(self.store.append_logs([line], 1000)))
        self.clock.advance(1)

    def open(self, query: str) -> tuple[Any, Collect]:
        response = self.successResultOf(self.start("GET", "/system/logs?" + query))
        body = Collect()
        response.deliverBody(body)
        self.flush()
        return response, body


def test_a_call_becomes_one_line_with_its_id_method_path_status_and_duration(
    logs_gateway: LogsTestCase,
) -> None:
    logs_gateway.deploy("echo")
    response, _ = logs_gateway.call(
        "POST", "/function/echo/a/b?secret=x", headers={b"X-Call-Id": [b"call-1"]}
    )
    assert logs_gateway.store.logs == {}  # written in a batch, not during the call
    logs_gateway.clock.advance(0.25)
    [entry] = logs_gateway.store.logs["openfaas-fn", "echo"]
    assert re.search(
        r"^call=call-1 kind=sync method=POST path=/a/b status=200 duration=\d\.\d{6}s attempt=1$", entry.text
    )
    assert entry.instance == "gw-1"


def test_an_unreachable_function_is_logged_with_its_error(logs_gateway: LogsTestCase) -> None:
    from tests.fakes import RefusingAgent

    logs_gateway.build(function_client=RefusingAgent(), invocations=logs_gateway.invocations)
    logs_gateway.deploy("echo")
    logs_gateway.call("GET", "/function/echo")
    logs_gateway.clock.advance(0.25)
    [entry] = logs_gateway.store.logs["openfaas-fn", "echo"]
    assert "status=502" in entry.text
    assert entry.text.endswith(' error="connection refused"'), entry.text


def test_a_timeout_is_logged_as_504(logs_gateway: LogsTestCase) -> None:
    logs_gateway.deploy("echo", annotations={"txfaas.timeout": "2s"})
    logs_gateway.function.hang = True
    logs_gateway.start("GET", "/function/echo")
    logs_gateway.clock.advance(2.1)
    logs_gateway.flush()
    logs_gateway.clock.advance(0.25)
    [entry] = logs_gateway.store.logs["openfaas-fn", "echo"]
    assert "status=504" in entry.text
    assert 'error="no answer within 2s"' in entry.text


def test_ndjson_lines_in_faas_providers_message_shape(logs_gateway: LogsTestCase) -> None:
    logs_gateway.deploy("echo")
    logs_gateway.add("one")
    logs_gateway.add("two", instance="worker-1")
    response, body = logs_gateway.call("GET", "/system/logs?follow=false&name=echo&tail=-1")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/x-ndjson"]
    lines = [json.loads(line) for line in body.splitlines()]
    assert [m["text"] for m in lines] == ["one", "two"]
    assert set(lines[0]) == {"name", "namespace", "instance", "timestamp", "text"}
    assert (lines[0]["name"], lines[0]["namespace"]) == ("echo", "openfaas-fn")
    assert [m["instance"] for m in lines] == ["gw-1", "worker-1"]
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", lines[0]["timestamp"])


def test_tail_since_and_instance(logs_gateway: LogsTestCase) -> None:
    logs_gateway.deploy("echo")
    for i in range(5):
        logs_gateway.add(f"l{i}", instance="a" if i % 2 else "b")
    since = datetime.fromtimestamp(logs_gateway.clock.seconds() - 2.5, UTC).isoformat().replace("+00:00", "Z")

    def texts(query: str) -> list[str]:
        response, body = logs_gateway.call("GET", "/system/logs?name=echo&" + query)
        assert response.code == 200, body
        return [json.loads(line)["text"] for line in body.splitlines()]

    assert texts("tail=2") == ["l3", "l4"]
    assert texts("tail=0") == ["l0", "l1", "l2", "l3", "l4"]
    assert texts("instance=a") == ["l1", "l3"]
    assert texts("instance=b&tail=2") == ["l2", "l4"]
    assert texts(f"since={since}") == ["l3", "l4"]
    response, body = logs_gateway.call("GET", "/system/logs?name=echo&namespace=dev")
    assert response.code == 400
    assert b"namespace 'dev' does not exist" in body


def test_unknown_function_is_404_and_bad_values_400(logs_gateway: LogsTestCase) -> None:
    response, body = logs_gateway.call("GET", "/system/logs?name=nope")
    assert (response.code, body) == (404, b"function 'nope' not found in namespace 'openfaas-fn'\n")
    logs_gateway.deploy("echo")
    for query in ["name=echo&tail=x", "name=echo&since=now", "name=echo&follow=maybe", "tail=1"]:
        response, body = logs_gateway.call("GET", "/system/logs?" + query)
        assert response.code == 400, query
        assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    response, _ = logs_gateway.call("POST", "/system/logs?name=echo")
    assert response.code == 405


def test_removing_the_function_removes_its_log(logs_gateway: LogsTestCase) -> None:
    logs_gateway.deploy("echo")
    logs_gateway.add("one")
    logs_gateway.call("DELETE", "/system/functions", data=b'{"functionName": "echo"}')
    assert logs_gateway.store.logs == {}


def test_follow_sends_history_then_new_lines_until_the_client_leaves(logs_gateway: LogsTestCase) -> None:
    gw = logs_gateway
    gw.deploy("echo")
    gw.add("old")
    before = set(gw.clock.getDelayedCalls())
    response, body = gw.open("follow=true&name=echo&tail=-1")
    assert response.code == 200
    assert [m["text"] for m in body.messages()] == ["old"]
    assert gw.app.logs.followers == 1
    gw.add("new 1")
    gw.add("new 2", instance="other")
    gw.clock.advance(0.5)
    gw.flush()
    assert [m["text"] for m in body.messages()] == ["old", "new 1", "new 2"]
    gw.clock.advance(0.5)
    gw.flush()
    assert len(body.messages()) == 3  # nothing sent twice
    # The client leaves: the poll stops where it waits, its place is given back.
    body.transport.stopProducing()
    gw.flush()
    assert gw.app.logs.followers == 0
    assert set(gw.clock.getDelayedCalls()) - before == set()
    gw.add("after")
    gw.clock.advance(5)
    gw.flush()
    assert len(body.messages()) == 3


def test_a_follow_stream_outlives_the_write_timeout(logs_gateway: LogsTestCase) -> None:
    gw = logs_gateway
    gw.site.response_timeout = 10.0  # --write-timeout
    gw.deploy("echo")
    _, body = gw.open("follow=true&name=echo")
    for _ in range(40):
        gw.clock.advance(0.5)
        gw.flush()
    gw.add("still here")
    gw.clock.advance(0.5)
    gw.flush()
    assert body.ended is None
    assert [m["text"] for m in body.messages()] == ["still here"]
    body.transport.stopProducing()
    gw.flush()


def test_follow_of_an_instance_with_an_empty_log(logs_gateway: LogsTestCase) -> None:
    gw = logs_gateway
    gw.deploy("echo")
    response, body = gw.open("follow=true&instance=b&name=echo")
    assert (response.code, body.data) == (200, b"")
    gw.add("from a", instance="a")
    gw.add("from b", instance="b")
    gw.clock.advance(0.5)
    gw.flush()
    assert [m["text"] for m in body.messages()] == ["from b"]
    body.transport.stopProducing()
    gw.flush()


def test_a_store_outage_while_following_is_waited_out(
    logs_gateway: LogsTestCase, no_unhandled_errors: list[dict]
) -> None:
    gw = logs_gateway
    gw.deploy("echo")
    _, body = gw.open("follow=true&name=echo")
    gw.store.available = False
    gw.clock.advance(0.5)
    gw.flush()
    gw.store.available = True
    gw.add("back")
    gw.clock.advance(0.5)
    gw.flush()
    assert [m["text"] for m in body.messages()] == ["back"]
    assert body.ended is None
    body.transport.stopProducing()
    gw.flush()
    # As trial's flushLoggedErrors(StoreUnavailable): the outage's errors are expected, others are not.
    gc.collect()
    no_unhandled_errors[:] = [e for e in no_unhandled_errors if not e["log_failure"].check(StoreUnavailable)]


def test_too_many_followers_is_503(logs_gateway: LogsTestCase) -> None:
    gw = logs_gateway
    gw.deploy("echo")
    gw.build(invocations=gw.invocations, settings=AppSettings(log_followers=1))
    _, first = gw.open("follow=true&name=echo")
    response, body = gw.call("GET", "/system/logs?follow=true&name=echo")
    assert response.code == 503
    assert b"too many log streams" in body
    assert response.headers.getRawHeaders(b"retry-after") == [b"5"]
    response, _ = gw.call("GET", "/system/logs?follow=false&name=echo")
    assert response.code == 200  # a plain read is not a follower
    first.transport.stopProducing()
    gw.flush()
    _, again = gw.open("follow=true&name=echo")
    assert gw.app.logs.followers == 1
    again.transport.stopProducing()
    gw.flush()


def test_the_worker_logs_every_attempt_of_a_queued_call():
    """One line per finished attempt: kind async, the queued method and path, status, attempt n."""
    from tests.unit.test_worker_retries import answers, retrying, run_until_quiet
    from tests.unit.test_worker_service import Harness

    h = Harness(respond=answers(503, 200), **retrying())
    h.worker.calls.invocations = InvocationLog(h.store, h.clock, "worker-1", interval=0.25)
    h.deploy()
    h.enqueue(method="POST", path="/hook")
    h.start()
    run_until_quiet(h, 5)
    texts = [e.text for e in h.store.logs["openfaas-fn", "echo"]]
    assert len(texts) == 2, texts
    assert texts[0].startswith("call=call-1 kind=async method=POST path=/hook status=503 duration=")
    assert texts[0].endswith(" attempt=1")
    assert " status=200 " in texts[1] and texts[1].endswith(" attempt=2")
    assert {e.instance for e in h.store.logs["openfaas-fn", "echo"]} == {"worker-1"}


def test_the_worker_writes_its_last_lines_when_it_stops():
    from tests.unit.test_worker_service import Harness

    h = Harness(respond=lambda req: (200, {}, b"ok"))
    h.worker.calls.invocations = InvocationLog(h.store, h.clock, "worker-1", interval=60)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.store.logs == {}
    h.worker.stopService()
    h.flush()
    assert len(h.store.logs["openfaas-fn", "echo"]) == 1


@pytest.fixture
def logs_gateway() -> LogsTestCase:
    return set_up(LogsTestCase())
