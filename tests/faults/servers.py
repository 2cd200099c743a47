"""The function under load and the callback receiver: loopback Twisted web servers that
write what they see into the :class:`~tests.faults.ledger.Ledger`.

The driver sends :func:`payload` as each call's body; the function answers
:func:`answer` after a short random delay (so a SIGKILL of a worker lands while calls
are running); the receiver checks that each callback carries that answer.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from tests.faults.ledger import Ledger

UP = "up"
ERROR = "error"
DOWN = "down"


def payload(call_id: str) -> bytes:
    """The request body the driver sends for ``call_id``."""
    return f"payload:{call_id}".encode()


def answer(call_id: str) -> bytes:
    """The function's answer for ``call_id`` (what its callback must carry)."""
    return f"done:{call_id}".encode()


def _call_id(request: server.Request) -> str:
    value = request.getHeader(b"x-call-id")
    return value.decode("latin-1") if value else "<no X-Call-Id>"


class FunctionServer(resource.Resource):
    """Records every execution, answers ``answer(call_id)`` after ``delay`` seconds (random)."""

    isLeaf = True
    log = Logger()

    def __init__(self, reactor: Any, ledger: Ledger, delay: tuple[float, float], seed: int = 0) -> None:
        super().__init__()
        self._reactor = reactor
        self._ledger = ledger
        self._delay = delay
        self._random = random.Random(seed)
        #: Requests received whose answer has not been written yet.
        self.running = 0

    def render_POST(self, request: server.Request) -> Any:
        call_id = _call_id(request)
        execution = self._ledger.execution(
            call_id, self._reactor.seconds(), body_ok=request.content.read() == payload(call_id)
        )
        self.running += 1
        timer = self._reactor.callLater(self._random.uniform(*self._delay), self._finish, request, call_id)

        def gone(_: Any) -> None:
            if timer.active():
                timer.cancel()
                self.running -= 1

        def written(_: Any) -> None:
            execution.completed = True

        request.notifyFinish().addCallbacks(written, gone)
        return server.NOT_DONE_YET

    def _finish(self, request: server.Request, call_id: str) -> None:
        self.running -= 1
        if request._disconnected:
            return
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/plain")
        request.write(answer(call_id))
        request.finish()


class CallbackReceiver(resource.Resource):
    """Records every callback; answers 200 (``up``) or 503 (``error``), or is not listening (``down``)."""

    isLeaf = True
    log = Logger()

    def __init__(self, reactor: Any, ledger: Ledger) -> None:
        super().__init__()
        self._reactor = reactor
        self._ledger = ledger
        self.mode = UP
        self.port = 0
        self._listening: Any = None

    def listen(self, port: int = 0) -> int:
        site = server.Site(self)
        site.noisy = False
        site.displayTracebacks = False
        self._listening = self._reactor.listenTCP(port or self.port, site, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    async def down(self) -> None:
        """Stop listening: callbacks are refused."""
        self.mode = DOWN
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await listening.stopListening()

    def error(self) -> None:
        """Listen again, and answer every callback 503."""
        self.mode = ERROR
        if self._listening is None:
            self.listen(self.port)

    def up(self) -> None:
        """Listen, and answer every callback 200."""
        self.mode = UP
        if self._listening is None:
            self.listen(self.port)

    async def close(self) -> None:
        await self.down()

    def render_POST(self, request: server.Request) -> bytes:
        call_id = _call_id(request)
        status = 503 if self.mode == ERROR else 200
        body_ok = request.content.read() == answer(call_id)
        self._ledger.arrival(call_id, self._reactor.seconds(), status, body_ok)
        request.setResponseCode(status)
        return b"ok" if status == 200 else b"try later"


async def stop_listening(port: Any) -> None:
    """``port.stopListening()`` as an awaitable (it may return None or a Deferred)."""
    await defer.maybeDeferred(port.stopListening)
