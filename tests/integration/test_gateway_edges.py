"""A real ``twistd faas-gateway`` on a real socket: the route decided on the decoded path (limits
cannot be bypassed by escaping), heads over the limits answered 414/431, TRACE refused, and the
listen backlog the kernel really uses."""

from __future__ import annotations

import socket
import subprocess

import pytest_twisted
from twisted.internet import threads

from tests.support import TwistdProcess, delete_redis_prefix, free_port, unique

AUTH = ("admin", "edges-pw")


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the gateway closes or 2 s pass (blocking: run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def _backlog(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[2])  # Send-Q of a listening socket: its backlog


@pytest_twisted.ensureDeferred
async def test_edges_on_a_real_socket(redis_url):
    port = free_port()
    prefix = unique("gwedges") + ":"
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
            "memory:",
            "--max-async-body",
            "1000",
            "--max-body",
            "2000",
            "--backlog",
            "2048",
            "--basic-auth",
            "true",
        ],
        env={"TXFAAS_BASIC_AUTH_USER": AUTH[0], "TXFAAS_BASIC_AUTH_PASSWORD": AUTH[1]},
    )
    try:
        await proc.wait_http(f"http://127.0.0.1:{port}/healthz", status=200)
        assert _backlog(port) == 2048

        async def send(data: bytes) -> bytes:
            return await threads.deferToThread(_exchange, port, data)

        for target, limit in [
            (b"/%61sync-function/fn", 1000),
            (b"/async%2Dfunction/fn", 1000),
            (b"/%66unction/fn", 2000),
            (b"/%66%75nction/fn/sub", 2000),
        ]:
            head = b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % (target, limit + 1)
            answer = await send(head)
            assert answer.startswith(b"HTTP/1.1 413 "), (target, answer[:200])
            assert b"over the limit of %d bytes" % limit in answer

        answer = await send(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
        answer = await send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        answer = await send(b"TRACE /function/fn HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 "), answer[:200]
        assert "Traceback" not in proc.output()
    finally:
        await proc.stop()
        await delete_redis_prefix(redis_url, prefix)
