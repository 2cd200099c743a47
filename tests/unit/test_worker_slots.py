"""KeyedSlots: at most N holders per key, the others served first come, first served."""

from __future__ import annotations

import pytest

from txfaas.worker.slots import KeyedSlots


def test_each_key_has_its_own_slots_and_the_rest_wait_in_order():
    slots = KeyedSlots(2)
    a1, a2, a3, a4 = (slots.acquire("a") for _ in range(4))
    b1 = slots.acquire("b")
    assert [d.called for d in (a1, a2, a3, a4, b1)] == [True, True, False, False, True]
    assert (slots.busy("a"), slots.waiting("a"), slots.busy("b")) == (2, 2, 1)
    slots.release("a")
    assert a3.called and not a4.called  # the slot passed to the first in line
    assert (slots.busy("a"), slots.waiting("a")) == (2, 1)
    slots.release("a")
    slots.release("a")
    assert a4.called
    slots.release("a")
    slots.release("b")
    assert (slots.busy("a"), slots.busy("b"), slots.waiting("a")) == (0, 0, 0)


def test_a_cancelled_wait_leaves_the_line_and_never_gets_a_slot():
    slots = KeyedSlots(1)
    slots.acquire("h")
    gave_up, next_one = slots.acquire("h"), slots.acquire("h")
    gave_up.cancel()
    gave_up.addErrback(lambda f: None)
    assert slots.waiting("h") == 1
    slots.release("h")
    assert next_one.called
    assert slots.busy("h") == 1 and slots.waiting("h") == 0


def test_a_newcomer_does_not_jump_the_line():
    """A free slot goes to whoever waits, not to a later acquire made in between."""
    slots = KeyedSlots(1)
    slots.acquire("h")
    waiting = slots.acquire("h")
    slots.release("h")
    assert waiting.called
    assert not slots.acquire("h").called


def test_at_least_one_slot():
    with pytest.raises(ValueError):
        KeyedSlots(0)
