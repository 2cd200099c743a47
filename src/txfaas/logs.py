"""Function logs: the lines, the ``/system/logs`` query, and the invocation log's text.

For a function txfaas does not run, its log is its invocation log: one line per finished
call, written by the gateway (synchronous calls) and the workers (queued ones).  Lines are
sent as faas-provider's ``logs.Message``, one JSON object per line.  Pure: no Twisted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import attrs
import orjson

from txfaas.model import DEFAULT_NAMESPACE, ValidationError, check_name, check_namespace

#: Go's strconv.ParseBool, which faas-provider reads ``follow`` with.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII)


class LogEntry(NamedTuple):
    """One stored line: ``id`` orders them (a Redis stream id, ``<ms>-<seq>``)."""

    id: str
    timestamp: float
    instance: str
    text: str

    def message(self, name: str, namespace: str) -> bytes:
        """faas-provider's ``logs.Message`` as one line of JSON (RFC 3339 time, as Go writes it)."""
        return (
            orjson.dumps(
                {
                    "name": name,
                    "namespace": namespace,
                    "instance": self.instance,
                    "timestamp": rfc3339_micro(self.timestamp),
                    "text": self.text,
                }
            )
            + b"\n"
        )


def rfc3339_micro(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def invocation_line(
    call_id: str | bytes,
    kind: bytes,
    method: str | bytes,
    path: str | bytes,
    status: int,
    duration: float,
    attempt: int,
    error: str | None,
) -> bytes:
    """A call as one logfmt line: ``call=ID kind=sync method=GET path=/ status=200 duration=0.001200s attempt=1``.

    Bytes in, bytes out, in one ``%``: one line per finished call."""
    if call_id.__class__ is not bytes:
        call_id = call_id.encode()  # type: ignore[union-attr]
    if method.__class__ is not bytes:
        method = method.encode()  # type: ignore[union-attr]
    if path.__class__ is not bytes:
        path = path.encode()  # type: ignore[union-attr]
    if b" " in path or b'"' in path or b"\\" in path or b"=" in path:
        path = orjson.dumps(path.decode("latin-1"))
    line = b"call=%s kind=%s method=%s path=%s status=%d duration=%.6fs attempt=%d" % (
        call_id,
        kind,
        method,
        path,
        status,
        duration,
        attempt,
    )
    if error:
        line += b" error=" + orjson.dumps(error)
    return line


@attrs.frozen
class LogQuery:
    """``GET /system/logs?name=&namespace=&instance=&tail=&since=&follow=`` (what faas-cli sends)."""

    name: str
    namespace: str
    instance: str | None = None
    tail: int | None = None  # the last N lines; None: all (faas-cli sends tail=-1 for that)
    since: float | None = None  # Unix time
    follow: bool = False

    @classmethod
    def from_args(
        cls, args: Mapping[bytes, list[bytes]], default_namespace: str = DEFAULT_NAMESPACE
    ) -> LogQuery:
        def arg(name: str) -> str | None:
            values = args.get(name.encode())
            return values[-1].decode("utf-8", "replace") if values else None  # the last, as Go's

        raw_name = arg("name")
        if not raw_name:
            raise ValidationError("name", "the function's name is required (?name=)")
        name, dot, in_name = raw_name.partition(".")
        check_name(name, "name")
        given = arg("namespace")
        if dot and given and given != in_name:
            raise ValidationError("namespace", f"{given!r} does not match the name's {in_name!r}")
        namespace = check_namespace((in_name if dot else given) or default_namespace)
        instance = arg("instance") or None
        tail = None
        raw_tail = arg("tail")
        if raw_tail:
            try:
                tail = int(raw_tail)
            except ValueError:
                raise ValidationError("tail", f"not a whole number: {raw_tail!r}") from None
            if tail <= 0:
                tail = None  # faas-provider: <= 0 means no limit
        since = None
        raw_since = arg("since")
        if raw_since:
            since = parse_rfc3339(raw_since, "since")
        follow = False
        raw_follow = arg("follow")
        if raw_follow:
            if raw_follow in _TRUE:
                follow = True
            elif raw_follow not in _FALSE:
                raise ValidationError("follow", f"not true or false: {raw_follow!r}")
        return cls(name, namespace, instance, tail, since, follow)


def parse_rfc3339(text: str, field: str) -> float:
    """An RFC 3339 time (``2024-05-01T10:00:00Z``, ``...+02:00``, fractions allowed) as Unix time."""
    match = _RFC3339.match(text)
    if not match:
        raise ValidationError(field, f"not an RFC 3339 time like 2024-05-01T10:00:00Z: {text!r}")
    date, clock, fraction, zone = match.groups()
    fraction = (fraction or "")[:7]  # datetime takes at most microseconds
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        return datetime.fromisoformat(f"{date}T{clock}{fraction}{zone}").timestamp()
    except ValueError as e:
        raise ValidationError(field, f"not a valid time: {text!r} ({e})") from None


def parse_entry(entry_id: str, fields: Any) -> LogEntry:
    """A stream entry's fields (a flat ``[k, v, ...]`` list, as XRANGE gives them) as a :class:`LogEntry`
    (``ts`` in Unix microseconds; the entry id's milliseconds without it)."""
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    ts = values.get("ts")
    try:
        timestamp = int(ts) / 1_000_000 if ts is not None else stream_id(entry_id)[0] / 1000
    except ValueError:
        timestamp = stream_id(entry_id)[0] / 1000
    return LogEntry(entry_id, timestamp, str(values.get("instance", "")), str(values.get("text", "")))
