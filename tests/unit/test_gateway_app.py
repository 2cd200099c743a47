"""The gateway's Klein app: /system API in OpenFaaS's shapes, auth, health, metrics, async accept."""

from __future__ import annotations

import base64
import json
from collections import deque
from ipaddress import ip_network
from typing import Any

import attrs
import pytest
import treq
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.address import IPv4Address

from tests.fakes import FakeResolver
from tests.unit.gateway_fixtures import GatewayTestCase, set_up
from txfaas.gateway.app import AppSettings, GatewayApp
from txfaas.gateway.root import GatewayRoot
from txfaas.http.ssrf import AddressPolicy
from txfaas.model import CallRecord, CallResult, CallStatus


@pytest.fixture
def gateway() -> GatewayTestCase:
    return set_up(GatewayTestCase())


def js(body: bytes) -> Any:
    return json.loads(body)


class _FunctionsAPI(GatewayTestCase):
    def deploy_json(self, method: str = "POST", **fields: Any):
        body = {"service": "echo", "image": "ghcr.io/x/echo:1.10", **fields}
        return self.call(method, "/system/functions", data=json.dumps(body).encode())


@pytest.fixture
def functions_a_p_i_gateway() -> _FunctionsAPI:
    return set_up(_FunctionsAPI())


def test_deploy_then_list_in_openfaas_status_shape(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    response, body = functions_a_p_i_gateway.deploy_json(envVars={"A": "007"}, labels={"team": "x"})
    assert response.code == 202
    response, body = functions_a_p_i_gateway.call("GET", "/system/functions")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    [fn] = js(body)
    assert fn["name"] == "echo"
    assert fn["image"] == "ghcr.io/x/echo:1.10"
    assert fn["envVars"] == {"A": "007"}
    for key in ["replicas", "availableReplicas", "invocationCount", "createdAt", "labels", "annotations"]:
        assert key in fn


def test_a_process_without_an_address_is_refused_plainly(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    """faas-cli deploy --fprocess with no txfaas.url: 400 saying it would have no endpoint."""
    for method in ("POST", "PUT"):
        response, body = functions_a_p_i_gateway.deploy_json(method, envProcess="wc -c")
        assert response.code == 400
        assert b"no endpoint" in body
        assert b"txfaas.url" in body
    response, _ = functions_a_p_i_gateway.deploy_json(
        envProcess="wc -c", annotations={"txfaas.url": "http://127.0.0.1:9000"}
    )
    assert response.code == 202


def test_deploy_twice_is_409(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    functions_a_p_i_gateway.deploy_json()
    response, body = functions_a_p_i_gateway.deploy_json()
    assert response.code == 409
    assert b"already exists" in body


def test_update_missing_is_404_and_update_existing_replaces(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    response, _ = functions_a_p_i_gateway.deploy_json("PUT")
    assert response.code == 404
    functions_a_p_i_gateway.deploy_json()
    response, _ = functions_a_p_i_gateway.deploy_json("PUT", image="new:2")
    assert response.code == 202
    _, body = functions_a_p_i_gateway.call("GET", "/system/function/echo")
    assert js(body)["image"] == "new:2"


def test_delete_by_function_name_and_404_when_missing(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    functions_a_p_i_gateway.deploy_json()
    response, _ = functions_a_p_i_gateway.call(
        "DELETE", "/system/functions", data=b'{"functionName": "echo"}'
    )
    assert response.code == 202
    response, _ = functions_a_p_i_gateway.call(
        "DELETE", "/system/functions", data=b'{"functionName": "echo"}'
    )
    assert response.code == 404
    response, body = functions_a_p_i_gateway.call("DELETE", "/system/functions", data=b"{}")
    assert response.code == 400
    assert b"functionName" in body


def test_delete_with_a_namespace_that_is_not_a_string_is_400_and_removes_nothing(
    functions_a_p_i_gateway: _FunctionsAPI,
) -> None:
    """Found by the schemathesis run: ``{}``, ``0`` or ``false`` read as "no namespace" removed
    the default namespace's function."""
    functions_a_p_i_gateway.deploy_json()
    for bad in (b"{}", b"[]", b"0", b"false"):
        body = b'{"functionName": "echo", "namespace": %s}' % bad
        response, text = functions_a_p_i_gateway.call("DELETE", "/system/functions", data=body)
        assert response.code == 400, bad
        assert b"namespace" in text
    response, _ = functions_a_p_i_gateway.call("GET", "/system/function/echo")
    assert response.code == 200


def test_a_deleted_function_is_no_longer_callable_through_this_gateway(
    functions_a_p_i_gateway: _FunctionsAPI,
) -> None:
    functions_a_p_i_gateway.deploy_json()
    assert functions_a_p_i_gateway.call("GET", "/function/echo")[0].code == 200
    functions_a_p_i_gateway.call("DELETE", "/system/functions", data=b'{"functionName": "echo"}')
    assert functions_a_p_i_gateway.call("GET", "/function/echo")[0].code == 404


def test_bad_json_and_wrong_fields_are_400_naming_the_field(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    response, body = functions_a_p_i_gateway.call("POST", "/system/functions", data=b"{not json")
    assert response.code == 400
    assert b"not valid JSON" in body
    response, body = functions_a_p_i_gateway.call("POST", "/system/functions", data=b'{"image": "x"}')
    assert (response.code, body) == (400, b"service: missing\n")
    response, body = functions_a_p_i_gateway.deploy_json(envVars={"A": 1})
    assert response.code == 400
    assert body.startswith(b"envVars:"), body
    response, body = functions_a_p_i_gateway.deploy_json(service="Bad_Name")
    assert response.code == 400
    assert body.startswith(b"service:"), body


def test_function_status_and_404(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    functions_a_p_i_gateway.deploy_json()
    response, body = functions_a_p_i_gateway.call("GET", "/system/function/echo")
    assert response.code == 200
    assert js(body)["name"] == "echo"
    assert functions_a_p_i_gateway.call("GET", "/system/function/nope")[0].code == 404


def test_scale_records_replicas_and_checks_the_body(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    functions_a_p_i_gateway.deploy_json()
    response, _ = functions_a_p_i_gateway.call(
        "POST", "/system/scale-function/echo", data=b'{"serviceName": "echo", "replicas": 3}'
    )
    assert response.code == 202
    _, body = functions_a_p_i_gateway.call("GET", "/system/function/echo")
    assert js(body)["replicas"] == 3
    assert functions_a_p_i_gateway.call("POST", "/system/scale-function/echo", data=b"nope")[0].code == 400
    response, body = functions_a_p_i_gateway.call(
        "POST", "/system/scale-function/echo", data=b'{"replicas": -1}'
    )
    assert response.code == 400
    assert b"replicas" in body
    assert (
        functions_a_p_i_gateway.call("POST", "/system/scale-function/nope", data=b'{"replicas": 1}')[0].code
        == 404
    )


def test_invocation_count_is_reported(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    functions_a_p_i_gateway.deploy_json()
    functions_a_p_i_gateway.functions.start()
    functions_a_p_i_gateway.call("GET", "/function/echo")
    functions_a_p_i_gateway.clock.advance(1)
    _, body = functions_a_p_i_gateway.call("GET", "/system/function/echo")
    assert js(body)["invocationCount"] == 1
    functions_a_p_i_gateway.successResultOf(
        defer.Deferred.fromCoroutine(functions_a_p_i_gateway.functions.stop())
    )


def test_info_has_openfaas_shape(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    response, body = functions_a_p_i_gateway.call("GET", "/system/info")
    info = js(body)
    assert info["provider"]["provider"] == "txfaas"
    assert "release" in info["version"]
    assert "arch" in info


def test_store_unavailable_is_503_never_404_or_500(functions_a_p_i_gateway: _FunctionsAPI) -> None:
    functions_a_p_i_gateway.store.available = False
    for method, path in [("GET", "/system/functions"), ("GET", "/system/function/echo")]:
        response, body = functions_a_p_i_gateway.call(method, path)
        assert response.code == 503, path
        assert b"unavailable" in body


def test_healthy_when_store_and_queue_answer(gateway: GatewayTestCase) -> None:
    response, body = gateway.call("GET", "/healthz")
    assert (response.code, body) == (200, b"OK\n")


def test_unhealthy_names_the_dependency(gateway: GatewayTestCase) -> None:
    gateway.queue.available = False
    response, body = gateway.call("GET", "/healthz")
    assert response.code == 503
    assert b"rabbitmq" in body
    gateway.queue.available = True
    gateway.store.available = False
    response, body = gateway.call("GET", "/healthz")
    assert response.code == 503
    assert b"redis" in body


def test_metrics_in_prometheus_text(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.call("GET", "/function/echo")
    response, body = gateway.call("GET", "/metrics")
    assert response.code == 200
    assert b'gateway_function_invocation_total{code="200",function_name="echo.openfaas-fn"} 1.0' in body


class _Auth(GatewayTestCase):
    auth = ("admin", "s3cret")

    def basic(self, user: str, password: str) -> dict:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": [f"Basic {token}"]}


@pytest.fixture
def auth_gateway() -> _Auth:
    return set_up(_Auth())


def test_system_and_metrics_need_auth(auth_gateway: _Auth) -> None:
    for path in ["/system/functions", "/system/info", "/metrics", "/system/calls/x"]:
        response, _ = auth_gateway.call("GET", path)
        assert response.code == 401, path
        assert response.headers.getRawHeaders(b"www-authenticate") == [b'Basic realm="Restricted"']


def test_other_spellings_of_protected_paths_need_auth_too(auth_gateway: _Auth) -> None:
    """Deny by default: //system, /%2Fsystem, /./system... never reach a /system handler without auth."""
    for path in ["//system/functions", "/%2Fsystem/functions", "//metrics", "/x/../system/info", "/"]:
        response, _ = auth_gateway.call("GET", path)
        assert response.code == 401, path
    response, _ = auth_gateway.call(
        "POST", "//system/functions", data=b'{"service": "evil", "url": "http://x"}'
    )
    assert response.code == 401
    assert auth_gateway.store.functions == {}


def test_wrong_user_or_password_is_401(auth_gateway: _Auth) -> None:
    for user, password in [("admin", "wrong"), ("root", "s3cret"), ("", "")]:
        response, _ = auth_gateway.call("GET", "/system/info", headers=auth_gateway.basic(user, password))
        assert response.code == 401


def test_auth_right_credentials_pass(auth_gateway: _Auth) -> None:
    response, _ = auth_gateway.call("GET", "/system/info", headers=auth_gateway.basic("admin", "s3cret"))
    assert response.code == 200


def test_function_routes_and_healthz_stay_open(auth_gateway: _Auth) -> None:
    auth_gateway.deploy("echo")
    assert auth_gateway.call("GET", "/function/echo")[0].code == 200
    assert auth_gateway.call("GET", "/healthz")[0].code == 200
    assert auth_gateway.call("POST", "/async-function/echo", data=b"x")[0].code == 202


class _AsyncAccept(GatewayTestCase):
    def make_resolver(self) -> Any:
        return FakeResolver(
            {
                "hooks.example.com": ["93.184.216.34"],
                "evil.example.com": ["127.0.0.1"],
                "mixed.example.com": ["93.184.216.34", "10.0.0.5"],
                "127.0.0.1": ["127.0.0.1"],
                "169.254.169.254": ["169.254.169.254"],
                "100.64.0.1": ["100.64.0.1"],
                "::ffff:127.0.0.1": ["127.0.0.1"],
                "localhost": ["127.0.0.1"],
            }
        )

    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")


@pytest.fixture
def async_accept_gateway() -> _AsyncAccept:
    return set_up(_AsyncAccept())


def test_accepts_with_202_call_id_location_and_json(async_accept_gateway: _AsyncAccept) -> None:
    response, body = async_accept_gateway.call(
        "POST",
        "/async-function/echo/sub/path?q=1",
        headers={"X-Callback-Url": ["http://hooks.example.com/done"], "X-Custom": ["v"]},
        data=b"\x00payload\xff",
    )
    assert response.code == 202
    call_id = response.headers.getRawHeaders(b"x-call-id")[0].decode()
    assert response.headers.getRawHeaders(b"location") == [f"/system/calls/{call_id}".encode()]
    assert js(body) == {"callId": call_id, "status": "queued", "location": f"/system/calls/{call_id}"}
    [call] = async_accept_gateway.queue.published
    assert call.call_id == call_id
    assert (call.function, call.method, call.path, call.query) == ("echo", "POST", "/sub/path", "q=1")
    assert call.body == b"\x00payload\xff"
    assert call.callback_url == "http://hooks.example.com/done"
    assert ("X-Custom", "v") in call.headers
    assert ("X-Call-Id", call_id) in call.headers
    record = async_accept_gateway.store.calls[call_id]
    assert (record.status, record.function) == ("queued", "echo")


def test_queued_headers_are_the_end_to_end_ones_in_order(async_accept_gateway: _AsyncAccept) -> None:
    """Hop-by-hop headers, those named in Connection, and what the gateway sets itself are not
    queued; the others are, in the order and spelling Twisted keeps them."""
    response, _ = async_accept_gateway.call(
        "POST",
        "/async-function/echo",
        headers={
            "X-First": ["1", "2"],
            "Connection": ["keep-alive, X-Secret-Hop"],
            "Keep-Alive": ["timeout=5"],
            "TE": ["trailers"],
            "Upgrade": ["websocket"],
            "Proxy-Authorization": ["Basic eA=="],
            "X-Secret-Hop": ["s"],
            "X-Callback-Url": ["http://hooks.example.com/done"],
            "content-type": ["text/plain"],
        },
        data=b"x",
    )
    assert response.code == 202
    [call] = async_accept_gateway.queue.published
    assert call.headers == (
        [
            ("X-First", "1"),
            ("X-First", "2"),
            ("Content-Type", "text/plain"),
            ("X-Call-Id", call.call_id),
        ]
    )


def test_sub_path_is_queued_as_the_client_sent_it(async_accept_gateway: _AsyncAccept) -> None:
    response, _ = async_accept_gateway.call("POST", "/async-function/echo/a%20b/c%3Fd?q=%2F", data=b"x")
    assert response.code == 202
    [call] = async_accept_gateway.queue.published
    assert (call.path, call.query) == ("/a%20b/c%3Fd", "q=%2F")


def test_client_call_id_is_kept_and_a_repeat_is_not_queued_twice(async_accept_gateway: _AsyncAccept) -> None:
    headers = {"X-Call-Id": ["order-42"]}
    first, _ = async_accept_gateway.call("POST", "/async-function/echo", headers=headers, data=b"a")
    second, body = async_accept_gateway.call("POST", "/async-function/echo", headers=headers, data=b"a")
    assert (first.code, second.code) == (202, 202)
    assert second.headers.getRawHeaders(b"x-call-id") == [b"order-42"]
    assert js(body)["duplicate"]
    assert len(async_accept_gateway.queue.published) == 1


def test_unknown_function_is_404_and_nothing_is_queued(async_accept_gateway: _AsyncAccept) -> None:
    response, body = async_accept_gateway.call("POST", "/async-function/nope", data=b"x")
    assert response.code == 404
    assert b"'nope'" in body
    assert async_accept_gateway.queue.published == []


def test_invalid_name_is_400(async_accept_gateway: _AsyncAccept) -> None:
    assert async_accept_gateway.call("POST", "/async-function/Nope", data=b"x")[0].code == 400


def test_other_methods_are_405_with_allow_post(async_accept_gateway: _AsyncAccept) -> None:
    for method in ["GET", "PUT", "DELETE", "PATCH"]:
        response, _ = async_accept_gateway.call(method, "/async-function/echo")
        assert response.code == 405, method
        assert response.headers.getRawHeaders(b"allow") == [b"POST"]


def test_broker_unavailable_is_503_with_retry_after_never_202(async_accept_gateway: _AsyncAccept) -> None:
    async_accept_gateway.queue.available = False
    response, body = async_accept_gateway.call("POST", "/async-function/echo", data=b"x")
    assert response.code == 503
    assert response.headers.getRawHeaders(b"retry-after") is not None
    assert b"queue unavailable" in body
    assert async_accept_gateway.store.calls == {}


def test_bad_callback_urls_are_400_naming_the_reason(async_accept_gateway: _AsyncAccept) -> None:
    cases = {
        "ftp://hooks.example.com/": b"http",
        "/relative": b"http",
        "http://127.0.0.1:9/": b"not a public address",
        "http://[::ffff:127.0.0.1]/": b"not a public address",
        "http://169.254.169.254/latest/meta-data": b"not a public address",
        "http://100.64.0.1/": b"not a public address",
        "http://evil.example.com/": b"not a public address",
        "http://mixed.example.com/": b"not a public address",
        "http://nowhere.example.com/": b"does not resolve",
        "http://user:pw@hooks.example.com/": b"credentials",
    }
    for url, reason in cases.items():
        response, body = async_accept_gateway.call(
            "POST", "/async-function/echo", headers={"X-Callback-Url": [url]}, data=b"x"
        )
        assert response.code == 400, url
        assert b"X-Callback-Url" in body
        assert reason in body, url
    assert async_accept_gateway.queue.published == []


def test_an_empty_callback_url_is_400_not_a_call_without_callback(async_accept_gateway: _AsyncAccept) -> None:
    """``X-Callback-Url:`` with no value (an unset variable in a client's script, say) is
    refused: taken as "no callback", the call would run and nobody would hear of it."""
    response, body = async_accept_gateway.call(
        "POST", "/async-function/echo", headers={"X-Callback-Url": [""]}, data=b"x"
    )
    assert response.code == 400
    assert b"X-Callback-Url must be an absolute http:// or https:// URL" in body
    assert async_accept_gateway.queue.published == []


def test_status_lookup_and_result(async_accept_gateway: _AsyncAccept) -> None:
    response, _ = async_accept_gateway.call(
        "POST", "/async-function/echo", headers={"X-Call-Id": ["c1"]}, data=b"x"
    )
    response, body = async_accept_gateway.call("GET", "/system/calls/c1")
    assert response.code == 200
    assert js(body)["status"] == "queued"
    response, body = async_accept_gateway.call("GET", "/system/calls/c1/result")
    assert response.code == 409
    assert js(body)["status"] == "queued"
    async_accept_gateway.store.results["c1"] = CallResult(
        201, [("Content-Type", "text/x-out"), ("X-Fn", "1")], b"out"
    )
    async_accept_gateway.store.calls["c1"] = attrs.evolve(
        async_accept_gateway.store.calls["c1"], status="succeeded", status_code=201
    )
    response, body = async_accept_gateway.call("GET", "/system/calls/c1/result")
    assert (response.code, body) == (200, b"out")
    assert response.headers.getRawHeaders(b"x-function-status") == [b"201"]
    assert response.headers.getRawHeaders(b"content-type") == [b"text/x-out"]
    assert async_accept_gateway.call("GET", "/system/calls/unknown")[0].code == 404


def test_record_written_by_the_worker_first_is_not_overwritten(async_accept_gateway: _AsyncAccept) -> None:
    running = CallRecord(call_id="c2", function="echo", status="running", attempts=1)
    async_accept_gateway.store.calls["c2"] = running
    # A record exists already: the post is a repeat, answered from it, not queued.
    response, body = async_accept_gateway.call(
        "POST", "/async-function/echo", headers={"X-Call-Id": ["c2"]}, data=b"x"
    )
    assert js(body)["status"] == "running"
    assert async_accept_gateway.store.calls["c2"] == running


def test_accepted_and_refused_calls_are_counted(async_accept_gateway: _AsyncAccept) -> None:
    async_accept_gateway.call("POST", "/async-function/echo", data=b"x")
    async_accept_gateway.queue.available = False
    async_accept_gateway.call("POST", "/async-function/echo", data=b"x")
    registry = async_accept_gateway.metrics.registry
    for code in ("202", "503"):
        assert (
            registry.get_sample_value(
                "gateway_async_calls_total", {"function_name": "echo.openfaas-fn", "code": code}
            )
        ) == 1.0


class _AllowedCallback(GatewayTestCase):
    def make_resolver(self) -> Any:
        return FakeResolver({"localhost": ["127.0.0.1"], "127.0.0.1": ["127.0.0.1"]})

    def app_settings(self) -> AppSettings:
        return AppSettings(callback_policy=AddressPolicy(allow_networks=(ip_network("127.0.0.0/8"),)))


@pytest.fixture
def allowed_callback_gateway() -> _AllowedCallback:
    return set_up(_AllowedCallback())


def test_operator_allowed_network_passes(allowed_callback_gateway: _AllowedCallback) -> None:
    allowed_callback_gateway.deploy("echo")
    for url in ["http://127.0.0.1:9999/cb", "http://localhost:9999/cb"]:
        response, _ = allowed_callback_gateway.call(
            "POST", "/async-function/echo", headers={"X-Callback-Url": [url]}, data=b"x"
        )
        assert response.code == 202, url


class HangingResolver:
    """Never answers (a DNS server that does not reply)."""

    def resolveHostName(self, receiver, host, port=0, *a, **k):
        receiver.resolutionBegan(None)


class _SlowDNS(GatewayTestCase):
    def make_resolver(self) -> Any:
        return HangingResolver()


@pytest.fixture
def slow_d_n_s_gateway() -> _SlowDNS:
    return set_up(_SlowDNS())


def test_a_callback_host_that_does_not_resolve_in_time_is_400(slow_d_n_s_gateway: _SlowDNS) -> None:
    slow_d_n_s_gateway.deploy("echo")
    d = slow_d_n_s_gateway.start(
        "POST", "/async-function/echo", headers={"X-Callback-Url": ["http://slow.example/"]}, data=b"x"
    )
    slow_d_n_s_gateway.assertNoResult(d)
    slow_d_n_s_gateway.clock.advance(5.1)
    slow_d_n_s_gateway.flush()
    response = slow_d_n_s_gateway.successResultOf(d)
    assert response.code == 400
    assert slow_d_n_s_gateway.queue.published == []


def test_a_callback_host_the_resolver_cannot_take_is_400_at_once(slow_d_n_s_gateway: _SlowDNS) -> None:
    """Non-ASCII bytes (the system resolver's IDNA encoding raised in its thread, so the
    check waited for its timeout), an empty label or one over 63 characters: refused
    before any resolution, with no time passing."""
    slow_d_n_s_gateway.deploy("echo")
    for url in (
        b"http://h\xe9llo.example/cb",
        b"http://\xff\x80.example/cb",
        b"http://a..b.example/cb",
        b"http://" + b"a" * 64 + b".example/cb",
        b"http://.example/cb",
    ):
        d = slow_d_n_s_gateway.start(
            "POST", "/async-function/echo", headers={b"X-Callback-Url": [url]}, data=b"x"
        )
        response = slow_d_n_s_gateway.successResultOf(d)
        assert response.code == 400, url
        body = slow_d_n_s_gateway.successResultOf(treq.content(response))
        assert b"X-Callback-Url" in body
    assert slow_d_n_s_gateway.queue.published == []


def test_unknown_function_names_do_not_become_metric_labels(gateway: GatewayTestCase) -> None:
    for i in range(5):
        gateway.call("POST", f"/async-function/nope-{i}", data=b"x")
    registry = gateway.metrics.registry
    assert (
        registry.get_sample_value("gateway_async_calls_total", {"function_name": "-", "code": "404"}) == 5.0
    )
    assert (
        registry.get_sample_value("gateway_async_calls_total", {"function_name": "nope-1", "code": "404"})
        is None
    )


class SlowQueue:
    """A queue whose publishes wait until the test confirms them (a slow broker)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.waiting: list[defer.Deferred] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def publish(self, call) -> None:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        await d
        await self.inner.publish(call)


def test_two_posts_with_one_call_id_at_the_same_moment_queue_one_run(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    slow = SlowQueue(gateway.queue)
    gateway.build(queue=slow)
    first = gateway.start("POST", "/async-function/echo", headers={"X-Call-Id": ["same"]}, data=b"x")
    gateway.assertNoResult(first)  # waiting for the broker's confirm
    second, body = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["same"]}, data=b"x")
    # Not confirmed yet: no 202 (which would promise it), but "in progress, retry".
    assert second.code == 409
    assert second.headers.getRawHeaders(b"retry-after") == [b"10"]
    assert b"being accepted" in body
    assert len(slow.waiting) == 1
    slow.waiting[0].callback(None)
    gateway.flush()
    assert gateway.successResultOf(first).code == 202
    third, body = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["same"]}, data=b"x")
    assert (third.code, js(body)["status"], js(body)["duplicate"]) == (202, "queued", True)
    assert len(gateway.queue.published) == 1


def test_a_claim_left_by_a_gateway_that_died_before_the_confirm_is_published_again(
    gateway: GatewayTestCase,
) -> None:
    """The false 202 of issue 16: the claim of a gateway that died between the claim and the
    broker's confirm lapses at its deadline, and the client's retry queues the call."""
    gateway.deploy("echo")
    gateway.build(queue=SlowQueue(gateway.queue))  # never confirms: this gateway "dies" waiting
    headers = {"X-Call-Id": ["orphan"]}
    gateway.assertNoResult(gateway.start("POST", "/async-function/echo", headers=headers, data=b"x"))
    assert gateway.store.calls["orphan"].status == "accepting"
    restarted = GatewayApp(
        gateway.functions,
        gateway.store,
        gateway.queue,
        gateway.resolver,
        gateway.metrics,
        gateway.app_settings(),
        gateway.clock,
    )
    gateway.root = GatewayRoot(gateway.proxy, restarted, None)
    gateway.client = RequestTraversalAgent(gateway.root)
    early, _ = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["orphan"]}, data=b"x")
    assert early.code == 409  # the first request may still be publishing
    assert gateway.queue.published == []
    gateway.clock.advance(10)
    response, body = gateway.call(
        "POST", "/async-function/echo", headers={"X-Call-Id": ["orphan"]}, data=b"y"
    )
    assert (response.code, js(body)["status"]) == (202, "queued")
    assert "duplicate" not in js(body)
    [call] = gateway.queue.published
    assert (call.call_id, call.body) == ("orphan", b"y")
    assert gateway.store.calls["orphan"].status == "queued"
    again, body = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["orphan"]}, data=b"y")
    assert (again.code, js(body)["duplicate"]) == (202, True)
    assert len(gateway.queue.published) == 1


def test_a_call_id_of_another_function_is_409_without_its_status(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.deploy("other")
    gateway.store.calls["theirs"] = CallRecord("theirs", "echo", status=CallStatus.SUCCEEDED, status_code=200)
    response, body = gateway.call(
        "POST", "/async-function/other", headers={"X-Call-Id": ["theirs"]}, data=b"x"
    )
    assert response.code == 409
    assert response.headers.getRawHeaders(b"location") is None
    for secret in (b"succeeded", b"echo", b"200", b"/system/calls"):
        assert secret not in body
    assert gateway.queue.published == []


def test_a_call_id_whose_publish_failed_can_be_posted_again(gateway: GatewayTestCase) -> None:
    gateway.deploy("echo")
    gateway.queue.available = False
    response, _ = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["again"]}, data=b"x")
    assert response.code == 503
    assert "again" not in gateway.store.calls  # the claim was given back
    gateway.queue.available = True
    response, body = gateway.call("POST", "/async-function/echo", headers={"X-Call-Id": ["again"]}, data=b"x")
    assert response.code == 202
    assert "duplicate" not in js(body)
    assert [c.call_id for c in gateway.queue.published] == ["again"]


class _ClientGone(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")
        self.slow = SlowQueue(self.queue)
        self.build(queue=self.slow)


@pytest.fixture
def client_gone_gateway() -> _ClientGone:
    return set_up(_ClientGone())


def test_a_client_that_leaves_during_the_publish_still_gets_its_call_queued_and_recorded(
    client_gone_gateway: _ClientGone,
) -> None:
    d = client_gone_gateway.start("POST", "/async-function/echo", data=b"x")
    assert len(client_gone_gateway.slow.waiting) == 1
    d.cancel()  # the client goes away while the broker has not confirmed yet
    client_gone_gateway.flush()
    client_gone_gateway.failureResultOf(d)
    client_gone_gateway.slow.waiting[0].callback(None)
    client_gone_gateway.flush()
    [call] = client_gone_gateway.queue.published
    assert client_gone_gateway.store.calls[call.call_id].status == "queued"


def test_a_client_that_left_before_anything_was_queued_gets_nothing_queued(
    client_gone_gateway: _ClientGone,
) -> None:
    resolver = LateResolver()
    client_gone_gateway.build(queue=client_gone_gateway.slow, resolver=resolver)
    d = client_gone_gateway.start(
        "POST", "/async-function/echo", headers={"X-Callback-Url": ["http://slow.example/"]}, data=b"x"
    )
    d.cancel()  # gone while its callback host was being resolved
    client_gone_gateway.flush()
    client_gone_gateway.failureResultOf(d)
    resolver.answer("93.184.216.34")
    client_gone_gateway.flush()
    assert client_gone_gateway.slow.waiting == []
    assert client_gone_gateway.queue.published == []
    assert client_gone_gateway.store.calls == {}


class LateResolver:
    """Answers when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, int]] = []

    def resolveHostName(self, receiver, host, port=0, *a, **k):
        receiver.resolutionBegan(None)
        self.pending.append((receiver, port))

    def answer(self, address: str) -> None:
        for receiver, port in self.pending:
            receiver.addressResolved(IPv4Address("TCP", address, port))
            receiver.resolutionComplete()
        self.pending = []


class _DefaultQueue(GatewayTestCase):
    """--default-queue: where the calls of a function without com.openfaas.queue go."""

    def app_settings(self) -> AppSettings:
        return AppSettings(default_queue="run-q")

    def setUp(self) -> None:
        super().setUp()
        self.queue.messages.setdefault("run-q", deque())  # the gateway declares it at start


@pytest.fixture
def default_queue_gateway() -> _DefaultQueue:
    return set_up(_DefaultQueue())


def test_unannotated_functions_use_the_default_queue_annotated_ones_theirs(
    default_queue_gateway: _DefaultQueue,
) -> None:
    default_queue_gateway.call(
        "POST", "/system/functions", data=b'{"service": "plain", "url": "http://p.fn"}'
    )
    default_queue_gateway.call(
        "POST",
        "/system/functions",
        data=b'{"service": "own", "url": "http://o.fn", "annotations": {"com.openfaas.queue": "mine"}}',
    )
    assert (set(default_queue_gateway.queue.messages) - {"faas-request", "run-q"}) == {"mine"}
    for name in ("plain", "own"):
        assert default_queue_gateway.call("POST", f"/async-function/{name}", data=b"x")[0].code == 202
    assert [c.queue for c in default_queue_gateway.queue.published] == ["run-q", "mine"]
