"""Header and path rules shared by every process: one filter, one call-id rule.

Pure: works on ``(name, value)`` pairs of bytes (as Twisted hands them over)
and on strings; imports nothing from the reactor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers

# RFC 9110 §7.6.1 plus the fixed list OpenFaaS strips; any header named in
# ``Connection:`` is hop-by-hop too (see :func:`end_to_end`).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

CALL_ID = b"X-Call-Id"
START_TIME = b"X-Start-Time"
DURATION = b"X-Duration-Seconds"
CALLBACK_URL = b"X-Callback-Url"
FORWARDED_FOR = b"X-Forwarded-For"
FORWARDED_HOST = b"X-Forwarded-Host"

FUNCTION_STATUS = b"X-Function-Status"
#: The one message for a client's call id that breaks the rule below.
BAD_CALL_ID = "X-Call-Id: invalid (use 1-128 characters of A-Z a-z 0-9 . _ : @ + = -)"

_CALL_ID_RULE = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}\Z")  # not "$": it allows a final "\n"


class _Urandom:
    """``os.urandom``'s bytes, read 4 KiB at a time: a call id costs a slice, not a system
    call.  The same source, so the same unpredictability; a forked child drops what its parent
    had read, so the two never hand out the same bytes."""

    SIZE = 4096

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def take(self, n: int) -> bytes:
        end = self._offset + n
        if end > len(self._buffer):
            self._buffer = os.urandom(max(self.SIZE, n))
            self._offset, end = 0, n
        chunk = self._buffer[self._offset : end]
        self._offset = end
        return chunk

    def forget(self) -> None:
        self._buffer = b""
        self._offset = 0


_urandom = _Urandom()
os.register_at_fork(after_in_child=lambda: _urandom.forget())


def new_call_id() -> str:
    """A random (version 4) UUID as text: ``str(uuid.uuid4())`` without the ``UUID`` object."""
    h = _urandom.take(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# RFC 9562's variant: the top two bits of the clock-sequence byte are 10.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def valid_call_id(value: bytes | str) -> bool:
    """A client may choose its call id: 1-128 characters of ``[A-Za-z0-9._:@+=-]``."""
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return False
    return bool(_CALL_ID_RULE.match(value))


def connection_tokens(pairs: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any ``Connection`` header, lower-cased."""
    names: set[bytes] = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def end_to_end(
    pairs: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers: hop-by-hop ones, those named in ``Connection`` and ``drop`` removed.

    ``drop`` holds lower-cased names the caller sets itself (so they are not duplicated).
    """
    pairs = list(pairs)
    skip = HOP_BY_HOP | connection_tokens(pairs) | drop
    return [(name, value) for name, value in pairs if name.lower() not in skip]


@lru_cache(maxsize=512)
def canonical_name(name: bytes) -> bytes | None:
    """``name`` as ``Headers.getAllRawHeaders`` spells it (Twisted's Header-Case); None for a
    token that is not a header name (it names no header)."""
    headers = Headers()
    try:
        headers.setRawHeaders(name, [b""])
    except ValueError:
        return None
    for canonical, _ in headers.getAllRawHeaders():
        return canonical
    return None


def canonical_names(names: Iterable[bytes]) -> frozenset[bytes]:
    """:func:`canonical_name` of each of ``names``, those that are header names."""
    return frozenset(c for c in map(canonical_name, names) if c is not None)


def end_to_end_raw(incoming: Headers, drop: frozenset[bytes]) -> list[tuple[bytes, Sequence[bytes]]]:
    """:func:`end_to_end` over a ``Headers`` in one pass: ``drop`` (canonical names, see
    :func:`canonical_names`) and every header named in ``Connection`` removed.

    ``getAllRawHeaders`` gives the names in canonical case, and Twisted took line breaks out
    of the values, so no name is lower-cased here and no value looked at.
    """
    connection = incoming.getRawHeaders(b"Connection")
    if connection:
        named = canonical_names(connection_tokens((b"connection", v) for v in connection))
        return [
            (name, values)
            for name, values in incoming.getAllRawHeaders()
            if name not in drop and name not in named
        ]
    return [(name, values) for name, values in incoming.getAllRawHeaders() if name not in drop]


def set_raw(headers: Headers, name: bytes, values: Sequence[bytes]) -> None:
    """``setRawHeaders`` for a canonical ``name`` and values without line breaks."""
    headers.setRawHeaders(name, values)


def update_raw(headers: Headers, pairs: Iterable[tuple[bytes, Sequence[bytes]]]) -> None:
    """:func:`set_raw` for each pair (as :func:`end_to_end_raw` gives them)."""
    for name, values in pairs:
        headers.setRawHeaders(name, values)


def writers() -> tuple[Any, Any]:
    """``(set_raw, update_raw)``: :mod:`txfaas._accel.raw_headers`'s when accelerations are on
    and its probe passes, else the stock ones above."""
    from txfaas import _accel
    from txfaas._accel import raw_headers

    if _accel.enabled() and raw_headers.probe():
        return raw_headers.set_raw, raw_headers.update_raw
    return set_raw, update_raw


def append_forwarded_for(existing: Sequence[bytes], client_ip: bytes) -> bytes:
    """Append the client's address to any ``X-Forwarded-For`` it sent; never trust, never drop."""
    parts = [v.strip() for v in existing if v.strip()]
    parts.append(client_ip)
    return b", ".join(parts)


class BadPath(ValueError):
    """A path segment that could escape the function's URL space."""


def check_subpath(segments: Iterable[bytes]) -> None:
    """Refuse segments that decode to ``.``/``..`` or contain ``/``, ``\\`` or NUL."""
    for raw in segments:
        decoded = unquote_to_bytes(raw)
        if decoded in (b".", b".."):
            raise BadPath(f"path segment {decoded.decode('latin-1')!r} is not allowed")
        for bad, label in ((b"/", "'/'"), (b"\\", "'\\'"), (b"\x00", "NUL")):
            if bad in decoded:
                raise BadPath(f"path segment may not contain {label} (after percent-decoding)")


def raw_subpath(path: bytes, skip: int) -> list[bytes]:
    """The raw (still percent-encoded) segments of ``path`` after its first ``skip`` ones.

    ``raw_subpath(b"/function/echo/a/b%20c", 3) == [b"a", b"b%20c"]`` (the leading empty
    segment counts).  twisted.web's ``postpath`` is percent-decoded, so it cannot be
    forwarded as it is: ``a%2Fb`` would become two segments.
    """
    return path.split(b"/")[skip:]


def to_str_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header bytes -> strings, losslessly (latin-1), for JSON records and queue messages."""
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in pairs]


def to_bytes_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]
