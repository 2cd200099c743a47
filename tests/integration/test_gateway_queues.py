"""A real ``twistd faas-gateway`` against the real RabbitMQ and Redis: function queues the broker
refuses or the worker owns.  Records from before the rule do not stop the gateway from starting;
their functions' async calls are 503 with the reason, the others are accepted; a deploy naming
such a queue is a 400 naming the rule."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import reactor

from tests.support import TwistdProcess, delete_queues, delete_redis_prefix, free_port, unique
from txfaas.config import parse_redis_url
from txfaas.model import FunctionSpec

AUTH = ("admin", "queues-pw")


async def _put_old_records(redis_url: str, prefix: str, records: dict[str, str]) -> None:
    """Write function records as a gateway from before the rule could have (no check of the queue)."""
    from txfaas.store.redis import RedisStore

    store = RedisStore.connect(parse_redis_url(redis_url), reactor, prefix=prefix)
    try:
        for name, queue in records.items():
            spec = FunctionSpec.from_json({"service": name, "annotations": {"com.openfaas.queue": queue}})
            await store.create_function(spec)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_refused_queues_leave_the_gateway_up_and_only_their_calls_503(redis_url, amqp_url):
    prefix = unique("gwqueues") + ":"
    good = unique("gwq-good")
    internal = unique("acme")  # the workers' --retry-prefix for this test
    await _put_old_records(
        redis_url,
        prefix,
        {"evil": f"amq.{good}", "eater": f"{internal}.callbacks", "good": good, "plain": "faas-request"},
    )
    port = free_port()
    proc = TwistdProcess(
        "faas-gateway",
        [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--redis",
            redis_url,
            "--redis-prefix",
            prefix,
            "--amqp",
            amqp_url,
            "--basic-auth",
            "true",
            "--retry-prefix",
            internal,
            "--callback-queue",
            f"{internal}.callbacks",
        ],
        env={"TXFAAS_BASIC_AUTH_USER": AUTH[0], "TXFAAS_BASIC_AUTH_PASSWORD": AUTH[1]},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await proc.wait_http(base + "/healthz", status=200)

        response = await treq.post(base + "/async-function/evil", data=b"x")
        text = await response.text()
        assert response.code == 503, text
        assert f"amq.{good}" in text and "reserved by RabbitMQ" in text

        response = await treq.post(base + "/async-function/eater", data=b"x")
        text = await response.text()
        assert response.code == 503, text
        assert "callback queue" in text

        for name in ("good", "plain"):
            response = await treq.post(
                base + f"/async-function/{name}", data=b"x", headers={"X-Call-Id": [unique()]}
            )
            assert response.code == 202, (name, await response.text())
            await response.content()

        for queue, rule in [
            ("amq.fresh", "reserved by RabbitMQ"),
            (f"{internal}.delay.1000", "--retry-prefix"),
            (f"{internal}.callbacks", "callback queue"),
            ("txfaas.dead-letter", "dead-letter queue"),
            ("q" * 256, "invalid queue name"),
        ]:
            body = json.dumps(
                {"service": "fresh", "image": "x", "annotations": {"com.openfaas.queue": queue}}
            )
            response = await treq.post(base + "/system/functions", data=body.encode(), auth=AUTH)
            text = await response.text()
            assert response.code == 400, (queue, text)
            assert "com.openfaas.queue" in text and rule in text, text
        response = await treq.get(base + "/system/function/fresh", auth=AUTH)
        assert response.code == 404
        await response.content()
        assert "Traceback" not in proc.output()
    finally:
        await proc.stop()
        await delete_queues(good)
        await delete_redis_prefix(redis_url, prefix)
