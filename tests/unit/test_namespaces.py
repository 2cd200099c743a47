"""Namespaces are part of a function's identity, as in OpenFaaS: model, in-memory store, gateway, worker."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.store_contract import CONTRACT
from tests.unit.gateway_fixtures import GatewayTestCase
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


class NamespaceGatewayTests(GatewayTestCase):
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

    def test_invoke_reaches_the_function_of_the_namespace_named(self) -> None:
        self.deploy_in("openfaas-fn", url="http://default.fn:8080")
        self.deploy_in("dev", url="http://dev.fn:8080")
        for path, host in [
            ("/function/echo.dev/x", b"dev.fn:8080"),
            ("/function/echo.openfaas-fn/x", b"default.fn:8080"),
            ("/function/echo/x", b"default.fn:8080"),
        ]:
            response, _ = self.call("POST", path, data=b"in")
            self.assertEqual(response.code, 200, path)
            self.assertEqual(self.function.header(b"host"), [host], path)
            self.assertEqual(self.function.seen[-1]["uri"], b"/x")

    def test_the_url_template_gets_the_namespace(self) -> None:
        self.build(proxy_settings=ProxySettings("http://{name}.{namespace}:8080", 10.0))
        self.deploy_in("dev")
        self.call("GET", "/function/echo.dev")
        self.assertEqual(self.function.header(b"host"), [b"echo.dev:8080"])

    def test_invoke_of_a_name_missing_in_that_namespace_is_404_naming_both(self) -> None:
        self.deploy_in(None)
        response, body = self.call("GET", "/function/echo.dev")
        self.assertEqual((response.code, body), (404, b"function 'echo' not found in namespace 'dev'\n"))
        response, body = self.call("POST", "/async-function/echo.dev", data=b"x")
        self.assertEqual((response.code, body), (404, b"function 'echo' not found in namespace 'dev'\n"))

    def test_bad_namespace_in_the_path_is_400(self) -> None:
        for path in [
            "/function/echo.Dev",
            "/function/echo.",
            "/function/echo.a.b",
            "/function/echo." + "a" * 64,
        ]:
            response, body = self.call("GET", path)
            self.assertEqual(response.code, 400, path)
            self.assertIn(b"invalid function name", body)
        response, body = self.call("POST", "/async-function/echo.Dev", data=b"x")
        self.assertEqual(response.code, 400)
        self.assertIn(b"namespace", body)

    def test_async_invoke_queues_the_namespace_and_records_it(self) -> None:
        self.deploy_in("dev")
        response, body = self.call("POST", "/async-function/echo.dev/sub", data=b"x")
        self.assertEqual(response.code, 202)
        call_id = js(body)["callId"]
        [call] = [c for c in self.queue.published if c.call_id == call_id]
        self.assertEqual((call.function, call.namespace, call.path), ("echo", "dev", "/sub"))
        _, body = self.call("GET", f"/system/calls/{call_id}")
        self.assertEqual((js(body)["function"], js(body)["namespace"]), ("echo", "dev"))

    def test_a_call_id_taken_by_the_same_name_in_another_namespace_is_409(self) -> None:
        self.deploy_in("dev")
        self.deploy_in(None)
        response, _ = self.call("POST", "/async-function/echo.dev", {"X-Call-Id": ["id-1"]}, b"x")
        self.assertEqual(response.code, 202)
        response, body = self.call("POST", "/async-function/echo", {"X-Call-Id": ["id-1"]}, b"x")
        self.assertEqual(response.code, 409)
        self.assertIn(b"taken by another call", body)
        response, body = self.call("POST", "/async-function/echo.dev", {"X-Call-Id": ["id-1"]}, b"x")
        self.assertEqual((response.code, js(body)["duplicate"]), (202, True))

    def test_metrics_are_labelled_name_dot_namespace(self) -> None:
        self.deploy_in("dev")
        self.deploy_in(None)
        self.call("GET", "/function/echo.dev")
        self.call("GET", "/function/echo")
        self.metrics.flush()
        registry = self.metrics.registry
        for ref in ["echo.dev", "echo.openfaas-fn"]:
            value = registry.get_sample_value(
                "gateway_function_invocation_total", {"function_name": ref, "code": "200"}
            )
            self.assertEqual(value, 1.0, ref)

    def test_list_and_describe_take_the_namespace_query(self) -> None:
        self.deploy_in("dev", image="dev-image")
        self.deploy_in(None, image="default-image")
        _, body = self.call("GET", "/system/functions?namespace=dev")
        self.assertEqual(
            [(f["name"], f["namespace"], f["image"]) for f in js(body)], [("echo", "dev", "dev-image")]
        )
        _, body = self.call("GET", "/system/functions")
        self.assertEqual([(f["name"], f["namespace"]) for f in js(body)], [("echo", "openfaas-fn")])
        response, body = self.call("GET", "/system/function/echo?namespace=dev")
        self.assertEqual((response.code, js(body)["image"]), (200, "dev-image"))
        response, body = self.call("GET", "/system/function/echo")
        self.assertEqual(js(body)["image"], "default-image")
        response, body = self.call("GET", "/system/functions?namespace=nowhere")
        self.assertEqual(response.code, 400)
        self.assertIn(b"'nowhere'", body)
        response, _ = self.call("GET", "/system/function/echo?namespace=nowhere")
        self.assertEqual(response.code, 404)

    def test_remove_with_a_namespace_leaves_the_same_name_elsewhere_untouched(self) -> None:
        self.deploy_in("dev")
        self.deploy_in(None)
        response, body = self.call_json(
            "DELETE", "/system/functions", {"functionName": "echo", "namespace": "dev"}
        )
        self.assertEqual(response.code, 202)
        response, _ = self.call("GET", "/function/echo.dev")
        self.assertEqual(response.code, 404)
        response, _ = self.call("GET", "/function/echo.openfaas-fn")
        self.assertEqual(response.code, 200)
        response, _ = self.call_json(
            "DELETE", "/system/functions", {"functionName": "echo", "namespace": "dev"}
        )
        self.assertEqual(response.code, 404)

    def test_update_and_scale_act_on_the_namespace_named(self) -> None:
        self.deploy_in("dev")
        self.deploy_in(None)
        response, _ = self.call_json(
            "PUT", "/system/functions", {"service": "echo", "namespace": "dev", "image": "v2"}
        )
        self.assertEqual(response.code, 202)
        response, _ = self.call_json(
            "POST", "/system/scale-function/echo", {"serviceName": "echo", "namespace": "dev", "replicas": 4}
        )
        self.assertEqual(response.code, 202)
        dev = finished(self.store.get_function("echo", "dev"))
        default = finished(self.store.get_function("echo"))
        self.assertEqual((dev.image, dev.replicas), ("v2", 4))
        self.assertEqual((default.image, default.replicas), ("x", 1))
        response, _ = self.call_json(
            "POST", "/system/scale-function/echo", {"serviceName": "echo", "namespace": "qa", "replicas": 1}
        )
        self.assertEqual(response.code, 404)

    def test_deploy_into_an_unknown_namespace_is_400_naming_it(self) -> None:
        response, body = self.deploy_in("nowhere")
        self.assertEqual(response.code, 400)
        self.assertIn(b"namespace 'nowhere' does not exist", body)
        self.assertEqual(self.store.functions, {})
        response, body = self.deploy_in("Bad_Name")
        self.assertEqual(response.code, 400)
        self.assertIn(b"namespace", body)

    def test_the_same_name_twice_in_one_namespace_is_409(self) -> None:
        self.deploy_in("dev")
        response, body = self.deploy_in("dev")
        self.assertEqual(response.code, 409)
        self.assertIn(b"namespace 'dev'", body)

    def test_namespaces_list_get_create_update_delete(self) -> None:
        response, body = self.call("GET", "/system/namespaces")
        self.assertEqual((response.code, js(body)), (200, ["dev", "openfaas-fn"]))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        response, body = self.call("GET", "/system/namespace/dev")
        self.assertEqual(js(body), {"name": "dev", "labels": {"openfaas": "1"}, "annotations": {}})
        response, body = self.call("GET", "/system/namespace/openfaas-fn")
        self.assertEqual((response.code, js(body)["name"]), (200, "openfaas-fn"))
        response, body = self.call("GET", "/system/namespace/qa")
        self.assertEqual(response.code, 404)

        response, body = self.call_json("POST", "/system/namespace/", {"name": "dev"})
        self.assertEqual(response.code, 409)
        response, body = self.call_json("POST", "/system/namespace/", {"name": "openfaas-fn"})
        self.assertEqual(response.code, 409)
        response, body = self.call_json("POST", "/system/namespace/", {"name": "Bad_Name"})
        self.assertEqual(response.code, 400)
        self.assertIn(b"invalid namespace", body)

        response, _ = self.call_json(
            "PUT",
            "/system/namespace/dev",
            {"name": "dev", "labels": {"openfaas": "1"}, "annotations": {"a": "b"}},
        )
        self.assertEqual(response.code, 202)
        _, body = self.call("GET", "/system/namespace/dev")
        self.assertEqual(js(body)["annotations"], {"a": "b"})
        response, _ = self.call_json("PUT", "/system/namespace/qa", {"name": "qa"})
        self.assertEqual(response.code, 404)

        self.deploy_in("dev")
        response, body = self.call_json(
            "DELETE", "/system/namespace/dev", {"name": "dev", "labels": {"openfaas": "1"}}
        )
        self.assertEqual(response.code, 409)
        self.assertIn(b"still holds functions", body)
        self.call_json("DELETE", "/system/functions", {"functionName": "echo", "namespace": "dev"})
        response, _ = self.call_json("DELETE", "/system/namespace/dev", {"name": "dev"})
        self.assertEqual(response.code, 202)
        response, _ = self.call_json("DELETE", "/system/namespace/dev", {"name": "dev"})
        self.assertEqual(response.code, 404)
        response, body = self.call_json("DELETE", "/system/namespace/openfaas-fn", {"name": "openfaas-fn"})
        self.assertEqual(response.code, 400)
        self.assertIn(b"cannot be deleted", body)
        _, body = self.call("GET", "/system/namespaces")
        self.assertEqual(js(body), ["openfaas-fn"])

    def test_dead_letters_filter_by_name_and_namespace(self) -> None:
        for call_id, namespace in [("c1", "dev"), ("c2", "openfaas-fn")]:
            call = Call(call_id=call_id, function="echo", namespace=namespace, dead=DeadMark("max_age", 1.0))
            finished(self.store.put_dead_letter(DeadLetter(call)))
        for query, ids in [
            ("function=echo.dev", ["c1"]),
            ("function=echo&namespace=dev", ["c1"]),
            ("function=echo", ["c2"]),
            ("", ["c1", "c2"]),
        ]:
            _, body = self.call("GET", f"/system/dead-letters?{query}")
            self.assertEqual(sorted(d["callId"] for d in js(body)), ids, query)


class OtherDefaultNamespaceTests(GatewayTestCase):
    """``--default-namespace dev``: bare names and bodies without a namespace mean dev."""

    def app_settings(self) -> AppSettings:
        return AppSettings(default_namespace="dev")

    def setUp(self) -> None:
        super().setUp()
        self.build(proxy_settings=ProxySettings("http://{name}.fn:8080", 10.0, default_namespace="dev"))

    def test_bare_names_and_bodies_without_namespace_mean_the_configured_default(self) -> None:
        response, _ = self.call("POST", "/system/functions", data=b'{"service": "echo"}')
        self.assertEqual(response.code, 202)
        self.assertEqual(list(self.store.functions), ["echo.dev"])
        self.assertEqual(self.call("GET", "/function/echo")[0].code, 200)
        self.assertEqual(self.call("GET", "/function/echo.openfaas-fn")[0].code, 404)
        _, body = self.call("GET", "/system/namespaces")
        self.assertEqual(js(body), ["dev", "openfaas-fn"])
        response, _ = self.call("DELETE", "/system/namespace/dev", data=b'{"name": "dev"}')
        self.assertEqual(response.code, 400)


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
