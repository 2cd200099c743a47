"""faas-cli's commands that touch namespaces, against real gateway and worker processes.

Each request is what faas-cli 0.16.37 (and its go-sdk) sends: the path, the query string,
the JSON body as Go's encoder writes it (field order and ``omitempty``), the basic-auth
header saved by ``faas-cli login`` on every ``/system`` call and none on ``/function``.
Each answer is checked for what faas-cli parses from it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest_twisted
import treq

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

AUTH = {"Authorization": ["Basic " + base64.b64encode(":".join(GATEWAY_AUTH).encode()).decode()]}


class Cli:
    """The requests of faas-cli's commands."""

    def __init__(self, base: str) -> None:
        self.base = base

    async def send(
        self, method: str, path: str, body: Any = None, auth: bool = True, **headers: str
    ) -> tuple:
        all_headers = {k.replace("_", "-"): [v] for k, v in headers.items()}
        if auth:
            all_headers.update(AUTH)
        data = None
        if body is not None:
            # Go's json.Marshal: compact, struct order.
            data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        response = await treq.request(
            method, self.base + path, data=data, headers=all_headers, persistent=False
        )
        return response.code, await response.content(), response

    # faas-cli namespace create NAME / namespaces / namespace get|update|remove NAME
    async def namespace_create(self, name: str) -> tuple:
        return await self.send("POST", "/system/namespace/", {"name": name, "labels": {"openfaas": "1"}})

    async def namespaces(self) -> list[str]:
        code, body, _ = await self.send("GET", "/system/namespaces")
        assert code == 200, body
        return json.loads(body)  # []string

    async def namespace_get(self, name: str) -> tuple:
        return await self.send("GET", f"/system/namespace/{name}")

    async def namespace_update(self, name: str, annotations: dict) -> tuple:
        body = {"name": name, "annotations": annotations, "labels": {"openfaas": "1"}}
        return await self.send("PUT", f"/system/namespace/{name}", body)

    async def namespace_remove(self, name: str) -> tuple:
        return await self.send(
            "DELETE", f"/system/namespace/{name}", {"name": name, "labels": {"openfaas": "1"}}
        )

    # faas-cli deploy --name NAME --image IMAGE [--namespace NS] --annotation ...: PUT first
    # (--update is the default), POST when the PUT says 404.
    async def deploy(self, name: str, namespace: str, annotations: dict) -> int:
        spec: dict[str, Any] = {"service": name, "image": "ghcr.io/openfaas/alpine:latest"}
        if namespace:
            spec["namespace"] = namespace
        spec["annotations"] = annotations
        code, body, _ = await self.send("PUT", "/system/functions", spec)
        if code == 404:
            code, body, _ = await self.send("POST", "/system/functions", spec)
        assert code in (200, 201, 202), body
        return code

    # faas-cli list [--namespace NS]
    async def list(self, namespace: str = "") -> list[dict]:
        path = "/system/functions" + (f"?namespace={namespace}" if namespace else "")
        code, body, _ = await self.send("GET", path)
        assert code == 200, body
        return json.loads(body)  # []FunctionStatus

    # faas-cli describe NAME [--namespace NS]
    async def describe(self, name: str, namespace: str = "") -> tuple:
        path = f"/system/function/{name}" + (f"?namespace={namespace}" if namespace else "")
        return await self.send("GET", path)

    # faas-cli invoke NAME [--namespace NS] [--async]: always name.namespace, no auth
    async def invoke(
        self, name: str, namespace: str = "openfaas-fn", data: bytes = b"", **headers: str
    ) -> tuple:
        return await self.send(
            "POST", f"/function/{name}.{namespace}", data, auth=False, Content_Type="text/plain", **headers
        )

    async def invoke_async(
        self, name: str, namespace: str = "openfaas-fn", data: bytes = b"", **headers: str
    ):
        return await self.send(
            "POST",
            f"/async-function/{name}.{namespace}",
            data,
            auth=False,
            Content_Type="text/plain",
            **headers,
        )

    # faas-cli remove NAME [--namespace NS]
    async def remove(self, name: str, namespace: str = "") -> tuple:
        body = {"functionName": name}
        if namespace:
            body["namespace"] = namespace
        return await self.send("DELETE", "/system/functions", body)

    # go-sdk ScaleFunction
    async def scale(self, name: str, namespace: str, replicas: int) -> tuple:
        body = {"serviceName": name, "replicas": replicas, "namespace": namespace}
        return await self.send("POST", f"/system/scale-function/{name}", body)


@pytest_twisted.ensureDeferred
async def test_faas_cli_in_two_namespaces_with_the_same_function_name(amqp_url, redis_url):
    prefix = unique("nscli") + ":"
    queue = unique("nsq")
    procs: list[TwistdProcess] = []
    ports = []

    def serve(recorder: Recorder) -> str:
        port = listen_http(recorder)
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    try:
        in_default = Recorder(
            lambda request: (200, {b"X-Where": b"default"}, b"default:" + request.content.getvalue())
        )
        in_dev = Recorder(lambda request: (200, {b"X-Where": b"dev"}, b"dev"))
        callbacks = Recorder(lambda request: (204, {}, b""))
        gw_port, worker_port = free_port(), free_port()
        common = ["--redis", redis_url, "--redis-prefix", prefix, "--amqp", amqp_url]
        gateway = TwistdProcess(
            "faas-gateway",
            ["--listen", f"tcp:{gw_port}:interface=127.0.0.1", *common, "--callback-allow", "127.0.0.0/8"],
            env=gateway_env(),
        )
        procs.append(gateway)
        worker = TwistdProcess(
            "faas-worker",
            [
                "--listen", f"tcp:{worker_port}:interface=127.0.0.1",
                *common,
                "--queue", queue,
                "--callback-allow", "127.0.0.0/8",
            ],
        )  # fmt: skip
        procs.append(worker)
        base = f"http://127.0.0.1:{gw_port}"
        await gateway.wait_http(base + "/healthz", status=200)
        await worker.wait_http(f"http://127.0.0.1:{worker_port}/healthz", status=200)
        cli = Cli(base)

        # Without credentials, /system is refused as faas-cli expects (it prints "unauthorized").
        code, _, _ = await cli.send("GET", "/system/namespaces", auth=False)
        assert code == 401

        assert await cli.namespaces() == ["openfaas-fn"]
        code, body, _ = await cli.namespace_create("dev")
        assert code in (200, 201, 202), body
        code, body, _ = await cli.namespace_create("dev")
        assert code == 409 and b"already exists" in body
        code, body, _ = await cli.namespace_create("Not_Valid")
        assert code == 400 and b"invalid namespace" in body
        assert await cli.namespaces() == ["dev", "openfaas-fn"]
        code, body, response = await cli.namespace_get("dev")
        assert code == 200 and response.headers.getRawHeaders("Content-Type") == ["application/json"]
        assert json.loads(body) == {"name": "dev", "labels": {"openfaas": "1"}, "annotations": {}}
        code, body, _ = await cli.namespace_update("dev", {"team": "a"})
        assert code in (200, 201, 202), body
        assert json.loads((await cli.namespace_get("dev"))[1])["annotations"] == {"team": "a"}
        code, _, _ = await cli.namespace_get("qa")
        assert code == 404  # faas-cli: "namespace qa not found"

        queue_annotation = {"com.openfaas.queue": queue}
        assert await cli.deploy("echo", "", {"txfaas.url": serve(in_default), **queue_annotation}) == 202
        assert await cli.deploy("echo", "dev", {"txfaas.url": serve(in_dev), **queue_annotation}) == 202
        code, body, _ = await cli.send(
            "POST", "/system/functions", {"service": "echo", "image": "x", "namespace": "qa"}
        )
        assert code == 400 and b"namespace 'qa' does not exist" in body

        [listed] = await cli.list("dev")
        assert (listed["name"], listed["namespace"], listed["replicas"]) == ("echo", "dev", 1)
        [listed] = await cli.list()
        assert (listed["name"], listed["namespace"]) == ("echo", "openfaas-fn")
        code, body, _ = await cli.describe("echo", "dev")
        assert code == 200 and json.loads(body)["annotations"]["txfaas.url"].startswith("http://127.0.0.1:")
        assert json.loads(body)["namespace"] == "dev"

        # invoke --namespace dev reaches dev's echo; invoke without reaches openfaas-fn's.
        code, body, _ = await cli.invoke("echo", "dev", b"hi")
        assert (code, body) == (200, b"dev")
        code, body, _ = await cli.invoke("echo", data=b"hi")
        assert (code, body) == (200, b"default:hi")
        assert len(in_dev.requests) == 1 and len(in_default.requests) == 1
        code, body, _ = await cli.invoke("echo", "qa")
        assert code == 404 and body == b"function 'echo' not found in namespace 'qa'\n"

        # invoke --async --namespace dev: queued, run by the worker on dev's echo, called back.
        code, body, response = await cli.invoke_async(
            "echo", "dev", b"later", X_Callback_Url=serve(callbacks) + "/hook"
        )
        assert code == 202, body
        call_id = response.headers.getRawHeaders("X-Call-Id")[0]
        await wait_for(lambda: callbacks.requests, timeout=20, what="the callback")
        [callback] = callbacks.requests
        assert callback["headers"]["x-function-name"] == ["echo.dev"]
        assert callback["headers"]["x-where"] == ["dev"]
        assert len(in_dev.requests) == 2 and len(in_default.requests) == 1
        code, body, _ = await cli.send("GET", f"/system/calls/{call_id}")
        record = json.loads(body)
        assert (record["function"], record["namespace"]) == ("echo", "dev")

        # scale in dev leaves openfaas-fn's alone
        code, body, _ = await cli.scale("echo", "dev", 3)
        assert code == 202, body
        assert [f["replicas"] for f in await cli.list("dev")] == [3]
        assert [f["replicas"] for f in await cli.list()] == [1]

        # A namespace that still holds a function is not removed.
        code, body, _ = await cli.namespace_remove("dev")
        assert code == 409 and b"still holds functions" in body

        # remove echo --namespace dev: openfaas-fn's echo is untouched.
        code, body, _ = await cli.remove("echo", "dev")
        assert code == 202, body
        assert await cli.list("dev") == []
        assert [f["name"] for f in await cli.list()] == ["echo"]
        code, body, _ = await cli.invoke("echo", data=b"still")
        assert (code, body) == (200, b"default:still")
        code, _, _ = await cli.invoke("echo", "dev")
        assert code == 404
        code, _, _ = await cli.remove("echo", "dev")
        assert code == 404  # faas-cli: "function echo not found"

        code, body, _ = await cli.namespace_remove("dev")
        assert code in (200, 201, 202), body
        code, body, _ = await cli.namespace_remove("openfaas-fn")
        assert code == 400 and b"cannot be deleted" in body
        assert await cli.namespaces() == ["openfaas-fn"]
    finally:
        for proc in procs:
            await proc.stop()
        for port in ports:
            await port.stopListening()
        await delete_queues(queue)
        await delete_redis_prefix(redis_url, prefix)
