"""The gateway's call routes for resilience: cancel, the dead-letter list, re-queuing a dead letter."""

from __future__ import annotations

import json
from collections import deque

import attrs
from twisted.internet import defer

from tests.unit.gateway_fixtures import GatewayTestCase
from txfaas.model import Call, CallbackJob, CallRecord, CallStatus, DeadLetter, DeadMark, DeadReason


def js(body: bytes):
    return json.loads(body)


class CancelTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")

    def put(self, record: CallRecord) -> None:
        self.store.calls[record.call_id] = record

    def test_a_queued_call_is_cancelled_with_202(self) -> None:
        response, _ = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["c1"]}, data=b"x")
        self.assertEqual(response.code, 202)
        response, body = self.call("DELETE", "/system/calls/c1")
        self.assertEqual((response.code, js(body)), (202, {"callId": "c1", "status": "cancelled"}))
        record = self.store.calls["c1"]
        self.assertEqual((record.status, record.callback_state), (CallStatus.CANCELLED, None))
        self.assertIsNotNone(record.finished_at)

    def test_a_call_waiting_for_a_retry_is_cancelled(self) -> None:
        self.put(CallRecord("c2", "echo", status=CallStatus.RETRYING, attempts=2, next_attempt_at=99.0))
        response, _ = self.call("DELETE", "/system/calls/c2")
        self.assertEqual(response.code, 202)
        self.assertEqual(self.store.calls["c2"].status, CallStatus.CANCELLED)
        self.assertIsNone(self.store.calls["c2"].next_attempt_at)

    def test_a_running_or_finished_call_is_409_naming_its_status(self) -> None:
        for status in (
            CallStatus.RUNNING,
            CallStatus.SUCCEEDED,
            CallStatus.DEAD_LETTERED,
            CallStatus.CANCELLED,
        ):
            self.put(CallRecord("c3", "echo", status=status))
            response, body = self.call("DELETE", "/system/calls/c3")
            self.assertEqual(response.code, 409, status)
            self.assertIn(f"is {status}", body.decode())
            self.assertEqual(self.store.calls["c3"].status, status)

    def test_a_call_that_started_between_the_read_and_the_write_is_409(self) -> None:
        """The cancel is a transition from queued/retrying: a worker that started first wins."""
        self.put(CallRecord("c4", "echo", status=CallStatus.QUEUED))
        store = self.store
        original = store.transition_call

        async def started_first(record, from_statuses, **kw):
            store.calls["c4"] = attrs.evolve(store.calls["c4"], status=CallStatus.RUNNING)
            return await original(record, from_statuses, **kw)

        store.transition_call = started_first
        response, body = self.call("DELETE", "/system/calls/c4")
        self.assertEqual(response.code, 409)
        self.assertIn("is running", body.decode())
        self.assertEqual(self.store.calls["c4"].status, CallStatus.RUNNING)

    def test_unknown_call_is_404_and_a_bad_id_400(self) -> None:
        self.assertEqual(self.call("DELETE", "/system/calls/nope")[0].code, 404)
        self.assertEqual(self.call("DELETE", "/system/calls/bad%20id")[0].code, 400)

    def test_the_store_down_is_503(self) -> None:
        self.store.available = False
        self.assertEqual(self.call("DELETE", "/system/calls/c1")[0].code, 503)


def letter(call_id: str, function: str = "echo", at: float = 100.0, **fields) -> DeadLetter:
    fields.setdefault("dead", DeadMark(DeadReason.ATTEMPTS, at, "503 five times", 5))
    return DeadLetter(Call(call_id=call_id, function=function, **fields))


class DeadLetterListTests(GatewayTestCase):
    def keep(self, *letters: DeadLetter) -> None:
        for d in letters:
            self.store.dead_letters[d.call_id] = d

    def test_empty(self) -> None:
        response, body = self.call("GET", "/system/dead-letters")
        self.assertEqual((response.code, js(body)), (200, []))
        self.assertEqual(response.headers.getRawHeaders(b"x-total-count"), [b"0"])

    def test_lists_function_call_id_reason_time_and_attempts_oldest_first(self) -> None:
        self.keep(letter("b", at=200.0), letter("a", "other", at=100.0))
        response, body = self.call("GET", "/system/dead-letters")
        items = js(body)
        self.assertEqual([i["callId"] for i in items], ["a", "b"])
        self.assertEqual(
            {k: items[1][k] for k in ("function", "reason", "deadAt", "attempts", "error", "phase")},
            {
                "function": "echo",
                "reason": "attempts_exhausted",
                "deadAt": 200.0,
                "attempts": 5,
                "error": "503 five times",
                "phase": "call",
            },
        )
        self.assertNotIn("body", items[0])

    def test_filters_by_function_and_pages(self) -> None:
        self.keep(*(letter(f"e{i}", at=float(i)) for i in range(5)), letter("o1", "other", at=2.5))
        _, body = self.call("GET", "/system/dead-letters?function=echo")
        self.assertEqual([i["callId"] for i in js(body)], ["e0", "e1", "e2", "e3", "e4"])
        response, body = self.call("GET", "/system/dead-letters?function=echo&limit=2&offset=2")
        self.assertEqual([i["callId"] for i in js(body)], ["e2", "e3"])
        self.assertEqual(response.headers.getRawHeaders(b"x-total-count"), [b"5"])

    def test_bad_arguments_are_400(self) -> None:
        for query in ("function=Bad_Name", "limit=0", "limit=x", "limit=100000", "offset=-1"):
            self.assertEqual(self.call("GET", f"/system/dead-letters?{query}")[0].code, 400, query)


class DiscardTests(GatewayTestCase):
    """``DELETE /system/dead-letters/{id}`` discards one; ``GET`` shows one."""

    def test_a_dead_letter_is_discarded_with_204_then_404(self) -> None:
        self.store.dead_letters["c1"] = letter("c1")
        self.store.dead_letters["c2"] = letter("c2")
        response, body = self.call("DELETE", "/system/dead-letters/c1")
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(list(self.store.dead_letters), ["c2"])
        _, body = self.call("GET", "/system/dead-letters")
        self.assertEqual([i["callId"] for i in js(body)], ["c2"])
        response, body = self.call("DELETE", "/system/dead-letters/c1")
        self.assertEqual((response.code, body), (404, b"no dead letter for call 'c1'\n"))
        self.assertEqual(self.call("POST", "/system/calls/c1/retry")[0].code, 404)

    def test_one_dead_letter_is_shown(self) -> None:
        self.store.dead_letters["c1"] = letter("c1")
        response, body = self.call("GET", "/system/dead-letters/c1")
        self.assertEqual(
            (response.code, js(body)["callId"], js(body)["reason"]), (200, "c1", "attempts_exhausted")
        )
        self.assertEqual(self.call("GET", "/system/dead-letters/nope")[0].code, 404)

    def test_a_bad_id_is_400_and_the_store_down_503(self) -> None:
        self.assertEqual(self.call("DELETE", "/system/dead-letters/bad%20id")[0].code, 400)
        self.store.available = False
        self.assertEqual(self.call("DELETE", "/system/dead-letters/c1")[0].code, 503)


class AuthenticatedDiscardTests(GatewayTestCase):
    auth = ("admin", "pw")

    def test_discarding_needs_credentials(self) -> None:
        self.store.dead_letters["c1"] = letter("c1")
        self.assertEqual(self.call("DELETE", "/system/dead-letters/c1")[0].code, 401)
        self.assertIn("c1", self.store.dead_letters)


class ResultWhileRetryingTests(GatewayTestCase):
    """A retrying call's stored answer is its last attempt's, not its result: 409 until it is final."""

    def setUp(self) -> None:
        super().setUp()
        from txfaas.model import CallResult

        self.store.results["c1"] = CallResult(503, [("Content-Type", "text/plain")], b"busy, try later")

    def put(self, **fields) -> None:
        self.store.calls["c1"] = CallRecord("c1", "echo", **fields)

    def test_retrying_is_409_saying_status_attempt_and_when(self) -> None:
        due = self.clock.seconds() + 7.2
        self.put(status=CallStatus.RETRYING, attempts=2, status_code=503, next_attempt_at=due)
        response, body = self.call("GET", "/system/calls/c1/result")
        self.assertEqual(response.code, 409)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"8"])
        self.assertEqual(
            js(body),
            {
                "callId": "c1",
                "status": "retrying",
                "attempts": 2,
                "nextAttemptAt": due,
                "lastStatusCode": 503,
                "error": "call 'c1' has no final result yet: it is retrying",
            },
        )

    def test_queued_and_running_are_409_too(self) -> None:
        for status in (CallStatus.QUEUED, CallStatus.RUNNING):
            self.put(status=status, attempts=3)
            response, body = self.call("GET", "/system/calls/c1/result")
            self.assertEqual((response.code, js(body)["status"]), (409, status))
            self.assertIsNone(response.headers.getRawHeaders(b"retry-after"))

    def test_a_final_call_answers_its_result(self) -> None:
        for status in (CallStatus.FAILED, CallStatus.DEAD_LETTERED):
            self.put(status=status, attempts=5, status_code=503)
            response, body = self.call("GET", "/system/calls/c1/result")
            self.assertEqual((response.code, body), (200, b"busy, try later"))
            self.assertEqual(response.headers.getRawHeaders(b"x-function-status"), [b"503"])

    def test_a_final_call_without_a_result_is_404(self) -> None:
        del self.store.results["c1"]
        self.put(status=CallStatus.CANCELLED)
        response, body = self.call("GET", "/system/calls/c1/result")
        self.assertEqual((response.code, body), (404, b"call 'c1' has no result (status: cancelled)\n"))


class RetryTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")
        self.queue.messages.setdefault("txfaas.callbacks", deque())

    def test_requeues_the_same_call_id_and_body_with_attempts_reset(self) -> None:
        dead = letter(
            "c1", body=b"\x00intact", attempt=5, queue="faas-request", callback_url="https://h.example/"
        )
        self.store.dead_letters["c1"] = dead
        self.store.calls["c1"] = CallRecord(
            "c1", "echo", status=CallStatus.DEAD_LETTERED, attempts=5, dead_reason="attempts_exhausted"
        )
        response, body = self.call("POST", "/system/calls/c1/retry")
        self.assertEqual(response.code, 202)
        self.assertEqual(js(body)["status"], "queued")
        self.assertEqual(js(body)["replay"], 1)
        [call] = self.queue.published
        self.assertEqual(
            (call.call_id, call.body, call.attempt, call.replay, call.queue, call.dead, call.callback_url),
            ("c1", b"\x00intact", 1, 1, "faas-request", None, "https://h.example/"),
        )
        record = self.store.calls["c1"]
        self.assertEqual(
            (record.status, record.attempts, record.replays, record.dead_reason), ("queued", 0, 1, None)
        )
        self.assertEqual(self.store.dead_letters, {})
        self.assertEqual(self.call("POST", "/system/calls/c1/retry")[0].code, 404)  # once only

    def test_a_callback_dead_letter_requeues_the_callback_not_the_call(self) -> None:
        job = CallbackJob(201, [("X-A", "b")], 0.5, attempt=10, first_at=1.0, retries=0, max_retries=4)
        dead = letter(
            "c2",
            body=b"the answer",
            queue="txfaas.callbacks",
            callback_url="https://h.example/",
            callback_job=job,
            dead=DeadMark(DeadReason.CALLBACK, 50.0, "receiver answered 503", 10),
        )
        self.store.dead_letters["c2"] = dead
        self.store.calls["c2"] = CallRecord(
            "c2", "echo", status="dead_lettered", status_code=201, callback_attempts=10
        )
        response, body = self.call("POST", "/system/calls/c2/retry")
        self.assertEqual(
            (response.code, js(body)["phase"], js(body)["status"]), (202, "callback", "succeeded")
        )
        [call] = self.queue.published
        self.assertEqual(
            (call.queue, call.body, call.callback_job.attempt), ("txfaas.callbacks", b"the answer", 1)
        )
        self.assertGreater(call.callback_job.first_at, 1.0)
        record = self.store.calls["c2"]
        self.assertEqual(
            (record.status, record.callback_state, record.callback_attempts, record.replays),
            ("succeeded", "retrying", 0, 1),
        )
        self.assertEqual(self.function.seen, [])

    def test_no_dead_letter_is_404(self) -> None:
        self.assertEqual(self.call("POST", "/system/calls/nothing/retry")[0].code, 404)

    def test_an_unconfirmed_publish_is_503_and_the_dead_letter_and_record_stay(self) -> None:
        self.store.dead_letters["c1"] = letter("c1")
        dead = CallRecord("c1", "echo", status=CallStatus.DEAD_LETTERED, dead_reason="attempts_exhausted")
        self.store.calls["c1"] = dead
        self.queue.available = False
        response, _ = self.call("POST", "/system/calls/c1/retry")
        self.assertEqual(response.code, 503)
        self.assertIn("c1", self.store.dead_letters)
        self.assertEqual(self.store.calls["c1"], dead)

    def test_the_record_is_claimed_before_the_message_is_published(self) -> None:
        """A worker must never see the re-queued message before its record says so."""
        self.store.dead_letters["c1"] = letter("c1")
        self.store.calls["c1"] = CallRecord("c1", "echo", status=CallStatus.DEAD_LETTERED)
        seen = []
        publish = self.queue.publish

        async def watch(call):
            seen.append(self.store.calls["c1"])
            await publish(call)

        self.queue.publish = watch
        self.assertEqual(self.call("POST", "/system/calls/c1/retry")[0].code, 202)
        self.assertEqual([(r.status, r.replays) for r in seen], [("accepting", 1)])
        self.assertEqual(self.store.calls["c1"].status, "queued")

    def test_ten_retries_at_once_requeue_once_and_the_others_are_409(self) -> None:
        self.store.dead_letters["c1"] = letter("c1")
        self.store.calls["c1"] = CallRecord("c1", "echo", status=CallStatus.DEAD_LETTERED)
        confirms: list[defer.Deferred] = []
        publish = self.queue.publish

        async def slow(call):
            d: defer.Deferred = defer.Deferred()
            confirms.append(d)
            await d
            await publish(call)

        self.queue.publish = slow
        pending = [self.start("POST", "/system/calls/c1/retry") for _ in range(10)]
        for d in confirms:
            d.callback(None)
        self.flush()
        codes = sorted(self.successResultOf(d).code for d in pending)
        self.assertEqual(codes, [202] + [409] * 9)
        self.assertEqual([c.call_id for c in self.queue.published], ["c1"])
        self.assertEqual((self.store.calls["c1"].status, self.store.calls["c1"].replays), ("queued", 1))

    def test_a_dead_letter_already_requeued_is_409_not_requeued_twice(self) -> None:
        """The gateway that re-queued it died before removing the dead letter: the call runs
        (replay 1) and the dead letter is still listed."""
        self.store.dead_letters["c1"] = letter("c1")
        self.store.calls["c1"] = CallRecord("c1", "echo", status=CallStatus.RUNNING, replays=1)
        response, body = self.call("POST", "/system/calls/c1/retry")
        self.assertEqual(response.code, 409)
        self.assertIn(b"re-queued already", body)
        self.assertEqual(self.queue.published, [])

    def test_an_unconfirmed_retry_of_a_letter_without_record_leaves_no_record(self) -> None:
        """Nothing queued: no ``queued`` record may say otherwise."""
        self.store.dead_letters["c1"] = letter("c1")
        self.queue.available = False
        self.assertEqual(self.call("POST", "/system/calls/c1/retry")[0].code, 503)
        self.assertNotIn("c1", self.store.calls)
        self.assertIn("c1", self.store.dead_letters)

    def test_a_retry_whose_gateway_died_before_the_confirm_can_be_retried_after_the_deadline(self) -> None:
        self.store.dead_letters["c1"] = letter("c1")
        self.store.calls["c1"] = CallRecord(
            "c1", "echo", status=CallStatus.ACCEPTING, replays=1, accepting_until=self.clock.seconds() + 10
        )
        self.assertEqual(self.call("POST", "/system/calls/c1/retry")[0].code, 409)
        self.clock.advance(10)
        response, body = self.call("POST", "/system/calls/c1/retry")
        self.assertEqual((response.code, js(body)["replay"]), (202, 2))
        [call] = self.queue.published
        self.assertEqual(call.replay, 2)

    def test_a_message_that_was_not_a_txfaas_call_cannot_be_requeued(self) -> None:
        self.store.dead_letters["x"] = letter("x", function="", dead=DeadMark(DeadReason.UNDECODABLE, 1.0))
        self.assertEqual(self.call("POST", "/system/calls/x/retry")[0].code, 409)

    def test_replay_numbers_grow_past_the_records(self) -> None:
        self.store.dead_letters["c1"] = letter("c1", replay=1)
        self.store.calls["c1"] = CallRecord("c1", "echo", status="dead_lettered", replays=3)
        _, body = self.call("POST", "/system/calls/c1/retry")
        self.assertEqual(js(body)["replay"], 4)


class IdempotencyTests(GatewayTestCase):
    def test_a_post_with_an_existing_call_id_queues_nothing_and_answers_its_status(self) -> None:
        self.deploy("echo")
        record = CallRecord("c9", "echo", status=CallStatus.RETRYING)
        self.store.calls["c9"] = record
        response, body = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["c9"]}, data=b"x")
        self.assertEqual((response.code, js(body)["status"], js(body)["duplicate"]), (202, "retrying", True))
        self.assertEqual(self.queue.published, [])
        d = defer.Deferred.fromCoroutine(self.store.get_call("c9"))
        self.assertEqual(self.successResultOf(d), record)
