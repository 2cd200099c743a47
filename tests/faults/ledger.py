"""The ledger of ``reliability.md``: what was sent, executed, called back and recorded.

Pure bookkeeping, no I/O: the servers and the driver fill a :class:`Ledger`;
:func:`summarize` turns it into a :class:`Summary`; :func:`table` prints it.

Definitions (all over call ids; times are seconds on the run's one clock):

- **accepted**: the gateway answered 202 (sent only after the broker confirmed).
- **lost**: accepted, and none of: a callback answered 2xx by the receiver; a
  ``dead_lettered`` status (or callback state); a final failed status.  A final
  record whose callback delivery ended in a recorded failure (``callbackState:
  failed``) is lost with ``strict_callbacks`` (the runner's default: exhausted
  callback retries end ``dead_lettered``, so a given-up callback means the receiver
  said stop, which the suite's receiver never does); without it, it counts as a
  final failed status, visible where the client looks (``GET /system/calls/{id}``).
  Either way it is counted on its own line (``callbacks given up``).  Everything else is lost: no
  record, a record that never became final, or one that says its callback was
  delivered when none arrived.
- **unexpected**: callbacks (or executions) for call ids never sent.
- **duplicate executions / callbacks**: a call id the function saw more than
  once / the receiver answered 2xx more than once.  Each is *explained* when a
  crash window (a worker or gateway SIGKILL, an AMQP connection cut, a broker
  restart) lies between the first and the last one, when the client posted it
  again after an answer that left the outcome unknown (none, or a 5xx), or
  (executions only) when an earlier execution was cut off before its answer was
  written; the rest are flagged.
- **client retries**: posts after the first (the driver retries under the same
  ``X-Call-Id`` until it gets a 202).
- **corrupt**: a sent call whose function request or callback carried a body
  that was not the one sent (poison is not held to it: it was never sent).
- **recovered**: not accepted (503, 4xx, timeout, connection error), yet it ran.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import attrs

FINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "dead_lettered"})
FAILED_FINAL = frozenset({"failed", "timed_out", "cancelled", "dead_lettered"})
DEAD_LETTERED = "dead_lettered"
ACCEPTED = "202"
#: How far apart two clocks' readings of one instant may be (all are this process's clock).
SLACK = 0.25


@attrs.define
class Execution:
    """One request the function received for a call id."""

    at: float
    #: The function wrote its whole answer (False: the worker went away first).
    completed: bool = False
    #: The request body was the one the driver sent for this call id.
    body_ok: bool = True


@attrs.define
class Arrival:
    """One callback request the receiver saw."""

    at: float
    #: The status the receiver answered (2xx: accepted by the receiver).
    answered: int
    #: The body was the function's answer for this call id.
    body_ok: bool = True

    @property
    def accepted(self) -> bool:
        return 200 <= self.answered < 300


@attrs.define
class FaultEvent:
    """One injected fault.  ``crash`` is the interval in which deliveries may have been lost
    with a worker or a connection (so a call may run twice); None for faults that should not
    cause redelivery (Redis paused, callback receiver down, poison)."""

    kind: str
    started: float
    ended: float
    detail: str = ""
    crash: tuple[float, float] | None = None


@attrs.define
class Ledger:
    """Everything a run observed."""

    #: call id -> the gateway's (last) answer: "202", "503", "400", ..., "timeout", "error".
    sent: dict[str, str] = attrs.field(factory=dict)
    #: call id -> every answer to its posts, in order (more than one: the client retried).
    posts: dict[str, list[str]] = attrs.field(factory=dict)
    executions: dict[str, list[Execution]] = attrs.field(factory=dict)
    callbacks: dict[str, list[Arrival]] = attrs.field(factory=dict)
    #: call id -> the last ``GET /system/calls/{id}`` JSON, None when it answered 404.
    records: dict[str, dict[str, Any] | None] = attrs.field(factory=dict)
    events: list[FaultEvent] = attrs.field(factory=list)
    #: poison call id -> kind ("undecodable", "unprocessable").
    poison: dict[str, str] = attrs.field(factory=dict)
    #: "undecodable message" lines found in the workers' logs.
    undecodable_rejections: int = 0
    #: call id -> reason, from ``GET /system/dead-letters``; None when the gateway has no such list.
    dead_letters: dict[str, str] | None = None
    #: queue name -> messages ready at the end (work queue, and any dead-letter queue seen).
    queues: dict[str, int] = attrs.field(factory=dict)
    #: Calls the workers held (``txfaas_worker_calls_in_flight``) when the drain ended; None: unknown.
    held: int | None = None
    load_seconds: float = 0.0
    drain_seconds: float | None = None
    drained: bool = False

    def execution(self, call_id: str, at: float, body_ok: bool = True) -> Execution:
        e = Execution(at, body_ok=body_ok)
        self.executions.setdefault(call_id, []).append(e)
        return e

    def arrival(self, call_id: str, at: float, answered: int, body_ok: bool = True) -> Arrival:
        a = Arrival(at, answered, body_ok)
        self.callbacks.setdefault(call_id, []).append(a)
        return a


@attrs.frozen
class Duplicates:
    count: int
    explained: int
    unexplained: list[str]


@attrs.frozen
class Summary:
    sent: int
    accepted: int
    answers: dict[str, int]
    lost: dict[str, str]
    unexpected: list[str]
    unexpected_executions: list[str]
    duplicate_executions: Duplicates
    duplicate_callbacks: Duplicates
    recovered: int
    client_retries: int
    #: The answers that made clients post again (each but the last of a call's posts).
    retried_after: dict[str, int]
    dead_lettered: int
    #: Entries in ``GET /system/dead-letters`` (accepted calls, poison, ...); None: no such list.
    dead_letters: int | None
    callbacks_received: int
    callbacks_given_up: int
    corrupt: list[str]
    final_status: dict[str, int]
    faults: dict[str, int]
    poison: dict[str, str]
    queues: dict[str, int]
    held: int | None
    load_seconds: float
    drain_seconds: float | None
    drained: bool

    @property
    def ok(self) -> bool:
        """Nothing lost and nothing unexpected (the run's exit status)."""
        return not self.lost and not self.unexpected and not self.unexpected_executions

    @property
    def flags(self) -> list[str]:
        """What deserves a look although it does not fail the run."""
        out = []
        if self.duplicate_executions.unexplained:
            out.append(f"{len(self.duplicate_executions.unexplained)} duplicate execution(s) not explained")
        if self.duplicate_callbacks.unexplained:
            out.append(f"{len(self.duplicate_callbacks.unexplained)} duplicate callback(s) not explained")
        if self.corrupt:
            out.append(f"{len(self.corrupt)} call(s) with a body that was not the one sent")
        if not self.drained:
            out.append("the accepted calls did not settle, or the queue did not drain, in time")
        for call_id, fate in self.poison.items():
            if fate.startswith("circulating") or fate.startswith("not seen"):
                out.append(f"poison {call_id}: {fate}")
        return out

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["ok"] = self.ok
        data["flags"] = self.flags
        return data


def _crash_between(events: Iterable[FaultEvent], first: float, last: float) -> bool:
    for event in events:
        if event.crash is None:
            continue
        start, end = event.crash
        if start <= last + SLACK and end >= first - SLACK:
            return True
    return False


def unknown_outcome(answer: str) -> bool:
    """An answer after which the call may or may not have been queued."""
    return answer in ("timeout", "error") or answer.startswith("5")


def _posted_again_unknowing(ledger: Ledger, call_id: str) -> bool:
    """The client posted the call again after an answer that left its outcome unknown."""
    return any(unknown_outcome(a) for a in ledger.posts.get(call_id, [])[:-1])


def _executions_explained(runs: list[Execution], events: list[FaultEvent]) -> bool:
    ordered = sorted(runs, key=lambda e: e.at)
    if any(not e.completed for e in ordered[:-1]):
        return True  # an earlier execution was cut off: the worker never had its answer
    return _crash_between(events, ordered[0].at, ordered[-1].at)


def _duplicates(groups: dict[str, list[float]], explained: Any) -> Duplicates:
    dups = [call_id for call_id, times in groups.items() if len(times) > 1]
    unexplained = sorted(call_id for call_id in dups if not explained(call_id))
    return Duplicates(len(dups), len(dups) - len(unexplained), unexplained)


def _lost_reason(ledger: Ledger, call_id: str, strict_callbacks: bool) -> str | None:
    """Why an accepted call counts as lost, or None when its outcome reached the client."""
    if any(a.accepted for a in ledger.callbacks.get(call_id, [])):
        return None
    record = ledger.records.get(call_id)
    if record is None:
        return "no status record" if call_id in ledger.records else "status never read"
    status = record.get("status")
    callback = record.get("callbackState")
    if DEAD_LETTERED in (status, callback):
        return None
    if status not in FINAL:
        return f"not final: {status} (attempts {record.get('attempts')})"
    if status in FAILED_FINAL:
        return None
    if callback == "failed":
        return f"{status}, callback given up" if strict_callbacks else None
    if callback == "delivered":
        return f"{status}, recorded as called back, but no callback arrived"
    return f"{status}, callback {callback}, none arrived"


def _poison_fate(ledger: Ledger, call_id: str, kind: str) -> str:
    record = ledger.records.get(call_id)
    if kind == "undecodable":
        n = sum(1 for k in ledger.poison.values() if k == "undecodable")
        if ledger.dead_letters and call_id in ledger.dead_letters:
            return f"dead-lettered ({ledger.dead_letters[call_id]})"
        if record is not None:
            return f"decoded after all? status {record.get('status')}"
        if ledger.undecodable_rejections >= n:
            return "rejected by a worker (logged)"
        return "not seen rejected by any worker"
    if record is None:
        return "no record (never started)"
    status = record.get("status")
    if status in FINAL:
        return f"ended: {status} after {record.get('attempts')} attempt(s)"
    return f"circulating: {status} after {record.get('attempts')} attempt(s)"


def summarize(ledger: Ledger, strict_callbacks: bool = False) -> Summary:
    sent = ledger.sent
    accepted = [c for c, answer in sent.items() if answer == ACCEPTED]
    known = set(sent) | set(ledger.poison)
    lost = {}
    for call_id in accepted:
        reason = _lost_reason(ledger, call_id, strict_callbacks)
        if reason is not None:
            lost[call_id] = reason

    def ran(call_id: str) -> bool:
        record = ledger.records.get(call_id) or {}
        return (
            bool(ledger.executions.get(call_id))
            or any(a.accepted for a in ledger.callbacks.get(call_id, []))
            or record.get("status") in FINAL
        )

    recovered = sum(1 for c, answer in sent.items() if answer != ACCEPTED and ran(c))
    final: Counter[str] = Counter()
    dead = given_up = received = 0
    for call_id in accepted:
        record = ledger.records.get(call_id)
        final[record.get("status", "?") if record else "no record"] += 1
        if record and DEAD_LETTERED in (record.get("status"), record.get("callbackState")):
            dead += 1
        if record and record.get("callbackState") == "failed":
            given_up += 1
        if any(a.accepted for a in ledger.callbacks.get(call_id, [])):
            received += 1

    sent_execs = {c: [e.at for e in runs] for c, runs in ledger.executions.items() if c in sent}
    dup_exec = _duplicates(
        sent_execs,
        lambda c: (
            _posted_again_unknowing(ledger, c) or _executions_explained(ledger.executions[c], ledger.events)
        ),
    )
    accepted_arrivals = {
        c: sorted(a.at for a in arrivals if a.accepted)
        for c, arrivals in ledger.callbacks.items()
        if c in sent
    }
    dup_cb = _duplicates(
        accepted_arrivals,
        lambda c: (
            _posted_again_unknowing(ledger, c)
            or _crash_between(ledger.events, accepted_arrivals[c][0], accepted_arrivals[c][-1])
        ),
    )
    # Only calls the driver sent: a poison message's body is whatever the injector made up, and
    # its callback (if any) carries the worker's error, not a function's answer.
    corrupt = sorted(
        {c for c, runs in ledger.executions.items() if c in sent and not all(e.body_ok for e in runs)}
        | {c for c, arr in ledger.callbacks.items() if c in sent and not all(a.body_ok for a in arr)}
    )
    return Summary(
        sent=len(sent),
        accepted=len(accepted),
        answers=dict(sorted(Counter(sent.values()).items())),
        lost=dict(sorted(lost.items())),
        unexpected=sorted(c for c in ledger.callbacks if c not in known),
        unexpected_executions=sorted(c for c in ledger.executions if c not in known),
        duplicate_executions=dup_exec,
        duplicate_callbacks=dup_cb,
        recovered=recovered,
        client_retries=sum(max(0, len(answers) - 1) for answers in ledger.posts.values()),
        retried_after=dict(
            sorted(Counter(a for answers in ledger.posts.values() for a in answers[:-1]).items())
        ),
        dead_lettered=dead,
        dead_letters=None if ledger.dead_letters is None else len(ledger.dead_letters),
        callbacks_received=received,
        callbacks_given_up=given_up,
        corrupt=corrupt,
        final_status=dict(final.most_common()),
        faults=dict(Counter(e.kind for e in ledger.events)),
        poison={c: _poison_fate(ledger, c, kind) for c, kind in sorted(ledger.poison.items())},
        queues=dict(ledger.queues),
        held=ledger.held,
        load_seconds=round(ledger.load_seconds, 1),
        drain_seconds=None if ledger.drain_seconds is None else round(ledger.drain_seconds, 1),
        drained=ledger.drained,
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _queues(queues: dict[str, int], held: int | None) -> str:
    shown = {name: n for name, n in queues.items() if n}
    empty = len(queues) - len(shown)
    parts = [_counts(shown)] if shown else []
    if empty:
        parts.append(f"{empty} empty")
    parts.append(f"held by workers: {'?' if held is None else held}")
    return "; ".join(parts)


def table(summary: Summary, title: str = "txfaas fault suite") -> str:
    """The end-of-run table (plain text)."""
    s = summary
    not_accepted = {k: v for k, v in s.answers.items() if k != ACCEPTED}
    de, dc = s.duplicate_executions, s.duplicate_callbacks
    drain = "not drained" if not s.drained else f"{s.drain_seconds:.1f} s"
    rows = [
        ("calls sent", f"{s.sent} in {s.load_seconds:.1f} s"),
        ("accepted (202)", str(s.accepted)),
        ("not accepted", f"{sum(not_accepted.values())} ({_counts(not_accepted)})"),
        ("LOST (must be 0)", str(len(s.lost))),
        (
            "UNEXPECTED (must be 0)",
            f"{len(s.unexpected)} callbacks, {len(s.unexpected_executions)} executions",
        ),
        ("duplicate executions", f"{de.count} ({de.explained} explained by a crash window)"),
        ("duplicate callbacks", f"{dc.count} ({dc.explained} explained by a crash window)"),
        ("recovered (not accepted, ran)", str(s.recovered)),
        ("client retries (same id)", f"{s.client_retries} (after {_counts(s.retried_after)})"),
        ("dead-lettered", f"{s.dead_lettered} accepted call(s); dead-letter list: {s.dead_letters}"),
        ("callbacks received", str(s.callbacks_received)),
        ("callbacks given up (recorded)", str(s.callbacks_given_up)),
        ("final statuses", _counts(s.final_status)),
        ("drain time", drain),
        ("faults injected", _counts(s.faults)),
        ("queues at the end", _queues(s.queues, s.held)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    for call_id, fate in s.poison.items():
        lines.append(f"{'poison'.ljust(width)}  {call_id}: {fate}")
    for call_id, reason in list(s.lost.items())[:20]:
        lines.append(f"  lost {call_id}: {reason}")
    if len(s.lost) > 20:
        lines.append(f"  ... and {len(s.lost) - 20} more lost (see the JSON report)")
    for call_id in (s.unexpected + s.unexpected_executions)[:20]:
        lines.append(f"  unexpected {call_id}")
    for what, dups in (("execution", de), ("callback", dc)):
        for call_id in dups.unexplained[:10]:
            lines.append(f"  unexplained duplicate {what}: {call_id}")
    for flag in s.flags:
        lines.append(f"FLAG: {flag}")
    lines.append("RESULT: " + ("OK (nothing lost, nothing unexpected)" if s.ok else "FAILED"))
    return "\n".join(lines)


def report_json(summary: Summary, ledger: Ledger, extra: dict[str, Any]) -> str:
    """The JSON report: the summary, the fault timeline and the run's settings."""
    data = {
        "summary": summary.to_json(),
        "events": [attrs.asdict(e) for e in ledger.events],
        **extra,
    }
    return json.dumps(data, indent=2, sort_keys=True, default=str)
