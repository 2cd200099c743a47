"""The asynchronous path end to end: gateway → RabbitMQ → worker → function → callback, with real processes.

Each test has its own queue (the function's ``com.openfaas.queue`` annotation), Redis
prefix and loopback servers, and removes them afterwards.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
import treq
from twisted.internet import reactor, task

from tests.support import (
    GATEWAY_AUTH,
    Recorder,
    TwistdProcess,
    delete_queues,
    delete_redis_prefix,
    free_port,
    gateway_env,
    listen_http,
    unique,
    wait_for,
)


class System:
    def __init__(self, amqp_url: str, redis_url: str) -> None:
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.queue = unique("aq")
        self.prefix = unique("async") + ":"
        self.procs: list[TwistdProcess] = []
        self.ports = []

    def serve(self, recorder: Recorder) -> str:
        port = listen_http(recorder)
        self.ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def gateway(self, *extra: str, amqp_url: str | None = None) -> str:
        port = free_port()
        proc = TwistdProcess(
            "faas-gateway",
            [
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--redis", self.redis_url,
                "--redis-prefix", self.prefix,
                "--amqp", amqp_url or self.amqp_url,
                *extra,
            ],
            env=gateway_env(),
        )  # fmt: skip
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        await proc.wait_http(base + "/system/info", status=200, auth=GATEWAY_AUTH)
        return base

    async def worker(self, *extra: str) -> None:
        port = free_port()
        proc = TwistdProcess(
            "faas-worker",
            [
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--redis", self.redis_url,
                "--redis-prefix", self.prefix,
                "--amqp", self.amqp_url,
                "--queue", self.queue,
                "--callback-allow", "127.0.0.0/8",
                *extra,
            ],
        )  # fmt: skip
        self.procs.append(proc)
        await proc.wait_http(f"http://127.0.0.1:{port}/healthz", status=200)

    async def deploy(self, base: str, name: str, url: str) -> None:
        body = {"service": name, "image": "x", "url": url, "annotations": {"com.openfaas.queue": self.queue}}
        response = await treq.post(
            base + "/system/functions", data=json.dumps(body).encode(), auth=GATEWAY_AUTH
        )
        assert response.code == 202, await response.text()

    async def close(self) -> None:
        for proc in self.procs:
            await proc.stop()
        for port in self.ports:
            await port.stopListening()
        await delete_queues(self.queue)
        await delete_redis_prefix(self.redis_url, self.prefix)


@pytest_twisted.ensureDeferred
async def test_post_runs_the_function_once_and_the_callback_carries_its_answer(amqp_url, redis_url):
    system = System(amqp_url, redis_url)
    try:
        answer = (201, {b"X-Fn": b"1", b"Content-Type": b"text/x-out"}, b"done")
        function = Recorder(lambda request: task.deferLater(reactor, 0.2, lambda: answer))
        callbacks = Recorder(lambda request: (204, {}, b""))
        gateway = await system.gateway("--callback-allow", "127.0.0.0/8")
        await system.deploy(gateway, "echo", system.serve(function))
        await system.worker()
        callback_url = system.serve(callbacks) + "/hook"

        body = bytes(range(256))
        posted = time.monotonic()
        response = await treq.post(
            gateway + "/async-function/echo/sub/path?x=1&y=%2F",
            data=body,
            headers={
                "X-Callback-Url": [callback_url],
                "X-Custom": ["v1"],
                "Content-Type": ["application/x-bin"],
            },
        )
        assert response.code == 202
        call_id = response.headers.getRawHeaders("X-Call-Id")[0]
        assert response.headers.getRawHeaders("Location") == [f"/system/calls/{call_id}"]
        assert json.loads(await response.content())["callId"] == call_id

        await wait_for(lambda: callbacks.requests, timeout=20, what="the callback")
        [seen] = function.requests
        assert seen["method"] == "POST"
        assert seen["uri"] == "/sub/path?x=1&y=%2F"
        assert seen["body"] == body
        assert seen["headers"]["x-custom"] == ["v1"]
        assert seen["headers"]["content-type"] == ["application/x-bin"]
        assert seen["headers"]["x-call-id"] == [call_id]

        [callback] = callbacks.requests
        assert callback["method"] == "POST"
        assert callback["body"] == b"done"
        headers = callback["headers"]
        assert headers["x-call-id"] == [call_id]
        assert headers["x-function-name"] == ["echo.openfaas-fn"]
        assert headers["x-function-status"] == ["201"]
        assert headers["x-fn"] == ["1"]
        # the function answers after 0.2 s; the whole round trip bounds it from above
        assert 0.2 <= float(headers["x-duration-seconds"][0]) < callback["time"] - posted

        async def final():
            response = await treq.get(gateway + f"/system/calls/{call_id}", auth=GATEWAY_AUTH)
            record = json.loads(await response.content())
            return record if record["callbackState"] == "delivered" else None

        record = await wait_for(final, timeout=10, what="the final record")
        assert (record["status"], record["statusCode"], record["attempts"]) == ("succeeded", 201, 1)
        response = await treq.get(gateway + f"/system/calls/{call_id}/result", auth=GATEWAY_AUTH)
        assert (response.code, await response.content()) == (200, b"done")
        assert response.headers.getRawHeaders("X-Function-Status") == ["201"]
    finally:
        await system.close()


@pytest_twisted.ensureDeferred
async def test_unknown_function_404_and_callback_ssrf_targets_400(amqp_url, redis_url):
    system = System(amqp_url, redis_url)
    try:
        gateway = await system.gateway()  # no --callback-allow: only public addresses pass
        await system.deploy(gateway, "echo", "http://127.0.0.1:9")
        response = await treq.post(gateway + "/async-function/nope", data=b"x")
        assert response.code == 404
        assert "'nope'" in await response.text()
        for target in [
            "http://127.0.0.1:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://localhost:8080/",
            "http://[::1]/",
            "ftp://example.com/",
            "http://localhost:8080/again",  # the gateway's resolver remembers localhost: still refused
        ]:
            response = await treq.post(
                gateway + "/async-function/echo", data=b"x", headers={"X-Callback-Url": [target]}
            )
            text = await response.text()
            assert response.code == 400, (target, text)
            assert text.startswith("X-Callback-Url refused:"), text
    finally:
        await system.close()


@pytest_twisted.ensureDeferred
async def test_broker_unreachable_is_503_never_202(amqp_url, redis_url):
    system = System(amqp_url, redis_url)
    try:
        dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
        gateway = await system.gateway("--confirm-timeout", "1s", amqp_url=dead_broker)
        await system.deploy(gateway, "echo", "http://127.0.0.1:9")
        response = await treq.post(
            gateway + "/async-function/echo", data=b"x", headers={"X-Call-Id": ["c-503"]}
        )
        assert response.code == 503
        assert response.headers.getRawHeaders("Retry-After")
        assert "queue unavailable" in await response.text()
        # Nothing was accepted, so nothing was recorded.
        response = await treq.get(gateway + "/system/calls/c-503", auth=GATEWAY_AUTH)
        assert response.code == 404
        response = await treq.get(gateway + "/healthz")
        assert response.code == 503
        assert "rabbitmq" in await response.text()
    finally:
        await system.close()
