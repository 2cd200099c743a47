"""The async benchmark's loopback servers: the functions, and the callback receiver.

Run by ``bench/async_bench.py`` as child processes (one per role), so that neither
shares a CPU with the load driver::

    python bench/async_servers.py functions --port P
    python bench/async_servers.py receiver --port P

``functions`` routes on the first path segment (a function's ``url`` is
``http://127.0.0.1:P/<route>``, the worker appends the call's path):

- ``/ok``      answers ``200 ok`` at once (the trivial function);
- ``/sleep``   answers ``200 slept`` after one second (``/sleep?s=0.5`` for another time);
- ``/hang``    never answers; it only counts the request until the caller gives up
  (the worker's exec_timeout aborts the connection) or ``/release`` answers it;
- ``GET /stats``     ``{"hanging": n, "sleeping": n, "served": {...}, "aborted": n}``;
- ``GET /times``     ``{call_id: [arrived, answered], ...}`` of the ``/sleep`` calls (``X-Call-Id``;
  ``time.time()``, the clock of the worker's records): when each reached the function and
  when it was answered (0 until then), so a burst's timeline shows how long the worker took
  to send each call and to take in its answer;
- ``POST /release``  answers every hanging request with ``200 released``.

``receiver`` records every callback: ``POST`` anything with ``X-Call-Id: <batch>.<n>``;
it keeps the arrival time (``time.time()`` when the whole request has been read, the
same clock as the worker's ``startedAt``/``finishedAt``) and ``X-Function-Status``:

- ``GET /count?batch=B``     number of distinct calls of batch ``B`` received so far;
- ``GET /arrivals?batch=B``  ``{call_id: [arrival, status, deliveries], ...}``.

Both speak HTTP/1.1 on asyncio with a small parser of their own (keep-alive, Content-Length
and chunked bodies), like ``async_client.py``, for the same reason: they stand in for a
function and a caller's endpoint that would run elsewhere, yet here they share the machine's
two cores with what is measured.  As twisted.web servers they cost about 1 ms of CPU per
burst call between them, and the function's own accept-and-parse rate (~1,500 new
connections a second) was on the burst's critical path: its requests reached the function
0.3-0.55 s after the worker had started them.

Every listening port has a 4096 backlog: a burst of 1,000 connections must not have
its SYNs dropped (a dropped SYN costs the client a one-second retransmission).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

BACKLOG = 4096
MAX_HEAD = 64 * 1024
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


class BadRequest(Exception):
    pass


class Request:
    """One request, read in full; ``reply`` answers it (at most once, and only while its
    connection is open); ``on_gone`` is called if the connection closes before that."""

    def __init__(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        self.method = method
        self.path, _, query = target.partition(b"?")
        self.args = parse_qs(query.decode("latin-1")) if query else {}
        self.headers = headers  # names lower-cased
        self.body = body
        self.answered = False
        self.on_gone: Callable[[], None] | None = None
        self._send: Callable[[int, bytes, bytes], None] | None = None

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    def reply(self, body: bytes, status: int = 200, content_type: bytes = b"text/plain") -> None:
        if self.answered:
            return
        self.answered = True
        if self._send is not None:
            self._send(status, body, content_type)


def _json(request: Request, data: Any) -> None:
    request.reply(json.dumps(data).encode(), content_type=b"application/json")


def parse_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, bytes]]:
    """Method, target, version and lower-cased headers of a request head (no final blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadRequest(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


class Connection(asyncio.Protocol):
    """HTTP/1.1 server side of one connection: one request at a time, answered in order."""

    def __init__(self, handle: Callable[[Request], None]) -> None:
        self._handle = handle
        self._buffer = b""
        self._transport: Any = None
        self._current: Request | None = None  # being answered
        self._close_after = False
        self._reading = False  # in _next (an answer given at once must not recurse into it)

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._current is None:
            self._next()

    def _next(self) -> None:
        if self._reading:
            return
        self._reading = True
        try:
            while self._current is None and self._transport is not None:
                try:
                    request = self._parse()
                except (BadRequest, ValueError) as e:
                    self._write(400, str(e).encode() + b"\n", b"text/plain", close=True)
                    return
                if request is None:
                    return
                self._current = request
                request._send = self._answer
                self._handle(request)
        finally:
            self._reading = False

    def _parse(self) -> Request | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise BadRequest("request head too long")
            return None
        method, target, version, headers = parse_head(buffer[:end])
        at = end + 4
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while True:
                line_end = buffer.find(b"\r\n", at)
                if line_end < 0:
                    return None
                size = int(buffer[at:line_end].split(b";")[0], 16)
                if size == 0:
                    trailer_end = buffer.find(b"\r\n\r\n", line_end)
                    if buffer[line_end : line_end + 4] == b"\r\n\r\n":
                        at = line_end + 4
                    elif trailer_end < 0:
                        return None
                    else:
                        at = trailer_end + 4
                    break
                if len(buffer) < line_end + 2 + size + 2:
                    return None
                chunks.append(buffer[line_end + 2 : line_end + 2 + size])
                at = line_end + 2 + size + 2
            body = b"".join(chunks)
        else:
            length = int(headers.get(b"content-length", b"0"))
            if len(buffer) < at + length:
                return None
            body = buffer[at : at + length]
            at += length
        self._buffer = buffer[at:]
        connection = headers.get(b"connection", b"").lower()
        self._close_after = version == b"HTTP/1.0" or connection == b"close"
        return Request(method, target, headers, body)

    def _answer(self, status: int, body: bytes, content_type: bytes) -> None:
        self._current = None
        self._write(status, body, content_type, close=self._close_after)
        if self._buffer:
            self._next()

    def _write(self, status: int, body: bytes, content_type: bytes, close: bool) -> None:
        if self._transport is None:
            return
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            _REASONS.get(status, b"Unknown"),
            content_type,
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
        self._transport.write(head + body)
        if close:
            self._transport.close()
            self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        current, self._current = self._current, None
        if current is not None and not current.answered and current.on_gone is not None:
            current.on_gone()


class Functions:
    def __init__(self, call_later: Callable[[float, Callable[[], None]], Any]) -> None:
        self._call_later = call_later
        self.hanging: set[Request] = set()
        self.sleeping = 0
        self.served: Counter[str] = Counter()
        self.aborted = 0
        self.times: dict[str, list[float]] = {}

    def handle(self, request: Request) -> None:
        parts = request.path.split(b"/")
        route = parts[1].decode("latin-1") if len(parts) > 1 else ""
        if route == "ok":
            self.served["ok"] += 1
            request.reply(b"ok")
        elif route == "sleep":
            self._sleep(request)
        elif route == "hang":
            self._hang(request)
        elif route == "stats":
            _json(
                request,
                {
                    "hanging": len(self.hanging),
                    "sleeping": self.sleeping,
                    "served": dict(self.served),
                    "aborted": self.aborted,
                },
            )
        elif route == "times":
            _json(request, self.times)
        elif route == "release" and request.method == b"POST":
            released = 0
            for waiting in list(self.hanging):
                self.hanging.discard(waiting)
                waiting.reply(b"released")
                self.served["hang"] += 1
                released += 1
            _json(request, {"released": released})
        else:
            request.reply(b"no such function\n", 404)

    def _sleep(self, request: Request) -> None:
        seconds = float((request.args.get("s") or ["1"])[0])
        call_id = (request.header(b"x-call-id") or b"?").decode("latin-1")
        times = self.times[call_id] = [time.time(), 0.0]
        self.sleeping += 1

        def wake() -> None:
            if request.answered:
                return  # gone meanwhile
            self.sleeping -= 1
            self.served["sleep"] += 1
            times[1] = time.time()
            request.reply(b"slept")

        timer = self._call_later(seconds, wake)

        def gone() -> None:
            timer.cancel()
            request.answered = True
            self.sleeping -= 1
            self.aborted += 1

        request.on_gone = gone

    def _hang(self, request: Request) -> None:
        self.hanging.add(request)

        def gone() -> None:
            self.hanging.discard(request)
            self.aborted += 1

        request.on_gone = gone


class Receiver:
    def __init__(self) -> None:
        # batch -> call id -> [arrival, status, deliveries]
        self.batches: dict[str, dict[str, list[Any]]] = {}

    def handle(self, request: Request) -> None:
        if request.method == b"POST":
            self._callback(request)
            return
        batch = (request.args.get("batch") or [""])[0]
        got = self.batches.get(batch, {})
        if request.path == b"/count":
            _json(request, {"count": len(got)})
        elif request.path == b"/arrivals":
            _json(request, got)
        else:
            request.reply(b"GET /count or /arrivals\n", 404)

    def _callback(self, request: Request) -> None:
        arrived = time.time()
        call_id = (request.header(b"x-call-id") or b"?").decode("latin-1")
        status = request.header(b"x-function-status")
        batch = self.batches.setdefault(call_id.rpartition(".")[0], {})
        seen = batch.get(call_id)
        if seen is None:
            batch[call_id] = [arrived, int(status) if status and status.isdigit() else None, 1]
        else:
            seen[2] += 1
        request.reply(b"ok")


async def serve(role: str, port: int, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    app = Functions(loop.call_later) if role == "functions" else Receiver()
    server = await loop.create_server(
        lambda: Connection(app.handle), host, port, backlog=BACKLOG, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["functions", "receiver"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address to listen on [127.0.0.1]")
    args = parser.parse_args(argv)
    if not args.host.startswith("127."):
        parser.error("--host must be a loopback address (127.x.x.x)")
    asyncio.run(serve(args.role, args.port, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
