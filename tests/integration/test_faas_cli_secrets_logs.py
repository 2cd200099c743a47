"""``faas-cli secret ...`` and ``faas-cli logs`` against real processes, byte for byte.

Each request is written on a socket as faas-cli 0.16.37's Go client writes it (request
line, Host, User-Agent, Content-Length, then its headers in Go's order, Accept-Encoding
last), and each answer is checked for what faas-cli parses from it.  Real Redis and
RabbitMQ; every test has its own Redis prefix and queue and removes them.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import time
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from tests.support import (
    Recorder,
    TwistdProcess,
    delete_queues,
    delete_redis_prefix,
    free_port,
    listen_http,
    unique,
    wait_for,
)

AUTH = ("admin", "cli-test-" + unique("pw"))
AUTH_HEADER = "Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
ENV = {"TXFAAS_BASIC_AUTH_USER": AUTH[0], "TXFAAS_BASIC_AUTH_PASSWORD": AUTH[1]}


def go_request(port: int, method: str, target: str, body: bytes | None = None, auth: bool = True) -> bytes:
    """The bytes Go's net/http client sends for faas-cli's request."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "User-Agent: Go-http-client/1.1"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if auth:
        lines.append(f"Authorization: {AUTH_HEADER}")
    if body is not None:
        lines.append("Content-Type: application/json")
    lines.append("Accept-Encoding: gzip")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Answer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        status, *header_lines = head.decode("latin-1").split("\r\n")
        self.code = int(status.split(" ")[1])
        self.headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._more()
        found, _, self.buffer = self.buffer.partition(marker)
        return found

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._more()
        found, self.buffer = self.buffer[:n], self.buffer[n:]
        return found

    def chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None at its end."""
        size = int(self._until(b"\r\n").split(b";")[0], 16)
        data = self._exactly(size)
        self._exactly(2)
        return data if size else None

    def body(self) -> bytes:
        if self.headers.get("transfer-encoding") == "chunked":
            out = b""
            while (data := self.chunk()) is not None:
                out += data
            return out
        return self._exactly(int(self.headers.get("content-length", "0")))


def exchange(port: int, method: str, target: str, body: bytes | None = None, auth: bool = True):
    """One request on a fresh connection: (status, headers, body), in a thread (the test's reactor
    serves the functions meanwhile)."""

    def run():
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(go_request(port, method, target, body, auth))
            answer = Answer(sock)
            return answer.code, answer.headers, answer.body()

    return deferToThread(run)


def go_json(data: dict) -> bytes:
    """Go's json.Marshal: compact, fields in the struct's order."""
    return json.dumps(data, separators=(",", ":")).encode()


class Gateway:
    def __init__(self, redis_url: str, amqp_url: str = "memory:") -> None:
        self.redis_url = redis_url
        self.amqp_url = amqp_url
        self.prefix = unique("clitest") + ":"
        self.queue = unique("cliq")
        self.procs: list[TwistdProcess] = []
        self.ports: list = []
        self.key = Path(unique("/tmp/txfaas-test-key")) / "secrets.key"

    async def start(self, *extra: str) -> tuple[TwistdProcess, int]:
        port = free_port()
        proc = TwistdProcess(
            "faas-gateway",
            [
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--redis", self.redis_url,
                "--redis-prefix", self.prefix,
                "--amqp", self.amqp_url,
                "--basic-auth", "true",
                "--secrets-key", str(self.key),
                *extra,
            ],
            env=ENV,
        )  # fmt: skip
        self.procs.append(proc)
        await proc.wait_http(f"http://127.0.0.1:{port}/healthz", status=200)
        return proc, port

    async def worker(self) -> TwistdProcess:
        port = free_port()
        proc = TwistdProcess(
            "faas-worker",
            [
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--redis", self.redis_url,
                "--redis-prefix", self.prefix,
                "--amqp", self.amqp_url,
                "--queue", self.queue,
            ],
        )  # fmt: skip
        self.procs.append(proc)
        await proc.wait_http(f"http://127.0.0.1:{port}/healthz", status=200)
        return proc

    def serve(self, recorder: Recorder) -> str:
        port = listen_http(recorder)
        self.ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def close(self) -> None:
        for proc in self.procs:
            await proc.stop()
        for port in self.ports:
            await port.stopListening()
        await delete_queues(self.queue)
        await delete_redis_prefix(self.redis_url, self.prefix)
        shutil.rmtree(self.key.parent, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_secret_list_create_update_remove_as_faas_cli_sends_them(redis_url):
    import txredisapi
    from cryptography.fernet import Fernet

    from txfaas.secrets import SecretBox

    gw = Gateway(redis_url)
    try:
        proc, port = await gw.start()
        # Without `faas-cli login`: 401, which faas-cli reads as "unauthorized access".
        code, headers, _ = await exchange(port, "GET", "/system/secrets", auth=False)
        assert (code, headers["www-authenticate"]) == (401, 'Basic realm="Restricted"')

        # faas-cli secret list -> "No secrets found." (an empty JSON array)
        code, headers, body = await exchange(port, "GET", "/system/secrets")
        assert (code, headers["content-type"], json.loads(body)) == (200, "application/json", [])

        # faas-cli secret create db-password --from-literal s3cr3t -> "Created: 201 Created"
        code, _, body = await exchange(
            port, "POST", "/system/secrets", go_json({"name": "db-password", "value": "s3cr3t"})
        )
        assert code == 201, body
        # faas-cli secret create db-password ... again -> 409: 'secret with the name ... already exists'
        code, _, _ = await exchange(
            port, "POST", "/system/secrets", go_json({"name": "db-password", "value": "x"})
        )
        assert code == 409
        # faas-cli secret create api-key -n openfaas-fn --from-file key.bin (the value as text)
        code, _, _ = await exchange(
            port,
            "POST",
            "/system/secrets",
            go_json({"name": "api-key", "namespace": "openfaas-fn", "value": "k3y"}),
        )
        assert code == 201
        # Another client's rawValue: base64 bytes.
        raw = base64.b64encode(b"\x00\xffbytes").decode()
        code, _, _ = await exchange(
            port, "POST", "/system/secrets", go_json({"name": "blob", "rawValue": raw})
        )
        assert code == 201

        # faas-cli secret list [-n openfaas-fn]: []types.Secret, names only.
        for target in ["/system/secrets", "/system/secrets?namespace=openfaas-fn"]:
            code, _, body = await exchange(port, "GET", target)
            assert code == 200
            listed = json.loads(body)
            assert [s["name"] for s in listed] == ["api-key", "blob", "db-password"]
            assert all(set(s) == {"name", "namespace"} for s in listed)
            assert b"s3cr3t" not in body

        # faas-cli secret update db-password --from-literal n3w -> "Updated: 200 OK"
        code, _, _ = await exchange(
            port, "PUT", "/system/secrets", go_json({"name": "db-password", "value": "n3w"})
        )
        assert code == 200
        # faas-cli secret update missing ... -> 404: "unable to find secret: missing"
        code, _, body = await exchange(
            port, "PUT", "/system/secrets", go_json({"name": "missing", "value": "v"})
        )
        assert code == 404, body
        # faas-cli secret remove api-key -> "Removed.. OK."; again -> 404 "unable to find secret"
        code, _, _ = await exchange(port, "DELETE", "/system/secrets", go_json({"name": "api-key"}))
        assert code == 200
        code, _, _ = await exchange(port, "DELETE", "/system/secrets", go_json({"name": "api-key"}))
        assert code == 404
        # A name faas-cli itself would refuse, sent by another client: a plain 400.
        code, headers, body = await exchange(
            port, "POST", "/system/secrets", go_json({"name": "Bad_Name", "value": "v"})
        )
        assert (code, headers["content-type"]) == (400, "text/plain; charset=utf-8")
        assert b"invalid secret name" in body

        # faas-cli deploy of a function naming a secret that does not exist: 400 naming it.
        deployment = {"service": "uses-secrets", "image": "x", "secrets": ["db-password", "nope"]}
        code, _, body = await exchange(port, "POST", "/system/functions", go_json(deployment))
        assert code == 400
        assert b"'nope' not found in namespace 'openfaas-fn'" in body
        deployment["secrets"] = ["db-password"]
        code, _, body = await exchange(port, "POST", "/system/functions", go_json(deployment))
        assert code == 202, body

        # At rest: sealed tokens only, each opening with the key file's key to its value.
        connection = await txredisapi.Connection("127.0.0.1", 6379, convertNumbers=False)
        try:
            stored = await connection.hgetall(f"{gw.prefix}secrets:openfaas-fn")
        finally:
            await connection.disconnect()
        assert sorted(stored) == ["blob", "db-password"]
        assert not any("n3w" in token or "s3cr3t" in token for token in stored.values())
        assert gw.key.stat().st_mode & 0o777 == 0o600
        box = SecretBox(gw.key.read_bytes().strip())
        assert box.open("openfaas-fn", "db-password", stored["db-password"]) == b"n3w"
        assert box.open("openfaas-fn", "blob", stored["blob"]) == b"\x00\xffbytes"
        assert gw.key.read_text().strip() not in proc.output()  # never logged
        assert str(gw.key) in proc.output()  # its path is

        # Restarted with another key: one line, exit 1.  With its own key: up again.
        await proc.stop()
        good = gw.key.read_bytes()
        gw.key.write_bytes(Fernet.generate_key())  # a key, not that one
        port = free_port()
        wrong = TwistdProcess(
            "faas-gateway",
            [
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--redis", redis_url,
                "--redis-prefix", gw.prefix,
                "--amqp", "memory:",
                "--secrets-key", str(gw.key),
            ],
            env=ENV,
        )  # fmt: skip
        gw.procs.append(wrong)
        assert await wrong.wait_exit(20) == 1
        assert f"--secrets-key {gw.key}: not the key that sealed the secrets" in wrong.output()
        gw.key.write_bytes(good)
        _, port = await gw.start()
        code, _, body = await exchange(port, "GET", "/system/secrets")
        assert [s["name"] for s in json.loads(body)] == ["blob", "db-password"]
    finally:
        await gw.close()


def read_lines(port: int, target: str, want: int, then=None, timeout: float = 20.0):
    """A follow stream read as faas-cli reads it (JSON values one after another) until ``want``
    messages came, calling ``then()`` (in the reactor) once the first answer is in; then the
    connection is closed, as faas-cli's Ctrl-C closes it."""
    from twisted.internet import reactor

    def run():
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(go_request(port, "GET", target))
            answer = Answer(sock)
            assert answer.code == 200, answer.body()
            if then is not None:
                reactor.callFromThread(then)
            data = b""
            deadline = time.monotonic() + timeout
            while data.count(b"\n") < want and time.monotonic() < deadline:
                chunk = answer.chunk()
                if chunk is None:
                    break
                data += chunk
            return answer.headers, [json.loads(line) for line in data.splitlines()]

    return deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_logs_as_faas_cli_reads_them(redis_url, amqp_url):
    gw = Gateway(redis_url, amqp_url)
    try:
        function = Recorder(lambda request: (200, {}, b"ok"))
        _, port = await gw.start("--log-followers", "1")
        await gw.worker()
        url = gw.serve(function)
        deployment = {
            "service": "echo",
            "image": "x",
            "url": url,
            "annotations": {"com.openfaas.queue": gw.queue},
        }
        code, _, body = await exchange(port, "POST", "/system/functions", go_json(deployment))
        assert code == 202, body
        base = f"http://127.0.0.1:{port}"
        response = await treq.post(
            base + "/function/echo/sync/path?token=hidden", headers={"X-Call-Id": ["c-sync"]}
        )
        assert response.code == 200
        await response.content()
        response = await treq.post(base + "/async-function/echo/queued", headers={"X-Call-Id": ["c-async"]})
        assert response.code == 202
        await response.content()

        # faas-cli logs echo --tail=false  ->  follow=false&name=echo&tail=-1
        async def both():
            code, headers, body = await exchange(port, "GET", "/system/logs?follow=false&name=echo&tail=-1")
            assert (code, headers["content-type"], headers["transfer-encoding"]) == (
                200,
                "application/x-ndjson",
                "chunked",
            )
            lines = [json.loads(line) for line in body.splitlines()]
            return lines if len(lines) == 2 else None

        lines = await wait_for(both, timeout=20, what="a line for each call")
        by_call = {m["text"].split()[0]: m for m in lines}
        sync, queued = by_call["call=c-sync"], by_call["call=c-async"]
        for message in lines:
            assert set(message) == {"name", "namespace", "instance", "timestamp", "text"}
            assert (message["name"], message["namespace"]) == ("echo", "openfaas-fn")
            assert message["timestamp"].endswith("Z")
        assert sync["text"].startswith(
            "call=c-sync kind=sync method=POST path=/sync/path status=200 duration="
        )
        assert "hidden" not in sync["text"]  # the query string stays out of the log
        assert queued["text"].startswith("call=c-async kind=async method=POST path=/queued status=200 ")
        assert queued["text"].endswith(" attempt=1")
        assert sync["instance"].startswith("gateway-") and queued["instance"].startswith("worker-")

        # faas-cli logs echo --tail=false --lines 1 / --instance / --since-time in the future
        code, _, body = await exchange(port, "GET", "/system/logs?follow=false&name=echo&tail=1")
        assert len(body.splitlines()) == 1
        instance = queued["instance"]
        code, _, body = await exchange(
            port, "GET", f"/system/logs?follow=false&instance={instance}&name=echo"
        )
        assert [json.loads(line)["instance"] for line in body.splitlines()] == [instance]
        code, _, body = await exchange(
            port, "GET", "/system/logs?follow=false&name=echo&since=2099-01-01T00%3A00%3A00Z"
        )
        assert (code, body) == (200, b"")

        # faas-cli logs nope / a bad --since: plain-text errors, never HTML.
        code, headers, body = await exchange(port, "GET", "/system/logs?follow=false&name=nope&tail=-1")
        assert (code, body) == (404, b"function 'nope' not found in namespace 'openfaas-fn'\n")
        code, headers, body = await exchange(
            port, "GET", "/system/logs?follow=false&name=echo&since=yesterday"
        )
        assert (code, headers["content-type"]) == (400, "text/plain; charset=utf-8")

        # faas-cli logs echo (follows by default): the history, then a call made meanwhile.
        async def call_again():
            response = await treq.get(base + "/function/echo/later", headers={"X-Call-Id": ["c-later"]})
            await response.content()

        made = []

        def later():
            made.append(defer.ensureDeferred(call_again()))

        headers, followed = await read_lines(
            port, "/system/logs?follow=true&name=echo&tail=-1", 3, then=later
        )
        await made[0]
        assert headers["transfer-encoding"] == "chunked"
        assert [m["text"].split()[0] for m in followed][-1] == "call=c-later"

        # The follower left (its connection closed): its place is free again (--log-followers 1).
        async def free():
            def probe():
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(go_request(port, "GET", "/system/logs?follow=true&name=echo&tail=1"))
                    return Answer(sock).code

            return await deferToThread(probe) == 200 or None

        await wait_for(free, timeout=10, what="the follower's place given back")
    finally:
        await gw.close()
