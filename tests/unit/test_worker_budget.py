"""ByteBudget: the bytes of answers the worker holds at once, reserved in line."""

from __future__ import annotations

import pytest

from txfaas.worker.budget import ByteBudget


def test_reservations_fit_or_wait_in_line_and_a_release_serves_them_in_order():
    freed: list[int] = []
    budget = ByteBudget(100, on_free=lambda: freed.append(budget.held))
    assert budget.reserve(60).called
    big, small = budget.reserve(50), budget.reserve(10)
    assert not big.called and not small.called  # the small one does not pass the big one
    assert budget.full and not budget.try_reserve(1)
    budget.release(60)
    assert big.called and small.called
    assert (budget.held, budget.peak, budget.waiting) == (60, 60, 0)
    assert freed == [60]
    budget.release(50)
    budget.release(10)
    assert budget.held == 0 and not budget.full and budget.peak == 60


def test_a_cancelled_reservation_leaves_the_line_and_lets_the_next_one_in():
    budget = ByteBudget(100)
    budget.reserve(90)
    big, small = budget.reserve(50), budget.reserve(5)
    big.cancel()
    big.addErrback(lambda f: None)
    assert small.called and budget.held == 95 and budget.waiting == 0


def test_try_reserve_takes_all_or_nothing():
    budget = ByteBudget(10)
    assert budget.try_reserve(10)
    assert not budget.try_reserve(1)
    assert budget.held == 10


def test_more_than_the_whole_budget_is_refused_at_once():
    with pytest.raises(ValueError, match="more than the whole budget"):
        ByteBudget(10).reserve(11)
    with pytest.raises(ValueError):
        ByteBudget(0)
