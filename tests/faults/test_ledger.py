"""The ledger's arithmetic (pure, synchronous): what counts as lost, unexpected, duplicated,
explained and recovered.  The whole-system run is in tests/integration/test_faults.py."""

from __future__ import annotations

import json

from tests.faults.injectors import KINDS, plan
from tests.faults.ledger import FaultEvent, Ledger, report_json, summarize, table
from tests.faults.runner import parse_args


def record(status: str, callback: str | None = "pending", attempts: int = 1) -> dict:
    return {"status": status, "callbackState": callback, "attempts": attempts}


def accepted(ledger: Ledger, call_id: str, rec: dict | None) -> None:
    ledger.sent[call_id] = "202"
    ledger.records[call_id] = rec


def test_an_accepted_call_whose_callback_arrived_is_not_lost():
    ledger = Ledger()
    accepted(ledger, "a", record("running"))  # the record may lag: the callback is what counts
    ledger.arrival("a", 1.0, 200)
    s = summarize(ledger)
    assert s.lost == {}
    assert s.callbacks_received == 1
    assert s.ok


def test_an_accepted_call_that_never_became_final_is_lost_with_its_status():
    ledger = Ledger()
    accepted(ledger, "a", record("queued", attempts=0))
    s = summarize(ledger)
    assert s.lost == {"a": "not final: queued (attempts 0)"}
    assert not s.ok


def test_an_accepted_call_without_a_record_is_lost():
    ledger = Ledger()
    accepted(ledger, "a", None)
    ledger.sent["b"] = "202"  # never polled at all
    assert summarize(ledger).lost == {"a": "no status record", "b": "status never read"}


def test_a_record_that_claims_a_delivered_callback_nobody_received_is_lost():
    ledger = Ledger()
    accepted(ledger, "a", record("succeeded", "delivered"))
    ledger.arrival("a", 1.0, 503)  # refused by the receiver: not a delivery
    assert "no callback arrived" in summarize(ledger).lost["a"]


def test_final_failed_and_dead_lettered_calls_are_not_lost_and_dead_letters_are_counted():
    ledger = Ledger()
    accepted(ledger, "failed", record("failed"))
    accepted(ledger, "timeout", record("timed_out"))
    accepted(ledger, "dead", record("dead_lettered"))
    accepted(ledger, "dead-cb", record("succeeded", "dead_lettered"))
    s = summarize(ledger)
    assert s.lost == {}
    assert s.dead_lettered == 2
    assert s.final_status == {"failed": 1, "timed_out": 1, "dead_lettered": 1, "succeeded": 1}


def test_a_given_up_callback_is_counted_and_only_lost_when_strict():
    ledger = Ledger()
    accepted(ledger, "a", record("succeeded", "failed"))
    lenient = summarize(ledger)
    assert lenient.lost == {}
    assert lenient.callbacks_given_up == 1
    assert summarize(ledger, strict_callbacks=True).lost == {"a": "succeeded, callback given up"}


def test_a_succeeded_call_whose_callback_is_still_pending_is_lost():
    ledger = Ledger()
    accepted(ledger, "a", record("succeeded", "pending"))
    assert summarize(ledger).lost == {"a": "succeeded, callback pending, none arrived"}


def test_callbacks_and_executions_for_ids_never_sent_are_unexpected_but_poison_is_known():
    ledger = Ledger()
    ledger.arrival("ghost", 1.0, 200)
    ledger.execution("phantom", 1.0)
    ledger.poison["p"] = "unprocessable"
    ledger.arrival("p", 1.0, 200)
    s = summarize(ledger)
    assert s.unexpected == ["ghost"]
    assert s.unexpected_executions == ["phantom"]
    assert not s.ok


def test_a_duplicate_execution_is_explained_only_by_a_crash_between_the_two_runs():
    ledger = Ledger()
    for call_id in ("crash", "later", "no-crash"):
        accepted(ledger, call_id, record("succeeded", "delivered"))
        ledger.arrival(call_id, 20.0, 200)
    ledger.execution("crash", 1.0).completed = True
    ledger.execution("crash", 5.0).completed = True
    ledger.execution("later", 10.0).completed = True
    ledger.execution("later", 11.0).completed = True
    ledger.execution("no-crash", 1.0).completed = True
    ledger.execution("no-crash", 2.0).completed = True
    ledger.events.append(FaultEvent("worker_kill", 3.0, 4.0, crash=(3.0, 3.0)))
    ledger.events.append(FaultEvent("redis_pause", 10.2, 10.8))  # no crash window
    dups = summarize(ledger).duplicate_executions
    assert dups.count == 3
    assert dups.explained == 1
    assert dups.unexplained == ["later", "no-crash"]


def test_a_rerun_after_an_execution_that_was_cut_off_is_explained():
    ledger = Ledger()
    accepted(ledger, "a", record("succeeded", "delivered"))
    ledger.execution("a", 1.0)  # never completed: the worker went away before the answer
    ledger.execution("a", 9.0).completed = True
    assert summarize(ledger).duplicate_executions.unexplained == []


def test_only_callbacks_the_receiver_accepted_twice_are_duplicates():
    ledger = Ledger()
    accepted(ledger, "retried", record("succeeded", "delivered"))
    ledger.arrival("retried", 1.0, 503)
    ledger.arrival("retried", 2.0, 200)
    accepted(ledger, "twice", record("succeeded", "delivered"))
    ledger.arrival("twice", 1.0, 200)
    ledger.arrival("twice", 3.0, 200)
    ledger.events.append(FaultEvent("amqp_cut", 2.0, 2.0, crash=(2.0, 2.0)))
    dups = summarize(ledger).duplicate_callbacks
    assert (dups.count, dups.explained, dups.unexplained) == (1, 1, [])


def test_a_call_not_accepted_that_ran_anyway_is_recovered():
    ledger = Ledger()
    ledger.sent.update({"ran": "503", "callback": "timeout", "idle": "503", "final": "error"})
    ledger.execution("ran", 1.0)
    ledger.arrival("callback", 1.0, 200)
    ledger.records.update({"idle": None, "final": record("succeeded", "failed")})
    s = summarize(ledger)
    assert s.recovered == 3
    assert s.accepted == 0
    assert s.answers == {"503": 2, "error": 1, "timeout": 1}


def test_bodies_that_are_not_the_ones_sent_are_flagged_as_corrupt():
    ledger = Ledger()
    accepted(ledger, "a", record("succeeded", "delivered"))
    ledger.execution("a", 1.0, body_ok=False)
    ledger.arrival("a", 2.0, 200, body_ok=True)
    s = summarize(ledger)
    assert s.corrupt == ["a"]
    assert any("not the one sent" in flag for flag in s.flags)


def test_poison_with_a_body_of_its_own_is_not_flagged_as_corrupt():
    """The suite's own poison is no call the driver sent: its callback carries the worker's
    error, not a function's answer, and that is no corruption."""
    ledger = Ledger()
    ledger.poison["p"] = "unprocessable"
    ledger.records["p"] = record("failed", "delivered")
    ledger.arrival("p", 1.0, 200, body_ok=False)
    ledger.execution("p", 1.0, body_ok=False)
    s = summarize(ledger)
    assert s.corrupt == []
    assert not any("not the one sent" in flag for flag in s.flags)


def test_a_duplicate_after_a_client_retry_with_an_unknown_outcome_is_explained():
    ledger = Ledger()
    for call_id, posts in (("unknown", ["error", "202"]), ("5xx", ["503", "409", "202"]), ("once", ["202"])):
        accepted(ledger, call_id, record("succeeded", "delivered"))
        ledger.posts[call_id] = posts
        ledger.execution(call_id, 1.0).completed = True
        ledger.execution(call_id, 30.0).completed = True
        ledger.arrival(call_id, 2.0, 200)
        ledger.arrival(call_id, 31.0, 200)
    s = summarize(ledger)
    assert s.duplicate_executions.unexplained == ["once"]
    assert s.duplicate_callbacks.unexplained == ["once"]
    assert s.client_retries == 3
    assert s.retried_after == {"409": 1, "503": 1, "error": 1}
    assert "client retries (same id)       3 (after 409 1, 503 1, error 1)" in table(s)


def test_poison_fates_say_whether_it_ended_or_still_circulates():
    ledger = Ledger()
    ledger.poison.update({"u": "undecodable", "v": "undecodable", "p": "unprocessable", "q": "unprocessable"})
    ledger.undecodable_rejections = 2
    ledger.dead_letters = {"v": "undecodable", "q": "delivery_limit"}
    ledger.records.update({"u": None, "p": record("running", attempts=7), "q": record("dead_lettered")})
    s = summarize(ledger)
    assert s.poison == {
        "p": "circulating: running after 7 attempt(s)",
        "q": "ended: dead_lettered after 1 attempt(s)",
        "u": "rejected by a worker (logged)",
        "v": "dead-lettered (undecodable)",
    }
    assert s.dead_letters == 2
    assert s.flags == ["the accepted calls did not settle, or the queue did not drain, in time",
                       "poison p: circulating: running after 7 attempt(s)"]  # fmt: skip


def test_the_table_and_the_json_report_show_the_losses():
    ledger = Ledger()
    accepted(ledger, "a", record("queued", attempts=0))
    ledger.events.append(FaultEvent("amqp_cut", 1.0, 1.0, "3 cut", crash=(1.0, 1.0)))
    s = summarize(ledger)
    text = table(s)
    assert "LOST (must be 0)               1" in text
    assert "lost a: not final: queued" in text
    assert text.endswith("RESULT: FAILED")
    data = json.loads(report_json(s, ledger, {"run": "r"}))
    assert data["summary"]["lost"] == {"a": "not final: queued (attempts 0)"}
    assert data["summary"]["ok"] is False
    assert data["events"][0]["kind"] == "amqp_cut"


def test_the_plan_interleaves_the_kinds_each_as_often_as_asked():
    kinds = plan({"worker_kill": 2, "amqp_cut": 2, "poison": 1})
    assert kinds == ["worker_kill", "amqp_cut", "poison", "worker_kill", "amqp_cut"]
    assert len(plan(dict.fromkeys(KINDS, 3))) == 3 * len(KINDS)


def test_the_command_line_quick_run_and_fault_selection():
    quick = parse_args(["--quick"])
    assert (quick.calls, quick.rounds["worker_kill"], quick.rounds["poison"]) == (300, 2, 1)
    full = parse_args([])
    assert full.calls == 10_000 and set(full.rounds.values()) == {3}
    assert full.strict_callbacks and not parse_args(["--lenient-callbacks"]).strict_callbacks
    assert "purge" not in full.rounds
    chosen = parse_args(["--faults", "purge,amqp_cut", "--calls", "50"])
    assert chosen.calls == 50
    assert {k for k, v in chosen.rounds.items() if v} == {"purge", "amqp_cut"}
