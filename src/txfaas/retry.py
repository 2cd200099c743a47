"""When to try a call (or its callback) again, and how long to wait: pure, no reactor.

Function retries
----------------
A call is tried again when its function answers one of the retry codes
(default 408, 429, 500, 502, 503, 504: the worker's own 502 "unreachable" and
504 "exec_timeout" are among them), up to ``max_attempts`` attempts in all.
The wait before retry ``n`` (1 for the first retry) is drawn uniformly
("full jitter") from ``[min_wait, min(max_wait, min_wait * 2**n)]``; a
``Retry-After`` from the function (seconds, or an HTTP date) replaces the
draw, clamped to ``[min_wait, max_wait]``.

A function overrides the defaults with OpenFaaS Pro's annotations:
``com.openfaas.retry.attempts`` (a whole number), ``com.openfaas.retry.codes``
(comma or space separated), ``com.openfaas.retry.min_wait`` and
``com.openfaas.retry.max_wait`` (durations: ``10``, ``10s``, ``1m30s``, ``500ms``).

Callback retries
----------------
A callback is retried on connection errors and timeouts (no status), on 408,
429, any 5xx and any 3xx (redirects are never followed); 410 stops at once and
so does any other status.  Waits grow the same way, between the callback's own
bounds; the attempts stop at ``max_attempts`` or once the first attempt is
older than ``max_age``.

Delays in RabbitMQ
------------------
Waiting calls sit in delay queues, one per *tier* (every message of a tier
queue has the same TTL, since RabbitMQ expires messages only at the head of a
queue).  :func:`pick_tier` chooses the largest tier not above the wait; the
message carries its due time, and a worker that receives it early sends it
round again for the rest.  So a wait is met to within half the smallest tier
(a rest shorter than that goes at once), at the cost of one extra pass per
hop (a 23-minute wait on the default ladder: 10m, 10m, 2m, 1m, about 5 hops).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Iterable, Mapping

import attrs

from txfaas.config import parse_duration

DEFAULT_CODES = frozenset({408, 429, 500, 502, 503, 504})
#: The delay tiers, in seconds (``--delay-tiers``).
DEFAULT_TIERS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

ATTEMPTS_ANNOTATION = "com.openfaas.retry.attempts"
CODES_ANNOTATION = "com.openfaas.retry.codes"
MIN_WAIT_ANNOTATION = "com.openfaas.retry.min_wait"
MAX_WAIT_ANNOTATION = "com.openfaas.retry.max_wait"

Random = Callable[[], float]


class RetryConfigError(ValueError):
    """A retry setting is invalid.  ``field`` names it (an annotation or a flag)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def parse_codes(value: str | Iterable[int]) -> frozenset[int]:
    """``"429,503"``, ``"429 503"`` or ``[429, 503]`` -> the set of HTTP status codes."""
    if isinstance(value, str):
        items: list[str | int] = [p for p in re.split(r"[\s,]+", value.strip()) if p]
    else:
        items = list(value)
    codes = set()
    for item in items:
        try:
            code = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"not an HTTP status code: {item!r}") from None
        if not 100 <= code <= 599:
            raise ValueError(f"not an HTTP status code: {code}")
        codes.add(code)
    return frozenset(codes)


def parse_tiers(value: str | Iterable[float]) -> tuple[float, ...]:
    """``"1s,5s,30s"`` (durations) -> sorted distinct tiers in seconds, each at least 1 ms."""
    parts = [p for p in re.split(r"[\s,]+", value.strip()) if p] if isinstance(value, str) else list(value)
    if not parts:
        raise ValueError("at least one delay tier is needed")
    tiers = set()
    for part in parts:
        seconds = parse_duration(part)
        if seconds < 0.001:
            raise ValueError(f"a delay tier must be at least 1ms, not {part!r}")
        tiers.add(round(seconds, 3))
    return tuple(sorted(tiers))


def pick_tier(tiers: tuple[float, ...], wait: float) -> float | None:
    """The delay tier to wait in: the largest not above ``wait``; None to go now.

    A wait shorter than half the smallest tier goes at once; one between that and the
    smallest tier waits the smallest tier (overshooting by less than half of it)."""
    if not tiers or wait < tiers[0] / 2:
        return None
    chosen = tiers[0]
    for tier in tiers:
        if tier <= wait:
            chosen = tier
    return chosen


def full_jitter(retry: int, min_wait: float, max_wait: float, random: Random) -> float:
    """The wait before retry number ``retry`` (1 = the first retry)."""
    ceiling = min(max_wait, min_wait * 2 ** min(max(retry, 1), 60))
    ceiling = max(ceiling, min_wait)
    return min_wait + random() * (ceiling - min_wait)


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """A ``Retry-After`` value (seconds, or an HTTP date) as seconds from ``now``; None if unusable."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


@attrs.frozen
class RetryPolicy:
    """How a function's calls are retried (the worker's flags, or a function's annotations)."""

    max_attempts: int = 5
    min_wait: float = 1.0
    max_wait: float = 120.0
    codes: frozenset[int] = DEFAULT_CODES

    def check(self, names: Mapping[str, str] | None = None) -> RetryPolicy:
        """Raise :class:`RetryConfigError` naming the setting (flag or annotation) that is wrong."""
        names = names or {}
        if self.max_attempts < 1:
            raise RetryConfigError(names.get("attempts", "max_attempts"), "must be at least 1")
        if self.min_wait < 0:
            raise RetryConfigError(names.get("min_wait", "min_wait"), "must not be negative")
        if self.max_wait < self.min_wait:
            raise RetryConfigError(names.get("max_wait", "max_wait"), "must not be below the minimum wait")
        return self

    def for_function(self, annotations: Mapping[str, str]) -> RetryPolicy:
        """These defaults, overridden by a function's ``com.openfaas.retry.*`` annotations."""
        changes: dict[str, object] = {}
        raw = annotations.get(ATTEMPTS_ANNOTATION)
        if raw is not None:
            try:
                changes["max_attempts"] = int(raw.strip())
            except ValueError:
                raise RetryConfigError(ATTEMPTS_ANNOTATION, f"not a whole number: {raw!r}") from None
        raw = annotations.get(CODES_ANNOTATION)
        if raw is not None:
            try:
                changes["codes"] = parse_codes(raw)
            except ValueError as e:
                raise RetryConfigError(CODES_ANNOTATION, str(e)) from None
        for key, name in (("min_wait", MIN_WAIT_ANNOTATION), ("max_wait", MAX_WAIT_ANNOTATION)):
            raw = annotations.get(name)
            if raw is not None:
                try:
                    changes[key] = parse_duration(raw)
                except ValueError as e:
                    raise RetryConfigError(name, str(e)) from None
        if not changes:
            return self
        policy = attrs.evolve(self, **changes)  # type: ignore[arg-type]
        # A min_wait above the default max_wait (or the reverse) follows the annotation given.
        if "min_wait" in changes and "max_wait" not in changes and policy.max_wait < policy.min_wait:
            policy = attrs.evolve(policy, max_wait=policy.min_wait)
        if "max_wait" in changes and "min_wait" not in changes and policy.min_wait > policy.max_wait:
            policy = attrs.evolve(policy, min_wait=policy.max_wait)
        return policy.check(
            {
                "attempts": ATTEMPTS_ANNOTATION,
                "min_wait": MIN_WAIT_ANNOTATION,
                "max_wait": MAX_WAIT_ANNOTATION,
            }
        )

    def should_retry(self, status_code: int, attempt: int) -> bool:
        """Is attempt number ``attempt`` (1-based), which answered ``status_code``, tried again?"""
        return status_code in self.codes and attempt < self.max_attempts

    def retryable(self, status_code: int) -> bool:
        return status_code in self.codes

    def wait(self, attempt: int, random: Random, retry_after: float | None = None) -> float:
        """Seconds to wait after attempt ``attempt`` failed (before attempt ``attempt + 1``)."""
        if retry_after is not None:
            return min(max(retry_after, self.min_wait), self.max_wait)
        return full_jitter(attempt, self.min_wait, self.max_wait, random)


GONE = 410


def callback_retryable(status: int | None) -> bool:
    """Is a callback that got ``status`` (None: no answer at all) tried again?"""
    if status is None:
        return True
    return status in (408, 429) or 300 <= status < 400 or 500 <= status < 600


@attrs.frozen
class CallbackPolicy:
    """How callbacks are retried: attempts, age limit, and the wait bounds."""

    max_attempts: int = 10
    max_age: float = 24 * 3600.0
    min_wait: float = 5.0
    max_wait: float = 3600.0

    def should_retry(self, status: int | None, attempt: int, first_at: float, now: float) -> bool:
        """Is callback attempt ``attempt`` (1-based), first tried at ``first_at``, tried again?"""
        return callback_retryable(status) and attempt < self.max_attempts and now - first_at < self.max_age

    def wait(self, attempt: int, random: Random, first_at: float, now: float) -> float | None:
        """Seconds before the next attempt, or None when it would fall after ``max_age``."""
        wait = full_jitter(attempt, self.min_wait, self.max_wait, random)
        left = first_at + self.max_age - now
        if left <= 0:
            return None
        return min(wait, left)
