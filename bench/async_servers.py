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
- ``POST /release``  answers every hanging request with ``200 released``.

``receiver`` records every callback: ``POST`` anything with ``X-Call-Id: <batch>.<n>``;
it keeps the arrival time (``time.time()`` when the whole request has been read, the
same clock as the worker's ``startedAt``/``finishedAt``) and ``X-Function-Status``:

- ``GET /count?batch=B``     number of distinct calls of batch ``B`` received so far;
- ``GET /arrivals?batch=B``  ``{call_id: [arrival, status, deliveries], ...}``.

Every listening port has a 4096 backlog: a burst of 1,000 connections must not have
its SYNs dropped (a dropped SYN costs the client a one-second retransmission).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from twisted.python.failure import Failure
from twisted.web import resource, server

BACKLOG = 4096


class QuietSite(server.Site):
    """No access log: writing one line per request would cost the servers CPU we do not measure."""

    def log(self, request: server.Request) -> None:
        pass


def _json(request: server.Request, data: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(data).encode()


class Functions(resource.Resource):
    isLeaf = True

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self._clock = clock
        self.hanging: set[server.Request] = set()
        self.sleeping = 0
        self.served: Counter[str] = Counter()
        self.aborted = 0

    def render(self, request: server.Request) -> Any:
        parts = request.path.split(b"/")
        route = parts[1].decode("latin-1") if len(parts) > 1 else ""
        request.content.read()
        if route == "ok":
            self.served["ok"] += 1
            return b"ok"
        if route == "sleep":
            return self._sleep(request)
        if route == "hang":
            return self._hang(request)
        if route == "stats":
            return _json(
                request,
                {
                    "hanging": len(self.hanging),
                    "sleeping": self.sleeping,
                    "served": dict(self.served),
                    "aborted": self.aborted,
                },
            )
        if route == "release" and request.method == b"POST":
            released = 0
            for waiting in list(self.hanging):
                self.hanging.discard(waiting)
                waiting.write(b"released")
                waiting.finish()
                released += 1
            return _json(request, {"released": released})
        request.setResponseCode(404)
        return b"no such function\n"

    def _sleep(self, request: server.Request) -> Any:
        seconds = float((request.args.get(b"s") or [b"1"])[0])
        self.sleeping += 1

        def wake() -> None:
            self.sleeping -= 1
            self.served["sleep"] += 1
            request.write(b"slept")
            request.finish()

        timer = self._clock.callLater(seconds, wake)

        def gone(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
                self.sleeping -= 1
            self.aborted += 1

        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET

    def _hang(self, request: server.Request) -> Any:
        self.hanging.add(request)

        def gone(failure: Failure) -> None:
            self.hanging.discard(request)
            self.aborted += 1

        def done(_: Any) -> None:
            self.served["hang"] += 1

        request.notifyFinish().addCallbacks(done, gone)
        return server.NOT_DONE_YET


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        # batch -> call id -> [arrival, status, deliveries]
        self.batches: dict[str, dict[str, list[Any]]] = {}

    def render_POST(self, request: server.Request) -> bytes:
        arrived = time.time()
        request.content.read()
        call_id = (request.getHeader(b"X-Call-Id") or b"?").decode("latin-1")
        status = request.getHeader(b"X-Function-Status")
        batch = self.batches.setdefault(call_id.rpartition(".")[0], {})
        seen = batch.get(call_id)
        if seen is None:
            batch[call_id] = [arrived, int(status) if status and status.isdigit() else None, 1]
        else:
            seen[2] += 1
        return b"ok"

    def render_GET(self, request: server.Request) -> bytes:
        batch = (request.args.get(b"batch") or [b""])[0].decode("latin-1")
        got = self.batches.get(batch, {})
        if request.path == b"/count":
            return _json(request, {"count": len(got)})
        if request.path == b"/arrivals":
            return _json(request, got)
        request.setResponseCode(404)
        return b"GET /count or /arrivals\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["functions", "receiver"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    root = Functions(reactor) if args.role == "functions" else Receiver()
    reactor.listenTCP(args.port, QuietSite(root), backlog=BACKLOG, interface="127.0.0.1")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
