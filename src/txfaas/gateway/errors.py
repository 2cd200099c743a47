"""The one table from exceptions to answers, for Klein's handlers and the direct routes."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from txfaas.gateway.answers import text
from txfaas.model import ValidationError
from txfaas.queue import QueueUnavailable
from txfaas.store import StoreUnavailable


class HTTPError(Exception):
    """An answer decided by a route: ``code``, a plain-text ``message`` and extra ``headers``."""

    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


#: exception -> (status, message prefix, what a warning calls it or None, Retry-After sent).
TABLE: tuple[tuple[type[Exception], int, str, str | None, bool], ...] = (
    (ValidationError, 400, "", None, False),
    (StoreUnavailable, 503, "function registry unavailable: ", "store unavailable", True),
    (QueueUnavailable, 503, "queue unavailable, call not accepted: ", "queue unavailable", True),
)
#: Every exception the table answers.
KNOWN: tuple[type[Exception], ...] = (HTTPError, *(row[0] for row in TABLE))


class ErrorTable:
    """Answers the exceptions of :data:`KNOWN` as :data:`TABLE` says."""

    log = Logger()

    def __init__(self, retry_after: int = 5) -> None:
        self._retry_after = str(retry_after).encode()

    def answer(self, request: IRequest, error: Any) -> bytes:
        """Set the status and headers for ``error`` (one of :data:`KNOWN`); return the body."""
        if isinstance(error, HTTPError):
            for name, value in error.headers.items():
                request.setHeader(name, value)
            return text(request, error.code, error.message)
        for kind, code, prefix, warning, retry in TABLE:
            if isinstance(error, kind):
                if warning is not None:
                    self.log.warn("{what}: {error}", what=warning, error=error)
                if retry:
                    request.setHeader(b"Retry-After", self._retry_after)
                return text(request, code, f"{prefix}{error}")
        raise TypeError(f"not an answerable error: {error!r}")


def no_function(name: str, namespace: str) -> str:
    return f"function {name!r} not found in namespace {namespace!r}"


def no_namespace(name: str) -> str:
    return f"namespace {name!r} does not exist: create it first (POST /system/namespace/)"
