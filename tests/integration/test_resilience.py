"""Retries, callback retries, dead letters, max age, cancel and idempotent posts, end to end.

Real ``faas-worker`` (and ``faas-gateway``) processes against the real RabbitMQ and Redis.
Time is made short by configuration (waits of milliseconds, delay tiers of 50 ms, 200 ms
and 1 s), never by sleeping in the test: every wait polls for the outcome.  Each test has
its own work queue, retry exchange, delay tiers, dead-letter and callback queues and Redis
prefix, all deleted afterwards (see ``Env`` in ``test_worker``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from typing import Any

import attrs
import pytest_twisted
import treq
from twisted.internet import defer, reactor, utils

from tests.integration.test_amqp_queue import Admin
from tests.integration.test_worker import SECRET, Env
from tests.support import (
    GATEWAY_AUTH,
    Recorder,
    TwistdProcess,
    free_port,
    gateway_env,
    never_answer,
    unique,
    wait_for,
)
from tests.tcpproxy import TCPProxy
from txfaas.config import parse_amqp_url
from txfaas.model import Call, CallRecord, CallStatus, DeadMark
from txfaas.queue.amqp import AMQPQueue, Topology
from txfaas.retry import parse_tiers
from txfaas.worker.callback import parse_signing_secret, verify

FAST = (
    "--retry-min-wait",
    "100ms",
    "--retry-max-wait",
    "200ms",
    "--callback-min-wait",
    "100ms",
    "--callback-max-wait",
    "200ms",
)


class Resilience(Env):
    """A test's queues, store and processes, plus a gateway and a broker admin connection."""

    async def open(self) -> Resilience:
        await super().open()
        self.admin = await Admin().open()
        self.gateway: TwistdProcess | None = None
        return self

    @property
    def topology(self) -> Topology:
        return Topology(
            prefix=self.retry_prefix,
            delay_tiers=parse_tiers(self.delay_tiers),
            dead_letter_queue=self.dead_letter_queue,
            callback_queue=self.callback_queue,
        )

    async def start_gateway(self, *extra: str, amqp_url: str | None = None, port: int = 0) -> str:
        port = port or free_port()
        self.gateway = TwistdProcess(
            "faas-gateway",
            [
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--redis",
                self.redis_url,
                "--redis-prefix",
                self.prefix,
                "--amqp",
                amqp_url or self.amqp_url,
                "--callback-allow",
                "127.0.0.0/8",
                *extra,
            ],
            env=gateway_env(),
        )
        base = f"http://127.0.0.1:{port}"
        await self.gateway.wait_http(base + "/healthz", status=200)
        return base

    async def deploy_http(self, base: str, recorder: Recorder, **annotations: str) -> str:
        """Deploy through the gateway, on this test's work queue."""
        name = unique("fn")
        spec = {
            "service": name,
            "image": "none",
            "url": self.serve(recorder),
            "annotations": {"com.openfaas.queue": self.queue, **annotations},
        }
        response = await treq.post(
            base + "/system/functions", data=json.dumps(spec).encode(), auth=GATEWAY_AUTH
        )
        assert response.code == 202, await response.text()
        return name

    async def waiting(self) -> int:
        """Messages waiting in this test's work queue and delay tiers."""
        names = [self.queue, *(self.topology.tier_name(t) for t in self.topology.delay_tiers)]
        counts = [await self.admin.ready_count(name) for name in names]
        return sum(c or 0 for c in counts)

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.admin.close()
        await super().close()


@pytest_twisted.async_yield_fixture
async def env(amqp_url, redis_url):
    e = await Resilience(amqp_url, redis_url).open()
    yield e
    await e.close()


def answers(*replies: tuple[int, dict]):
    """A function answering ``replies`` (status, headers) in turn, the last one for ever."""
    count = [0]

    def respond(request):
        count[0] += 1
        code, headers = replies[min(count[0], len(replies)) - 1]
        return code, headers, f"answer {count[0]}: {code}".encode()

    return respond


async def final(env: Env, call: Call, timeout: float = 15.0, **expect: Any) -> CallRecord:
    """Wait until the call's record has every field in ``expect``."""

    async def check():
        record = await env.record(call)
        if record and all(getattr(record, k) == v for k, v in expect.items()):
            return record
        return None

    return await wait_for(check, timeout=timeout, interval=0.05, what=f"record {expect}")


async def json_of(response) -> Any:
    return json.loads(await response.content())


# --- function retries ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failing_call_is_retried_and_the_final_callback_says_how_often(env):
    """503, 503, 200: the record shows ``retrying`` with the attempt and the next attempt's time
    while it waits; the function runs three times, each wait at least the minimum; one callback
    carries the third answer, X-Retry 2 and X-Retry-Max 4."""
    function = Recorder(answers((503, {}), (503, {}), (200, {})))
    receiver = Recorder()
    name = await env.deploy(function)
    await env.start_worker(*FAST, "--retry-min-wait", "300ms", "--retry-max-wait", "400ms")
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    waiting = await final(env, call, status=CallStatus.RETRYING, attempts=1)
    assert waiting.next_attempt_at > waiting.finished_at and waiting.status_code == 503
    await wait_for(lambda: receiver.requests, timeout=15, what="the callback")
    times = [r["time"] for r in function.requests]
    assert len(times) == 3
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(times)), times
    [cb] = receiver.requests
    assert cb["body"] == b"answer 3: 200"
    assert (cb["headers"]["x-retry"], cb["headers"]["x-retry-max"]) == (["2"], ["4"])
    record = await final(env, call, callback_state="delivered")
    assert (record.status, record.attempts, record.max_attempts, record.next_attempt_at) == (
        "succeeded",
        3,
        5,
        None,
    )


@pytest_twisted.ensureDeferred
async def test_a_waiting_retry_lives_in_rabbitmq_and_survives_a_worker_restart(env):
    """The worker is SIGKILLed while the retry waits: the retry is in the broker's delay queues
    (not in the dead worker's memory), and the next worker runs it."""
    function = Recorder(answers((503, {}), (200, {})))
    receiver = Recorder()
    name = await env.deploy(function)
    proc, _ = await env.start_worker(*FAST, "--retry-min-wait", "3s", "--retry-max-wait", "3s")
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    await final(env, call, status=CallStatus.RETRYING)
    proc.kill()
    assert await env.waiting() == 1
    assert await env.admin.ready_count(env.queue) == 0  # it waits in a delay tier, not in the queue
    await env.start_worker(*FAST)
    await wait_for(lambda: receiver.requests, timeout=20, what="the callback from the new worker")
    assert len(function.requests) == 2
    assert receiver.requests[0]["headers"]["x-retry"] == ["1"]
    assert function.requests[1]["time"] - function.requests[0]["time"] >= 2.9


@pytest_twisted.ensureDeferred
async def test_retry_after_from_the_function_is_honoured(env):
    """429 with Retry-After: 1 -> the next attempt about a second later (not the 100 ms minimum)."""
    function = Recorder(answers((429, {b"Retry-After": b"1"}), (200, {})))
    name = await env.deploy(function)
    await env.start_worker(*FAST, "--retry-max-wait", "5s")
    call = await env.enqueue(name, None)
    await final(env, call, status=CallStatus.SUCCEEDED)
    gap = function.requests[1]["time"] - function.requests[0]["time"]
    assert 0.95 <= gap < 2.5, gap


@pytest_twisted.ensureDeferred
async def test_annotations_override_the_retry_settings_and_exhausted_calls_are_dead_lettered(env):
    """com.openfaas.retry.attempts=2 and .codes=500: a 500 is tried twice, then the call is
    ``dead_lettered`` (attempts_exhausted) and kept, body intact; a 503 (not in .codes) is final."""
    always_500 = Recorder(answers((500, {})))
    always_503 = Recorder(answers((503, {})))
    annotations = {"com.openfaas.retry.attempts": "2", "com.openfaas.retry.codes": "500"}
    name_500 = await env.deploy(always_500, annotations=annotations)
    name_503 = await env.deploy(always_503, annotations=annotations)
    await env.start_worker(*FAST)
    dead = await env.enqueue(name_500, None, body=b"\x00keep me")
    plain = await env.enqueue(name_503, None)
    record = await final(env, dead, status=CallStatus.DEAD_LETTERED)
    assert (record.dead_reason, record.attempts, record.max_attempts) == ("attempts_exhausted", 2, 2)
    assert len(always_500.requests) == 2
    letter = await wait_for(lambda: env.store.get_dead_letter(dead.call_id), what="the kept dead letter")
    assert (letter.call.body, letter.mark.reason, letter.mark.attempts) == (
        b"\x00keep me",
        "attempts_exhausted",
        2,
    )
    record = await final(env, plain, status=CallStatus.FAILED)
    assert (record.status_code, len(always_503.requests)) == (503, 1)
    assert await env.admin.ready_count(env.dead_letter_queue) == 0


@pytest_twisted.ensureDeferred
async def test_an_unreachable_function_is_retried_then_dead_lettered(env):
    """Nobody listens at the function's URL: each attempt is a 502, retried up to --max-attempts."""
    name = unique("fn")
    from txfaas.model import FunctionSpec

    await env.store.create_function(FunctionSpec(service=name, url=f"http://127.0.0.1:{free_port()}"))
    await env.start_worker(*FAST, "--max-attempts", "3")
    call = await env.enqueue(name, None)
    record = await final(env, call, status=CallStatus.DEAD_LETTERED)
    assert (record.attempts, record.status_code, record.dead_reason) == (3, 502, "attempts_exhausted")
    assert "unreachable" in record.error
    await wait_for(lambda: env.store.get_dead_letter(call.call_id), what="the kept dead letter")


# --- callback retries -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failing_callback_is_retried_with_the_same_webhook_id_and_never_reruns_the_call(env):
    """Receiver: 503, then a redirect (not followed), then 200: three signed deliveries of the same
    answer with one webhook-id; the function ran once; the record counts three callback attempts."""
    function = Recorder(answers((201, {})))
    replies = iter([(503, {}, b""), (302, {b"Location": b"http://127.0.0.1:1/elsewhere"}, b"")])
    receiver = Recorder(lambda request: next(replies, (200, {}, b"ok")))
    name = await env.deploy(function)
    await env.start_worker(*FAST, "--callback-secret", SECRET)
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    record = await final(env, call, callback_state="delivered")
    assert (record.callback_attempts, record.callback_status, record.status) == (3, 200, "succeeded")
    assert len(function.requests) == 1
    assert [r["uri"] for r in receiver.requests] == ["/cb"] * 3
    key = parse_signing_secret(SECRET)
    for r in receiver.requests:
        headers = {k: v[0] for k, v in r["headers"].items()}
        assert verify(key, headers, r["body"], now=time.time()) == call.call_id
        assert (headers["webhook-id"], r["body"]) == (call.call_id, b"answer 1: 201")


@pytest_twisted.ensureDeferred
async def test_a_callback_answered_410_is_not_retried(env):
    function = Recorder(answers((200, {})))
    receiver = Recorder(lambda request: (410, {}, b"gone"))
    name = await env.deploy(function)
    await env.start_worker(*FAST)
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    record = await final(env, call, callback_state="failed")
    assert (record.callback_status, record.callback_attempts, record.status) == (410, 1, "succeeded")
    # Recorded as failed with nothing queued for later: no callback job, no dead letter.
    tiers = [env.topology.tier_name(t) for t in env.topology.delay_tiers]
    for queue in (env.callback_queue, env.dead_letter_queue, *tiers):
        assert not await env.admin.ready_count(queue), queue
    assert len(receiver.requests) == 1
    assert await env.store.get_dead_letter(call.call_id) is None


@pytest_twisted.ensureDeferred
async def test_an_exhausted_callback_is_dead_lettered_and_re_queuing_it_delivers_without_rerunning(env):
    """--callback-max-attempts 2 against a receiver answering 500: ``callback_failed`` in the
    dead letters (listed by the gateway, phase ``callback``); once the receiver is fixed,
    POST /system/calls/{id}/retry delivers the kept answer; the function never runs again."""
    function = Recorder(answers((202, {b"X-Out": b"kept"})))
    broken = [True]
    receiver = Recorder(lambda request: (500, {}, b"") if broken[0] else (200, {}, b"ok"))
    base = await env.start_gateway()
    name = await env.deploy_http(base, function)
    await env.start_worker(*FAST, "--callback-max-attempts", "2")
    response = await treq.post(
        base + f"/async-function/{name}",
        data=b"in",
        headers={"X-Callback-Url": [env.serve(receiver) + "/cb"]},
    )
    call_id = (await json_of(response))["callId"]
    call = Call(call_id=call_id, function=name)
    # (The dead letter's keeper may mark the record first; the callback path's own record, with
    # its attempts and the failed state, is the one that must stay.)
    record = await final(env, call, status=CallStatus.DEAD_LETTERED, callback_state="failed")
    assert (record.dead_reason, record.callback_attempts, record.status_code) == ("callback_failed", 2, 202)

    async def listed():
        response = await treq.get(base + f"/system/dead-letters?function={name}", auth=GATEWAY_AUTH)
        return await json_of(response)

    [item] = await wait_for(listed, what="the dead letter listed")
    assert (item["callId"], item["phase"], item["reason"], item["attempts"]) == (
        call_id,
        "callback",
        "callback_failed",
        2,
    )
    broken[0] = False
    response = await treq.post(base + f"/system/calls/{call_id}/retry", auth=GATEWAY_AUTH)
    assert response.code == 202, await response.text()
    record = await final(env, call, callback_state="delivered")
    assert (record.status, record.replays, record.dead_reason) == ("succeeded", 1, None)
    assert receiver.requests[-1]["body"] == b"answer 1: 202"
    assert receiver.requests[-1]["headers"]["x-out"] == ["kept"]
    assert len(function.requests) == 1
    assert await listed() == []


# --- dead letters -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_call_older_than_max_age_is_dead_lettered_without_running(env):
    function = Recorder()
    name = await env.deploy(function)
    call = Call(call_id=unique("call"), function=name, queue=env.queue, accepted_at=time.time() - 10)
    await env.store.create_call(CallRecord.for_call(call))
    await env.publisher.publish(call)
    await env.start_worker(*FAST, "--max-age", "5s")
    record = await final(env, call, status=CallStatus.DEAD_LETTERED)
    assert record.dead_reason == "max_age"
    letter = await wait_for(lambda: env.store.get_dead_letter(call.call_id), what="the kept dead letter")
    assert letter.mark.reason == "max_age"
    assert function.requests == []


@pytest_twisted.ensureDeferred
async def test_a_call_that_keeps_killing_workers_is_dead_lettered(env):
    """The function kills the worker running it, every time.  With --delivery-limit 1 the call runs
    twice (the second run finds the first interrupted), and the third delivery dead-letters it."""

    def kill_the_worker(request):
        env.workers[-1].signal(signal.SIGKILL)  # the newest worker is the one running it
        return defer.Deferred()  # never answers: its worker is dead

    function = Recorder(kill_the_worker)
    name = await env.deploy(function)
    call = await env.enqueue(name, None)
    for run in range(1, 4):
        proc, _ = await env.start_worker(*FAST, "--delivery-limit", "1", wait=run == 3)
        if run < 3:
            await wait_for(lambda n=run: len(function.requests) == n, timeout=15, what=f"run {run}")
            await wait_for(lambda p=proc: p.popen.poll() is not None, timeout=5, what="the worker's death")
    record = await final(env, call, status=CallStatus.DEAD_LETTERED)
    assert (record.dead_reason, record.attempts, record.interruptions) == ("delivery_limit", 1, 1)
    assert len(function.requests) == 2
    await wait_for(lambda: env.store.get_dead_letter(call.call_id), what="the kept dead letter")


@pytest_twisted.ensureDeferred
async def test_a_broker_side_delivery_limit_policy_dead_letters_at_least_once_and_is_kept(env):
    """An operator's policy (x-delivery-limit and at-least-once dead-lettering on the work queue):
    the broker dead-letters a call whose worker died; the worker keeps it with the broker's reason."""
    policy = unique("txfaas-test")
    definition = json.dumps(
        {
            "delivery-limit": 0,
            "dead-letter-exchange": "",
            "dead-letter-routing-key": env.dead_letter_queue,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        }
    )
    out, err, code = await utils.getProcessOutputAndValue(
        "rabbitmqctl",
        ["set_policy", policy, f"^{env.queue}$", definition, "--apply-to", "queues"],
        env=os.environ,
    )
    assert code == 0, err
    try:

        def kill_the_worker(request):
            env.workers[-1].signal(signal.SIGKILL)
            return defer.Deferred()

        function = Recorder(kill_the_worker)
        name = await env.deploy(function)
        await wait_for(_policy_applied(env.queue, policy), timeout=10, what="the policy on the queue")
        call = await env.enqueue(name, None)
        proc, _ = await env.start_worker(*FAST, "--delivery-limit", "10", wait=False)
        await wait_for(lambda: function.requests, timeout=15, what="the first run")
        await wait_for(lambda: proc.popen.poll() is not None, timeout=5, what="the worker's death")
        await env.start_worker(*FAST, "--delivery-limit", "10")
        letter = await wait_for(lambda: env.store.get_dead_letter(call.call_id), timeout=15, what="kept")
        assert letter.mark.reason == "delivery_limit"
        assert "by the broker" in letter.mark.error
        record = await final(env, call, status=CallStatus.DEAD_LETTERED)
        assert record.dead_reason == "delivery_limit"
        assert len(function.requests) == 1
    finally:
        await utils.getProcessOutputAndValue("rabbitmqctl", ["clear_policy", policy], env=os.environ)


def _policy_applied(queue: str, policy: str):
    async def check():
        out, _, code = await utils.getProcessOutputAndValue(
            "rabbitmqctl", ["list_queues", "-q", "name", "policy"], env=os.environ
        )
        return code == 0 and any(line.split() == [queue, policy] for line in out.decode().splitlines())

    return check


@pytest_twisted.ensureDeferred
async def test_a_dead_letter_waits_in_the_dead_letter_queue_until_a_worker_keeps_it(env):
    """Dead letters are durable messages first: one published while no worker runs waits in the
    dead-letter queue; the next worker writes it to the store, marks the record, then acks it."""
    queue = AMQPQueue(reactor, parse_amqp_url(env.amqp_url), declare=(), topology=env.topology)
    await queue.start()
    await queue.ready(10)
    try:
        call = Call(
            call_id=unique("call"),
            function="some-fn",
            body=b"body",
            queue=env.queue,
            dead=DeadMark("attempts_exhausted", time.time(), "as if a worker died right after publishing"),
        )
        await env.store.create_call(attrs.evolve(CallRecord.for_call(call), status=CallStatus.RUNNING))
        await queue.dead_letter(call)
    finally:
        await queue.close()
    assert await env.admin.ready_count(env.dead_letter_queue) == 1
    await env.start_worker(*FAST)
    letter = await wait_for(lambda: env.store.get_dead_letter(call.call_id), what="the kept dead letter")
    assert letter.call == call
    record = await final(env, call, status=CallStatus.DEAD_LETTERED)
    assert record.error == "as if a worker died right after publishing"
    await wait_for(_empty(env, env.dead_letter_queue), what="the dead-letter queue drained")


def _metric(worker: str, line: str):
    async def check():
        response = await treq.get(worker + "/metrics")
        return line in (await response.text()).splitlines()

    return check


def _empty(env: Resilience, queue: str):
    async def check():
        return await env.admin.ready_count(queue) == 0

    return check


# --- through the gateway: idempotent posts, cancel, list and replay ------------------------------


@pytest_twisted.ensureDeferred
async def test_idempotent_post_and_cancel_of_a_queued_call(env):
    """A second post with the same X-Call-Id queues nothing and answers the call's status; DELETE
    cancels the queued call (202), a second DELETE is 409; the worker acks it and never runs it."""
    function = Recorder()
    base = await env.start_gateway()
    name = await env.deploy_http(base, function)
    headers = {"X-Call-Id": ["same-" + unique()]}
    first = await treq.post(base + f"/async-function/{name}", data=b"x", headers=headers)
    second = await treq.post(base + f"/async-function/{name}", data=b"x", headers=headers)
    assert (first.code, second.code) == (202, 202)
    body = await json_of(second)
    assert (body["status"], body.get("duplicate")) == ("queued", True)
    call_id = (await json_of(first))["callId"]
    assert await env.admin.ready_count(env.queue) == 1
    response = await treq.delete(base + f"/system/calls/{call_id}", auth=GATEWAY_AUTH)
    assert (response.code, (await json_of(response))["status"]) == (202, "cancelled")
    response = await treq.delete(base + f"/system/calls/{call_id}", auth=GATEWAY_AUTH)
    assert response.code == 409 and "is cancelled" in await response.text()
    third = await treq.post(base + f"/async-function/{name}", data=b"x", headers=headers)
    assert (await json_of(third))["status"] == "cancelled"
    _, worker = await env.start_worker(*FAST)
    await wait_for(_metric(worker, "txfaas_worker_skipped_total 1.0"), what="the cancelled call skipped")
    response = await treq.get(base + f"/system/calls/{call_id}", auth=GATEWAY_AUTH)
    assert (await json_of(response))["status"] == "cancelled"
    assert function.requests == []


@pytest_twisted.ensureDeferred
async def test_a_gateway_killed_before_the_confirm_leaves_no_false_202(env):
    """Issue 16's false 202: the broker stops answering the gateway, a post with X-Call-Id is
    claimed, the gateway is SIGKILLed before any confirm.  After a restart, the same id is
    refused (409) while the dead gateway's claim holds, then accepted, run and called back."""
    function, receiver = Recorder(), Recorder()
    amqp = parse_amqp_url(env.amqp_url)
    proxy = TCPProxy(reactor, amqp.host, amqp.port)
    proxy.listen()
    try:
        proxied = f"amqp://{amqp.username}:{amqp.password}@127.0.0.1:{proxy.port}/%2F"
        base = await env.start_gateway("--confirm-timeout", "2s", amqp_url=proxied)
        name = await env.deploy_http(base, function)
        call_id = "orphan-" + unique()
        headers = {"X-Call-Id": [call_id], "X-Callback-Url": [env.serve(receiver)]}
        url = base + f"/async-function/{name}"
        proxy.stall()
        first = treq.post(url, data=b"x", headers=headers)
        first.addErrback(lambda _: None)  # no answer: the gateway is killed
        claimed = await wait_for(lambda: env.store.get_call(call_id), what="the claim")
        assert claimed.status == CallStatus.ACCEPTING
        env.gateway.kill()
        proxy.forward()
        base = await env.start_gateway("--confirm-timeout", "2s", amqp_url=proxied)
        url = base + f"/async-function/{name}"
        early = await treq.post(url, data=b"x", headers=headers)
        assert early.code == 409 and early.headers.getRawHeaders(b"retry-after")
        assert await env.admin.ready_count(env.queue) == 0

        async def accepted():
            response = await treq.post(url, data=b"x", headers=headers)
            return await json_of(response) if response.code == 202 else None

        body = await wait_for(accepted, timeout=20, interval=0.5, what="the retry accepted")
        assert (body["status"], body.get("duplicate")) == ("queued", None)
        await env.start_worker(*FAST)
        await wait_for(lambda: receiver.requests, what="the callback")
        assert [r["headers"]["x-call-id"] for r in function.requests] == [[call_id]]
        record = await env.store.get_call(call_id)
        assert (record.status, record.callback_state) == (CallStatus.SUCCEEDED, "delivered")
    finally:
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_cancel_while_waiting_for_a_retry_and_409_while_running(env):
    """A call waiting for its retry is cancelled and runs no more; a running call cannot be."""
    retried = Recorder(answers((503, {})))
    hanging = Recorder(never_answer)
    base = await env.start_gateway()
    name = await env.deploy_http(base, retried)
    slow = await env.deploy_http(base, hanging)
    _, worker = await env.start_worker(*FAST, "--retry-min-wait", "1s", "--retry-max-wait", "1s")
    response = await treq.post(base + f"/async-function/{name}", data=b"x")
    call = Call(call_id=(await json_of(response))["callId"], function=name)
    await final(env, call, status=CallStatus.RETRYING)
    response = await treq.delete(base + f"/system/calls/{call.call_id}", auth=GATEWAY_AUTH)
    assert response.code == 202
    await final(env, call, status=CallStatus.CANCELLED, next_attempt_at=None)
    await wait_for(_metric(worker, "txfaas_worker_skipped_total 1.0"), what="the retry delivered and skipped")
    assert len(retried.requests) == 1
    assert (await env.record(call)).status == CallStatus.CANCELLED

    response = await treq.post(base + f"/async-function/{slow}", data=b"x")
    running = Call(call_id=(await json_of(response))["callId"], function=slow)
    await wait_for(lambda: hanging.requests, what="the slow call running")
    response = await treq.delete(base + f"/system/calls/{running.call_id}", auth=GATEWAY_AUTH)
    assert response.code == 409 and "is running" in await response.text()


@pytest_twisted.ensureDeferred
async def test_dead_letters_are_listed_and_replayed_with_the_readme_loop(env):
    """A call dead-lettered after its attempts is listed (function, call id, reason, time, attempts);
    the README's shell loop re-queues every dead letter of the function: the same call id and body
    run again from attempt 1, the callback arrives, and the list is empty."""
    healthy = [False]
    function = Recorder(
        lambda request: (200, {}, b"fixed:" + request.content.getvalue()) if healthy[0] else (503, {}, b"")
    )
    receiver = Recorder()
    base = await env.start_gateway()
    name = await env.deploy_http(base, function, **{"com.openfaas.retry.attempts": "2"})
    await env.start_worker(*FAST)
    ids = []
    for i in range(2):
        response = await treq.post(
            base + f"/async-function/{name}",
            data=f"payload {i}".encode(),
            headers={"X-Callback-Url": [env.serve(receiver) + "/cb"]},
        )
        ids.append((await json_of(response))["callId"])

    async def listed():
        response = await treq.get(base + f"/system/dead-letters?function={name}", auth=GATEWAY_AUTH)
        items = await json_of(response)
        return items if len(items) == 2 else None

    items = await wait_for(listed, timeout=20, what="two dead letters listed")
    assert sorted(i["callId"] for i in items) == sorted(ids)
    for item in items:
        assert (item["function"], item["reason"], item["attempts"]) == (name, "attempts_exhausted", 2)
        assert item["deadAt"] <= time.time() and item["deadAtTime"].endswith("Z")
    # The last answers' callbacks (from the callback queue) first, then the replay's.
    await wait_for(lambda: len(receiver.requests) == 2, timeout=20, what="the dead calls' callbacks")
    receiver.requests.clear()
    healthy[0] = True
    out, err, code = await utils.getProcessOutputAndValue(
        "bash",
        ["-c", REPLAY_ALL],
        env={**os.environ, "GATEWAY": base, "FN": name, "AUTH": ":".join(GATEWAY_AUTH)},
    )
    assert code == 0, err
    await wait_for(lambda: len(receiver.requests) == 2, timeout=20, what="the replayed callbacks")
    assert sorted(r["body"] for r in receiver.requests) == [b"fixed:payload 0", b"fixed:payload 1"]
    assert sorted(r["headers"]["x-call-id"][0] for r in receiver.requests) == sorted(ids)
    response = await treq.get(base + f"/system/dead-letters?function={name}", auth=GATEWAY_AUTH)
    assert await json_of(response) == []
    for call_id in ids:
        record = await final(env, Call(call_id=call_id, function=name), callback_state="delivered")
        assert (record.status, record.attempts, record.replays) == ("succeeded", 1, 1)


# The loop the README shows (kept identical to it: a test below checks).
REPLAY_ALL = """\
curl -fsS -u "$AUTH" "$GATEWAY/system/dead-letters?function=$FN&limit=1000" | jq -r '.[].callId' |
  while read -r id; do curl -fsS -u "$AUTH" -X POST "$GATEWAY/system/calls/$id/retry"; echo; done
"""


def test_the_readme_shows_the_replay_loop_tested_here():
    from tests.support import ROOT

    readme = (ROOT / "README.rst").read_text()
    for line in REPLAY_ALL.splitlines():
        assert line.strip() in readme, line
