"""Function queues: RabbitMQ's own names and the worker's internal ones are refused at deploy (400
naming the rule); a record from before the rule does not stop a gateway from starting -- its
function's async calls are 503 with the reason, every other function works."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer

from tests.support import successResultOf
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


def gateway(settings: AppSettings | None = None) -> GatewayTestCase:
    case = GatewayTestCase()
    if settings is not None:
        case.app_settings = lambda: settings  # type: ignore[method-assign]
    case.setUp()
    return case


@pytest.fixture
def acme() -> GatewayTestCase:
    """A gateway whose workers use --retry-prefix acme and --callback-queue acme-callbacks."""
    return gateway(
        AppSettings(reserved_queues=ReservedQueues(prefix="acme", callback_queue="acme-callbacks"))
    )


def deploy(case: GatewayTestCase, method: str, queue: str) -> tuple[int, bytes]:
    body = {"service": "fn", "image": "x", "annotations": {"com.openfaas.queue": queue}}
    response, answer = case.call(method, "/system/functions", data=json.dumps(body).encode())
    return response.code, answer


def stored(case: GatewayTestCase, name: str) -> FunctionSpec | None:
    return successResultOf(defer.Deferred.fromCoroutine(case.store.get_function(name)))


def test_a_reserved_queue_is_a_400_naming_the_rule_and_nothing_is_stored(acme: GatewayTestCase) -> None:
    for queue, words in [
        ("amq.evil", b"reserved by RabbitMQ"),
        ("acme-callbacks", b"callback queue"),
        ("txfaas.dead-letter", b"dead-letter queue"),
        ("acme.delay.1000", b"--retry-prefix"),
    ]:
        code, answer = deploy(acme, "POST", queue)
        assert code == 400, answer
        assert b"com.openfaas.queue" in answer
        assert words in answer
    assert stored(acme, "fn") is None
    assert "amq.evil" not in acme.queue.messages


def test_an_update_to_a_reserved_queue_is_a_400_too(acme: GatewayTestCase) -> None:
    assert deploy(acme, "POST", "orders")[0] == 202
    code, answer = deploy(acme, "PUT", "amq.orders")
    assert code == 400, answer
    spec = stored(acme, "fn")
    assert spec is not None and spec.queue == "orders"


def test_names_the_broker_would_refuse_are_400(acme: GatewayTestCase) -> None:
    for queue in ("", "q" * 256, "a b", "é"):
        code, answer = deploy(acme, "POST", queue)
        assert code == 400, (queue, answer)


class _Port:
    def getHost(self) -> str:
        return "test"

    def stopListening(self) -> defer.Deferred[None]:
        return defer.succeed(None)


@pytest.fixture
def started() -> Iterator[GatewayTestCase]:
    """Records written before the rule (two on reserved queues), then the gateway started."""
    case = gateway()
    for name, queue in [("evil", "amq.evil"), ("eater", "txfaas.callbacks"), ("good", "orders")]:
        spec = FunctionSpec.from_json({"service": name, "annotations": {"com.openfaas.queue": queue}})
        successResultOf(defer.Deferred.fromCoroutine(case.store.create_function(spec)))
    case.deploy("plain")

    async def listen(*_args: Any) -> _Port:
        return _Port()

    service = GatewayService(
        case.clock,
        case.site,
        "tcp:0",
        case.functions,
        case.queue,
        listen=listen,
        refused_queues=case.app.refused_queues,
    )
    service.startService()
    successResultOf(service.started)
    yield case
    service.stopService()


def test_the_gateway_starts_and_only_those_functions_async_calls_are_503(started: GatewayTestCase) -> None:
    for name, queue in [("evil", "amq.evil"), ("eater", "txfaas.callbacks")]:
        response, answer = started.call("POST", f"/async-function/{name}", data=b"x")
        assert response.code == 503, answer
        assert repr(queue).encode() in answer
        assert b"redeploy" in answer
    for name, queue in [("good", "orders"), ("plain", "faas-request")]:
        response, answer = started.call("POST", f"/async-function/{name}", data=b"x")
        assert response.code == 202, answer
        assert started.queue.pending(queue) == 1
    assert "amq.evil" not in started.queue.messages  # never declared
    assert started.queue.pending("txfaas.callbacks") == 0


def test_redeploying_with_another_queue_makes_it_work(started: GatewayTestCase) -> None:
    body = {"service": "evil", "annotations": {"com.openfaas.queue": "evil-orders"}}
    response, _ = started.call("PUT", "/system/functions", data=json.dumps(body).encode())
    assert response.code == 202
    response, answer = started.call("POST", "/async-function/evil", data=b"x")
    assert response.code == 202, answer
    assert started.queue.pending("evil-orders") == 1


def test_a_functions_file_naming_a_reserved_queue_is_a_startup_error(tmp_path) -> None:
    path = tmp_path / "functions.json"
    path.write_text(
        json.dumps([{"service": "a"}, {"service": "b", "annotations": {"com.openfaas.queue": "amq.b"}}])
    )
    with pytest.raises(StartupError, match=r"function #2: .*reserved by RabbitMQ"):
        load_functions_file(str(path))
