"""The gateway's Klein app: /system API in OpenFaaS's shapes, auth, health, metrics, async accept."""

from __future__ import annotations

import base64
import json
from collections import deque
from ipaddress import ip_network
from typing import Any

import attrs
import treq
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.address import IPv4Address

from tests.fakes import FakeResolver
from tests.unit.gateway_fixtures import GatewayTestCase
from txfaas.gateway.app import AppSettings, GatewayApp
from txfaas.gateway.root import GatewayRoot
from txfaas.model import CallRecord, CallResult, CallStatus
from txfaas.ssrf import AddressPolicy


def js(body: bytes) -> Any:
    return json.loads(body)


class FunctionsAPITests(GatewayTestCase):
    def deploy_json(self, method: str = "POST", **fields: Any):
        body = {"service": "echo", "image": "ghcr.io/x/echo:1.10", **fields}
        return self.call(method, "/system/functions", data=json.dumps(body).encode())

    def test_deploy_then_list_in_openfaas_status_shape(self) -> None:
        response, body = self.deploy_json(envVars={"A": "007"}, labels={"team": "x"})
        self.assertEqual(response.code, 202)
        response, body = self.call("GET", "/system/functions")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        [fn] = js(body)
        self.assertEqual(fn["name"], "echo")
        self.assertEqual(fn["image"], "ghcr.io/x/echo:1.10")
        self.assertEqual(fn["envVars"], {"A": "007"})
        for key in ["replicas", "availableReplicas", "invocationCount", "createdAt", "labels", "annotations"]:
            self.assertIn(key, fn)

    def test_a_process_without_an_address_is_refused_plainly(self) -> None:
        """faas-cli deploy --fprocess with no txfaas.url: 400 saying it would have no endpoint."""
        for method in ("POST", "PUT"):
            response, body = self.deploy_json(method, envProcess="wc -c")
            self.assertEqual(response.code, 400)
            self.assertIn(b"no endpoint", body)
            self.assertIn(b"txfaas.url", body)
        response, _ = self.deploy_json(
            envProcess="wc -c", annotations={"txfaas.url": "http://127.0.0.1:9000"}
        )
        self.assertEqual(response.code, 202)

    def test_deploy_twice_is_409(self) -> None:
        self.deploy_json()
        response, body = self.deploy_json()
        self.assertEqual(response.code, 409)
        self.assertIn(b"already exists", body)

    def test_update_missing_is_404_and_update_existing_replaces(self) -> None:
        response, _ = self.deploy_json("PUT")
        self.assertEqual(response.code, 404)
        self.deploy_json()
        response, _ = self.deploy_json("PUT", image="new:2")
        self.assertEqual(response.code, 202)
        _, body = self.call("GET", "/system/function/echo")
        self.assertEqual(js(body)["image"], "new:2")

    def test_delete_by_function_name_and_404_when_missing(self) -> None:
        self.deploy_json()
        response, _ = self.call("DELETE", "/system/functions", data=b'{"functionName": "echo"}')
        self.assertEqual(response.code, 202)
        response, _ = self.call("DELETE", "/system/functions", data=b'{"functionName": "echo"}')
        self.assertEqual(response.code, 404)
        response, body = self.call("DELETE", "/system/functions", data=b"{}")
        self.assertEqual(response.code, 400)
        self.assertIn(b"functionName", body)

    def test_delete_with_a_namespace_that_is_not_a_string_is_400_and_removes_nothing(self) -> None:
        """Found by the schemathesis run: ``{}``, ``0`` or ``false`` read as "no namespace" removed
        the default namespace's function."""
        self.deploy_json()
        for bad in (b"{}", b"[]", b"0", b"false"):
            body = b'{"functionName": "echo", "namespace": %s}' % bad
            response, text = self.call("DELETE", "/system/functions", data=body)
            self.assertEqual(response.code, 400, bad)
            self.assertIn(b"namespace", text)
        response, _ = self.call("GET", "/system/function/echo")
        self.assertEqual(response.code, 200)

    def test_a_deleted_function_is_no_longer_callable_through_this_gateway(self) -> None:
        self.deploy_json()
        self.assertEqual(self.call("GET", "/function/echo")[0].code, 200)
        self.call("DELETE", "/system/functions", data=b'{"functionName": "echo"}')
        self.assertEqual(self.call("GET", "/function/echo")[0].code, 404)

    def test_bad_json_and_wrong_fields_are_400_naming_the_field(self) -> None:
        response, body = self.call("POST", "/system/functions", data=b"{not json")
        self.assertEqual(response.code, 400)
        self.assertIn(b"not valid JSON", body)
        response, body = self.call("POST", "/system/functions", data=b'{"image": "x"}')
        self.assertEqual((response.code, body), (400, b"service: missing\n"))
        response, body = self.deploy_json(envVars={"A": 1})
        self.assertEqual(response.code, 400)
        self.assertTrue(body.startswith(b"envVars:"), body)
        response, body = self.deploy_json(service="Bad_Name")
        self.assertEqual(response.code, 400)
        self.assertTrue(body.startswith(b"service:"), body)

    def test_function_status_and_404(self) -> None:
        self.deploy_json()
        response, body = self.call("GET", "/system/function/echo")
        self.assertEqual(response.code, 200)
        self.assertEqual(js(body)["name"], "echo")
        self.assertEqual(self.call("GET", "/system/function/nope")[0].code, 404)

    def test_scale_records_replicas_and_checks_the_body(self) -> None:
        self.deploy_json()
        response, _ = self.call(
            "POST", "/system/scale-function/echo", data=b'{"serviceName": "echo", "replicas": 3}'
        )
        self.assertEqual(response.code, 202)
        _, body = self.call("GET", "/system/function/echo")
        self.assertEqual(js(body)["replicas"], 3)
        self.assertEqual(self.call("POST", "/system/scale-function/echo", data=b"nope")[0].code, 400)
        response, body = self.call("POST", "/system/scale-function/echo", data=b'{"replicas": -1}')
        self.assertEqual(response.code, 400)
        self.assertIn(b"replicas", body)
        self.assertEqual(
            self.call("POST", "/system/scale-function/nope", data=b'{"replicas": 1}')[0].code, 404
        )

    def test_invocation_count_is_reported(self) -> None:
        self.deploy_json()
        self.functions.start()
        self.call("GET", "/function/echo")
        self.clock.advance(1)
        _, body = self.call("GET", "/system/function/echo")
        self.assertEqual(js(body)["invocationCount"], 1)
        self.successResultOf(defer.Deferred.fromCoroutine(self.functions.stop()))

    def test_info_has_openfaas_shape(self) -> None:
        response, body = self.call("GET", "/system/info")
        info = js(body)
        self.assertEqual(info["provider"]["provider"], "txfaas")
        self.assertIn("release", info["version"])
        self.assertIn("arch", info)

    def test_store_unavailable_is_503_never_404_or_500(self) -> None:
        self.store.available = False
        for method, path in [("GET", "/system/functions"), ("GET", "/system/function/echo")]:
            response, body = self.call(method, path)
            self.assertEqual(response.code, 503, path)
            self.assertIn(b"unavailable", body)


class HealthTests(GatewayTestCase):
    def test_healthy_when_store_and_queue_answer(self) -> None:
        response, body = self.call("GET", "/healthz")
        self.assertEqual((response.code, body), (200, b"OK\n"))

    def test_unhealthy_names_the_dependency(self) -> None:
        self.queue.available = False
        response, body = self.call("GET", "/healthz")
        self.assertEqual(response.code, 503)
        self.assertIn(b"rabbitmq", body)
        self.queue.available = True
        self.store.available = False
        response, body = self.call("GET", "/healthz")
        self.assertEqual(response.code, 503)
        self.assertIn(b"redis", body)

    def test_metrics_in_prometheus_text(self) -> None:
        self.deploy("echo")
        self.call("GET", "/function/echo")
        response, body = self.call("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(
            b'gateway_function_invocation_total{code="200",function_name="echo.openfaas-fn"} 1.0', body
        )


class AuthTests(GatewayTestCase):
    auth = ("admin", "s3cret")

    def basic(self, user: str, password: str) -> dict:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": [f"Basic {token}"]}

    def test_system_and_metrics_need_auth(self) -> None:
        for path in ["/system/functions", "/system/info", "/metrics", "/system/calls/x"]:
            response, _ = self.call("GET", path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(
                response.headers.getRawHeaders(b"www-authenticate"), [b'Basic realm="Restricted"']
            )

    def test_other_spellings_of_protected_paths_need_auth_too(self) -> None:
        """Deny by default: //system, /%2Fsystem, /./system... never reach a /system handler without auth."""
        for path in ["//system/functions", "/%2Fsystem/functions", "//metrics", "/x/../system/info", "/"]:
            response, _ = self.call("GET", path)
            self.assertEqual(response.code, 401, path)
        response, _ = self.call("POST", "//system/functions", data=b'{"service": "evil", "url": "http://x"}')
        self.assertEqual(response.code, 401)
        self.assertEqual(self.store.functions, {})

    def test_wrong_user_or_password_is_401(self) -> None:
        for user, password in [("admin", "wrong"), ("root", "s3cret"), ("", "")]:
            response, _ = self.call("GET", "/system/info", headers=self.basic(user, password))
            self.assertEqual(response.code, 401)

    def test_right_credentials_pass(self) -> None:
        response, _ = self.call("GET", "/system/info", headers=self.basic("admin", "s3cret"))
        self.assertEqual(response.code, 200)

    def test_function_routes_and_healthz_stay_open(self) -> None:
        self.deploy("echo")
        self.assertEqual(self.call("GET", "/function/echo")[0].code, 200)
        self.assertEqual(self.call("GET", "/healthz")[0].code, 200)
        self.assertEqual(self.call("POST", "/async-function/echo", data=b"x")[0].code, 202)


class AsyncAcceptTests(GatewayTestCase):
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

    def test_accepts_with_202_call_id_location_and_json(self) -> None:
        response, body = self.call(
            "POST",
            "/async-function/echo/sub/path?q=1",
            headers={"X-Callback-Url": ["http://hooks.example.com/done"], "X-Custom": ["v"]},
            data=b"\x00payload\xff",
        )
        self.assertEqual(response.code, 202)
        call_id = response.headers.getRawHeaders(b"x-call-id")[0].decode()
        self.assertEqual(response.headers.getRawHeaders(b"location"), [f"/system/calls/{call_id}".encode()])
        self.assertEqual(
            js(body), {"callId": call_id, "status": "queued", "location": f"/system/calls/{call_id}"}
        )
        [call] = self.queue.published
        self.assertEqual(call.call_id, call_id)
        self.assertEqual(
            (call.function, call.method, call.path, call.query), ("echo", "POST", "/sub/path", "q=1")
        )
        self.assertEqual(call.body, b"\x00payload\xff")
        self.assertEqual(call.callback_url, "http://hooks.example.com/done")
        self.assertIn(("X-Custom", "v"), call.headers)
        self.assertIn(("X-Call-Id", call_id), call.headers)
        record = self.store.calls[call_id]
        self.assertEqual((record.status, record.function), ("queued", "echo"))

    def test_queued_headers_are_the_end_to_end_ones_in_order(self) -> None:
        """Hop-by-hop headers, those named in Connection, and what the gateway sets itself are not
        queued; the others are, in the order and spelling Twisted keeps them."""
        response, _ = self.call(
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
        self.assertEqual(response.code, 202)
        [call] = self.queue.published
        self.assertEqual(
            call.headers,
            [
                ("X-First", "1"),
                ("X-First", "2"),
                ("Content-Type", "text/plain"),
                ("X-Call-Id", call.call_id),
            ],
        )

    def test_sub_path_is_queued_as_the_client_sent_it(self) -> None:
        response, _ = self.call("POST", "/async-function/echo/a%20b/c%3Fd?q=%2F", data=b"x")
        self.assertEqual(response.code, 202)
        [call] = self.queue.published
        self.assertEqual((call.path, call.query), ("/a%20b/c%3Fd", "q=%2F"))

    def test_client_call_id_is_kept_and_a_repeat_is_not_queued_twice(self) -> None:
        headers = {"X-Call-Id": ["order-42"]}
        first, _ = self.call("POST", "/async-function/echo", headers=headers, data=b"a")
        second, body = self.call("POST", "/async-function/echo", headers=headers, data=b"a")
        self.assertEqual((first.code, second.code), (202, 202))
        self.assertEqual(second.headers.getRawHeaders(b"x-call-id"), [b"order-42"])
        self.assertTrue(js(body)["duplicate"])
        self.assertEqual(len(self.queue.published), 1)

    def test_unknown_function_is_404_and_nothing_is_queued(self) -> None:
        response, body = self.call("POST", "/async-function/nope", data=b"x")
        self.assertEqual(response.code, 404)
        self.assertIn(b"'nope'", body)
        self.assertEqual(self.queue.published, [])

    def test_invalid_name_is_400(self) -> None:
        self.assertEqual(self.call("POST", "/async-function/Nope", data=b"x")[0].code, 400)

    def test_other_methods_are_405_with_allow_post(self) -> None:
        for method in ["GET", "PUT", "DELETE", "PATCH"]:
            response, _ = self.call(method, "/async-function/echo")
            self.assertEqual(response.code, 405, method)
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])

    def test_broker_unavailable_is_503_with_retry_after_never_202(self) -> None:
        self.queue.available = False
        response, body = self.call("POST", "/async-function/echo", data=b"x")
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(response.headers.getRawHeaders(b"retry-after"))
        self.assertIn(b"queue unavailable", body)
        self.assertEqual(self.store.calls, {})

    def test_bad_callback_urls_are_400_naming_the_reason(self) -> None:
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
            response, body = self.call(
                "POST", "/async-function/echo", headers={"X-Callback-Url": [url]}, data=b"x"
            )
            self.assertEqual(response.code, 400, url)
            self.assertIn(b"X-Callback-Url", body)
            self.assertIn(reason, body, url)
        self.assertEqual(self.queue.published, [])

    def test_an_empty_callback_url_is_400_not_a_call_without_callback(self) -> None:
        """``X-Callback-Url:`` with no value (an unset variable in a client's script, say) is
        refused: taken as "no callback", the call would run and nobody would hear of it."""
        response, body = self.call(
            "POST", "/async-function/echo", headers={"X-Callback-Url": [""]}, data=b"x"
        )
        self.assertEqual(response.code, 400)
        self.assertIn(b"X-Callback-Url must be an absolute http:// or https:// URL", body)
        self.assertEqual(self.queue.published, [])

    def test_status_lookup_and_result(self) -> None:
        response, _ = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["c1"]}, data=b"x")
        response, body = self.call("GET", "/system/calls/c1")
        self.assertEqual(response.code, 200)
        self.assertEqual(js(body)["status"], "queued")
        response, body = self.call("GET", "/system/calls/c1/result")
        self.assertEqual(response.code, 409)
        self.assertEqual(js(body)["status"], "queued")
        self.store.results["c1"] = CallResult(201, [("Content-Type", "text/x-out"), ("X-Fn", "1")], b"out")
        self.store.calls["c1"] = attrs.evolve(self.store.calls["c1"], status="succeeded", status_code=201)
        response, body = self.call("GET", "/system/calls/c1/result")
        self.assertEqual((response.code, body), (200, b"out"))
        self.assertEqual(response.headers.getRawHeaders(b"x-function-status"), [b"201"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/x-out"])
        self.assertEqual(self.call("GET", "/system/calls/unknown")[0].code, 404)

    def test_record_written_by_the_worker_first_is_not_overwritten(self) -> None:
        running = CallRecord(call_id="c2", function="echo", status="running", attempts=1)
        self.store.calls["c2"] = running
        # A record exists already: the post is a repeat, answered from it, not queued.
        response, body = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["c2"]}, data=b"x")
        self.assertEqual(js(body)["status"], "running")
        self.assertEqual(self.store.calls["c2"], running)

    def test_accepted_and_refused_calls_are_counted(self) -> None:
        self.call("POST", "/async-function/echo", data=b"x")
        self.queue.available = False
        self.call("POST", "/async-function/echo", data=b"x")
        registry = self.metrics.registry
        for code in ("202", "503"):
            self.assertEqual(
                registry.get_sample_value(
                    "gateway_async_calls_total", {"function_name": "echo.openfaas-fn", "code": code}
                ),
                1.0,
            )


class AllowedCallbackTests(GatewayTestCase):
    def make_resolver(self) -> Any:
        return FakeResolver({"localhost": ["127.0.0.1"], "127.0.0.1": ["127.0.0.1"]})

    def app_settings(self) -> AppSettings:
        return AppSettings(callback_policy=AddressPolicy(allow_networks=(ip_network("127.0.0.0/8"),)))

    def test_operator_allowed_network_passes(self) -> None:
        self.deploy("echo")
        for url in ["http://127.0.0.1:9999/cb", "http://localhost:9999/cb"]:
            response, _ = self.call(
                "POST", "/async-function/echo", headers={"X-Callback-Url": [url]}, data=b"x"
            )
            self.assertEqual(response.code, 202, url)


class HangingResolver:
    """Never answers (a DNS server that does not reply)."""

    def resolveHostName(self, receiver, host, port=0, *a, **k):
        receiver.resolutionBegan(None)


class SlowDNSTests(GatewayTestCase):
    def make_resolver(self) -> Any:
        return HangingResolver()

    def test_a_callback_host_that_does_not_resolve_in_time_is_400(self) -> None:
        self.deploy("echo")
        d = self.start(
            "POST", "/async-function/echo", headers={"X-Callback-Url": ["http://slow.example/"]}, data=b"x"
        )
        self.assertNoResult(d)
        self.clock.advance(5.1)
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 400)
        self.assertEqual(self.queue.published, [])

    def test_a_callback_host_the_resolver_cannot_take_is_400_at_once(self) -> None:
        """Non-ASCII bytes (the system resolver's IDNA encoding raised in its thread, so the
        check waited for its timeout), an empty label or one over 63 characters: refused
        before any resolution, with no time passing."""
        self.deploy("echo")
        for url in (
            b"http://h\xe9llo.example/cb",
            b"http://\xff\x80.example/cb",
            b"http://a..b.example/cb",
            b"http://" + b"a" * 64 + b".example/cb",
            b"http://.example/cb",
        ):
            d = self.start("POST", "/async-function/echo", headers={b"X-Callback-Url": [url]}, data=b"x")
            response = self.successResultOf(d)
            self.assertEqual(response.code, 400, url)
            body = self.successResultOf(treq.content(response))
            self.assertIn(b"X-Callback-Url", body)
        self.assertEqual(self.queue.published, [])


class MetricLabelTests(GatewayTestCase):
    def test_unknown_function_names_do_not_become_metric_labels(self) -> None:
        for i in range(5):
            self.call("POST", f"/async-function/nope-{i}", data=b"x")
        registry = self.metrics.registry
        self.assertEqual(
            registry.get_sample_value("gateway_async_calls_total", {"function_name": "-", "code": "404"}), 5.0
        )
        self.assertIsNone(
            registry.get_sample_value("gateway_async_calls_total", {"function_name": "nope-1", "code": "404"})
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


class IdempotencyRaceTests(GatewayTestCase):
    def test_two_posts_with_one_call_id_at_the_same_moment_queue_one_run(self) -> None:
        self.deploy("echo")
        slow = SlowQueue(self.queue)
        self.build(queue=slow)
        first = self.start("POST", "/async-function/echo", headers={"X-Call-Id": ["same"]}, data=b"x")
        self.assertNoResult(first)  # waiting for the broker's confirm
        second, body = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["same"]}, data=b"x")
        # Not confirmed yet: no 202 (which would promise it), but "in progress, retry".
        self.assertEqual(second.code, 409)
        self.assertEqual(second.headers.getRawHeaders(b"retry-after"), [b"10"])
        self.assertIn(b"being accepted", body)
        self.assertEqual(len(slow.waiting), 1)
        slow.waiting[0].callback(None)
        self.flush()
        self.assertEqual(self.successResultOf(first).code, 202)
        third, body = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["same"]}, data=b"x")
        self.assertEqual((third.code, js(body)["status"], js(body)["duplicate"]), (202, "queued", True))
        self.assertEqual(len(self.queue.published), 1)

    def test_a_claim_left_by_a_gateway_that_died_before_the_confirm_is_published_again(self) -> None:
        """The false 202 of issue 16: the claim of a gateway that died between the claim and the
        broker's confirm lapses at its deadline, and the client's retry queues the call."""
        self.deploy("echo")
        self.build(queue=SlowQueue(self.queue))  # never confirms: this gateway "dies" waiting
        headers = {"X-Call-Id": ["orphan"]}
        self.assertNoResult(self.start("POST", "/async-function/echo", headers=headers, data=b"x"))
        self.assertEqual(self.store.calls["orphan"].status, "accepting")
        restarted = GatewayApp(
            self.functions,
            self.store,
            self.queue,
            self.resolver,
            self.metrics,
            self.app_settings(),
            self.clock,
        )
        self.root = GatewayRoot(self.proxy, restarted, None)
        self.client = RequestTraversalAgent(self.root)
        early, _ = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["orphan"]}, data=b"x")
        self.assertEqual(early.code, 409)  # the first request may still be publishing
        self.assertEqual(self.queue.published, [])
        self.clock.advance(10)
        response, body = self.call(
            "POST", "/async-function/echo", headers={"X-Call-Id": ["orphan"]}, data=b"y"
        )
        self.assertEqual((response.code, js(body)["status"]), (202, "queued"))
        self.assertNotIn("duplicate", js(body))
        [call] = self.queue.published
        self.assertEqual((call.call_id, call.body), ("orphan", b"y"))
        self.assertEqual(self.store.calls["orphan"].status, "queued")
        again, body = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["orphan"]}, data=b"y")
        self.assertEqual((again.code, js(body)["duplicate"]), (202, True))
        self.assertEqual(len(self.queue.published), 1)

    def test_a_call_id_of_another_function_is_409_without_its_status(self) -> None:
        self.deploy("echo")
        self.deploy("other")
        self.store.calls["theirs"] = CallRecord(
            "theirs", "echo", status=CallStatus.SUCCEEDED, status_code=200
        )
        response, body = self.call(
            "POST", "/async-function/other", headers={"X-Call-Id": ["theirs"]}, data=b"x"
        )
        self.assertEqual(response.code, 409)
        self.assertEqual(response.headers.getRawHeaders(b"location"), None)
        for secret in (b"succeeded", b"echo", b"200", b"/system/calls"):
            self.assertNotIn(secret, body)
        self.assertEqual(self.queue.published, [])

    def test_a_call_id_whose_publish_failed_can_be_posted_again(self) -> None:
        self.deploy("echo")
        self.queue.available = False
        response, _ = self.call("POST", "/async-function/echo", headers={"X-Call-Id": ["again"]}, data=b"x")
        self.assertEqual(response.code, 503)
        self.assertNotIn("again", self.store.calls)  # the claim was given back
        self.queue.available = True
        response, body = self.call(
            "POST", "/async-function/echo", headers={"X-Call-Id": ["again"]}, data=b"x"
        )
        self.assertEqual(response.code, 202)
        self.assertNotIn("duplicate", js(body))
        self.assertEqual([c.call_id for c in self.queue.published], ["again"])


class ClientGoneTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deploy("echo")
        self.slow = SlowQueue(self.queue)
        self.build(queue=self.slow)

    def test_a_client_that_leaves_during_the_publish_still_gets_its_call_queued_and_recorded(self) -> None:
        d = self.start("POST", "/async-function/echo", data=b"x")
        self.assertEqual(len(self.slow.waiting), 1)
        d.cancel()  # the client goes away while the broker has not confirmed yet
        self.flush()
        self.failureResultOf(d)
        self.slow.waiting[0].callback(None)
        self.flush()
        [call] = self.queue.published
        self.assertEqual(self.store.calls[call.call_id].status, "queued")

    def test_a_client_that_left_before_anything_was_queued_gets_nothing_queued(self) -> None:
        resolver = LateResolver()
        self.build(queue=self.slow, resolver=resolver)
        d = self.start(
            "POST", "/async-function/echo", headers={"X-Callback-Url": ["http://slow.example/"]}, data=b"x"
        )
        d.cancel()  # gone while its callback host was being resolved
        self.flush()
        self.failureResultOf(d)
        resolver.answer("93.184.216.34")
        self.flush()
        self.assertEqual(self.slow.waiting, [])
        self.assertEqual(self.queue.published, [])
        self.assertEqual(self.store.calls, {})


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


class DefaultQueueTests(GatewayTestCase):
    """--default-queue: where the calls of a function without com.openfaas.queue go."""

    def app_settings(self) -> AppSettings:
        return AppSettings(default_queue="run-q")

    def setUp(self) -> None:
        super().setUp()
        self.queue.messages.setdefault("run-q", deque())  # the gateway declares it at start

    def test_unannotated_functions_use_the_default_queue_annotated_ones_theirs(self) -> None:
        self.call("POST", "/system/functions", data=b'{"service": "plain", "url": "http://p.fn"}')
        self.call(
            "POST",
            "/system/functions",
            data=b'{"service": "own", "url": "http://o.fn", "annotations": {"com.openfaas.queue": "mine"}}',
        )
        self.assertEqual(set(self.queue.messages) - {"faas-request", "run-q"}, {"mine"})
        for name in ("plain", "own"):
            self.assertEqual(self.call("POST", f"/async-function/{name}", data=b"x")[0].code, 202)
        self.assertEqual([c.queue for c in self.queue.published], ["run-q", "mine"])
