"""Namespaces are part of a function's identity, as in OpenFaaS: model, in-memory store, gateway, worker."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.store_contract import CONTRACT
from tests.unit.gateway_fixtures import GatewayTestCase, set_up
from tests.unit.test_worker_service import CALLBACK, Harness
from txfaas.gateway.app import AppSettings
from txfaas.gateway.proxy import ProxySettings
from txfaas.model import (
    Call,
    CallRecord,
    DeadLetter,
    DeadMark,
    FunctionSpec,
    Namespace,
    ValidationError,
    check_namespace,
    split_ref,
    store_key,
)
from txfaas.store.memory import MemoryStore


def finished(coroutine: Any) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "the coroutine did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def js(body: bytes) -> Any:
    return json.loads(body)


# --- model ----------------------------------------------------------------------------------------


def test_a_ref_is_a_name_and_an_optional_namespace_both_dns_labels():
    assert split_ref("echo", "openfaas-fn") == ("echo", "openfaas-fn")
    assert split_ref("echo.dev", "openfaas-fn") == ("echo", "dev")
    for bad in ["Echo", "echo.", "echo.Dev", "echo.dev.x", ".dev", "echo.-dev", "echo." + "a" * 64]:
        with pytest.raises(ValidationError):
            split_ref(bad, "openfaas-fn")


def test_namespace_names_are_dns_1123_labels():
    assert check_namespace("a" * 63) == "a" * 63
    for bad in ["", "a" * 64, "Dev", "dev-", "-dev", "d_v", "d.v", "dev\n"]:
        with pytest.raises(ValidationError, match="namespace"):
            check_namespace(bad)


def test_the_default_namespace_keeps_the_keys_of_before_namespaces():
    assert store_key("echo", "openfaas-fn") == "echo"
    assert store_key("echo", "dev") == "echo.dev"


def test_a_deployment_without_namespace_is_in_the_default_one():
    assert FunctionSpec.from_json({"service": "echo"}).namespace == "openfaas-fn"
    assert FunctionSpec.from_json({"service": "echo", "namespace": ""}).namespace == "openfaas-fn"
    assert FunctionSpec.from_json({"service": "echo"}, default_namespace="dev").namespace == "dev"
    spec = FunctionSpec.from_json({"service": "echo", "namespace": "dev"})
    assert (spec.namespace, spec.ref, spec.key) == ("dev", "echo.dev", "echo.dev")
    with pytest.raises(ValidationError, match="namespace"):
        FunctionSpec.from_json({"service": "echo", "namespace": "Not_A_Label"})


def test_a_record_of_the_release_before_namespaces_reads_as_the_default_namespace():
    """Old records are under the bare name with namespace "" (or whatever the client sent then)."""
    for stored in ["", "dev", None]:
        old = {"service": "echo", "image": "x", "envVars": {}, "url": None, "replicas": 2, "createdAt": 5.0}
        if stored is not None:
            old["namespace"] = stored
        spec = FunctionSpec.from_record(old, "echo")
        assert (spec.namespace, spec.ref, spec.replicas) == ("openfaas-fn", "echo.openfaas-fn", 2)


def test_a_message_queued_before_namespaces_reads_as_the_default_namespace():
    old = {"v": 1, "callId": "c1", "function": "echo", "method": "POST", "path": "/", "attempt": 1}
    call = Call.decode(orjson.dumps(old), b"body")
    assert (call.function, call.namespace, call.ref) == ("echo", "openfaas-fn", "echo.openfaas-fn")
    new = Call(call_id="c2", function="echo", namespace="dev")
    again = Call.decode(new.encode_meta(), b"")
    assert (again.namespace, again.ref) == ("dev", "echo.dev")


def test_a_call_record_of_before_namespaces_reads_as_the_default_namespace():
    old = {"callId": "c1", "function": "echo", "status": "succeeded"}
    assert CallRecord.from_json(old).namespace == "openfaas-fn"
    record = CallRecord.for_call(Call(call_id="c1", function="echo", namespace="dev"))
    assert record.to_json()["namespace"] == "dev"
    assert CallRecord.from_json(record.to_json()).namespace == "dev"


def test_a_dead_letter_carries_the_namespace_and_is_indexed_by_its_key():
    letter = DeadLetter(Call(call_id="c", function="echo", namespace="dev", dead=DeadMark("max_age", 1.0)))
    assert letter.summary_json()["namespace"] == "dev"
    assert letter.key == "echo.dev"
    assert DeadLetter.from_json(json.loads(json.dumps(letter.to_json()))).namespace == "dev"


def test_namespace_body_is_openfaas_function_namespace():
    ns = Namespace.from_json({"name": "dev", "labels": {"openfaas": "1"}})
    assert ns.to_json() == {"name": "dev", "labels": {"openfaas": "1"}, "annotations": {}}
    assert Namespace.from_json({}, "dev").name == "dev"
    with pytest.raises(ValidationError, match="does not match"):
        Namespace.from_json({"name": "other"}, "dev")
    with pytest.raises(ValidationError, match="name: missing"):
        Namespace.from_json({"labels": {}})
    with pytest.raises(ValidationError, match="labels"):
        Namespace.from_json({"name": "dev", "labels": {"a": 1}})


# --- the in-memory store --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.__name__)
def test_memory_store_contract(case):
    finished(case(MemoryStore()))


# --- the gateway ----------------------------------------------------------------------------------


class _NamespaceGateway(GatewayTestCase):
    """Paths, query strings and bodies as faas-cli sends them."""

    def setUp(self) -> None:
        super().setUp()
        self.call_json("POST", "/system/namespace/", {"name": "dev", "labels": {"openfaas": "1"}})

    def call_json(self, method: str, path: str, body: Any) -> Any:
        return self.call(method, path, data=json.dumps(body).encode())

    def deploy_in(self, namespace: str | None, name: str = "echo", **fields: Any) -> Any:
        body = {"service": name, "image": "x", **fields}
        if namespace is not None:
            body["namespace"] = namespace
        return self.call_json("POST", "/system/functions", body)


@pytest.fixture
def namespace_gateway_gateway() -> _NamespaceGateway:
    return set_up(_NamespaceGateway())


def test_invoke_reaches_the_function_of_the_namespace_named(
    namespace_gateway_gateway: _NamespaceGateway,
) -> None:
    namespace_gateway_gateway.deploy_in("openfaas-fn", url="http://default.fn:8080")
    namespace_gateway_gateway.deploy_in("dev", url="http://dev.fn:8080")
    for path, host in [
        ("/function/echo.dev/x", b"dev.fn:8080"),
        ("/function/echo.openfaas-fn/x", b"default.fn:8080"),
        ("/function/echo/x", b"default.fn:8080"),
    ]:
        response, _ = namespace_gateway_gateway.call("POST", path, data=b"in")
        assert response.code == 200, path
        assert namespace_gateway_gateway.function.header(b"host") == [host], path
        assert namespace_gateway_gateway.function.seen[-1]["uri"] == b"/x"


def test_the_url_template_gets_the_namespace(namespace_gateway_gateway: _NamespaceGateway) -> None:
    namespace_gateway_gateway.build(proxy_settings=ProxySettings("http://{name}.{namespace}:8080", 10.0))
    namespace_gateway_gateway.deploy_in("dev")
    namespace_gateway_gateway.call("GET", "/function/echo.dev")
    assert namespace_gateway_gateway.function.header(b"host") == [b"echo.dev:8080"]


def test_invoke_of_a_name_missing_in_that_namespace_is_404_naming_both(
    namespace_gateway_gateway: _NamespaceGateway,
) -> None:
    namespace_gateway_gateway.deploy_in(None)
    response, body = namespace_gateway_gateway.call("GET", "/function/echo.dev")
    assert (response.code, body) == (404, b"function 'echo' not found in namespace 'dev'\n")
    response, body = namespace_gateway_gateway.call("POST", "/async-function/echo.dev", data=b"x")
    assert (response.code, body) == (404, b"function 'echo' not found in namespace 'dev'\n")


def test_bad_namespace_in_the_path_is_400(namespace_gateway_gateway: _NamespaceGateway) -> None:
    for path in [
        "/function/echo.Dev",
        "/function/echo.",
        "/function/echo.a.b",
        "/function/echo." + "a" * 64,
    ]:
        response, body = namespace_gateway_gateway.call("GET", path)
        assert response.code == 400, path
        assert b"invalid function name" in body
    response, body = namespace_gateway_gateway.call("POST", "/async-function/echo.Dev", data=b"x")
    assert response.code == 400
    assert b"namespace" in body


def test_async_invoke_queues_the_namespace_and_records_it(
    namespace_gateway_gateway: _NamespaceGateway,
) -> None:
    namespace_gateway_gateway.deploy_in("dev")
    response, body = namespace_gateway_gateway.call("POST", "/async-function/echo.dev/sub", data=b"x")
    assert response.code == 202
    call_id = js(body)["callId"]
    [call] = [c for c in namespace_gateway_gateway.queue.published if c.call_id == call_id]
    assert (call.function, call.namespace, call.path) == ("echo", "dev", "/sub")
    _, body = namespace_gateway_gateway.call("GET", f"/system/calls/{call_id}")
    assert (js(body)["function"], js(body)["namespace"]) == ("echo", "dev")


def test_a_call_id_taken_by_the_same_name_in_another_namespace_is_409(
    namespace_gateway_gateway: _NamespaceGateway,
) -> None:
    namespace_gateway_gateway.deploy_in("dev")
    namespace_gateway_gateway.deploy_in(None)
    response, _ = namespace_gateway_gateway.call(
        "POST", "/async-function/echo.dev", {"X-Call-Id": ["id-1"]}, b"x"
    )
    assert response.code == 202
    response, body = namespace_gateway_gateway.call(
        "POST", "/async-function/echo", {"X-Call-Id": ["id-1"]}, b"x"
    )
    assert response.code == 409
    assert b"taken by another call" in body
    response, body = namespace_gateway_gateway.call(
        "POST", "/async-function/echo.dev", {"X-Call-Id": ["id-1"]}, b"x"
    )
    assert (response.code, js(body)["duplicate"]) == (202, True)


def test_metrics_are_labelled_name_dot_namespace(namespace_gateway_gateway: _NamespaceGateway) -> None:
    namespace_gateway_gateway.deploy_in("dev")
    namespace_gateway_gateway.deploy_in(None)
    namespace_gateway_gateway.call("GET", "/function/echo.dev")
    namespace_gateway_gateway.call("GET", "/function/echo")
    namespace_gateway_gateway.metrics.flush()
    registry = namespace_gateway_gateway.metrics.registry
    for ref in ["echo.dev", "echo.openfaas-fn"]:
        value = registry.get_sample_value(
            "gateway_function_invocation_total", {"function_name": ref, "code": "200"}
        )
        assert value == 1.0, ref


def test_list_and_describe_take_the_namespace_query(namespace_gateway_gateway: _NamespaceGateway) -> None:
    namespace_gateway_gateway.deploy_in("dev", image="dev-image")
    namespace_gateway_gateway.deploy_in(None, image="default-image")
    _, body = namespace_gateway_gateway.call("GET", "/system/functions?namespace=dev")
    assert [(f["name"], f["namespace"], f["image"]) for f in js(body)] == [("echo", "dev", "dev-image")]
    _, body = namespace_gateway_gateway.call("GET", "/system/functions")
    assert [(f["name"], f["namespace"]) for f in js(body)] == [("echo", "openfaas-fn")]
    response, body = namespace_gateway_gateway.call("GET", "/system/function/echo?namespace=dev")
    assert (response.code, js(body)["image"]) == (200, "dev-image")
    response, body = namespace_gateway_gateway.call("GET", "/system/function/echo")
    assert js(body)["image"] == "default-image"
    response, body = namespace_gateway_gateway.call("GET", "/system/functions?namespace=nowhere")
    assert response.code == 400
    assert b"'nowhere'" in body
    response, _ = namespace_gateway_gateway.call("GET", "/system/function/echo?namespace=nowhere")
    assert response.code == 404


def test_remove_with_a_namespace_leaves_the_same_name_elsewhere_untouched(
    namespace_gateway_gateway: _NamespaceGateway,
) -> None:
    namespace_gateway_gateway.deploy_in("dev")
    namespace_gateway_gateway.deploy_in(None)
    response, body = namespace_gateway_gateway.call_json(
        "DELETE", "/system/functions", {"functionName": "echo", "namespace": "dev"}
    )
    assert response.code == 202
    response, _ = namespace_gateway_gateway.call("GET", "/function/echo.dev")
    assert response.code == 404
    response, _ = namespace_gateway_gateway.call("GET", "/function/echo.openfaas-fn")
    assert response.code == 200
    response, _ = namespace_gateway_gateway.call_json(
        "DELETE", "/system/functions", {"functionName": "echo", "namespace": "dev"}
    )
    assert response.code == 404


def test_update_and_scale_act_on_the_namespace_named(namespace_gateway_gateway: _NamespaceGateway) -> None:
    namespace_gateway_gateway.deploy_in("dev")
    namespace_gateway_gateway.deploy_in(None)
    response, _ = namespace_gateway_gateway.call_json(
        "PUT", "/system/functions", {"service": "echo", "namespace": "dev", "image": "v2"}
    )
    assert response.code == 202
    response, _ = namespace_gateway_gateway.call_json(
        "POST", "/system/scale-function/echo", {"serviceName": "echo", "namespace": "dev", "replicas": 4}
    )
    assert response.code == 202
    dev = finished(namespace_gateway_gateway.store.get_function("echo", "dev"))
    default = finished(namespace_gateway_gateway.store.get_function("echo"))
    assert (dev.image, dev.replicas) == ("v2", 4)
    assert (default.image, default.replicas) == ("x", 1)
    response, _ = namespace_gateway_gateway.call_json(
        "POST", "/system/scale-function/echo", {"serviceName": "echo", "namespace": "qa", "replicas": 1}
    )
    assert response.code == 404


def test_deploy_into_an_unknown_namespace_is_400_naming_it(
    namespace_gateway_gateway: _NamespaceGateway,
) -> None:
    response, body = namespace_gateway_gateway.deploy_in("nowhere")
    assert response.code == 400
    assert b"namespace 'nowhere' does not exist" in body
    assert namespace_gateway_gateway.store.functions == {}
    response, body = namespace_gateway_gateway.deploy_in("Bad_Name")
    assert response.code == 400
    assert b"namespace" in body


def test_the_same_name_twice_in_one_namespace_is_409(namespace_gateway_gateway: _NamespaceGateway) -> None:
    namespace_gateway_gateway.deploy_in("dev")
    response, body = namespace_gateway_gateway.deploy_in("dev")
    assert response.code == 409
    assert b"namespace 'dev'" in body


def test_namespaces_list_get_create_update_delete(namespace_gateway_gateway: _NamespaceGateway) -> None:
    response, body = namespace_gateway_gateway.call("GET", "/system/namespaces")
    assert (response.code, js(body)) == (200, ["dev", "openfaas-fn"])
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    response, body = namespace_gateway_gateway.call("GET", "/system/namespace/dev")
    assert js(body) == {"name": "dev", "labels": {"openfaas": "1"}, "annotations": {}}
    response, body = namespace_gateway_gateway.call("GET", "/system/namespace/openfaas-fn")
    assert (response.code, js(body)["name"]) == (200, "openfaas-fn")
    response, body = namespace_gateway_gateway.call("GET", "/system/namespace/qa")
    assert response.code == 404

    response, body = namespace_gateway_gateway.call_json("POST", "/system/namespace/", {"name": "dev"})
    assert response.code == 409
    response, body = namespace_gateway_gateway.call_json(
        "POST", "/system/namespace/", {"name": "openfaas-fn"}
    )
    assert response.code == 409
    response, body = namespace_gateway_gateway.call_json("POST", "/system/namespace/", {"name": "Bad_Name"})
    assert response.code == 400
    assert b"invalid namespace" in body

    response, _ = namespace_gateway_gateway.call_json(
        "PUT",
        "/system/namespace/dev",
        {"name": "dev", "labels": {"openfaas": "1"}, "annotations": {"a": "b"}},
    )
    assert response.code == 202
    _, body = namespace_gateway_gateway.call("GET", "/system/namespace/dev")
    assert js(body)["annotations"] == {"a": "b"}
    response, _ = namespace_gateway_gateway.call_json("PUT", "/system/namespace/qa", {"name": "qa"})
    assert response.code == 404

    namespace_gateway_gateway.deploy_in("dev")
    response, body = namespace_gateway_gateway.call_json(
        "DELETE", "/system/namespace/dev", {"name": "dev", "labels": {"openfaas": "1"}}
    )
    assert response.code == 409
    assert b"still holds functions" in body
    namespace_gateway_gateway.call_json(
        "DELETE", "/system/functions", {"functionName": "echo", "namespace": "dev"}
    )
    response, _ = namespace_gateway_gateway.call_json("DELETE", "/system/namespace/dev", {"name": "dev"})
    assert response.code == 202
    response, _ = namespace_gateway_gateway.call_json("DELETE", "/system/namespace/dev", {"name": "dev"})
    assert response.code == 404
    response, body = namespace_gateway_gateway.call_json(
        "DELETE", "/system/namespace/openfaas-fn", {"name": "openfaas-fn"}
    )
    assert response.code == 400
    assert b"cannot be deleted" in body
    _, body = namespace_gateway_gateway.call("GET", "/system/namespaces")
    assert js(body) == ["openfaas-fn"]


def test_dead_letters_filter_by_name_and_namespace(namespace_gateway_gateway: _NamespaceGateway) -> None:
    for call_id, namespace in [("c1", "dev"), ("c2", "openfaas-fn")]:
        call = Call(call_id=call_id, function="echo", namespace=namespace, dead=DeadMark("max_age", 1.0))
        finished(namespace_gateway_gateway.store.put_dead_letter(DeadLetter(call)))
    for query, ids in [
        ("function=echo.dev", ["c1"]),
        ("function=echo&namespace=dev", ["c1"]),
        ("function=echo", ["c2"]),
        ("", ["c1", "c2"]),
    ]:
        _, body = namespace_gateway_gateway.call("GET", f"/system/dead-letters?{query}")
        assert sorted(d["callId"] for d in js(body)) == ids, query


class _OtherDefaultNamespace(GatewayTestCase):
    """``--default-namespace dev``: bare names and bodies without a namespace mean dev."""

    def app_settings(self) -> AppSettings:
        return AppSettings(default_namespace="dev")

    def setUp(self) -> None:
        super().setUp()
        self.build(proxy_settings=ProxySettings("http://{name}.fn:8080", 10.0, default_namespace="dev"))


@pytest.fixture
def other_default_namespace_gateway() -> _OtherDefaultNamespace:
    return set_up(_OtherDefaultNamespace())


def test_bare_names_and_bodies_without_namespace_mean_the_configured_default(
    other_default_namespace_gateway: _OtherDefaultNamespace,
) -> None:
    response, _ = other_default_namespace_gateway.call(
        "POST", "/system/functions", data=b'{"service": "echo"}'
    )
    assert response.code == 202
    assert list(other_default_namespace_gateway.store.functions) == ["echo.dev"]
    assert other_default_namespace_gateway.call("GET", "/function/echo")[0].code == 200
    assert other_default_namespace_gateway.call("GET", "/function/echo.openfaas-fn")[0].code == 404
    _, body = other_default_namespace_gateway.call("GET", "/system/namespaces")
    assert js(body) == ["dev", "openfaas-fn"]
    response, _ = other_default_namespace_gateway.call(
        "DELETE", "/system/namespace/dev", data=b'{"name": "dev"}'
    )
    assert response.code == 400


# --- the worker -----------------------------------------------------------------------------------


def test_the_worker_runs_the_function_of_the_calls_namespace_and_says_so_in_the_callback():
    h = Harness()
    h.store.functions["echo"] = FunctionSpec(service="echo", url="http://default.test:8080")
    h.store.functions["echo.dev"] = FunctionSpec(service="echo", namespace="dev", url="http://dev.test:8080")
    h.enqueue(Call(call_id="call-1", function="echo", namespace="dev", callback_url=CALLBACK))
    h.start()
    h.flush()
    [req] = h.function.requests
    assert req["headers"]["host"] == ["dev.test:8080"]
    [cb] = h.receiver.requests
    assert cb["headers"]["x-function-name"] == ["echo.dev"]
    assert h.record().namespace == "dev"
    assert h.metric("txfaas_worker_calls_total", function="echo.dev", status="succeeded") == 1


def test_an_old_message_without_namespace_runs_the_default_namespaces_function():
    h = Harness()
    h.store.functions["echo"] = FunctionSpec(service="echo", url="http://default.test:8080")
    h.store.functions["echo.dev"] = FunctionSpec(service="echo", namespace="dev", url="http://dev.test:8080")
    meta = {"v": 1, "callId": "call-1", "function": "echo", "callbackUrl": CALLBACK, "attempt": 1}
    h.enqueue(Call.decode(orjson.dumps(meta), b""))
    h.start()
    h.flush()
    [req] = h.function.requests
    assert req["headers"]["host"] == ["default.test:8080"]
    [cb] = h.receiver.requests
    assert cb["headers"]["x-function-name"] == ["echo.openfaas-fn"]
