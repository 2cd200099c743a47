"""Header writes straight into ``Headers._rawHeaders`` on the proxy's hot path.

``Headers.setRawHeaders`` encodes the name and splits every value on line breaks; the
proxy's names are already canonical and its values come from Twisted's own parsers (no
line breaks), so that work is only done again.  :func:`probe` checks that the dict is
what ``getRawHeaders``/``getAllRawHeaders`` read, keyed by canonical names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.web.http_headers import Headers


def probe() -> bool:
    """True when ``Headers`` keeps a dict of canonical name -> list of values that its
    public readers answer from."""
    headers = Headers()
    raw = getattr(headers, "_rawHeaders", None)
    if not isinstance(raw, dict):
        return False
    headers.setRawHeaders(b"x-probe-name", [b"a"])
    if raw != {b"X-Probe-Name": [b"a"]}:
        return False
    raw[b"X-Written"] = [b"b", b"c"]
    return (
        headers.getRawHeaders(b"x-written") == [b"b", b"c"]
        and headers.hasHeader(b"X-WRITTEN")
        and dict(headers.getAllRawHeaders()) == {b"X-Probe-Name": [b"a"], b"X-Written": [b"b", b"c"]}
    )


def set_raw(headers: Headers, name: bytes, values: Sequence[bytes]) -> None:
    """``headers.setRawHeaders(name, values)`` for a canonical ``name`` and clean values."""
    headers._rawHeaders[name] = list(values)


def update_raw(headers: Headers, pairs: Iterable[tuple[bytes, Sequence[bytes]]]) -> None:
    """:func:`set_raw` for each pair."""
    raw = headers._rawHeaders
    for name, values in pairs:
        raw[name] = list(values)
