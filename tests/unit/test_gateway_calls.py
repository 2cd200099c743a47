"""The gateway's call routes for resilience: cancel, the dead-letter list, re-queuing a dead letter."""

from __future__ import annotations

import json
from collections import deque

import attrs
import pytest
from twisted.internet import defer

from tests.unit.gateway_fixtures import GatewayTestCase, set_up
from txfaas.model import Call, CallbackJob, CallRecord, CallStatus, DeadLetter, DeadMark, DeadReason


@pytest.fixture
def gateway() -> GatewayTestCase:
    return set_up(GatewayTestCase())


def js(body: bytes):
    return json.loads(body)


class _Cancel(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")

    def put(self, record: CallRecord) -> None:
        self.store.calls[record.call_id] = record


@pytest.fixture
def cancel_gateway() -> _Cancel:
    return set_up(_Cancel())


def test_a_queued_call_is_cancelled_with_202(cancel_gateway: _Cancel) -> None:
    response, _ = cancel_gateway.call(
        "POST", "/async-function/echo", headers={"X-Call-Id": ["c1"]}, data=b"x"
    )
    assert response.code == 202
    response, body = cancel_gateway.call("DELETE", "/system/calls/c1")
    assert (response.code, js(body)) == (202, {"callId": "c1", "status": "cancelled"})
    record = cancel_gateway.store.calls["c1"]
    assert (record.status, record.callback_state) == (CallStatus.CANCELLED, None)
    assert record.finished_at is not None


def test_a_call_waiting_for_a_retry_is_cancelled(cancel_gateway: _Cancel) -> None:
    cancel_gateway.put(CallRecord("c2", "echo", status=CallStatus.RETRYING, attempts=2, next_attempt_at=99.0))
    response, _ = cancel_gateway.call("DELETE", "/system/calls/c2")
    assert response.code == 202
    assert cancel_gateway.store.calls["c2"].status == CallStatus.CANCELLED
    assert cancel_gateway.store.calls["c2"].next_attempt_at is None


def test_a_running_or_finished_call_is_409_naming_its_status(cancel_gateway: _Cancel) -> None:
    for status in (
        CallStatus.RUNNING,
        CallStatus.SUCCEEDED,
        CallStatus.DEAD_LETTERED,
        CallStatus.CANCELLED,
    ):
        cancel_gateway.put(CallRecord("c3", "echo", status=status))
        response, body = cancel_gateway.call("DELETE", "/system/calls/c3")
        assert response.code == 409, status
        assert f"is {status}" in body.decode()
        assert cancel_gateway.store.calls["c3"].status == status


def test_a_call_that_started_between_the_read_and_the_write_is_409(cancel_gateway: _Cancel) -> None:
    """The cancel is a transition from queued/retrying: a worker that started first wins."""
    cancel_gateway.put(CallRecord("c4", "echo", status=CallStatus.QUEUED))
    store = cancel_gateway.store
    original = store.transition_call

    async def started_first(record, from_statuses, **kw):
        store.calls["c4"] = attrs.evolve(store.calls["c4"], status=CallStatus.RUNNING)
        return await original(record, from_statuses, **kw)

    store.transition_call = started_first
    response, body = cancel_gateway.call("DELETE", "/system/calls/c4")
    assert response.code == 409
    assert "is running" in body.decode()
    assert cancel_gateway.store.calls["c4"].status == CallStatus.RUNNING


def test_unknown_call_is_404_and_a_bad_id_400(cancel_gateway: _Cancel) -> None:
    assert cancel_gateway.call("DELETE", "/system/calls/nope")[0].code == 404
    assert cancel_gateway.call("DELETE", "/system/calls/bad%20id")[0].code == 400


def test_the_store_down_is_503(cancel_gateway: _Cancel) -> None:
    cancel_gateway.store.available = False
    assert cancel_gateway.call("DELETE", "/system/calls/c1")[0].code == 503


def letter(call_id: str, function: str = "echo", at: float = 100.0, **fields) -> DeadLetter:
    fields.setdefault("dead", DeadMark(DeadReason.ATTEMPTS, at, "503 five times", 5))
    return DeadLetter(Call(call_id=call_id, function=function, **fields))


class _DeadLetterList(GatewayTestCase):
    def keep(self, *letters: DeadLetter) -> None:
        for d in letters:
            self.store.dead_letters[d.call_id] = d


@pytest.fixture
def dead_letter_list_gateway() -> _DeadLetterList:
    return set_up(_DeadLetterList())


def test_dead_letter_list_empty(dead_letter_list_gateway: _DeadLetterList) -> None:
    response, body = dead_letter_list_gateway.call("GET", "/system/dead-letters")
    assert (response.code, js(body)) == (200, [])
    assert response.headers.getRawHeaders(b"x-total-count") == [b"0"]


def test_lists_function_call_id_reason_time_and_attempts_oldest_first(
    dead_letter_list_gateway: _DeadLetterList,
) -> None:
    dead_letter_list_gateway.keep(letter("b", at=200.0), letter("a", "other", at=100.0))
    response, body = dead_letter_list_gateway.call("GET", "/system/dead-letters")
    items = js(body)
    assert [i["callId"] for i in items] == ["a", "b"]
    assert {k: items[1][k] for k in ("function", "reason", "deadAt", "attempts", "error", "phase")} == (
        {
            "function": "echo",
            "reason": "attempts_exhausted",
            "deadAt": 200.0,
            "attempts": 5,
            "error": "503 five times",
            "phase": "call",
        }
    )
    assert "body" not in items[0]


def test_filters_by_function_and_pages(dead_letter_list_gateway: _DeadLetterList) -> None:
    dead_letter_list_gateway.keep(
        *(letter(f"e{i}", at=float(i)) for i in range(5)), letter("o1", "other", at=2.5)
    )
    _, body = dead_letter_list_gateway.call("GET", "/system/dead-letters?function=echo")
    assert [i["callId"] for i in js(body)] == ["e0", "e1", "e2", "e3", "e4"]
    response, body = dead_letter_list_gateway.call(
        "GET", "/system/dead-letters?function=echo&limit=2&offset=2"
    )
    assert [i["callId"] for i in js(body)] == ["e2", "e3"]
    assert response.headers.getRawHeaders(b"x-total-count") == [b"5"]


def test_bad_arguments_are_400(dead_letter_list_gateway: _DeadLetterList) -> None:
    for query in ("function=Bad_Name", "limit=0", "limit=x", "limit=100000", "offset=-1"):
        assert dead_letter_list_gateway.call("GET", f"/system/dead-letters?{query}")[0].code == 400, query


# DiscardTests: ``DELETE /system/dead-letters/{id}`` discards one; ``GET`` shows one.
def test_a_dead_letter_is_discarded_with_204_then_404(gateway: GatewayTestCase) -> None:
    gateway.store.dead_letters["c1"] = letter("c1")
    gateway.store.dead_letters["c2"] = letter("c2")
    response, body = gateway.call("DELETE", "/system/dead-letters/c1")
    assert (response.code, body) == (204, b"")
    assert list(gateway.store.dead_letters) == ["c2"]
    _, body = gateway.call("GET", "/system/dead-letters")
    assert [i["callId"] for i in js(body)] == ["c2"]
    response, body = gateway.call("DELETE", "/system/dead-letters/c1")
    assert (response.code, body) == (404, b"no dead letter for call 'c1'\n")
    assert gateway.call("POST", "/system/calls/c1/retry")[0].code == 404


def test_one_dead_letter_is_shown(gateway: GatewayTestCase) -> None:
    gateway.store.dead_letters["c1"] = letter("c1")
    response, body = gateway.call("GET", "/system/dead-letters/c1")
    assert (response.code, js(body)["callId"], js(body)["reason"]) == (200, "c1", "attempts_exhausted")
    assert gateway.call("GET", "/system/dead-letters/nope")[0].code == 404


def test_a_bad_id_is_400_and_the_store_down_503(gateway: GatewayTestCase) -> None:
    assert gateway.call("DELETE", "/system/dead-letters/bad%20id")[0].code == 400
    gateway.store.available = False
    assert gateway.call("DELETE", "/system/dead-letters/c1")[0].code == 503


class _AuthenticatedDiscard(GatewayTestCase):
    auth = ("admin", "pw")


@pytest.fixture
def authenticated_discard_gateway() -> _AuthenticatedDiscard:
    return set_up(_AuthenticatedDiscard())


def test_authenticated_discard_discarding_needs_credentials(
    authenticated_discard_gateway: _AuthenticatedDiscard,
) -> None:
    authenticated_discard_gateway.store.dead_letters["c1"] = letter("c1")
    assert authenticated_discard_gateway.call("DELETE", "/system/dead-letters/c1")[0].code == 401
    assert "c1" in authenticated_discard_gateway.store.dead_letters


class _ResultWhileRetrying(GatewayTestCase):
    """A retrying call's stored answer is its last attempt's, not its result: 409 until it is final."""

    def setUp(self) -> None:
        super().setUp()
        from txfaas.model import CallResult

        self.store.results["c1"] = CallResult(503, [("Content-Type", "text/plain")], b"busy, try later")

    def put(self, **fields) -> None:
        self.store.calls["c1"] = CallRecord("c1", "echo", **fields)


@pytest.fixture
def result_while_retrying_gateway() -> _ResultWhileRetrying:
    return set_up(_ResultWhileRetrying())


def test_retrying_is_409_saying_status_attempt_and_when(
    result_while_retrying_gateway: _ResultWhileRetrying,
) -> None:
    due = result_while_retrying_gateway.clock.seconds() + 7.2
    result_while_retrying_gateway.put(
        status=CallStatus.RETRYING, attempts=2, status_code=503, next_attempt_at=due
    )
    response, body = result_while_retrying_gateway.call("GET", "/system/calls/c1/result")
    assert response.code == 409
    assert response.headers.getRawHeaders(b"retry-after") == [b"8"]
    assert js(body) == (
        {
            "callId": "c1",
            "status": "retrying",
            "attempts": 2,
            "nextAttemptAt": due,
            "lastStatusCode": 503,
            "error": "call 'c1' has no final result yet: it is retrying",
        }
    )


def test_queued_and_running_are_409_too(result_while_retrying_gateway: _ResultWhileRetrying) -> None:
    for status in (CallStatus.QUEUED, CallStatus.RUNNING):
        result_while_retrying_gateway.put(status=status, attempts=3)
        response, body = result_while_retrying_gateway.call("GET", "/system/calls/c1/result")
        assert (response.code, js(body)["status"]) == (409, status)
        assert response.headers.getRawHeaders(b"retry-after") is None


def test_a_final_call_answers_its_result(result_while_retrying_gateway: _ResultWhileRetrying) -> None:
    for status in (CallStatus.FAILED, CallStatus.DEAD_LETTERED):
        result_while_retrying_gateway.put(status=status, attempts=5, status_code=503)
        response, body = result_while_retrying_gateway.call("GET", "/system/calls/c1/result")
        assert (response.code, body) == (200, b"busy, try later")
        assert response.headers.getRawHeaders(b"x-function-status") == [b"503"]


def test_a_final_call_without_a_result_is_404(result_while_retrying_gateway: _ResultWhileRetrying) -> None:
    del result_while_retrying_gateway.store.results["c1"]
    result_while_retrying_gateway.put(status=CallStatus.CANCELLED)
    response, body = result_while_retrying_gateway.call("GET", "/system/calls/c1/result")
    assert (response.code, body) == (404, b"call 'c1' has no result (status: cancelled)\n")


class _Retry(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")
        self.queue.messages.setdefault("txfaas.callbacks", deque())


@pytest.fixture
def retry_gateway() -> _Retry:
    return set_up(_Retry())


def test_requeues_the_same_call_id_and_body_with_attempts_reset(retry_gateway: _Retry) -> None:
    dead = letter(
        "c1", body=b"\x00intact", attempt=5, queue="faas-request", callback_url="https://h.example/"
    )
    retry_gateway.store.dead_letters["c1"] = dead
    retry_gateway.store.calls["c1"] = CallRecord(
        "c1", "echo", status=CallStatus.DEAD_LETTERED, attempts=5, dead_reason="attempts_exhausted"
    )
    response, body = retry_gateway.call("POST", "/system/calls/c1/retry")
    assert response.code == 202
    assert js(body)["status"] == "queued"
    assert js(body)["replay"] == 1
    [call] = retry_gateway.queue.published
    assert (call.call_id, call.body, call.attempt, call.replay, call.queue, call.dead, call.callback_url) == (
        "c1",
        b"\x00intact",
        1,
        1,
        "faas-request",
        None,
        "https://h.example/",
    )
    record = retry_gateway.store.calls["c1"]
    assert (record.status, record.attempts, record.replays, record.dead_reason) == ("queued", 0, 1, None)
    assert retry_gateway.store.dead_letters == {}
    assert retry_gateway.call("POST", "/system/calls/c1/retry")[0].code == 404


def test_a_callback_dead_letter_requeues_the_callback_not_the_call(retry_gateway: _Retry) -> None:
    job = CallbackJob(201, [("X-A", "b")], 0.5, attempt=10, first_at=1.0, retries=0, max_retries=4)
    dead = letter(
        "c2",
        body=b"the answer",
        queue="txfaas.callbacks",
        callback_url="https://h.example/",
        callback_job=job,
        dead=DeadMark(DeadReason.CALLBACK, 50.0, "receiver answered 503", 10),
    )
    retry_gateway.store.dead_letters["c2"] = dead
    retry_gateway.store.calls["c2"] = CallRecord(
        "c2", "echo", status="dead_lettered", status_code=201, callback_attempts=10
    )
    response, body = retry_gateway.call("POST", "/system/calls/c2/retry")
    assert (response.code, js(body)["phase"], js(body)["status"]) == (202, "callback", "succeeded")
    [call] = retry_gateway.queue.published
    assert (call.queue, call.body, call.callback_job.attempt) == ("txfaas.callbacks", b"the answer", 1)
    assert call.callback_job.first_at > 1.0
    record = retry_gateway.store.calls["c2"]
    assert (record.status, record.callback_state, record.callback_attempts, record.replays) == (
        "succeeded",
        "retrying",
        0,
        1,
    )
    assert retry_gateway.function.seen == []


def test_no_dead_letter_is_404(retry_gateway: _Retry) -> None:
    assert retry_gateway.call("POST", "/system/calls/nothing/retry")[0].code == 404


def test_an_unconfirmed_publish_is_503_and_the_dead_letter_and_record_stay(retry_gateway: _Retry) -> None:
    retry_gateway.store.dead_letters["c1"] = letter("c1")
    dead = CallRecord("c1", "echo", status=CallStatus.DEAD_LETTERED, dead_reason="attempts_exhausted")
    retry_gateway.store.calls["c1"] = dead
    retry_gateway.queue.available = False
    response, _ = retry_gateway.call("POST", "/system/calls/c1/retry")
    assert response.code == 503
    assert "c1" in retry_gateway.store.dead_letters
    assert retry_gateway.store.calls["c1"] == dead


def test_the_record_is_claimed_before_the_message_is_published(retry_gateway: _Retry) -> None:
    """A worker must never see the re-queued message before its record says so."""
    retry_gateway.store.dead_letters["c1"] = letter("c1")
    retry_gateway.store.calls["c1"] = CallRecord("c1", "echo", status=CallStatus.DEAD_LETTERED)
    seen = []
    publish = retry_gateway.queue.publish

    async def watch(call):
        seen.append(retry_gateway.store.calls["c1"])
        await publish(call)

    retry_gateway.queue.publish = watch
    assert retry_gateway.call("POST", "/system/calls/c1/retry")[0].code == 202
    assert [(r.status, r.replays) for r in seen] == [("accepting", 1)]
    assert retry_gateway.store.calls["c1"].status == "queued"


def test_ten_retries_at_once_requeue_once_and_the_others_are_409(retry_gateway: _Retry) -> None:
    retry_gateway.store.dead_letters["c1"] = letter("c1")
    retry_gateway.store.calls["c1"] = CallRecord("c1", "echo", status=CallStatus.DEAD_LETTERED)
    confirms: list[defer.Deferred] = []
    publish = retry_gateway.queue.publish

    async def slow(call):
        d: defer.Deferred = defer.Deferred()
        confirms.append(d)
        await d
        await publish(call)

    retry_gateway.queue.publish = slow
    pending = [retry_gateway.start("POST", "/system/calls/c1/retry") for _ in range(10)]
    for d in confirms:
        d.callback(None)
    retry_gateway.flush()
    codes = sorted(retry_gateway.successResultOf(d).code for d in pending)
    assert codes == ([202] + [409] * 9)
    assert [c.call_id for c in retry_gateway.queue.published] == ["c1"]
    assert (retry_gateway.store.calls["c1"].status, retry_gateway.store.calls["c1"].replays) == ("queued", 1)


def test_a_dead_letter_already_requeued_is_409_not_requeued_twice(retry_gateway: _Retry) -> None:
    """The gateway that re-queued it died before removing the dead letter: the call runs
    (replay 1) and the dead letter is still listed."""
    retry_gateway.store.dead_letters["c1"] = letter("c1")
    retry_gateway.store.calls["c1"] = CallRecord("c1", "echo", status=CallStatus.RUNNING, replays=1)
    response, body = retry_gateway.call("POST", "/system/calls/c1/retry")
    assert response.code == 409
    assert b"re-queued already" in body
    assert retry_gateway.queue.published == []


def test_an_unconfirmed_retry_of_a_letter_without_record_leaves_no_record(retry_gateway: _Retry) -> None:
    """Nothing queued: no ``queued`` record may say otherwise."""
    retry_gateway.store.dead_letters["c1"] = letter("c1")
    retry_gateway.queue.available = False
    assert retry_gateway.call("POST", "/system/calls/c1/retry")[0].code == 503
    assert "c1" not in retry_gateway.store.calls
    assert "c1" in retry_gateway.store.dead_letters


def test_a_retry_whose_gateway_died_before_the_confirm_can_be_retried_after_the_deadline(
    retry_gateway: _Retry,
) -> None:
    retry_gateway.store.dead_letters["c1"] = letter("c1")
    retry_gateway.store.calls["c1"] = CallRecord(
        "c1",
        "echo",
        status=CallStatus.ACCEPTING,
        replays=1,
        accepting_until=retry_gateway.clock.seconds() + 10,
    )
    assert retry_gateway.call("POST", "/system/calls/c1/retry")[0].code == 409
    retry_gateway.clock.advance(10)
    response, body = retry_gateway.call("POST", "/system/calls/c1/retry")
    assert (response.code, js(body)["replay"]) == (202, 2)
    [call] = retry_gateway.queue.published
    assert call.replay == 2


def test_a_message_that_was_not_a_txfaas_call_cannot_be_requeued(retry_gateway: _Retry) -> None:
    retry_gateway.store.dead_letters["x"] = letter(
        "x", function="", dead=DeadMark(DeadReason.UNDECODABLE, 1.0)
    )
    assert retry_gateway.call("POST", "/system/calls/x/retry")[0].code == 409


def test_replay_numbers_grow_past_the_records(retry_gateway: _Retry) -> None:
    retry_gateway.store.dead_letters["c1"] = letter("c1", replay=1)
    retry_gateway.store.calls["c1"] = CallRecord("c1", "echo", status="dead_lettered", replays=3)
    _, body = retry_gateway.call("POST", "/system/calls/c1/retry")
    assert js(body)["replay"] == 4


def test_a_post_with_an_existing_call_id_queues_nothing_and_answers_its_status(
    gateway: GatewayTestCase,
) -> None:
    gateway.deploy("echo")
    record = CallRecord("c9", "echo", status=CallStatus.RETRYING)
    gateway.store.calls["c9"] = record
    response, body = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["c9"]}, data=b"x")
    assert (response.code, js(body)["status"], js(body)["duplicate"]) == (202, "retrying", True)
    assert gateway.queue.published == []
    d = defer.Deferred.fromCoroutine(gateway.store.get_call("c9"))
    assert gateway.successResultOf(d) == record
