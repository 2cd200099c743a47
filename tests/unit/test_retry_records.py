"""What retries and dead letters add to the model, the in-memory store and the in-memory queue."""

from __future__ import annotations

import json

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from txfaas.model import Call, CallbackJob, CallRecord, CallStatus, DeadLetter, DeadMark, DeadReason
from txfaas.queue import QueueUnavailable
from txfaas.store import NotFound
from txfaas.testing import MemoryQueue, MemoryStore


def run(coro):
    d = defer.Deferred.fromCoroutine(coro)
    results: list = []
    d.addBoth(results.append)
    assert results, "did not finish synchronously"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_a_retry_message_round_trips_its_due_time_replay_dead_mark_and_callback_job():
    call = Call(
        call_id="c1",
        function="fn",
        body=b"\x00answer",
        attempt=3,
        not_before=12.5,
        replay=2,
        dead=DeadMark(DeadReason.CALLBACK, 99.0, "receiver answered 503", 4),
        callback_job=CallbackJob(
            201, [("X-A", "b")], 0.25, attempt=2, first_at=50.0, retries=1, max_retries=4
        ),
    )
    assert Call.decode(call.encode_meta(), call.body) == call


def test_a_first_attempt_message_carries_no_retry_keys():
    meta = Call(call_id="c1", function="fn").meta()
    assert not {"notBefore", "replay", "dead", "callbackJob"} & set(meta)


def test_a_dead_letter_keeps_the_whole_message_and_lists_a_summary():
    call = Call(
        call_id="c1",
        function="fn",
        body=bytes(range(256)),
        queue="q",
        attempt=5,
        dead=DeadMark(DeadReason.ATTEMPTS, 1_700_000_000.0, "503 five times", 5),
    )
    letter = DeadLetter(call)
    again = DeadLetter.from_json(json.loads(json.dumps(letter.to_json())))
    assert again == letter
    assert letter.summary_json() == {
        "callId": "c1",
        "namespace": "openfaas-fn",
        "function": "fn",
        "queue": "q",
        "phase": "call",
        "reason": "attempts_exhausted",
        "error": "503 five times",
        "deadAt": 1_700_000_000.0,
        "deadAtTime": "2023-11-14T22:13:20Z",
        "attempts": 5,
        "replay": 0,
    }
    assert DeadLetter(attrs.evolve(call, callback_job=CallbackJob(200))).phase == "callback"
    with pytest.raises(ValueError):
        DeadLetter(attrs.evolve(call, dead=None))


def test_records_round_trip_the_new_fields():
    record = CallRecord(
        "c1",
        "fn",
        status=CallStatus.DEAD_LETTERED,
        callback_next_attempt_at=5.0,
        callback_error="boom",
        dead_reason=DeadReason.MAX_AGE,
        interruptions=2,
        replays=1,
    )
    assert CallRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert CallRecord.for_call(Call(call_id="c", function="f", replay=3)).replays == 3


def test_transition_writes_only_from_the_allowed_statuses():
    store = MemoryStore()
    queued = CallRecord("c1", "fn")
    with pytest.raises(NotFound):
        run(store.transition_call(queued, {CallStatus.QUEUED}))
    assert run(store.transition_call(queued, {CallStatus.QUEUED}, create=True)) is None
    running = attrs.evolve(queued, status=CallStatus.RUNNING)
    assert run(store.transition_call(running, CallStatus.CANCELLABLE)) is None
    cancelled = attrs.evolve(queued, status=CallStatus.CANCELLED)
    assert run(store.transition_call(cancelled, CallStatus.CANCELLABLE)) == running
    assert store.calls["c1"] == running


def _letter(call_id: str, function: str, at: float) -> DeadLetter:
    return DeadLetter(Call(call_id=call_id, function=function, dead=DeadMark(DeadReason.MAX_AGE, at)))


def test_memory_dead_letters_list_oldest_first_by_function_and_are_removed_once():
    store = MemoryStore()
    for letter in (_letter("c", "a", 3.0), _letter("b", "b", 2.0), _letter("a", "a", 1.0)):
        run(store.put_dead_letter(letter))
    assert [d.call_id for d in run(store.list_dead_letters())] == ["a", "b", "c"]
    assert [d.call_id for d in run(store.list_dead_letters("a"))] == ["a", "c"]
    assert [d.call_id for d in run(store.list_dead_letters(offset=1, limit=1))] == ["b"]
    assert (run(store.count_dead_letters()), run(store.count_dead_letters("a"))) == (3, 2)
    assert run(store.get_dead_letter("b")).function == "b"
    assert run(store.remove_dead_letter("b")) is True
    assert run(store.remove_dead_letter("b")) is False
    assert run(store.get_dead_letter("b")) is None


def test_memory_queue_delays_on_its_clock_and_dead_letters_to_its_dead_letter_queue():
    clock = Clock()
    queue = MemoryQueue(["q"], clock=clock, dead_letter_queue="dlq")
    got: list[Call] = []
    queue.consume(["q", "dlq"], 10, lambda d: (got.append(d.call), d.ack()))
    call = Call(call_id="c1", function="fn", queue="q")
    assert run(queue.publish_delayed(call, 2.0)) == 2.0
    clock.advance(1.9)
    assert got == []
    clock.advance(0.1)
    assert got == [call]
    assert run(queue.publish_delayed(call, 0)) == 0.0  # no wait: published at once
    assert len(got) == 2
    dead = attrs.evolve(call, dead=DeadMark(DeadReason.ATTEMPTS, 1.0))
    run(queue.dead_letter(dead))
    assert got[-1] == dead and queue.dead_letters == [dead]
    queue.available = False
    with pytest.raises(QueueUnavailable):
        run(queue.publish_delayed(call, 1.0))
