"""Reading a request: JSON bodies, query arguments, call ids, and whether the client left."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from txfaas import headers as hdr
from txfaas.gateway.errors import HTTPError
from txfaas.model import ValidationError

SYSTEM_BODY_LIMIT = 1024 * 1024


def read_json(request: IRequest) -> Any:
    """The body as strict JSON: 413 past :data:`SYSTEM_BODY_LIMIT`, 400 when empty or invalid."""
    raw = request.content.read(SYSTEM_BODY_LIMIT + 1)
    if len(raw) > SYSTEM_BODY_LIMIT:
        raise HTTPError(413, f"request body over {SYSTEM_BODY_LIMIT} bytes")
    if not raw.strip():
        raise ValidationError("", "a JSON body is required")
    try:
        # orjson: strict JSON (no NaN), nesting at most 1024 deep, no lone surrogate, and an
        # integer past 64 bits read as a float -- what it cannot store later is refused now.
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValidationError("", f"the body is not valid JSON: {e}") from None


def query_arg(request: IRequest, name: bytes) -> str | None:
    """The last ``?name=`` given, or None."""
    values = request.args.get(name)
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def int_arg(request: IRequest, name: bytes, default: int, low: int, high: int | None) -> int:
    """``?name=`` as a whole number from ``low`` to ``high``; ``default`` when absent or empty."""
    raw = query_arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name.decode(), f"not a whole number: {raw!r}") from None
    if value < low or (high is not None and value > high):
        limits = f"from {low}" + (f" to {high}" if high is not None else "")
        raise ValidationError(name.decode(), f"must be {limits}")
    return value


def check_call_id(call_id: str) -> str:
    """A call id from a path: 400 unless it follows the call-id rule."""
    if not hdr.valid_call_id(call_id):
        raise HTTPError(400, f"invalid call id {call_id!r}")
    return call_id


def call_id_of(request: IRequest) -> str:
    """The client's ``X-Call-Id`` (400 if invalid), or a new one."""
    given = request.getHeader(hdr.CALL_ID)
    if given is None:
        return hdr.new_call_id()
    if not hdr.valid_call_id(given):
        raise HTTPError(400, hdr.BAD_CALL_ID)
    return given.decode("ascii")


def method_of(request: IRequest) -> str:
    return request.method.decode("latin-1")


def path_of(request: IRequest) -> str:
    return request.path.decode("utf-8", "replace")


def when_gone(request: Any, gone: Callable[[Failure], object]) -> None:
    """``gone(reason)`` once the client went away before the response was finished.

    The site's requests offer ``whenGone`` (no Deferred per call); any other request
    takes ``notifyFinish``'s errback."""
    hook = getattr(request, "whenGone", None)
    if hook is not None:
        hook(gone)
    else:
        request.notifyFinish().addErrback(gone)


class Presence:
    """Whether a request's client is still there, as ``notifyFinish`` tells it."""

    def __init__(self, request: Any) -> None:  # a twisted.web.server.Request
        self.gone = False
        request.notifyFinish().addErrback(self._left)

    def _left(self, _reason: Failure) -> None:
        self.gone = True
