"""Function queues: RabbitMQ's own names and the worker's internal ones are refused at deploy (400
naming the rule); a record from before the rule does not stop a gateway from starting -- its
function's async calls are 503 with the reason, every other function works."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer

from tests.unit.gateway_fixtures import GatewayTestCase
from txfaas.gateway.app import AppSettings
from txfaas.gateway.service import GatewayService, load_functions_file
from txfaas.model import FunctionSpec, ReservedQueues
from txfaas.service import StartupError


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("amq.evil", "reserved by RabbitMQ"),
        ("AMQ.gen-1", "reserved by RabbitMQ"),
        ("txfaas.callbacks", "callback queue"),
        ("txfaas.dead-letter", "dead-letter queue"),
        ("txfaas.delay.5000", "--retry-prefix"),
        ("txfaas.retry", "--retry-prefix"),
    ],
)
def test_reserved_names_are_refused_naming_the_rule(name: str, rule: str) -> None:
    reason = ReservedQueues().refusal(name)
    assert reason is not None and rule in reason and repr(name) in reason


def test_the_reserved_names_follow_the_workers_flags() -> None:
    reserved = ReservedQueues(prefix="acme", dead_letter_queue="acme-dead", callback_queue="cb")
    for name in ("acme.delay.1000", "acme.retry", "acme-dead", "cb", "amq.x"):
        assert reserved.refusal(name) is not None, name
    for name in ("txfaas.callbacks", "faas-request", "acme", "acme-orders", "amqp.orders", "orders"):
        assert reserved.refusal(name) is None, name


class DeployTests(GatewayTestCase):
    def app_settings(self) -> AppSettings:
        return AppSettings(reserved_queues=ReservedQueues(prefix="acme", callback_queue="acme-callbacks"))

    def _deploy(self, method: str, queue: str) -> tuple[int, bytes]:
        body = {"service": "fn", "image": "x", "annotations": {"com.openfaas.queue": queue}}
        response, answer = self.call(method, "/system/functions", data=json.dumps(body).encode())
        return response.code, answer

    def test_a_reserved_queue_is_a_400_naming_the_rule_and_nothing_is_stored(self) -> None:
        for queue, words in [
            ("amq.evil", b"reserved by RabbitMQ"),
            ("acme-callbacks", b"callback queue"),
            ("txfaas.dead-letter", b"dead-letter queue"),
            ("acme.delay.1000", b"--retry-prefix"),
        ]:
            code, answer = self._deploy("POST", queue)
            self.assertEqual(code, 400, answer)
            self.assertIn(b"com.openfaas.queue", answer)
            self.assertIn(words, answer)
        self.assertIsNone(self.successResultOf(defer.Deferred.fromCoroutine(self.store.get_function("fn"))))
        self.assertNotIn("amq.evil", self.queue.messages)

    def test_an_update_to_a_reserved_queue_is_a_400_too(self) -> None:
        self.assertEqual(self._deploy("POST", "orders")[0], 202)
        code, answer = self._deploy("PUT", "amq.orders")
        self.assertEqual(code, 400, answer)
        spec = self.successResultOf(defer.Deferred.fromCoroutine(self.store.get_function("fn")))
        self.assertEqual(spec.queue, "orders")

    def test_names_the_broker_would_refuse_are_400(self) -> None:
        for queue in ("", "q" * 256, "a b", "é"):
            code, answer = self._deploy("POST", queue)
            self.assertEqual(code, 400, (queue, answer))


class _Port:
    def getHost(self) -> str:
        return "test"

    def stopListening(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class StartWithOldRecordsTests(GatewayTestCase):
    """Records written before the rule: the gateway starts, their calls are 503."""

    def _start(self) -> GatewayService:
        for name, queue in [("evil", "amq.evil"), ("eater", "txfaas.callbacks"), ("good", "orders")]:
            spec = FunctionSpec.from_json({"service": name, "annotations": {"com.openfaas.queue": queue}})
            self.successResultOf(defer.Deferred.fromCoroutine(self.store.create_function(spec)))
        self.deploy("plain")

        async def listen(*_args: Any) -> _Port:
            return _Port()

        service = GatewayService(
            self.clock,
            self.site,
            "tcp:0",
            self.functions,
            self.queue,
            listen=listen,
            refused_queues=self.app.refused_queues,
        )
        service.startService()
        self.successResultOf(service.started)
        self.addCleanup(service.stopService)
        return service

    def test_the_gateway_starts_and_only_those_functions_async_calls_are_503(self) -> None:
        self._start()
        for name, queue in [("evil", "amq.evil"), ("eater", "txfaas.callbacks")]:
            response, answer = self.call("POST", f"/async-function/{name}", data=b"x")
            self.assertEqual(response.code, 503, answer)
            self.assertIn(repr(queue).encode(), answer)
            self.assertIn(b"redeploy", answer)
        for name, queue in [("good", "orders"), ("plain", "faas-request")]:
            response, answer = self.call("POST", f"/async-function/{name}", data=b"x")
            self.assertEqual(response.code, 202, answer)
            self.assertEqual(self.queue.pending(queue), 1)
        self.assertNotIn("amq.evil", self.queue.messages)  # never declared
        self.assertEqual(self.queue.pending("txfaas.callbacks"), 0)

    def test_redeploying_with_another_queue_makes_it_work(self) -> None:
        self._start()
        body = {"service": "evil", "annotations": {"com.openfaas.queue": "evil-orders"}}
        response, _ = self.call("PUT", "/system/functions", data=json.dumps(body).encode())
        self.assertEqual(response.code, 202)
        response, answer = self.call("POST", "/async-function/evil", data=b"x")
        self.assertEqual(response.code, 202, answer)
        self.assertEqual(self.queue.pending("evil-orders"), 1)


def test_a_functions_file_naming_a_reserved_queue_is_a_startup_error(tmp_path) -> None:
    path = tmp_path / "functions.json"
    path.write_text(
        json.dumps([{"service": "a"}, {"service": "b", "annotations": {"com.openfaas.queue": "amq.b"}}])
    )
    with pytest.raises(StartupError, match=r"function #2: .*reserved by RabbitMQ"):
        load_functions_file(str(path))
