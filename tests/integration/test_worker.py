"""``twistd faas-worker`` as real processes, against the real RabbitMQ and Redis.

Calls are published with AMQPQueue and their records created with RedisStore, as the
gateway does; functions and callback receivers are loopback ``Recorder`` servers.  Every
test uses its own queue (deleted afterwards) and Redis key prefix (keys deleted afterwards).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pika
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task

from tests.support import (
    Recorder,
    TwistdProcess,
    free_port,
    listen_http,
    never_answer,
    run_twistd_sync,
    sleep,
    unique,
    wait_for,
)
from tests.tcpproxy import TCPProxy
from txfaas.config import parse_amqp_url, parse_redis_url
from txfaas.model import Call, CallRecord, CallStatus, FunctionSpec
from txfaas.queue.amqp import AMQPQueue
from txfaas.store.redis import RedisStore
from txfaas.worker.callback import parse_signing_secret, verify

SECRET = "whsec_dGVzdC1zaWduaW5nLWtleQ=="


class Env:
    """One test's queue, Redis prefix, publisher, store and the worker processes it started."""

    def __init__(self, amqp_url: str, redis_url: str) -> None:
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.queue = unique("wq")
        self.prefix = unique("wtest") + ":"
        # The worker's own queues and retry topology, unique too: never the shared defaults.
        self.retry_prefix = unique("wr")
        self.dead_letter_queue = self.retry_prefix + ".dead"
        self.callback_queue = self.retry_prefix + ".callbacks"
        self.delay_tiers = "50ms,200ms,1s"
        self.publisher = AMQPQueue(
            reactor, parse_amqp_url(amqp_url), declare=(self.queue,), retry_policy=lambda attempt: 0.2
        )
        self.store = RedisStore.connect(parse_redis_url(redis_url), reactor, prefix=self.prefix)
        self.workers: list[TwistdProcess] = []
        self.ports: list[Any] = []

    async def open(self) -> Env:
        await self.publisher.start()
        await self.publisher.ready(10)
        return self

    def serve(self, recorder: Recorder) -> str:
        port = listen_http(recorder)
        self.ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def deploy(self, recorder: Recorder, **kwargs: Any) -> str:
        name = unique("fn")
        await self.store.create_function(FunctionSpec(service=name, url=self.serve(recorder), **kwargs))
        return name

    async def enqueue(self, function: str, callback_url: str | None, **kwargs: Any) -> Call:
        """What the gateway does: the record first, then the message (confirmed by the broker)."""
        call = Call(
            call_id=unique("call"),
            function=function,
            callback_url=callback_url,
            accepted_at=time.time(),
            queue=self.queue,
            **kwargs,
        )
        assert await self.store.create_call(CallRecord.for_call(call)) is None
        await self.publisher.publish(call)
        return call

    async def start_worker(
        self, *extra: str, amqp_url: str | None = None, wait: bool = True
    ) -> tuple[TwistdProcess, str]:
        """Start a worker on this test's queues; ``wait`` for its /healthz (unless it may die first)."""
        port = free_port()
        proc = TwistdProcess(
            "faas-worker",
            [
                "--amqp",
                amqp_url or self.amqp_url,
                "--redis",
                self.redis_url,
                "--redis-prefix",
                self.prefix,
                "--queue",
                self.queue,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--callback-allow",
                "127.0.0.0/8",
                "--retry-prefix",
                self.retry_prefix,
                "--dead-letter-queue",
                self.dead_letter_queue,
                "--callback-queue",
                self.callback_queue,
                "--delay-tiers",
                self.delay_tiers,
                *extra,
            ],
        )
        self.workers.append(proc)
        base = f"http://127.0.0.1:{port}"
        if wait:
            await proc.wait_http(base + "/healthz", status=200)
        return proc, base

    async def record(self, call: Call) -> CallRecord | None:
        return await self.store.get_call(call.call_id)

    async def close(self) -> None:
        for proc in self.workers:
            await proc.stop()
        for port in self.ports:
            await port.stopListening()
        await self.publisher.close()
        await delete_topology(
            [self.queue, self.dead_letter_queue, self.callback_queue],
            self.retry_prefix,
            self.delay_tiers,
        )
        keys = await self.store._redis.keys(f"{self.prefix}*")
        if keys:
            await self.store._redis.delete(keys)
        await self.store.close()


async def delete_topology(queues: list[str], retry_prefix: str | None = None, tiers: str = "") -> None:
    """Delete a test's queues, and its retry exchange and delay tiers (queue + exchange each)."""
    from pika.adapters.twisted_connection import TwistedProtocolConnection
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from txfaas.queue.amqp import Topology
    from txfaas.retry import parse_tiers

    params = pika.ConnectionParameters(credentials=pika.PlainCredentials("guest", "guest"))
    conn = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", 5672), TwistedProtocolConnection(params)
    )
    await conn.ready
    closed = conn.closed
    exchanges: list[str] = []
    if retry_prefix:
        topology = Topology(prefix=retry_prefix)
        tier_names = [topology.tier_name(t) for t in parse_tiers(tiers)] if tiers else []
        queues = [*queues, *tier_names]
        exchanges = [topology.retry_exchange, *tier_names]
    try:
        channel = await conn.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
    finally:
        conn.close()
        if closed is not None:
            await closed


@pytest_twisted.async_yield_fixture
async def env(amqp_url, redis_url):
    e = await Env(amqp_url, redis_url).open()
    yield e
    await e.close()


def test_help_lists_every_flag():
    result = run_twistd_sync("faas-worker", ["--help"])
    assert result.returncode == 0
    for flag in [
        "--amqp", "--redis", "--redis-prefix", "--queue", "--max-inflight", "--exec-timeout",
        "--gateway-url", "--callback-allow", "--callback-secret", "--listen", "--consumer-timeout",
        "--drain-timeout", "--callback-timeout", "--function-url-template", "--max-result-size",
        "--max-attempts", "--retry-codes", "--retry-min-wait", "--retry-max-wait", "--callback-max-attempts",
        "--callback-max-age", "--callback-min-wait", "--callback-max-wait", "--max-age", "--delivery-limit",
        "--delay-tiers", "--retry-prefix", "--dead-letter-queue", "--callback-queue",
        "--callback-concurrency", "--callback-host-concurrency", "--max-answer-memory",
    ]:  # fmt: skip
        assert flag in result.stdout, flag


def test_a_configuration_that_breaks_the_consumer_timeout_is_refused_in_one_line():
    """exec_timeout (+ callback time) not below the consumer timeout: one line, non-zero exit."""
    result = run_twistd_sync("faas-worker", ["--exec-timeout", "1h", "--consumer-timeout", "30m"])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --exec-timeout: ")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_port_in_use_is_one_line_and_a_non_zero_exit():
    port = listen_http(Recorder())
    try:
        result = run_twistd_sync(
            "faas-worker",
            [
                "--amqp",
                "memory:",
                "--redis",
                "memory:",
                "--listen",
                f"tcp:{port.getHost().port}:interface=127.0.0.1",
            ],
        )
    finally:
        port.stopListening()
    assert result.returncode != 0
    assert "cannot listen" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_enqueued_call_reaches_the_function_intact_and_the_signed_callback_arrives(env):
    """Method, path, query, headers and binary body arrive intact; the callback carries the answer,
    the call's headers and a valid Standard Webhooks signature; the record and result are in Redis."""
    function = Recorder(
        lambda request: task.deferLater(
            reactor, 0.2, lambda: (201, {b"X-Fn": b"yes"}, b"answer:" + request.content.getvalue())
        )
    )
    receiver = Recorder()
    name = await env.deploy(function)
    _proc, base = await env.start_worker("--callback-secret", SECRET)
    body = bytes(range(256)) + b"\r\n\x00end"
    enqueued = time.monotonic()
    call = await env.enqueue(
        name,
        env.serve(receiver) + "/cb?token=1",
        method="PATCH",
        path="/sub/path",
        query="a=1&b=%20x",
        headers=[("Content-Type", "application/octet-stream"), ("X-Custom", "kept"), ("X-Custom", "twice")],
        body=body,
    )
    await wait_for(lambda: receiver.requests, timeout=15, what="the callback")

    [seen] = function.requests
    assert (seen["method"], seen["uri"], seen["body"]) == ("PATCH", "/sub/path?a=1&b=%20x", body)
    assert seen["headers"]["x-custom"] == ["kept", "twice"]
    assert seen["headers"]["content-type"] == ["application/octet-stream"]
    assert seen["headers"]["x-call-id"] == [call.call_id]

    [cb] = receiver.requests
    assert (cb["method"], cb["uri"]) == ("POST", "/cb?token=1")
    assert cb["body"] == b"answer:" + body
    headers = {k: v[0] for k, v in cb["headers"].items()}
    assert headers["x-call-id"] == call.call_id
    assert headers["x-function-name"] == f"{name}.openfaas-fn"
    assert headers["x-function-status"] == "201"
    assert headers["x-fn"] == "yes"
    # the function answers after 0.2 s; the whole round trip bounds it from above
    assert 0.2 <= float(headers["x-duration-seconds"]) < cb["time"] - enqueued
    assert verify(parse_signing_secret(SECRET), headers, cb["body"], now=time.time()) == call.call_id

    async def final():
        record = await env.record(call)
        return record if record and record.callback_state == "delivered" else None

    record = await wait_for(final, timeout=5, what="the delivered callback on the record")
    assert (record.status, record.status_code, record.attempts) == (CallStatus.SUCCEEDED, 201, 1)
    assert record.started_at >= record.accepted_at and record.finished_at >= record.started_at
    assert record.callback_status == 200
    result = await env.store.get_result(call.call_id)
    assert (result.status_code, result.body) == (201, b"answer:" + body)

    response = await treq.get(base + "/metrics")
    metrics = (await response.content()).decode()
    assert f'txfaas_worker_calls_total{{function="{name}.openfaas-fn",status="succeeded"}} 1.0' in metrics
    assert 'txfaas_worker_callbacks_total{outcome="delivered"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_exec_timeout_closes_the_function_connection_and_calls_back_504_in_time(env):
    """A function that never answers: its connection is closed at exec_timeout and the callback
    says 504 within exec_timeout + 1 s of the call reaching the function."""
    function = Recorder(never_answer)
    receiver = Recorder()
    name = await env.deploy(function)
    await env.start_worker("--exec-timeout", "2s", "--max-attempts", "1")
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    await wait_for(lambda: function.requests, timeout=15, what="the call reaching the function")
    await wait_for(lambda: receiver.requests, timeout=5, what="the 504 callback")
    elapsed = receiver.requests[0]["time"] - function.requests[0]["time"]
    assert 1.9 <= elapsed < 3.0, elapsed
    assert receiver.requests[0]["headers"]["x-function-status"] == ["504"]
    await wait_for(lambda: function.disconnected, timeout=2, what="the function's connection closing")
    record = await wait_for(lambda: env.record(call), what="the record")
    assert (record.status, record.status_code) == (CallStatus.TIMED_OUT, 504)


@pytest_twisted.ensureDeferred
async def test_worker_killed_mid_call_the_call_is_completed_by_the_next_worker(env):
    """SIGKILL while the function runs: the broker redelivers, a new worker runs it again (the same
    attempt, one interruption counted) and the callback arrives once."""
    first: defer.Deferred = defer.Deferred()

    def respond(request):
        return first if len(function.requests) == 1 else (200, {}, b"second try")

    function = Recorder(respond)
    receiver = Recorder()
    name = await env.deploy(function)
    proc, _ = await env.start_worker()
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    await wait_for(lambda: function.requests, timeout=15, what="the call reaching the function")
    record = await wait_for(lambda: env.record(call), what="the record")
    assert record.status == CallStatus.RUNNING
    proc.kill()
    await wait_for(lambda: function.disconnected, timeout=5, what="the killed worker's connection closing")

    await env.start_worker()
    await wait_for(lambda: receiver.requests, timeout=15, what="the callback from the second worker")
    assert receiver.requests[0]["body"] == b"second try"
    assert len(function.requests) == 2

    async def final():
        r = await env.record(call)
        return r if r.callback_state == "delivered" else None

    record = await wait_for(final, timeout=5, what="the final record")
    assert (record.status, record.attempts, record.interruptions) == (CallStatus.SUCCEEDED, 1, 1)
    await sleep(0.5)
    assert len(receiver.requests) == 1


@pytest_twisted.ensureDeferred
async def test_amqp_connection_cut_under_the_worker_it_reconnects_and_finishes_the_work(env):
    """The broker connection is cut (TCP proxy) while a call runs: the call finishes once, with one
    callback, and the worker reconnects and takes new calls."""
    proxy = TCPProxy(reactor, "127.0.0.1", 5672)
    proxy_port = proxy.listen()
    try:
        gate: defer.Deferred = defer.Deferred()

        def respond(request):
            return gate if request.uri.startswith(b"/first") else (200, {}, b"ok:" + request.uri)

        function = Recorder(respond)
        receiver = Recorder()
        name = await env.deploy(function)
        cb_url = env.serve(receiver) + "/cb"
        url = env.amqp_url.replace(":5672/", f":{proxy_port}/")
        assert url != env.amqp_url
        proc, _ = await env.start_worker(amqp_url=url)

        first = await env.enqueue(name, cb_url, path="/first")
        await wait_for(lambda: function.requests, timeout=15, what="the first call reaching the function")
        assert proxy.drop_all() >= 1
        await sleep(1.5)  # the worker reconnects (and the broker redelivers the unacked call)
        gate.callback((200, {}, b"first done"))
        await wait_for(lambda: receiver.requests, timeout=15, what="the first callback")

        second = await env.enqueue(name, cb_url, path="/second")
        await wait_for(lambda: len(receiver.requests) == 2, timeout=15, what="the second callback")
        await sleep(1.0)
        ids = [r["headers"]["x-call-id"][0] for r in receiver.requests]
        assert ids == [first.call_id, second.call_id]
        assert [r["uri"] for r in function.requests] == ["/first", "/second"]
        for call in (first, second):
            record = await env.record(call)
            assert (record.status, record.callback_state, record.attempts) == ("succeeded", "delivered", 1)
        assert proxy.accepted >= 2, "the worker never reconnected through the proxy"
    finally:
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_running_call_finish_before_exiting(env):
    """SIGTERM mid-call: the worker stops taking messages, the call finishes and is called back,
    then the process exits cleanly."""

    def respond(request):
        d: defer.Deferred = defer.Deferred()
        reactor.callLater(1.0, d.callback, (200, {}, b"finished"))
        return d

    function = Recorder(respond)
    receiver = Recorder()
    name = await env.deploy(function)
    proc, _ = await env.start_worker("--drain-timeout", "10s")
    call = await env.enqueue(name, env.serve(receiver) + "/cb")
    await wait_for(lambda: function.requests, timeout=15, what="the call reaching the function")
    proc.signal(signal.SIGTERM)
    # twistd ends by re-raising the signal it got once it has shut down cleanly.
    assert await proc.wait_exit(timeout=15) in (0, -signal.SIGTERM), proc.tail()
    assert "Server Shut Down." in proc.output()
    assert [r["body"] for r in receiver.requests] == [b"finished"]
    record = await env.record(call)
    assert (record.status, record.callback_state) == (CallStatus.SUCCEEDED, "delivered")
    assert function.disconnected == []


@pytest_twisted.ensureDeferred
async def test_redis_connection_cut_under_the_worker_it_reconnects_and_finishes_the_work(env):
    """Every Redis connection of the worker is cut (TCP proxy): the next call still runs once and
    is recorded and called back, after txredisapi reconnects (the message waits, unacked)."""
    proxy = TCPProxy(reactor, "127.0.0.1", 6379)
    proxy_port = proxy.listen()
    try:
        function = Recorder(lambda request: (200, {}, b"ok"))
        receiver = Recorder()
        name = await env.deploy(function)
        cb_url = env.serve(receiver) + "/cb"
        redis_url = env.redis_url.replace(":6379/", f":{proxy_port}/")
        assert redis_url != env.redis_url
        env.redis_url, original = redis_url, env.redis_url
        try:
            await env.start_worker()
        finally:
            env.redis_url = original
        assert proxy.drop_all() >= 1
        call = await env.enqueue(name, cb_url)
        await wait_for(lambda: receiver.requests, timeout=20, what="the callback after Redis came back")
        record = await wait_for(lambda: env.record(call), what="the record")
        assert record.status == CallStatus.SUCCEEDED
        assert len(function.requests) == 1
    finally:
        await proxy.close()


MIB = 1024 * 1024


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest_twisted.ensureDeferred
async def test_big_answers_keep_the_workers_memory_within_max_answer_memory(env):
    """Ten calls answering 8 MiB each at once (--max-inflight 10), called back whole, with
    --max-answer-memory 8MiB: the worker's RSS grew by 49 MiB here (a small multiple of the
    bound: copies made while reading, publishing and receiving), against 219 MiB without the
    bound (all ten answers held at once, with copies of each)."""
    big = b"z" * (8 * MIB)
    function = Recorder(lambda request: (200, {}, big))
    receiver = Recorder()
    name = await env.deploy(function)
    proc, _ = await env.start_worker("--max-answer-memory", "8MiB", "--max-inflight", "10")
    hook = env.serve(receiver) + "/cb"
    await task.deferLater(reactor, 0.5, lambda: None)  # settle after start-up
    baseline = _rss(proc.popen.pid)
    for _ in range(10):
        await env.enqueue(name, hook)
    peak = baseline
    deadline = time.monotonic() + 60
    while len(receiver.requests) < 10 and time.monotonic() < deadline:
        peak = max(peak, _rss(proc.popen.pid))
        await task.deferLater(reactor, 0.01, lambda: None)
    assert len(receiver.requests) == 10, proc.tail()
    assert all(r["body"] == big for r in receiver.requests)
    growth = (peak - baseline) / MIB
    assert growth < 100, f"the worker grew by {growth:.0f} MiB"
