"""Invoking a function: the queued request sent to it, cut off at its exec_timeout.

Cancelling the request's Deferred at the timeout aborts the TCP connection, so the
function sees its caller go.  Every failure is an answer: timeout 504, unreachable 502,
deleted since queued 404, a request no HTTP can carry 400.
"""

from __future__ import annotations

from urllib.parse import quote

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from txfaas.headers import CALL_ID, end_to_end, to_bytes_pairs
from txfaas.http.client import BodyTooLarge, describe, fetch
from txfaas.model import Call, FunctionSpec, ValidationError
from txfaas.worker.config import MAX_FUNCTION_RESPONSE, WorkerConfig
from txfaas.worker.jobs import JobTable

# Request headers the worker sets itself (the body producer sets Content-Length; the
# agent sets Host for the function's own address).
_REQUEST_DROP = frozenset({b"host", b"content-length", CALL_ID.lower()})
_URL_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _URL_SAFE + "?"
_TEXT = [(b"Content-Type", b"text/plain; charset=utf-8")]
_NO_BODY = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})


@attrs.frozen
class FunctionResponse:
    """A function's answer, or the worker's own answer for a call it could not complete."""

    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    error: str | None = None

    @classmethod
    def failed(cls, status_code: int, text: str) -> FunctionResponse:
        """The worker's answer: ``text`` is the body and the recorded error."""
        return cls(status_code, list(_TEXT), text.encode() + b"\n", text)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Invoker:
    """Sends calls to their functions through ``agent``, holding answers in the job table's budget."""

    log = Logger()

    def __init__(self, clock: IReactorTime, config: WorkerConfig, agent: IAgent, table: JobTable) -> None:
        self._clock = clock
        self._config = config
        self._agent = agent
        self._table = table

    def timeout_for(self, spec: FunctionSpec) -> float:
        """The function's own timeout, else the default; never above what the consumer timeout allows."""
        try:
            timeout = spec.timeout or self._config.exec_timeout
        except ValidationError as e:
            self.log.warn("function {name}: {error}; using the default timeout", name=spec.service, error=e)
            timeout = self._config.exec_timeout
        limit = self._config.exec_timeout_limit
        if timeout > limit:
            self.log.warn(
                "function {name}: timeout {t:g}s is above what --consumer-timeout allows; using {limit:g}s",
                name=spec.service,
                t=timeout,
                limit=limit,
            )
            timeout = limit
        return timeout

    def url_for(self, call: Call, spec: FunctionSpec) -> bytes:
        """The function's URL for the call's path and query (through --gateway-url if set)."""
        path = quote(call.path or "/", safe=_URL_SAFE)
        if not path.startswith("/"):
            path = "/" + path
        if self._config.gateway_url:
            base = f"{self._config.gateway_url}/function/{call.ref}"
            url = base if path == "/" else base + path
        else:
            url = spec.base_url(self._config.function_url_template) + path
        if call.query:
            url += "?" + quote(call.query, safe=_QUERY_SAFE)
        return url.encode("ascii")

    async def invoke(self, call: Call, spec: FunctionSpec | None) -> FunctionResponse:
        """Send the call to its function and read the answer; never raises but ``CancelledError``."""
        if spec is None:
            return FunctionResponse.failed(
                404, f"function {call.ref!r} not found (deleted after the call was queued?)"
            )
        try:
            # A queued call can carry what no HTTP request may (a non-ASCII method, say):
            # it fails once, as a 400, rather than coming back until its delivery limit.
            headers = end_to_end(to_bytes_pairs(call.headers), drop=_REQUEST_DROP)
            headers.append((CALL_ID, call.call_id.encode("latin-1")))
            method = call.method.upper().encode("ascii")
            if not method.isalpha():
                raise ValueError(f"invalid method {call.method!r}")
        except (UnicodeEncodeError, ValueError) as e:
            return FunctionResponse.failed(400, f"cannot build the request to function {call.ref!r}: {e}")
        try:
            url = self.url_for(call, spec)
        except (UnicodeEncodeError, KeyError, IndexError, ValueError) as e:
            return FunctionResponse.failed(502, f"cannot build the URL of function {call.ref!r}: {e}")
        body: bytes | None = None if not call.body and method in _NO_BODY else call.body
        return await self._send(call, method, url, headers, body, self.timeout_for(spec))

    async def _send(
        self,
        call: Call,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeout: float,
    ) -> FunctionResponse:
        budget = self._table.answers
        limit = min(MAX_FUNCTION_RESPONSE, budget.capacity)
        d = fetch(self._agent, method, url, headers, body, limit=limit, budget=budget)
        d.addTimeout(timeout, self._clock)
        try:
            raw = await d
        except defer.TimeoutError:
            return FunctionResponse.failed(
                504, f"function {call.ref!r} did not answer within its exec_timeout ({timeout:g}s)"
            )
        except defer.CancelledError:
            raise
        except BodyTooLarge:
            return FunctionResponse.failed(
                502,
                f"function {call.ref!r} answered more than {limit} bytes, the most a worker "
                f"holds of one answer (--max-answer-memory, at most {MAX_FUNCTION_RESPONSE})",
            )
        except Exception as e:
            return FunctionResponse.failed(502, f"function {call.ref!r} unreachable: {describe(e)}")
        self._table.hold(raw.reserved)
        return FunctionResponse(raw.code, raw.headers, raw.body)
