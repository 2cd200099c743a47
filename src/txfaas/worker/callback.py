"""Callback delivery: POST the function's answer to the caller's ``X-Callback-Url``.

The receiver gets the function's body and headers (exact bytes, hop-by-hop headers
dropped) with ``X-Call-Id``, ``X-Function-Name``, ``X-Function-Status``,
``X-Duration-Seconds``, ``X-Retry`` and ``X-Retry-Max``; with ``--callback-secret``, also the
`Standard Webhooks <https://www.standardwebhooks.com/>`_ headers (``webhook-id`` is the call id,
so a receiver can drop duplicates).  The README shows a receiver's check.

Redirects are never followed, a fragment is never sent, and every new connection goes through
:func:`txfaas.http.ssrf.callback_agent`, which resolves and checks the host again.
:class:`CallbackDelivery` makes one attempt and says whether a failure is worth another; the
worker retries through the callback queue (:mod:`txfaas.worker.callback_jobs`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from txfaas.headers import CALL_ID, DURATION, FUNCTION_STATUS, end_to_end
from txfaas.http.client import Pairs, describe, fetch
from txfaas.http.ssrf import CallbackRefused, parse_callback_url
from txfaas.retry import callback_retryable

FUNCTION_NAME = b"X-Function-Name"
RETRY = b"X-Retry"
RETRY_MAX = b"X-Retry-Max"
WEBHOOK_ID = b"webhook-id"
WEBHOOK_TIMESTAMP = b"webhook-timestamp"
WEBHOOK_SIGNATURE = b"webhook-signature"

# Headers the worker sets itself: the function's own values for them are dropped.
_OURS = frozenset(
    name.lower()
    for name in (
        CALL_ID,
        FUNCTION_NAME,
        FUNCTION_STATUS,
        DURATION,
        RETRY,
        RETRY_MAX,
        WEBHOOK_ID,
        WEBHOOK_TIMESTAMP,
        WEBHOOK_SIGNATURE,
        b"Content-Length",
        b"Host",
    )
)

DELIVERED = "delivered"
FAILED = "failed"


def parse_signing_secret(text: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` is decoded (Standard Webhooks); anything else is UTF-8 text."""
    text = text.strip()
    if not text:
        raise ValueError("empty signing secret")
    if text.startswith("whsec_"):
        try:
            key = base64.b64decode(text[6:], validate=True)
        except ValueError:
            raise ValueError("a whsec_ secret must be followed by base64") from None
        if not key:
            raise ValueError("empty signing secret")
        return key
    return text.encode("utf-8")


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def verify(key: bytes, headers: Mapping[str, str], body: bytes, now: float, tolerance: float = 300) -> str:
    """Check a signed callback as a receiver would; return the call id or raise :class:`ValueError`."""
    try:
        msg_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"]
    except (KeyError, ValueError):
        raise ValueError("missing or malformed webhook headers") from None
    if abs(now - timestamp) > tolerance:
        raise ValueError("timestamp outside the tolerance")
    expected = sign(key, msg_id, timestamp, body)
    for candidate in signatures.split():
        if hmac.compare_digest(candidate, expected):
            return msg_id
    raise ValueError("no valid signature")


@attrs.frozen
class Callback:
    """One callback to deliver: where, for which call, and the function's answer."""

    url: str
    call_id: str
    function: str
    status_code: int
    headers: Pairs = attrs.field(factory=list)
    body: bytes = b""
    duration: float = 0.0
    #: ``X-Retry`` / ``X-Retry-Max`` (left out when None).
    retries: int | None = None
    max_retries: int | None = None


@attrs.frozen
class CallbackOutcome:
    """How one delivery attempt ended."""

    state: str  # DELIVERED or FAILED
    status: int | None = None  # the receiver's HTTP status, when it answered
    error: str | None = None
    #: Is a failure worth another attempt (no answer, 408, 429, 3xx, 5xx)?
    retryable: bool = False

    @property
    def delivered(self) -> bool:
        return self.state == DELIVERED


class CallbackDelivery:
    """Delivers one callback, once, within a timeout.  Success is a 2xx answer.

    ``agent`` must come from :func:`txfaas.http.ssrf.callback_agent` (that checks the address
    of every new connection); only ``tap.py`` builds it.  It is given the absolute URL without
    its fragment.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        agent: IAgent,
        *,
        timeout: float = 10.0,
        signing_key: bytes | None = None,
    ) -> None:
        self._clock = clock
        self._agent = agent
        self._timeout = timeout
        self._key = signing_key

    def headers_for(self, callback: Callback) -> Pairs:
        """The request's headers: the function's end-to-end ones, ours, and the signature."""
        headers = end_to_end(callback.headers, drop=_OURS)
        headers += [
            (CALL_ID, callback.call_id.encode("latin-1")),
            (FUNCTION_NAME, callback.function.encode("latin-1")),
            (FUNCTION_STATUS, str(callback.status_code).encode("ascii")),
            (DURATION, f"{callback.duration:.6f}".encode("ascii")),
        ]
        if callback.retries is not None:
            headers.append((RETRY, str(callback.retries).encode("ascii")))
        if callback.max_retries is not None:
            headers.append((RETRY_MAX, str(callback.max_retries).encode("ascii")))
        if self._key is not None:
            timestamp = int(self._clock.seconds())
            headers += [
                (WEBHOOK_ID, callback.call_id.encode("latin-1")),
                (WEBHOOK_TIMESTAMP, str(timestamp).encode("ascii")),
                (
                    WEBHOOK_SIGNATURE,
                    sign(self._key, callback.call_id, timestamp, callback.body).encode("ascii"),
                ),
            ]
        return headers

    async def deliver(self, callback: Callback) -> CallbackOutcome:
        """POST the callback; never raises except :class:`CancelledError` (the worker is stopping)."""
        try:
            parse_callback_url(callback.url)
            # A fragment is never sent.
            url = callback.url.split("#", 1)[0].encode("ascii")
        except (CallbackRefused, UnicodeEncodeError) as e:
            return self._failed(callback, f"bad callback URL: {e}", retryable=False)
        # Only the receiver's status matters: read at most a little of its body (a hostile
        # receiver could otherwise stream gigabytes into the worker).
        d = fetch(
            self._agent, b"POST", url, self.headers_for(callback), callback.body, limit=4096, keep_head=True
        )
        d.addTimeout(self._timeout, self._clock)
        try:
            response = await d
        except defer.TimeoutError:
            return self._failed(callback, f"no answer within {self._timeout:g}s", retryable=True)
        except defer.CancelledError:
            raise
        except Exception as e:
            # Connection errors (an address the policy refuses looks like a name that does not
            # resolve: it may resolve elsewhere later) are worth another attempt.
            return self._failed(callback, describe(e), retryable=True)
        if 200 <= response.code < 300:
            # No log line per delivery (twistd writes every level): the record and metrics say it.
            return CallbackOutcome(DELIVERED, response.code)
        return self._failed(
            callback,
            f"receiver answered {response.code}",
            retryable=callback_retryable(response.code),
            status=response.code,
        )

    def _failed(
        self, callback: Callback, error: str, *, retryable: bool, status: int | None = None
    ) -> CallbackOutcome:
        self.log.warn(
            "call {call_id}: callback to {url} failed: {error}",
            call_id=callback.call_id,
            url=callback.url,
            error=error,
        )
        return CallbackOutcome(FAILED, status, error, retryable)
