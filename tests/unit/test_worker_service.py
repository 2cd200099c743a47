"""The worker's handling of one message: invoke, record, call back, ack, in that order.

Everything is in memory and synchronous: a ``Clock``, ``MemoryQueue``/``MemoryStore``, and
treq's ``RequestTraversalAgent`` in front of loopback resources (real HTTP framing, no sockets).
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from prometheus_client import CollectorRegistry
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web import resource, server

from tests.fakes import RefusingAgent
from tests.support import Recorder, never_answer
from txfaas.model import Call, CallbackJob, CallRecord, CallResult, CallStatus, FunctionSpec
from txfaas.retry import RetryPolicy
from txfaas.store import StoreUnavailable
from txfaas.testing import MemoryQueue, MemoryStore
from txfaas.worker.callback import CallbackDelivery
from txfaas.worker.service import WorkerConfig, WorkerMetrics, WorkerService

Q = "faas-request"
CALLBACK = "http://receiver.test:9000/hook"


class FlakyStore(MemoryStore):
    """A MemoryStore whose writes alone can fail (Redis lost after the function ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes_fail = False
        self.writes = 0
        self.lose_final_reply = False

    async def put_call(self, record: CallRecord) -> None:
        self.writes += 1
        if self.writes_fail:
            raise StoreUnavailable("writes down")
        await super().put_call(record)

    async def put_result(self, call_id: str, result: CallResult) -> None:
        if self.writes_fail:
            raise StoreUnavailable("writes down")
        await super().put_result(call_id, result)

    async def transition_call(self, record: CallRecord, from_statuses: Any, **kwargs: Any) -> Any:
        self.writes += 1
        if self.writes_fail:
            raise StoreUnavailable("writes down")
        found = await super().transition_call(record, from_statuses, **kwargs)
        if self.lose_final_reply and record.final:
            self.lose_final_reply = False
            raise StoreUnavailable("no reply in time")  # the write landed; its reply did not
        return found


class Harness:
    def __init__(
        self,
        respond: Any = None,
        callback_respond: Any = None,
        function_resource: resource.Resource | None = None,
        agent: Any = None,
        random: Any = lambda: 0.0,
        signing_key: bytes | None = None,
        **config: Any,
    ) -> None:
        self.clock = Clock()
        self.queue = MemoryQueue([Q], clock=self.clock)
        self.store = FlakyStore()
        self.function = Recorder(respond)
        self.function_agent = agent or RequestTraversalAgent(function_resource or self.function)
        self.receiver = Recorder(callback_respond)
        self.callback_agent = RequestTraversalAgent(self.receiver)
        self.registry = CollectorRegistry()
        # One attempt unless a test asks for retries: most tests here pin what one attempt does.
        settings = {
            "queues": (Q,),
            "retry_delay": 1.0,
            "drain_timeout": 30.0,
            "retry": RetryPolicy(max_attempts=1),
            **config,
        }
        self.worker = WorkerService(
            self.clock,
            WorkerConfig(**settings),
            self.queue,
            self.store,
            self.function_agent,
            CallbackDelivery(self.clock, self.callback_agent, timeout=10.0, signing_key=signing_key),
            WorkerMetrics(self.registry),
            random=random,
        )

    def deploy(self, name: str = "echo", **kwargs: Any) -> FunctionSpec:
        spec = FunctionSpec(service=name, url=f"http://{name}.test:8080", **kwargs)
        self.store.functions[name] = spec
        return spec

    def enqueue(self, call: Call | None = None, record: CallRecord | None = None, **kwargs: Any) -> Call:
        if call is None:
            fields = {"call_id": "call-1", "function": "echo", "callback_url": CALLBACK, "accepted_at": 1.0}
            fields.update(kwargs)
            call = Call(**fields)
        self.store.calls[call.call_id] = record or CallRecord.for_call(call)
        d = defer.Deferred.fromCoroutine(self.queue.publish(call))
        assert d.called
        return call

    def start(self) -> None:
        self.worker.startService()

    def flush(self) -> None:
        if isinstance(self.function_agent, RequestTraversalAgent):
            self.function_agent.flush()
        self.callback_agent.flush()

    def record(self, call_id: str = "call-1") -> CallRecord:
        return self.store.calls[call_id]

    @property
    def unacked(self) -> int:
        return len(self.queue._unacked)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def test_call_is_invoked_recorded_called_back_and_acked():
    """The function gets the queued request; outcome, result and callback are recorded; then the ack."""
    h = Harness(respond=lambda req: (201, {"X-Out": "yes", "Content-Type": "text/plain"}, b"made it"))
    h.deploy()
    h.enqueue(
        method="PUT",
        path="/sub/path",
        query="a=1&b=two%20words",
        headers=[("Content-Type", "application/json"), ("X-Custom", "kept"), ("X-Call-Id", "spoofed")],
        body=b'{"in": 1}',
    )
    h.start()
    h.flush()

    [req] = h.function.requests
    assert req["method"] == "PUT"
    assert req["uri"] == "/sub/path?a=1&b=two%20words"
    assert req["body"] == b'{"in": 1}'
    assert req["headers"]["x-custom"] == ["kept"]
    assert req["headers"]["content-type"] == ["application/json"]
    assert req["headers"]["x-call-id"] == ["call-1"]
    assert req["headers"]["host"] == ["echo.test:8080"]

    record = h.record()
    assert record.status == CallStatus.SUCCEEDED
    assert record.status_code == 201
    assert record.attempts == 1
    assert record.started_at == 0.0 and record.finished_at == 0.0 and record.duration == 0.0
    assert record.callback_state == "delivered"
    assert record.callback_status == 200
    assert record.callback_attempts == 1
    result = h.store.results["call-1"]
    assert (result.status_code, result.body, result.truncated) == (201, b"made it", False)
    assert ("X-Out", "yes") in result.headers

    [cb] = h.receiver.requests
    assert cb["method"] == "POST" and cb["uri"] == "/hook"
    assert cb["body"] == b"made it"
    assert cb["headers"]["x-call-id"] == ["call-1"]
    assert cb["headers"]["x-function-name"] == ["echo.openfaas-fn"]
    assert cb["headers"]["x-function-status"] == ["201"]
    assert cb["headers"]["x-duration-seconds"] == ["0.000000"]
    assert cb["headers"]["x-out"] == ["yes"]

    assert h.unacked == 0 and h.queue.pending(Q) == 0
    assert h.worker.in_flight == 0


def test_each_outcome_is_logged_as_one_line_with_its_fields_kept():
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness(respond=lambda req: (201, {}, b"ok"))
        h.deploy()
        h.enqueue()
        h.start()
        h.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("call_id") == "call-1" and "outcome" in e]
    assert formatEvent(event) == "call call-1: echo.openfaas-fn -> succeeded (201) in 0.000s, attempt 1 of 1"
    assert (event["function"], event["status"], event["code"], event["n"]) == (
        "echo.openfaas-fn",
        "succeeded",
        201,
        1,
    )


def test_get_without_body_sends_no_body_and_empty_post_sends_empty_body():
    """A bodiless GET goes out without Content-Length; a POST always says how long its body is."""
    h = Harness()
    h.deploy()
    h.enqueue(call_id="g", method="GET", callback_url=None)
    h.enqueue(call_id="p", method="POST", callback_url=None)
    h.start()
    h.flush()
    get, post = h.function.requests
    assert get["method"] == "GET" and "content-length" not in get["headers"]
    assert post["method"] == "POST" and post["headers"]["content-length"] == ["0"]


def test_a_call_no_http_request_can_carry_fails_once_as_400():
    """A queued call with a non-ASCII method is not requeued until its delivery limit: it fails once."""
    h = Harness()
    h.deploy()
    h.enqueue(call_id="call-1", method="P\u00d6ST", callback_url=None)
    h.start()
    h.flush()
    record = h.record()
    assert (record.status, record.status_code) == (CallStatus.FAILED, 400)
    assert "cannot build the request" in record.error
    assert h.function.requests == []
    assert h.unacked == 0 and h.queue.pending(Q) == 0


def test_the_call_is_acked_once_its_callback_is_queued_which_is_acked_once_answered():
    """The call's message is acked once its outcome is recorded and its callback is on the
    callback queue (confirmed); the callback's message stays unacknowledged until the receiver
    answers: a crash in between loses neither."""
    answer: defer.Deferred = defer.Deferred()
    h = Harness(callback_respond=lambda req: answer)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.record().status == CallStatus.SUCCEEDED
    assert h.record().callback_state == "pending"
    [waiting] = h.queue._unacked
    assert (waiting.call.queue, waiting.call.callback_job.attempt) == ("txfaas.callbacks", 1)
    answer.callback((204, {}, b""))
    h.flush()
    assert h.record().callback_state == "delivered"
    assert h.unacked == 0


def test_a_callback_outcome_never_overwrites_a_record_that_moved_on():
    """The callback's outcome is written over the record as it was read: a call re-queued (or
    cancelled) while its callback was on the wire keeps its newer record."""
    answer: defer.Deferred = defer.Deferred()
    h = Harness(callback_respond=lambda req: answer)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert len(h.receiver.requests) == 1
    newer = attrs.evolve(h.record(), status=CallStatus.QUEUED, replays=1, status_code=None)
    h.store.calls["call-1"] = newer  # an operator re-queued the call meanwhile
    answer.callback((204, {}, b""))
    h.flush()
    assert h.record() == newer
    assert h.unacked == 0


def test_a_callback_outcome_is_recorded_over_a_record_the_store_lost():
    """No record when the callback job arrives (its TTL ran out): the outcome creates one."""
    h = Harness()
    h.deploy()
    h.start()
    job = CallbackJob(200, [], 0.5, attempt=1, first_at=0.0)
    message = Call(
        call_id="call-1",
        function="echo",
        callback_url=CALLBACK,
        queue="txfaas.callbacks",
        body=b"answer",
        callback_job=job,
    )
    d = defer.Deferred.fromCoroutine(h.queue.publish(message))
    assert d.called
    h.flush()
    assert h.receiver.requests[0]["body"] == b"answer"
    record = h.record()
    assert (record.status, record.callback_state, record.callback_attempts) == ("succeeded", "delivered", 1)


def test_exec_timeout_aborts_the_function_connection_and_records_504():
    """A function that never answers is cut off at exec_timeout: connection closed, 504, timed_out."""
    h = Harness(respond=never_answer, exec_timeout=5.0)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    h.clock.advance(4.9)
    h.flush()
    assert h.record().status == CallStatus.RUNNING
    assert h.function.disconnected == []
    h.clock.advance(0.1)
    h.flush()
    assert h.function.disconnected == ["/"]
    record = h.record()
    assert record.status == CallStatus.TIMED_OUT
    assert record.status_code == 504
    assert record.duration == pytest.approx(5.0)
    assert "exec_timeout" in record.error
    [cb] = h.receiver.requests
    assert cb["headers"]["x-function-status"] == ["504"]
    assert cb["headers"]["x-duration-seconds"] == ["5.000000"]
    assert h.unacked == 0


class TrickleResource(resource.Resource):
    """Sends the headers and part of the body, then nothing more."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[Any] = []

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"Content-Length", b"100")
        request.write(b"partial")
        request.notifyFinish().addErrback(self.lost.append)
        return server.NOT_DONE_YET


def test_exec_timeout_covers_reading_the_body():
    """Headers in time but a body that never ends still times out, and the connection is aborted."""
    trickle = TrickleResource()
    h = Harness(function_resource=trickle, exec_timeout=3.0)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.record().status == CallStatus.RUNNING
    h.clock.advance(3.0)
    h.flush()
    assert len(trickle.lost) == 1
    assert h.record().status == CallStatus.TIMED_OUT
    assert h.unacked == 0


def test_the_function_record_timeout_overrides_the_default():
    """``exec_timeout`` in the function's envVars is its limit, not the worker's default."""
    h = Harness(respond=never_answer, exec_timeout=30.0)
    h.deploy(env_vars={"exec_timeout": "2s"})
    h.enqueue()
    h.start()
    h.flush()
    h.clock.advance(2.0)
    h.flush()
    assert h.record().status == CallStatus.TIMED_OUT
    assert h.record().error.endswith("(2s)")


def test_a_function_timeout_above_the_consumer_timeout_budget_is_clamped():
    """A function timeout that would outlast the broker's consumer timeout is cut to what fits."""
    h = Harness(consumer_timeout=300.0, callback_timeout=10.0)
    spec = h.deploy(env_vars={"exec_timeout": "1h"})
    assert h.worker.invoker.timeout_for(spec) == 300.0 - 10.0 - 60.0 - 30.0


def test_unreachable_function_is_502_failed_and_called_back():
    """A refused connection is status 502 (failed); the callback says so."""
    h = Harness(agent=RefusingAgent())
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    record = h.record()
    assert (record.status, record.status_code) == (CallStatus.FAILED, 502)
    assert "unreachable" in record.error
    [cb] = h.receiver.requests
    assert cb["headers"]["x-function-status"] == ["502"]
    assert b"unreachable" in cb["body"]
    assert h.unacked == 0


def test_function_deleted_after_queueing_is_404_failed():
    """No function record: final ``failed``, status 404, callback says 404; the message is done."""
    h = Harness()
    h.enqueue()
    h.start()
    h.flush()
    record = h.record()
    assert (record.status, record.status_code) == (CallStatus.FAILED, 404)
    assert "not found" in record.error
    assert h.function.requests == []
    assert h.receiver.requests[0]["headers"]["x-function-status"] == ["404"]
    assert h.unacked == 0


def test_function_error_status_is_failed_with_its_code():
    """A 500 from the function is a ``failed`` call with status code 500, still acknowledged."""
    h = Harness(respond=lambda req: (500, {}, b"boom"))
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert (h.record().status, h.record().status_code) == (CallStatus.FAILED, 500)
    assert h.receiver.requests[0]["body"] == b"boom"
    assert h.unacked == 0


def test_redelivered_final_call_is_not_run_again_but_its_callback_is_delivered():
    """A call already final (worker died before its ack) only gets its pending callback, from the store."""
    h = Harness()
    h.deploy()
    call = Call(call_id="call-1", function="echo", callback_url=CALLBACK)
    done = attrs.evolve(
        CallRecord.for_call(call), status=CallStatus.SUCCEEDED, status_code=200, attempts=1, duration=1.5
    )
    h.store.results["call-1"] = CallResult(200, [("X-Kept", "1")], b"stored body")
    h.enqueue(call, record=done)
    h.start()
    h.flush()
    assert h.function.requests == []
    [cb] = h.receiver.requests
    assert cb["body"] == b"stored body"
    assert cb["headers"]["x-kept"] == ["1"]
    assert cb["headers"]["x-duration-seconds"] == ["1.500000"]
    assert h.record().callback_state == "delivered"
    assert h.record().attempts == 1
    assert h.metric("txfaas_worker_skipped_total") == 1
    assert h.unacked == 0


def test_redelivered_final_call_with_delivered_callback_is_only_acked():
    """Final and called back: nothing is run or sent again."""
    h = Harness()
    h.deploy()
    call = Call(call_id="call-1", function="echo", callback_url=CALLBACK)
    done = attrs.evolve(CallRecord.for_call(call), status=CallStatus.FAILED, callback_state="delivered")
    h.enqueue(call, record=done)
    h.start()
    h.flush()
    assert h.function.requests == [] and h.receiver.requests == []
    assert h.unacked == 0 and h.queue.pending(Q) == 0


def test_call_found_running_is_run_again_and_the_interruption_counted():
    """A ``running`` record of this attempt means the last worker died mid-call: run it again, as
    the same attempt (``attempts`` is the attempt number), counting one interruption."""
    h = Harness()
    h.deploy()
    call = Call(call_id="call-1", function="echo", callback_url=CALLBACK)
    running = attrs.evolve(CallRecord.for_call(call), status=CallStatus.RUNNING, attempts=1, started_at=0.5)
    h.enqueue(call, record=running)
    h.start()
    h.flush()
    assert len(h.function.requests) == 1
    assert (h.record().attempts, h.record().interruptions) == (1, 1)
    assert h.record().status == CallStatus.SUCCEEDED


def test_a_claim_whose_gateway_died_after_the_confirm_is_run():
    """An ``accepting`` record with a message behind it: the gateway had the broker's confirm
    but died before recording it; the worker runs the call and the record moves on."""
    h = Harness()
    h.deploy()
    call = Call(call_id="call-1", function="echo", callback_url=CALLBACK)
    claim = attrs.evolve(CallRecord.for_call(call), status=CallStatus.ACCEPTING, accepting_until=5.0)
    h.enqueue(call, record=claim)
    h.start()
    h.flush()
    assert len(h.function.requests) == 1
    assert h.record().status == CallStatus.SUCCEEDED
    assert h.record().to_json()["acceptingUntil"] is None
    assert len(h.receiver.requests) == 1


def test_missing_record_is_created_and_the_call_runs():
    """A call whose record is gone (expired, or never written) still runs and gets a record."""
    h = Harness()
    h.deploy()
    call = h.enqueue()
    del h.store.calls[call.call_id]
    h.start()
    h.flush()
    assert h.record().status == CallStatus.SUCCEEDED
    assert h.record().accepted_at == 1.0


def test_store_down_gives_the_message_back_after_a_growing_delay_and_never_acks():
    """Redis unreachable: nothing runs, no ack; requeued after 1s, then 2s; completes once Redis is back."""
    h = Harness()
    h.deploy()
    h.enqueue()
    h.store.available = False
    h.start()
    assert h.unacked == 1
    h.clock.advance(0.99)
    assert h.queue._unacked and next(iter(h.queue._unacked)).delivery_count == 0
    h.clock.advance(0.01)  # requeued at 1s and redelivered at once to the same consumer
    assert next(iter(h.queue._unacked)).delivery_count == 1
    h.clock.advance(1.99)
    assert next(iter(h.queue._unacked)).delivery_count == 1
    h.clock.advance(0.01)  # the second wait is 2s
    assert next(iter(h.queue._unacked)).delivery_count == 2
    assert h.function.requests == []
    assert h.metric("txfaas_worker_requeued_total", reason="store") == 2
    h.store.available = True
    h.clock.advance(4.0)
    h.flush()
    assert len(h.function.requests) == 1
    assert h.record().status == CallStatus.SUCCEEDED
    assert h.unacked == 0 and h.queue.pending(Q) == 0


def test_outcome_writes_are_retried_so_the_function_does_not_run_twice():
    """Redis lost after the function answered: the outcome is written when it is back, no second run."""
    gate: defer.Deferred = defer.Deferred()
    h = Harness(respond=lambda req: gate)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    h.store.writes_fail = True
    gate.callback((200, {}, b"once"))
    h.flush()
    assert h.record().status == CallStatus.RUNNING
    assert h.unacked == 1
    h.clock.advance(1.0)
    h.clock.advance(2.0)
    h.store.writes_fail = False
    h.clock.advance(4.0)
    h.flush()
    assert h.record().status == CallStatus.SUCCEEDED
    assert h.store.results["call-1"].body == b"once"
    assert len(h.function.requests) == 1
    assert h.unacked == 0


def test_an_outcome_write_whose_reply_was_lost_still_gets_its_callback():
    """Redis paused past the command timeout ran the write all the same: the retry finds this
    run's own outcome, which is no reason to drop the message before its callback."""
    h = Harness(respond=lambda req: (200, {}, b"done"))
    h.deploy()
    h.enqueue()
    h.store.lose_final_reply = True
    h.start()
    h.flush()
    for _ in range(5):
        h.clock.advance(1.0)
    record = h.record()
    assert record.status == CallStatus.SUCCEEDED
    assert record.callback_state == "delivered"
    assert len(h.function.requests) == 1


def test_outcome_never_recorded_is_never_acked():
    """Redis down for longer than the recording patience: the message goes back, unacknowledged."""
    gate: defer.Deferred = defer.Deferred()
    h = Harness(respond=lambda req: gate)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    h.store.writes_fail = True
    h.store.available = False  # reads fail too, so the redelivery waits as well
    gate.callback((200, {}, b"lost?"))
    h.flush()
    for _ in range(200):
        h.clock.advance(1.0)
    [delivery] = h.queue._unacked
    assert delivery.delivery_count >= 1
    assert delivery.settled is None
    assert h.record().status == CallStatus.RUNNING


def test_failed_callback_is_recorded_and_the_message_acked_without_rerun():
    """A callback answered with 500 is recorded (call status kept) and queued for a retry; the
    work message is acked and the function is not run again."""
    h = Harness(callback_respond=lambda req: (500, {}, b"no"))
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    record = h.record()
    assert record.status == CallStatus.SUCCEEDED
    assert (record.callback_state, record.callback_status, record.callback_attempts) == ("retrying", 500, 1)
    assert len(h.function.requests) == 1
    assert h.metric("txfaas_worker_callbacks_total", outcome="failed") == 1
    assert h.unacked == 0
    [(_, job)] = h.queue.delayed
    assert job.queue == "txfaas.callbacks" and job.callback_job.attempt == 2


def test_callback_redirect_is_not_followed():
    """A 3xx from the receiver is a failed delivery (to be retried); the Location is never requested."""
    h = Harness(callback_respond=lambda req: (302, {"Location": "http://receiver.test:9000/other"}, b""))
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert [r["uri"] for r in h.receiver.requests] == ["/hook"]
    assert (h.record().callback_state, h.record().callback_status) == ("retrying", 302)


def test_call_without_callback_url_sends_nothing():
    """No X-Callback-Url: no callback, callback state stays empty."""
    h = Harness()
    h.deploy()
    h.enqueue(callback_url=None)
    h.start()
    h.flush()
    assert h.receiver.requests == []
    assert h.record().callback_state is None
    assert h.unacked == 0


def test_large_result_is_truncated_in_the_store_but_the_callback_gets_it_whole():
    """The stored body stops at max_result_size (flagged ``truncated``); the callback body is complete."""
    h = Harness(respond=lambda req: (200, {}, b"x" * 100), max_result_size=10)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    result = h.store.results["call-1"]
    assert (result.body, result.truncated) == (b"x" * 10, True)
    assert h.receiver.requests[0]["body"] == b"x" * 100


def test_no_more_than_max_inflight_calls_run_at_once():
    """With max_inflight 2 and five queued calls, two run; each finished call lets the next one start."""
    gates: list[defer.Deferred] = []

    def respond(req):
        gates.append(defer.Deferred())
        return gates[-1]

    h = Harness(respond=respond, max_inflight=2)
    h.deploy()
    for i in range(5):
        h.enqueue(call_id=f"c{i}", callback_url=None)
    h.start()
    h.flush()
    assert len(h.function.requests) == 2
    assert h.metric("txfaas_worker_calls_in_flight") == 2
    gates[0].callback((200, {}, b""))
    h.flush()
    h.flush()
    assert len(h.function.requests) == 3
    assert h.queue.pending(Q) == 2


def test_redelivery_of_a_call_running_here_joins_it_instead_of_running_twice():
    """The broker redelivers a call this process still runs (channel closed): one run, both settled."""
    gate: defer.Deferred = defer.Deferred()
    h = Harness(respond=lambda req: gate)
    h.deploy()
    call = h.enqueue()
    h.start()
    h.flush()

    class Stale:
        def __init__(self, call: Call) -> None:
            self.call, self.redelivered, self.delivery_count = call, True, 1
            self.acked = 0

        def ack(self) -> None:
            self.acked += 1

        def nack(self, requeue: bool = True) -> None:
            raise AssertionError("should be acked")

    again = Stale(call)
    h.worker.handle(again)
    gate.callback((200, {}, b""))
    h.flush()
    assert len(h.function.requests) == 1
    assert again.acked == 1
    assert h.unacked == 0


def test_metrics_count_outcomes_durations_and_callbacks():
    """Outcomes by function and status, a duration sample per call, callbacks by outcome."""
    h = Harness(respond=lambda req: (200, {}, b""))
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    assert h.metric("txfaas_worker_calls_total", function="echo.openfaas-fn", status="succeeded") == 1
    assert h.metric("txfaas_worker_call_duration_seconds_count", function="echo.openfaas-fn") == 1
    assert h.metric("txfaas_worker_callbacks_total", outcome="delivered") == 1
    assert h.metric("txfaas_worker_calls_in_flight") == 0


def test_stop_lets_in_flight_calls_finish_and_takes_no_new_ones():
    """SIGTERM: no new messages; a running call finishes and is acked before the stop ends (the
    queue, a sibling service, closes after that)."""
    gate: defer.Deferred = defer.Deferred()
    h = Harness(respond=lambda req: gate)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    stopped = h.worker.stopService()
    assert not stopped.called
    h.enqueue(call_id="late", callback_url=None)
    assert len(h.function.requests) == 1
    gate.callback((200, {}, b"done"))
    h.flush()
    assert stopped.called
    assert h.record().status == CallStatus.SUCCEEDED
    assert h.record().callback_state == "delivered"
    assert h.queue.pending(Q) == 1  # "late" was never taken


def test_stop_gives_calls_past_the_drain_limit_back_to_the_queue():
    """Calls still running at the drain limit are aborted and requeued, never acked as done."""
    h = Harness(respond=never_answer, drain_timeout=10.0, exec_timeout=60.0)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    stopped = h.worker.stopService()
    h.clock.advance(9.9)
    assert not stopped.called
    h.clock.advance(0.1)
    h.flush()
    assert stopped.called
    assert h.function.disconnected == ["/"]
    assert h.queue.pending(Q) == 1  # back on the queue
    # Given back on purpose: queued again, so its next run is not counted as an interruption.
    assert (h.record().status, h.record().attempts, h.record().interruptions) == (CallStatus.QUEUED, 1, 0)
    assert h.receiver.requests == []


def test_a_call_given_back_at_the_drain_limit_runs_again_without_counting_an_interruption():
    h = Harness(respond=never_answer, drain_timeout=10.0, exec_timeout=60.0)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    h.worker.stopService()
    h.clock.advance(10)
    h.flush()
    # The redelivery, to a worker that finds the record as the first one left it.
    again = Harness(respond=lambda req: (200, {}, b"ok"))
    again.deploy()
    again.enqueue(record=h.record())
    again.start()
    again.flush()
    record = again.record()
    assert (record.status, record.attempts, record.interruptions) == (CallStatus.SUCCEEDED, 1, 0)


def test_health_names_what_does_not_answer():
    """``health()`` is empty when broker and Redis answer, and names the ones that do not."""
    h = Harness()
    assert h.worker.health
    d = defer.Deferred.fromCoroutine(h.worker.health())
    assert d.result == []
    h.store.available = False
    d = defer.Deferred.fromCoroutine(h.worker.health())
    assert d.result == ["redis"]
    h.queue.available = False
    d = defer.Deferred.fromCoroutine(h.worker.health())
    assert d.result == ["broker", "redis"]


@pytest.mark.parametrize(
    ("base", "path", "query", "gateway", "expected"),
    [
        ("http://fn:8080", "/", "", None, b"http://fn:8080/"),
        ("http://fn:8080/prefix", "/a/b", "x=1", None, b"http://fn:8080/prefix/a/b?x=1"),
        ("http://fn:8080", "/caf\u00e9", "q=a b", None, b"http://fn:8080/caf%C3%A9?q=a%20b"),
        ("http://fn:8080", "/a%2Fb", "", None, b"http://fn:8080/a%2Fb"),
        ("http://fn:8080", "/", "", "http://gw:8080", b"http://gw:8080/function/echo.openfaas-fn"),
        (
            "http://fn:8080",
            "/sub",
            "k=v",
            "http://gw:8080",
            b"http://gw:8080/function/echo.openfaas-fn/sub?k=v",
        ),
    ],
)
def test_function_url(base, path, query, gateway, expected):
    """The function's base URL (or the gateway's /function/{name}) + the queued sub-path and query."""
    h = Harness(gateway_url=gateway)
    spec = FunctionSpec(service="echo", url=base)
    call = Call(call_id="c", function="echo", path=path, query=query)
    assert h.worker.invoker.url_for(call, spec) == expected


def test_function_url_template_is_used_without_a_function_url():
    """A function with no URL of its own is reached through --function-url-template."""
    h = Harness(function_url_template="http://{name}.fns.svc:8080")
    spec = FunctionSpec(service="echo")
    assert h.worker.invoker.url_for(Call(call_id="c", function="echo"), spec) == b"http://echo.fns.svc:8080/"


def test_a_lost_reply_to_the_running_write_is_retried_not_counted_as_an_interruption():
    """The start's write lands but its reply is lost (a paused Redis): the write is retried like
    the others, the call runs once, and no interruption is counted (before, the message was given
    back and its redelivery found its own ``running`` record)."""
    h = Harness(respond=lambda req: (200, {}, b"ok"))
    lose = [True]
    landed = h.store.transition_call

    async def lossy(record: CallRecord, from_statuses: Any, **kwargs: Any) -> Any:
        found = await landed(record, from_statuses, **kwargs)
        if lose and record.status == CallStatus.RUNNING:
            lose.clear()
            raise StoreUnavailable("no reply in time")
        return found

    h.store.transition_call = lossy
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    h.clock.advance(1.0)
    h.flush()
    record = h.record()
    assert (record.status, record.attempts, record.interruptions) == (CallStatus.SUCCEEDED, 1, 0)
    assert len(h.function.requests) == 1
    assert h.metric("txfaas_worker_requeued_total", reason="store") is None
    assert h.unacked == 0 and h.queue.pending(Q) == 0


def test_a_call_given_back_at_the_drain_limit_does_not_raise_the_brokers_delivery_count():
    """The drain hands the message back as a fresh copy and acks the original: its delivery count
    stays 0, so a broker-side delivery limit (the README's policy) does not count the stop."""
    h = Harness(respond=never_answer, drain_timeout=10.0, exec_timeout=60.0)
    h.deploy()
    call = h.enqueue()
    h.start()
    h.flush()
    h.worker.stopService()
    h.clock.advance(10)
    h.flush()
    assert list(h.queue.messages[Q]) == [(call, 0)]
    assert h.unacked == 0
    assert h.record().status == CallStatus.QUEUED


def test_the_start_write_and_the_outcome_write_share_the_messages_recording_patience():
    """Redis refuses the start's write for 15 s, then takes it; the outcome's write never gets
    through. The two share one RECORD_PATIENCE (60 s) per message -- what exec_timeout_limit
    counts once below the consumer timeout: the message goes back 31 s after the outcome's first
    try (15 + 1 + 2 + 4 + 8 + 16 = 46 s spent; 32 more would pass 60), not 60 s after it."""
    h = Harness(respond=lambda req: (200, {}, b"ok"))
    tried: list[float] = []
    landed = h.store.transition_call

    async def flaky(record: CallRecord, from_statuses: Any, **kwargs: Any) -> Any:
        if record.status == CallStatus.RUNNING and h.clock.seconds() < 15:
            raise StoreUnavailable("records down")
        if record.final:
            tried.append(h.clock.seconds())
            raise StoreUnavailable("records down")
        return await landed(record, from_statuses, **kwargs)

    h.store.transition_call = flaky
    h.deploy()
    h.enqueue()
    h.start()
    for _ in range(46):
        h.flush()
        h.clock.advance(1)
    h.flush()
    assert len(h.function.requests) == 1  # started at 15 s, after 1 + 2 + 4 + 8 s of waits
    assert tried == [15, 16, 18, 22, 30, 46]
    h.clock.advance(1)  # the give-back's own backoff
    assert h.metric("txfaas_worker_requeued_total", reason="store") == 1


SLOW_HOOK = "http://slow.test:9000/hook"


def slow_host_never_answers(request: server.Request) -> Any:
    """A callback receiver: ``slow.test`` accepts and never answers; any other host answers 200."""
    if request.getRequestHostname() == b"slow.test":
        return defer.Deferred()
    return (200, {}, b"")


def callbacks_to(h: Harness, host: str) -> list[dict[str, Any]]:
    return [r for r in h.receiver.requests if r["headers"]["host"][0].startswith(host)]


def test_slow_callback_receivers_take_no_call_capacity():
    """Four calls whose receiver never answers, with --max-inflight 2: every call still runs at
    once, and an ordinary call's callback is delivered at once (before, the slow callbacks held
    both call slots for --callback-timeout each, and the ordinary call waited 20 s to run)."""
    h = Harness(
        respond=lambda req: (200, {}, b"ok"), callback_respond=slow_host_never_answers, max_inflight=2
    )
    h.deploy()
    for n in range(4):
        h.enqueue(call_id=f"slow-{n}", callback_url=SLOW_HOOK)
    h.enqueue(call_id="ordinary")
    h.start()
    h.flush()
    assert len(h.function.requests) == 5
    assert len(callbacks_to(h, "slow.test")) == 4
    [ordinary] = callbacks_to(h, "receiver.test")
    assert ordinary["headers"]["x-call-id"] == ["ordinary"]
    assert h.record("ordinary").callback_state == "delivered"
    assert h.queue.pending(Q) == 0


def test_one_host_gets_at_most_its_share_of_callback_slots_the_rest_wait_then_are_parked():
    """--callback-host-concurrency 2: two callbacks go to the slow host, three wait; a second
    later those three are parked in the broker (a delay queue, the same attempt), and another
    host's callback is never held up."""
    h = Harness(
        respond=lambda req: (200, {}, b"ok"),
        callback_respond=slow_host_never_answers,
        callback_concurrency=10,
        callback_host_concurrency=2,
    )
    h.deploy()
    for n in range(5):
        h.enqueue(call_id=f"slow-{n}", callback_url=SLOW_HOOK)
    h.start()
    h.flush()
    assert len(callbacks_to(h, "slow.test")) == 2
    h.enqueue(call_id="ordinary")
    h.flush()
    assert len(callbacks_to(h, "receiver.test")) == 1
    assert h.metric("txfaas_worker_callbacks_parked_total") == 0
    h.clock.advance(1.0)
    h.flush()
    assert h.metric("txfaas_worker_callbacks_parked_total") == 3
    parked = [call for _, call in h.queue.delayed if call.queue == "txfaas.callbacks"]
    assert sorted(c.call_id for c in parked) == ["slow-2", "slow-3", "slow-4"]
    assert {c.callback_job.attempt for c in parked} == {1}
    assert len(callbacks_to(h, "slow.test")) == 2
    assert {h.record(f"slow-{n}").callback_attempts for n in range(5)} == {0}


def test_a_callback_that_would_fill_the_callback_prefetch_waiting_is_parked_at_once():
    """With the callback queue's prefetch (--callback-concurrency 3) about to be full of
    callbacks waiting for one host, the newcomer is parked at once, so the prefetch always has
    room for other hosts' callbacks."""
    h = Harness(
        respond=lambda req: (200, {}, b"ok"),
        callback_respond=slow_host_never_answers,
        callback_concurrency=3,
        callback_host_concurrency=1,
    )
    h.deploy()
    for n in range(3):
        h.enqueue(call_id=f"slow-{n}", callback_url=SLOW_HOOK)
    h.start()
    h.flush()
    assert len(callbacks_to(h, "slow.test")) == 1
    assert h.metric("txfaas_worker_callbacks_parked_total") == 1
    h.enqueue(call_id="ordinary")
    h.flush()
    assert h.record("ordinary").callback_state == "delivered"


KIB = 1024


def test_callbacks_of_big_answers_wait_in_the_broker_not_in_memory():
    """--max-answer-memory 100 KiB, four calls answering 40 KiB each, the receiver not answering
    yet: the callback consumer's prefetch is what the budget holds at the largest answer (one),
    so one callback body is held and the other three wait in the broker; the budget never went
    past its bound, and every byte arrives whole once the receiver answers."""
    answer = b"x" * (40 * KIB)
    gates: list[defer.Deferred] = []

    def held(request: server.Request) -> defer.Deferred:
        gates.append(defer.Deferred())
        return gates[-1]

    h = Harness(
        respond=lambda req: (200, {}, answer),
        callback_respond=held,
        max_answer_memory=100 * KIB,
    )
    h.deploy()
    for n in range(4):
        h.enqueue(call_id=f"big-{n}")
    h.start()
    h.flush()
    budget = h.worker._table.answers
    assert len(h.receiver.requests) == 1
    assert (budget.held, h.queue.pending("txfaas.callbacks")) == (40 * KIB, 3)
    while gates:
        gates.pop(0).callback((200, {}, b""))
        h.flush()
        h.clock.advance(1.0)
        h.flush()
    assert budget.peak <= 100 * KIB
    assert sorted(r["headers"]["x-call-id"][0] for r in h.receiver.requests) == [f"big-{n}" for n in range(4)]
    assert {len(r["body"]) for r in h.receiver.requests} == {40 * KIB}
    assert {h.record(f"big-{n}").callback_state for n in range(4)} == {"delivered"}
    assert budget.held == 0 and h.unacked == 0


def test_an_answer_larger_than_max_answer_memory_fails_the_call_with_a_clear_error():
    """A 100 KiB answer with --max-answer-memory 64 KiB: the call fails (502) saying so; the
    callback gets that error; nothing of the answer is kept."""
    h = Harness(respond=lambda req: (200, {}, b"y" * (100 * KIB)), max_answer_memory=64 * KIB)
    h.deploy()
    h.enqueue()
    h.start()
    h.flush()
    record = h.record()
    assert (record.status_code, record.status) == (502, CallStatus.FAILED)
    assert "answered more than 65536 bytes" in record.error
    assert "--max-answer-memory" in record.error
    [cb] = h.receiver.requests
    assert cb["headers"]["x-function-status"] == ["502"] and b"--max-answer-memory" in cb["body"]
    assert h.worker._table.answers.held == 0


class Chunked(resource.Resource):
    """A function answering in chunks with no Content-Length (chunked encoding)."""

    isLeaf = True

    def __init__(self, chunks: int, size: int) -> None:
        super().__init__()
        self.chunks, self.size, self.requests = chunks, size, 0

    def render(self, request: server.Request) -> Any:
        self.requests += 1
        for n in range(self.chunks):
            request.write(bytes([65 + n]) * self.size)
        request.finish()
        return server.NOT_DONE_YET


def test_answers_of_unknown_length_reserve_as_they_arrive_and_reading_waits_for_room():
    """Chunked answers of 90 KiB each, --max-answer-memory 128 KiB, three calls, the first's
    callback held by its receiver: the second's reading pauses when the budget is full (30 KiB
    of it read), the third is not started, and both go on once the first's callback is
    delivered; every body arrives whole, and the budget never went past its bound."""
    function = Chunked(3, 30 * KIB)
    gate: defer.Deferred = defer.Deferred()
    h = Harness(
        function_resource=function,
        callback_respond=lambda req: gate if not gate.called else (200, {}, b""),
        max_answer_memory=128 * KIB,
    )
    h.deploy()
    for n in range(3):
        h.enqueue(call_id=f"c-{n}")
    h.start()
    h.flush()
    budget = h.worker._table.answers
    assert (budget.held, budget.waiting) == (120 * KIB, 1)  # c-0's callback body + 30 KiB of c-1
    assert function.requests == 2  # c-2 is not started while the budget is full
    gate.callback((200, {}, b""))
    for _ in range(5):
        h.flush()
        h.clock.advance(1.0)
    assert budget.peak <= 128 * KIB
    bodies = sorted((r["headers"]["x-call-id"][0], r["body"]) for r in h.receiver.requests)
    expected = b"A" * (30 * KIB) + b"B" * (30 * KIB) + b"C" * (30 * KIB)
    assert bodies == [("c-0", expected), ("c-1", expected), ("c-2", expected)]
    assert budget.held == 0 and h.unacked == 0


def test_a_call_cut_off_while_waiting_for_answer_memory_gives_back_what_it_held():
    """The second call's reading waits for room until its exec_timeout: it ends in a 504 and
    the 30 KiB it had reserved are released (only the first call's callback body stays held)."""
    gate: defer.Deferred = defer.Deferred()
    h = Harness(
        function_resource=Chunked(3, 30 * KIB),
        callback_respond=lambda req: gate,
        max_answer_memory=128 * KIB,
        exec_timeout=5.0,
    )
    h.deploy()
    h.enqueue(call_id="c-0")
    h.enqueue(call_id="c-1")
    h.start()
    h.flush()
    budget = h.worker._table.answers
    assert (budget.held, budget.waiting) == (120 * KIB, 1)
    h.clock.advance(5.0)
    h.flush()
    assert h.record("c-1").status_code == 504
    assert (budget.held, budget.waiting) == (90 * KIB, 0)  # c-0's callback body, still held
