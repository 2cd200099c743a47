"""The load driver: posts N asynchronous calls at a steady rate, at most ``concurrency`` at once.

Each call has its own ``X-Call-Id`` and the receiver's ``X-Callback-Url``; the gateway's
answer is written into the ledger: ``"202"``, another status code (``"503"``, ``"400"``...),
``"timeout"`` (no answer within ``timeout`` seconds) or ``"error"`` (connection refused/reset).
With ``retry`` (the default) a client that got no answer, a 5xx or a 409 (its id still being
accepted) posts again under the same id, as a careful client would, until it gets a 202 or
``give_up`` seconds have passed; every answer is kept (``Ledger.posts``).  A call that was
never accepted may still run ("recovered").
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from tests.faults.ledger import Ledger, unknown_outcome
from tests.faults.servers import payload


class LoadDriver:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        ledger: Ledger,
        url: str,
        callback_url: str,
        *,
        rate: float,
        concurrency: int,
        timeout: float = 10.0,
        run_id: str = "c",
        retry: bool = True,
        give_up: float = 120.0,
    ) -> None:
        self._reactor = reactor
        self._ledger = ledger
        self._url = url
        self._callback_url = callback_url
        self._rate = rate
        self._timeout = timeout
        self._run_id = run_id
        self._retry = retry
        self._give_up = give_up
        self._slots = defer.DeferredSemaphore(concurrency)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        self._pool.retryAutomatically = False  # a retried POST would hide what the gateway answered
        self._http = HTTPClient(Agent(reactor, pool=self._pool))
        self.sent = 0
        self.answered = 0
        self.retries = 0

    def call_id(self, i: int) -> str:
        return f"{self._run_id}-{i:06d}"

    async def run(self, n: int) -> float:
        """Send ``n`` calls; return once every one has its answer (the seconds it took)."""
        start = self._reactor.seconds()
        pending = []
        for i in range(n):
            wait = start + i / self._rate - self._reactor.seconds()
            if wait > 0:
                await task.deferLater(self._reactor, wait, lambda: None)
            await self._slots.acquire()
            call_id = self.call_id(i)
            self.sent += 1
            d = defer.Deferred.fromCoroutine(self._send(call_id))
            d.addErrback(self._crashed, call_id)
            d.addBoth(self._done)
            pending.append(d)
        await defer.gatherResults(pending)
        return self._reactor.seconds() - start

    def _done(self, _: Any) -> None:
        self.answered += 1
        self._slots.release()

    def _crashed(self, failure: Any, call_id: str) -> None:
        self.log.failure("driver: sending {call_id} crashed", failure, call_id=call_id)
        self._ledger.sent.setdefault(call_id, "error")

    async def _send(self, call_id: str) -> None:
        self._ledger.sent[call_id] = "timeout"  # until the gateway answers
        answers = self._ledger.posts.setdefault(call_id, [])
        give_up = self._reactor.seconds() + self._give_up
        while True:
            answer, retry_after = await self._post(call_id)
            answers.append(answer)
            self._ledger.sent[call_id] = answer
            if not (self._retry and _retryable(answer)) or self._reactor.seconds() > give_up:
                return
            wait = min(0.25 * 2 ** min(len(answers) - 1, 3), 2.0)
            if retry_after is not None:
                wait = max(wait, min(retry_after, 5.0))
            self.retries += 1
            await task.deferLater(self._reactor, wait, lambda: None)

    async def _post(self, call_id: str) -> tuple[str, float | None]:
        """One post: the answer, and its Retry-After in seconds (if any)."""
        d = self._http.post(
            self._url,
            data=payload(call_id),
            headers={
                "X-Call-Id": call_id,
                "X-Callback-Url": self._callback_url,
                "Content-Type": "text/plain",
            },
        )
        d.addCallback(lambda response: response.content().addCallback(lambda _: response))
        d.addTimeout(self._timeout, self._reactor)
        try:
            response = await d
        except defer.TimeoutError:
            return "timeout", None
        except Exception as e:
            self.log.debug("{call_id}: {error}", call_id=call_id, error=e)
            return "error", None
        retry_after = None
        for value in response.headers.getRawHeaders(b"retry-after", []):
            try:
                retry_after = float(value)
            except ValueError:
                pass
        return str(response.code), retry_after

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _retryable(answer: str) -> bool:
    """No answer, a 5xx, or 409 (the id is still being accepted): the outcome is not known yet."""
    return unknown_outcome(answer) or answer == "409"
