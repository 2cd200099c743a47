"""How the gateway's routes write an answer: plain text, JSON, or a direct route's finish."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.web.iweb import IRequest


def text(request: IRequest, code: int, message: str) -> bytes:
    """``code`` with ``message`` as one line of plain text; returns the body."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return message.encode("utf-8", "replace") + b"\n"


def json(request: IRequest, code: int, data: Any) -> bytes:
    """``code`` with ``data`` as compact JSON (as OpenFaaS's Go encoder writes it)."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    return orjson.dumps(data)


def finish(request: Any, body: bytes) -> None:
    """Write ``body`` and finish: for a route that answers after ``render`` returned.

    The caller knows the client is still there (see :func:`txfaas.gateway.web.when_gone`)."""
    if request.finished:
        return
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
