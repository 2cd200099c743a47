"""The worker's retries, callback retries, dead letters, cancel and max age, in memory.

The harness of ``test_worker_service`` (a ``Clock``, ``MemoryQueue`` on that clock,
``MemoryStore``, functions and receivers behind ``RequestTraversalAgent``) with a fixed
jitter draw, so every wait is known.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer

from tests.fakes import RefusingAgent
from tests.unit.test_worker_service import CALLBACK, Harness, Q, never_answer
from txfaas.model import Call, CallbackJob, CallRecord, CallStatus, DeadMark, DeadReason
from txfaas.retry import CallbackPolicy, RetryPolicy
from txfaas.worker.callback import verify

KEY = b"test-key"


def retrying(**config):
    """Five attempts, waits drawn at the minimum of 1 s (random() == 0), then doubling ceilings."""
    config.setdefault("retry", RetryPolicy(max_attempts=5, min_wait=1.0, max_wait=30.0))
    return config


def answers(*codes, headers=None):
    """A function answering ``codes`` in turn (the last one for ever after)."""
    seen = []

    def respond(request):
        seen.append(1)
        code = codes[min(len(seen), len(codes)) - 1]
        return (code, headers or {}, f"answer {len(seen)}: {code}".encode())

    return respond


def run_until_quiet(h: Harness, seconds: float, step: float = 0.5) -> None:
    h.flush()
    t = 0.0
    while t < seconds:
        h.clock.advance(step)
        h.flush()
        t += step


def test_a_retry_code_schedules_the_next_attempt_in_the_queue_and_records_retrying():
    """503: the next attempt (number 2) is published to a delay queue, due after the wait; the record
    says ``retrying`` with the attempt and the next attempt's time; the message is acked."""
    h = Harness(respond=answers(503, 200), **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    record = h.record()
    assert (record.status, record.attempts, record.max_attempts, record.status_code) == (
        "retrying",
        1,
        5,
        503,
    )
    assert record.next_attempt_at == h.clock.seconds() + 1.0
    [(delay, nxt)] = h.queue.delayed
    assert (delay, nxt.attempt, nxt.not_before, nxt.queue) == (1.0, 2, record.next_attempt_at, Q)
    assert nxt.body == b"" and nxt.call_id == "call-1"
    assert h.unacked == 0 and h.receiver.requests == []
    assert h.store.results["call-1"].status_code == 503


def test_an_attempts_answer_is_kept_before_the_next_attempt_is_published():
    """So the next attempt's answer, from whichever worker runs it, is written after this one."""
    h = Harness(respond=answers(503, 200), **retrying())
    h.deploy()
    h.enqueue()
    kept_when_published = []
    publish = h.queue.publish_delayed

    async def watching(call, delay):
        kept_when_published.append(h.store.results.get("call-1"))
        return await publish(call, delay)

    h.queue.publish_delayed = watching
    h.start()
    h.flush()
    [kept] = kept_when_published
    assert kept is not None and kept.status_code == 503


def test_a_call_retried_until_it_succeeds_calls_back_once_with_x_retry_headers():
    """503, 503, 200: three runs, one callback carrying the answer, X-Retry 2 and X-Retry-Max 4."""
    h = Harness(respond=answers(503, 503, 200), **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 10)
    assert len(h.function.requests) == 3
    [cb] = h.receiver.requests
    assert cb["body"] == b"answer 3: 200"
    assert (cb["headers"]["x-retry"], cb["headers"]["x-retry-max"]) == (["2"], ["4"])
    record = h.record()
    assert (record.status, record.attempts, record.next_attempt_at) == ("succeeded", 3, None)
    assert h.metric("txfaas_worker_retries_total", function="echo.openfaas-fn") == 2


def test_waits_follow_full_jitter_between_the_bounds():
    """random() == 1: the ceilings 2 s, 4 s, 8 s (min_wait * 2**n), capped by max_wait 5 s."""
    h = Harness(
        respond=answers(500),
        random=lambda: 1.0,
        retry=RetryPolicy(max_attempts=5, min_wait=1.0, max_wait=5.0),
    )
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 30, step=0.25)
    assert [d for d, _ in h.queue.delayed] == [2.0, 4.0, 5.0, 5.0]
    gaps = [b["time"] - a["time"] for a, b in zip(h.function.requests, h.function.requests[1:], strict=False)]
    assert len(h.function.requests) == 5 and len(gaps) == 4


def test_unreachable_and_timed_out_functions_are_retried():
    """No connection (502 from the worker) and exec_timeout (504) are retry codes too."""
    agent = RefusingAgent()
    h = Harness(agent=agent, **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 60)
    assert agent.requests == 5
    assert h.record().status == CallStatus.DEAD_LETTERED

    h = Harness(respond=never_answer, exec_timeout=2.0, **retrying(retry=RetryPolicy(max_attempts=2)))
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 10)
    assert len(h.function.requests) == 2
    assert h.record().status_code == 504


def test_retry_after_from_the_function_sets_the_wait_within_the_bounds():
    h = Harness(respond=answers(429, 200, headers={"Retry-After": "7"}), **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert [d for d, _ in h.queue.delayed] == [7.0]
    h2 = Harness(respond=answers(429, 200, headers={"Retry-After": "3600"}), **retrying())
    h2.deploy()
    h2.enqueue()
    h2.start()
    h2.flush()
    assert [d for d, _ in h2.queue.delayed] == [30.0]  # clamped to max_wait


def test_function_annotations_override_the_worker_retry_settings():
    """com.openfaas.retry.codes=429 makes 500 final; .attempts=2 stops after two."""
    h = Harness(respond=answers(500), **retrying())
    h.deploy(annotations={"com.openfaas.retry.codes": "429"})
    h.enqueue()
    h.start()
    run_until_quiet(h, 5)
    assert len(h.function.requests) == 1 and h.record().status == CallStatus.FAILED

    h = Harness(respond=answers(429), **retrying())
    h.deploy(annotations={"com.openfaas.retry.attempts": "2", "com.openfaas.retry.min_wait": "3s"})
    h.enqueue()
    h.start()
    run_until_quiet(h, 20)
    assert len(h.function.requests) == 2
    assert [d for d, _ in h.queue.delayed] == [3.0]
    assert (h.record().status, h.record().max_attempts) == (CallStatus.DEAD_LETTERED, 2)


def test_a_status_that_is_not_a_retry_code_is_final_at_once():
    h = Harness(respond=answers(400), **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 5)
    assert len(h.function.requests) == 1
    assert (h.record().status, h.queue.delayed) == (CallStatus.FAILED, [])


def test_exhausted_attempts_end_in_the_dead_letters_with_the_last_answer_called_back():
    """Five 503s: the record is ``dead_lettered`` (attempts_exhausted), the call is in the dead-letter
    queue and then kept in the store (body intact), and the caller gets the last answer once."""
    h = Harness(respond=answers(503), signing_key=KEY, **retrying())
    h.deploy()
    h.enqueue(body=b"\x00payload")
    h.start()
    run_until_quiet(h, 120)
    assert len(h.function.requests) == 5
    record = h.record()
    assert (record.status, record.dead_reason, record.attempts, record.status_code) == (
        "dead_lettered",
        "attempts_exhausted",
        5,
        503,
    )
    assert "5 attempt(s)" in record.error
    [dead] = h.queue.dead_letters
    assert (dead.call_id, dead.dead.reason, dead.dead.attempts, dead.body) == (
        "call-1",
        "attempts_exhausted",
        5,
        b"\x00payload",
    )
    kept = h.store.dead_letters["call-1"]
    assert (kept.call.body, kept.call.attempt, kept.mark.reason) == (b"\x00payload", 5, "attempts_exhausted")
    [cb] = h.receiver.requests
    assert (cb["headers"]["x-function-status"], cb["headers"]["x-retry"], cb["headers"]["x-retry-max"]) == (
        ["503"],
        ["4"],
        ["4"],
    )
    assert h.unacked == 0 and h.queue.pending("txfaas.dead-letter") == 0
    assert h.metric("txfaas_worker_dead_letters_total", reason="attempts_exhausted") == 1


def test_a_stale_attempt_message_is_dropped_without_running():
    """A duplicate of attempt 1 when the record says attempt 2 started (or attempt 1 already
    scheduled its retry) is acked and never runs."""
    for record_fields in ({"status": "running", "attempts": 2}, {"status": "retrying", "attempts": 1}):
        h = Harness(**retrying())
        h.deploy()
        call = Call(call_id="call-1", function="echo", callback_url=CALLBACK, attempt=1)
        h.enqueue(call, record=attrs.evolve(CallRecord.for_call(call), **record_fields))
        h.start()
        h.flush()
        assert h.function.requests == [] and h.unacked == 0
        assert h.metric("txfaas_worker_stale_total", kind="call") == 1


def test_a_cancelled_call_never_runs_and_gets_no_callback():
    h = Harness(**retrying())
    h.deploy()
    call = Call(call_id="call-1", function="echo", callback_url=CALLBACK)
    h.enqueue(call, record=attrs.evolve(CallRecord.for_call(call), status=CallStatus.CANCELLED))
    h.start()
    h.flush()
    assert h.function.requests == [] and h.receiver.requests == [] and h.unacked == 0


def test_a_call_cancelled_while_waiting_for_its_retry_runs_no_more():
    h = Harness(respond=answers(503, 200), **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.record().status == CallStatus.RETRYING
    h.store.calls["call-1"] = attrs.evolve(h.record(), status=CallStatus.CANCELLED)
    run_until_quiet(h, 5)
    assert len(h.function.requests) == 1 and h.receiver.requests == []
    assert h.record().status == CallStatus.CANCELLED


def test_a_cancel_that_lands_between_reading_and_starting_wins():
    """The switch to ``running`` is a transition from queued/retrying: a cancel written after the
    worker read the record but before it started the call stops it."""

    class CancelInBetween(type(Harness().store)):
        async def get_function(self, name, namespace="openfaas-fn"):
            self.calls["call-1"] = attrs.evolve(self.calls["call-1"], status=CallStatus.CANCELLED)
            return await super().get_function(name, namespace)

    h = Harness(**retrying())
    h.store.__class__ = CancelInBetween
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.function.requests == [] and h.unacked == 0
    assert h.record().status == CallStatus.CANCELLED


def test_a_call_older_than_max_age_is_dead_lettered_without_running():
    h = Harness(max_age=3600.0, **retrying())
    h.deploy()
    h.clock.advance(3602)
    h.enqueue()  # accepted_at = 1.0
    h.start()
    h.flush()
    assert h.function.requests == [] and h.receiver.requests == []
    record = h.record()
    assert (record.status, record.dead_reason, record.callback_state) == (
        "dead_lettered",
        "max_age",
        "failed",
    )
    assert h.store.dead_letters["call-1"].mark.reason == "max_age"


def test_a_call_that_keeps_killing_workers_is_dead_lettered_at_the_delivery_limit():
    """Found ``running`` (interrupted) for the fourth time with --delivery-limit 3: not run again."""
    h = Harness(delivery_limit=3, **retrying())
    h.deploy()
    call = Call(call_id="call-1", function="echo", callback_url=CALLBACK)
    interrupted = attrs.evolve(CallRecord.for_call(call), status="running", attempts=1, interruptions=3)
    h.enqueue(call, record=interrupted)
    h.start()
    h.flush()
    assert h.function.requests == []
    assert (h.record().status, h.record().dead_reason) == ("dead_lettered", "delivery_limit")
    assert h.store.dead_letters["call-1"].mark.reason == "delivery_limit"
    # One interruption fewer: it runs again.
    h = Harness(delivery_limit=3, **retrying())
    h.deploy()
    h.enqueue(call, record=attrs.evolve(interrupted, interruptions=2))
    h.start()
    h.flush()
    assert len(h.function.requests) == 1 and h.record().interruptions == 3


def test_a_retry_arriving_before_its_due_time_is_sent_round_again():
    """A delay tier shorter than the wait delivers it early: it goes back for the rest, unrun."""
    h = Harness(**retrying())
    h.deploy()
    h.clock.advance(100)
    h.enqueue(attempt=2, not_before=160.0, record=CallRecord("call-1", "echo", status="retrying", attempts=1))
    h.start()
    h.flush()
    assert h.function.requests == []
    assert [(d, c.not_before) for d, c in h.queue.delayed] == [(60.0, 160.0)]
    h.clock.advance(60)
    h.flush()
    assert len(h.function.requests) == 1


def test_scheduling_a_retry_that_the_broker_does_not_confirm_gives_the_message_back():
    """The retry is not confirmed: no ack (the broker keeps the message); nothing is lost."""
    h = Harness(respond=answers(503), **retrying())

    async def refuse(call, delay):
        from txfaas.queue import QueueUnavailable

        raise QueueUnavailable("no confirm")

    h.queue.publish_delayed = refuse
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    [delivery] = h.queue._unacked
    assert delivery.settled is None
    assert h.record().status == CallStatus.RUNNING


# --- callbacks --------------------------------------------------------------------------------------


def test_a_failed_callback_is_retried_from_the_queue_with_the_same_webhook_id_never_rerunning():
    """Receiver 503, 503, then 200: three deliveries with one webhook-id and the same body; the
    function ran once; the record shows three callback attempts and ``delivered``."""
    replies = iter([(503, {}, b""), (503, {}, b""), (200, {}, b"")])
    h = Harness(
        respond=answers(201),
        callback_respond=lambda req: next(replies),
        signing_key=KEY,
        callback_retry=CallbackPolicy(max_attempts=5, min_wait=1.0, max_wait=10.0),
        **retrying(),
    )
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 10)
    assert len(h.function.requests) == 1
    assert len(h.receiver.requests) == 3
    ids = {r["headers"]["webhook-id"][0] for r in h.receiver.requests}
    assert ids == {"call-1"}
    assert {r["body"] for r in h.receiver.requests} == {b"answer 1: 201"}
    for r in h.receiver.requests:
        headers = {k: v[0] for k, v in r["headers"].items()}
        assert verify(KEY, headers, r["body"], now=h.clock.seconds()) == "call-1"
        assert headers["x-function-status"] == "201"
    record = h.record()
    assert (record.status, record.callback_state, record.callback_attempts, record.callback_status) == (
        "succeeded",
        "delivered",
        3,
        200,
    )
    assert h.metric("txfaas_worker_callback_retries_total") == 2


def test_a_callback_answered_410_stops_at_once():
    h = Harness(callback_respond=lambda req: (410, {}, b"gone"), **retrying())
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 60)
    assert len(h.receiver.requests) == 1
    record = h.record()
    assert (record.status, record.callback_state, record.callback_status) == ("succeeded", "failed", 410)
    assert h.queue.dead_letters == []


def test_an_exhausted_callback_is_dead_lettered_with_the_answer_kept():
    """Three failed deliveries (--callback-max-attempts 3): reason callback_failed, the letter keeps
    the function's answer (status, headers, body) so re-queuing it never runs the function."""
    h = Harness(
        respond=lambda req: (202, {"X-Out": "kept"}, b"the answer"),
        callback_respond=lambda req: (500, {}, b""),
        callback_retry=CallbackPolicy(max_attempts=3, min_wait=1.0, max_wait=1.0),
        **retrying(),
    )
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 10)
    assert len(h.function.requests) == 1 and len(h.receiver.requests) == 3
    record = h.record()
    assert (record.status, record.dead_reason, record.status_code) == (
        "dead_lettered",
        "callback_failed",
        202,
    )
    assert (record.callback_state, record.callback_attempts) == ("failed", 3)
    letter = h.store.dead_letters["call-1"]
    assert letter.phase == "callback"
    assert (letter.call.body, letter.call.callback_job.status_code) == (b"the answer", 202)
    assert ["X-Out", "kept"] in [list(x) for x in letter.call.callback_job.headers]


def test_callback_retries_stop_at_the_max_age():
    h = Harness(
        callback_respond=lambda req: (503, {}, b""),
        callback_retry=CallbackPolicy(max_attempts=100, max_age=10.0, min_wait=4.0, max_wait=4.0),
        **retrying(),
    )
    h.deploy()
    h.enqueue()
    h.start()
    run_until_quiet(h, 60)
    # Attempts at 0, 4, 8 and at the age limit (10 s): never later.
    assert len(h.receiver.requests) == 4
    assert h.record().dead_reason == DeadReason.CALLBACK


def test_a_duplicate_callback_job_is_dropped():
    """A callback-queue message for an attempt the record already counts is not delivered again."""
    h = Harness(**retrying())
    h.deploy()
    record = CallRecord("call-1", "echo", status="succeeded", callback_url=CALLBACK)
    h.store.calls["call-1"] = attrs.evolve(record, callback_state="retrying", callback_attempts=2)
    job = Call(
        call_id="call-1",
        function="echo",
        callback_url=CALLBACK,
        queue="txfaas.callbacks",
        callback_job=CallbackJob(200, attempt=2),
    )
    h.start()
    defer.Deferred.fromCoroutine(h.queue.publish(job))
    h.flush()
    assert h.receiver.requests == []
    assert h.metric("txfaas_worker_stale_total", kind="callback") == 1


def test_a_requeued_callback_whose_gateway_did_not_record_the_confirm_ends_with_the_outcome():
    """A callback re-queued from the dead letters whose record is still the gateway's claim
    (``accepting``): once delivered, the record says the call's outcome, not ``accepting``
    (a lapsed claim would let a client's retry run the call again)."""
    h = Harness(**retrying())
    h.deploy()
    claim = CallRecord(
        "call-1",
        "echo",
        status=CallStatus.ACCEPTING,
        accepting_until=5.0,
        callback_url=CALLBACK,
        callback_state="retrying",
        replays=1,
    )
    h.store.calls["call-1"] = claim
    job = Call(
        call_id="call-1",
        function="echo",
        callback_url=CALLBACK,
        queue="txfaas.callbacks",
        replay=1,
        callback_job=CallbackJob(201, attempt=1),
    )
    h.start()
    defer.Deferred.fromCoroutine(h.queue.publish(job))
    h.flush()
    assert len(h.receiver.requests) == 1
    record = h.record()
    assert (record.status, record.callback_state) == (CallStatus.SUCCEEDED, "delivered")


def test_a_requeued_callback_is_recorded_over_the_claim_its_gateway_settled_meanwhile():
    """The gateway records the confirm of a re-queued callback (its claim becomes the call's
    outcome, ``retrying`` its callback) while the worker delivers it: the delivery is still
    recorded, over the settled record."""
    h = Harness(**retrying())
    h.deploy()
    answer: defer.Deferred = defer.Deferred()
    h.receiver.respond = lambda request: answer
    claim = CallRecord(
        "call-1",
        "echo",
        status=CallStatus.ACCEPTING,
        accepting_until=5.0,
        callback_url=CALLBACK,
        callback_state="retrying",
        replays=1,
    )
    h.store.calls["call-1"] = claim
    job = Call(
        call_id="call-1",
        function="echo",
        callback_url=CALLBACK,
        queue="txfaas.callbacks",
        replay=1,
        callback_job=CallbackJob(201, attempt=1),
    )
    h.start()
    defer.Deferred.fromCoroutine(h.queue.publish(job))
    h.flush()
    assert len(h.receiver.requests) == 1
    h.store.calls["call-1"] = attrs.evolve(claim, status=CallStatus.SUCCEEDED, accepting_until=None)
    answer.callback((204, {}, b""))
    h.flush()
    record = h.record()
    assert (record.status, record.callback_state, record.callback_attempts) == ("succeeded", "delivered", 1)


def test_a_dead_callback_is_recorded_over_the_keepers_mark():
    """The keeper may mark the record of a callback's dead letter before the attempt that published
    it records its end: that fuller record still lands."""
    h = Harness(callback_respond=lambda req: (503, {}, b""), callback_retry=CallbackPolicy(max_attempts=1))
    h.deploy()
    h.enqueue()
    publish = h.queue.dead_letter

    async def kept_at_once(call):
        await publish(call)
        h.store.calls["call-1"] = attrs.evolve(
            h.store.calls["call-1"], status=CallStatus.DEAD_LETTERED, dead_reason=DeadReason.CALLBACK
        )

    h.queue.dead_letter = kept_at_once
    h.start()
    h.flush()
    record = h.record()
    assert (record.status, record.dead_reason) == ("dead_lettered", DeadReason.CALLBACK)
    assert (record.callback_state, record.callback_attempts, record.callback_status) == ("failed", 1, 503)


# --- the dead-letter keeper --------------------------------------------------------------------------


def test_a_broker_dead_letter_is_kept_and_its_record_marked():
    """A message the broker dead-lettered (say, by a delivery-limit policy) reaches the keeper with
    its reason: it is kept in the store and the record says dead_lettered."""
    h = Harness(**retrying())
    h.start()
    call = Call(
        call_id="call-9", function="echo", body=b"b", dead=DeadMark("delivery_limit", 5.0, "by the broker")
    )
    h.store.calls["call-9"] = CallRecord("call-9", "echo", status="running", attempts=1)
    defer.Deferred.fromCoroutine(h.queue.dead_letter(call))
    h.flush()
    assert h.store.dead_letters["call-9"].call == call
    record = h.store.calls["call-9"]
    assert (record.status, record.dead_reason, record.error) == (
        "dead_lettered",
        "delivery_limit",
        "by the broker",
    )
    assert h.queue.pending("txfaas.dead-letter") == 0


def test_the_keeper_never_writes_back_a_record_that_moved_on_while_it_read():
    """The callback path publishes its dead letter, then records the end (attempt 2, failed).
    The keeper, reading the record between the two, must not write its older copy over that
    (seen in CI: the record kept saying "callback retrying, 1 attempt")."""
    h = Harness(**retrying())
    h.start()
    before = CallRecord(
        "call-9", "echo", status="succeeded", attempts=1, callback_state="retrying", callback_attempts=1
    )
    after = attrs.evolve(
        before,
        status="dead_lettered",
        dead_reason="callback_failed",
        callback_state="failed",
        callback_attempts=2,
    )
    h.store.calls["call-9"] = before
    read = h.store.get_call

    async def read_then_moved_on(call_id: str) -> CallRecord | None:
        found = await read(call_id)
        h.store.calls["call-9"] = after  # the callback path's own write lands meanwhile
        return found

    h.store.get_call = read_then_moved_on
    call = Call(call_id="call-9", function="echo", dead=DeadMark("callback_failed", 5.0, "cb down"))
    defer.Deferred.fromCoroutine(h.queue.dead_letter(call))
    h.flush()
    assert h.store.dead_letters["call-9"].call == call
    assert h.store.calls["call-9"] == after
    assert h.queue.pending("txfaas.dead-letter") == 0


def test_the_keeper_drops_a_dead_letter_older_than_a_replay():
    """After ``POST .../retry`` (replay 1), a late duplicate of the replay-0 dead letter is not kept."""
    h = Harness(**retrying())
    h.start()
    h.store.calls["call-9"] = CallRecord("call-9", "echo", status="queued", replays=1)
    call = Call(call_id="call-9", function="echo", dead=DeadMark("max_age", 5.0))
    defer.Deferred.fromCoroutine(h.queue.dead_letter(call))
    h.flush()
    assert h.store.dead_letters == {} and h.store.calls["call-9"].status == "queued"


def test_the_keeper_gives_the_dead_letter_back_while_the_store_is_down():
    h = Harness(**retrying())
    h.start()
    h.store.available = False
    defer.Deferred.fromCoroutine(
        h.queue.dead_letter(Call(call_id="c", function="echo", dead=DeadMark("x", 1.0)))
    )
    h.flush()
    assert len(h.queue._unacked) == 1
    h.store.available = True
    h.clock.advance(1.0)
    h.flush()
    assert "c" in h.store.dead_letters and h.queue.pending("txfaas.dead-letter") == 0


def test_a_retry_past_max_age_is_dead_lettered_and_the_last_answer_called_back():
    """Waiting for attempt 2 when --max-age passes: not run; dead-lettered (max_age); the caller
    gets attempt 1's answer, the one it would otherwise never hear of."""
    h = Harness(
        respond=answers(503), max_age=100.0, **retrying(retry=RetryPolicy(min_wait=200.0, max_wait=200.0))
    )
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.record().status == CallStatus.RETRYING and h.receiver.requests == []
    run_until_quiet(h, 210, step=10.0)
    assert len(h.function.requests) == 1
    record = h.record()
    assert (record.status, record.dead_reason, record.callback_state) == (
        "dead_lettered",
        "max_age",
        "delivered",
    )
    [cb] = h.receiver.requests
    assert (cb["body"], cb["headers"]["x-function-status"], cb["headers"]["x-retry"]) == (
        b"answer 1: 503",
        ["503"],
        ["0"],
    )
    assert h.store.dead_letters["call-1"].mark.reason == "max_age"


def test_a_dead_letter_write_whose_reply_was_lost_is_still_published_and_called_back():
    """Redis paused past the command timeout ran the dead_lettered write all the same: the retry
    finds this run's own record, which is no reason to skip the dead letter and the callback."""
    h = Harness(
        respond=answers(503), max_age=100.0, **retrying(retry=RetryPolicy(min_wait=200.0, max_wait=200.0))
    )
    h.deploy()
    h.enqueue()
    h.store.lose_final_reply = True
    h.start()
    h.flush()
    run_until_quiet(h, 210, step=10.0)
    assert not h.store.lose_final_reply  # the reply was lost once
    record = h.record()
    assert (record.status, record.dead_reason, record.callback_state) == (
        "dead_lettered",
        "max_age",
        "delivered",
    )
    assert len(h.receiver.requests) == 1
    assert h.store.dead_letters["call-1"].mark.reason == "max_age"


def test_a_retry_arriving_while_its_previous_attempt_still_records_is_run_not_acked_with_it():
    """Attempt 2 comes back while attempt 1's job still waits for Redis to record it: it is a message
    of its own and must run (found in review: it used to join attempt 1's job and be acked unrun)."""
    h = Harness(
        respond=answers(503, 200), **retrying(retry=RetryPolicy(max_attempts=5, min_wait=1.0, max_wait=30.0))
    )
    h.deploy()
    h.enqueue()
    h.store.writes_fail = True  # Redis stops answering once the call has started...
    original = h.store.transition_call
    seen = {"n": 0}

    async def transition(record, from_statuses, **kwargs):
        seen["n"] += 1
        if seen["n"] == 1:  # ...but the start itself gets through
            return await super(type(h.store), h.store).transition_call(record, from_statuses, **kwargs)
        return await original(record, from_statuses, **kwargs)

    h.store.transition_call = transition
    h.start()
    h.flush()
    h.clock.advance(1.5)  # the retry is delivered while attempt 1 is still being recorded
    h.flush()
    h.store.writes_fail = False
    run_until_quiet(h, 60)
    assert len(h.function.requests) == 2, "attempt 2 never ran"
    record = h.record()
    assert (record.status, record.attempts) == (CallStatus.SUCCEEDED, 2)
    assert len(h.receiver.requests) == 1
    assert h.unacked == 0 and h.queue.pending(Q) == 0
