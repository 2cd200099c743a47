"""The in-memory fakes (txfaas.testing) behave like the real store and queue where tests rely on it."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from txfaas.model import Call, CallRecord, CallResult, CallStatus, FunctionSpec
from txfaas.queue import QueueUnavailable
from txfaas.store import AlreadyExists, NotFound, StoreUnavailable
from txfaas.testing import MemoryDelivery, MemoryQueue, MemoryStore


def finished(coroutine: Any) -> Any:
    """Run a coroutine that must finish synchronously; return its result or raise its error."""
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "the coroutine did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# --- MemoryStore: functions ---------------------------------------------------------------------


def spec(name: str = "fn", **kwargs: Any) -> FunctionSpec:
    return FunctionSpec(service=name, **kwargs)


def test_store_create_then_get_and_list_sorted_by_name():
    store = MemoryStore()
    finished(store.create_function(spec("b", image="b:1")))
    finished(store.create_function(spec("a", image="a:1")))
    assert finished(store.get_function("b")) == spec("b", image="b:1")
    assert [s.service for s in finished(store.list_functions())] == ["a", "b"]
    assert finished(store.get_function("missing")) is None


def test_store_create_existing_name_raises_already_exists_and_keeps_the_first():
    store = MemoryStore()
    finished(store.create_function(spec(image="first")))
    with pytest.raises(AlreadyExists):
        finished(store.create_function(spec(image="second")))
    assert finished(store.get_function("fn")).image == "first"


def test_store_update_replaces_the_spec_but_keeps_created_at_and_replicas():
    store = MemoryStore()
    finished(store.create_function(spec(image="v1", created_at=100.0)))
    finished(store.scale_function("fn", 4))
    finished(store.update_function(spec(image="v2", created_at=999.0, replicas=1, env_vars={"A": "1"})))
    updated = finished(store.get_function("fn"))
    assert (updated.image, updated.env_vars) == ("v2", {"A": "1"})
    assert (updated.created_at, updated.replicas) == (100.0, 4)


def test_store_update_missing_raises_not_found():
    with pytest.raises(NotFound):
        finished(MemoryStore().update_function(spec()))


def test_store_delete_removes_the_function_and_its_invocation_count():
    store = MemoryStore()
    finished(store.create_function(spec()))
    finished(store.add_invocations({"fn": 3}))
    finished(store.delete_function("fn"))
    assert finished(store.get_function("fn")) is None
    assert finished(store.invocation_counts(["fn"])) == {"fn": 0}


def test_store_delete_missing_raises_not_found():
    with pytest.raises(NotFound):
        finished(MemoryStore().delete_function("fn"))


def test_store_scale_sets_replicas_and_missing_raises_not_found():
    store = MemoryStore()
    finished(store.create_function(spec()))
    finished(store.scale_function("fn", 0))
    assert finished(store.get_function("fn")).replicas == 0
    with pytest.raises(NotFound):
        finished(store.scale_function("other", 1))


def test_store_invocations_add_up_and_unknown_names_count_zero():
    store = MemoryStore()
    finished(store.add_invocations({"a": 2, "b": 1}))
    finished(store.add_invocations({"a": 3}))
    finished(store.add_invocations({}))
    assert finished(store.invocation_counts(["a", "b", "c"])) == {"a": 5, "b": 1, "c": 0}
    assert finished(store.invocation_counts([])) == {}


# --- MemoryStore: calls -------------------------------------------------------------------------


def test_store_create_call_stores_a_new_record_and_returns_none():
    store = MemoryStore()
    record = CallRecord("c1", "fn")
    assert finished(store.create_call(record)) is None
    assert finished(store.get_call("c1")) == record
    assert finished(store.get_call("c2")) is None


def test_store_create_call_with_an_existing_id_returns_the_existing_record_and_stores_nothing():
    store = MemoryStore()
    first = CallRecord("c1", "fn", accepted_at=1.0)
    finished(store.create_call(first))
    assert finished(store.create_call(CallRecord("c1", "other", accepted_at=2.0))) == first
    assert finished(store.get_call("c1")) == first


def test_store_put_call_overwrites_and_results_are_kept_per_call():
    store = MemoryStore()
    finished(store.create_call(CallRecord("c1", "fn")))
    done = CallRecord("c1", "fn", status=CallStatus.SUCCEEDED, status_code=200)
    finished(store.put_call(done))
    assert finished(store.get_call("c1")) == done
    result = CallResult(200, [("Content-Type", "text/plain")], b"\x00ok")
    finished(store.put_result("c1", result))
    assert finished(store.get_result("c1")) == result
    assert finished(store.get_result("c2")) is None


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.ping(),
        lambda s: s.list_functions(),
        lambda s: s.get_function("fn"),
        lambda s: s.create_function(spec()),
        lambda s: s.update_function(spec()),
        lambda s: s.delete_function("fn"),
        lambda s: s.scale_function("fn", 1),
        lambda s: s.add_invocations({"fn": 1}),
        lambda s: s.invocation_counts(["fn"]),
        lambda s: s.create_call(CallRecord("c1", "fn")),
        lambda s: s.get_call("c1"),
        lambda s: s.put_call(CallRecord("c1", "fn")),
        lambda s: s.put_result("c1", CallResult(200)),
        lambda s: s.get_result("c1"),
    ],
)
def test_store_marked_unavailable_raises_store_unavailable_for_every_operation(operation):
    store = MemoryStore()
    finished(store.create_function(spec()))
    store.available = False
    with pytest.raises(StoreUnavailable):
        finished(operation(store))


def test_store_available_again_answers_again():
    store = MemoryStore()
    store.available = False
    with pytest.raises(StoreUnavailable):
        finished(store.ping())
    store.available = True
    assert finished(store.ping()) is None


# --- MemoryQueue --------------------------------------------------------------------------------


def call(n: int, queue: str = "q") -> Call:
    return Call(call_id=f"c{n}", function="fn", queue=queue, body=f"body {n}".encode())


def publish(q: MemoryQueue, *calls: Call) -> None:
    for c in calls:
        finished(q.publish(c))


def test_queue_delivers_published_calls_in_order():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 10, got.append)
    publish(q, call(1), call(2))
    assert [d.call for d in got] == [call(1), call(2)]
    assert [(d.redelivered, d.delivery_count) for d in got] == [(False, 0), (False, 0)]
    assert q.published == [call(1), call(2)]


def test_queue_delivers_what_was_published_before_consuming():
    q = MemoryQueue(["q"])
    publish(q, call(1))
    assert q.pending("q") == 1
    got: list[MemoryDelivery] = []
    q.consume(["q"], 1, got.append)
    assert [d.call for d in got] == [call(1)]
    assert q.pending("q") == 0


def test_queue_prefetch_bounds_unacked_deliveries_and_ack_lets_the_next_one_through():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 2, got.append)
    publish(q, *(call(i) for i in range(5)))
    assert [d.call.call_id for d in got] == ["c0", "c1"]
    assert q.pending("q") == 3
    got[0].ack()
    assert [d.call.call_id for d in got] == ["c0", "c1", "c2"]
    got[1].nack(requeue=False)
    assert [d.call.call_id for d in got] == ["c0", "c1", "c2", "c3"]


def test_queue_prefetch_is_per_consumer():
    q = MemoryQueue(["q"])
    first: list[MemoryDelivery] = []
    second: list[MemoryDelivery] = []
    q.consume(["q"], 1, first.append)
    q.consume(["q"], 1, second.append)
    publish(q, call(1), call(2), call(3))
    assert (len(first), len(second), q.pending("q")) == (1, 1, 1)
    second[0].ack()
    assert (len(first), len(second), q.pending("q")) == (1, 2, 0)


def test_queue_nack_requeue_redelivers_with_redelivered_and_delivery_count_1():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 1, got.append)
    publish(q, call(1))
    got[0].nack(requeue=True)
    assert len(got) == 2
    assert got[1].call == call(1)
    assert (got[1].redelivered, got[1].delivery_count) == (True, 1)
    got[1].nack()
    assert (got[2].redelivered, got[2].delivery_count) == (True, 2)


def test_queue_nack_requeue_puts_the_call_back_at_the_head():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 1, got.append)
    publish(q, call(1), call(2))
    got[0].nack(requeue=True)
    assert [d.call.call_id for d in got] == ["c1", "c1"]


def test_queue_handler_that_nacks_inline_gets_the_redelivery():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []

    def handler(delivery: MemoryDelivery) -> None:
        got.append(delivery)
        if len(got) == 1:
            delivery.nack(requeue=True)
        else:
            delivery.ack()

    q.consume(["q"], 1, handler)
    publish(q, call(1))
    assert [(d.call, d.delivery_count, d.settled) for d in got] == [
        (call(1), 0, "requeue"),
        (call(1), 1, "ack"),
    ]


def test_queue_nack_without_requeue_dead_letters_the_call():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 1, got.append)
    publish(q, call(1))
    got[0].nack(requeue=False)
    assert q.dead_letters == [call(1)]
    assert len(got) == 1
    assert q.pending("q") == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [("ack", "ack"), ("ack", "nack"), ("nack", "ack"), ("nack", "nack")],
)
def test_queue_settling_a_delivery_twice_raises(first, second):
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 1, got.append)
    publish(q, call(1))
    getattr(got[0], first)()
    with pytest.raises(RuntimeError, match="already settled"):
        getattr(got[0], second)()


def test_queue_publish_to_an_unknown_queue_raises_queue_unavailable():
    q = MemoryQueue(["q"])
    with pytest.raises(QueueUnavailable):
        finished(q.publish(call(1, queue="nowhere")))
    assert q.published == []


def test_queue_declare_makes_a_queue_publishable():
    q = MemoryQueue()
    finished(q.declare("slow"))
    finished(q.publish(call(1, queue="slow")))
    assert q.pending("slow") == 1


@pytest.mark.parametrize(
    "operation",
    [lambda q: q.start(), lambda q: q.declare("q"), lambda q: q.publish(call(1)), lambda q: q.ping()],
)
def test_queue_marked_unavailable_raises_queue_unavailable(operation):
    q = MemoryQueue(["q"])
    q.available = False
    with pytest.raises(QueueUnavailable):
        finished(operation(q))
    assert q.published == []


def test_queue_consumes_only_its_own_queues():
    q = MemoryQueue(["a", "b"])
    got: list[MemoryDelivery] = []
    q.consume(["a"], 10, got.append)
    publish(q, call(1, queue="a"), call(2, queue="b"))
    assert [d.call.call_id for d in got] == ["c1"]
    assert q.pending("b") == 1


def test_queue_stop_consuming_stops_new_deliveries():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 10, got.append)
    finished(q.stop_consuming())
    publish(q, call(1))
    assert got == []
    assert q.pending("q") == 1


def test_queue_close_requeues_unacked_deliveries_without_redelivering():
    q = MemoryQueue(["q"])
    got: list[MemoryDelivery] = []
    q.consume(["q"], 10, got.append)
    publish(q, call(1))
    finished(q.close())
    assert len(got) == 1
    assert q.pending("q") == 1
    redelivered: list[MemoryDelivery] = []
    q.consume(["q"], 10, redelivered.append)
    assert [(d.call, d.redelivered) for d in redelivered] == [(call(1), True)]


def test_queue_a_raising_handler_is_logged_and_does_not_stop_delivery():
    q = MemoryQueue(["q"])
    seen: list[str] = []
    events: list[dict] = []

    def handler(delivery: MemoryDelivery) -> None:
        seen.append(delivery.call.call_id)
        if delivery.call.call_id == "c1":
            raise ValueError("boom")
        delivery.ack()

    q.consume(["q"], 10, handler)
    globalLogPublisher.addObserver(events.append)
    try:
        publish(q, call(1), call(2))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert seen == ["c1", "c2"]
    failures = [e["log_failure"] for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0].check(ValueError)
