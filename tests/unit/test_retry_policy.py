"""txfaas.retry: which answers are retried, how long to wait, annotations, Retry-After, delay tiers."""

from __future__ import annotations

import email.utils
import itertools

import pytest

from txfaas.model import FunctionSpec, ValidationError
from txfaas.retry import (
    DEFAULT_CODES,
    CallbackPolicy,
    RetryConfigError,
    RetryPolicy,
    callback_retryable,
    full_jitter,
    parse_codes,
    parse_retry_after,
    parse_tiers,
    pick_tier,
)


def fixed(value: float):
    return lambda: value


def test_defaults_are_openfaas_pros_codes_five_attempts_one_second_to_two_minutes():
    policy = RetryPolicy()
    assert policy.codes == DEFAULT_CODES == {408, 429, 500, 502, 503, 504}
    assert (policy.max_attempts, policy.min_wait, policy.max_wait) == (5, 1.0, 120.0)


@pytest.mark.parametrize("code", sorted(DEFAULT_CODES))
def test_retry_codes_are_retried_until_the_last_attempt(code):
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(code, 1)
    assert policy.should_retry(code, 2)
    assert not policy.should_retry(code, 3)


@pytest.mark.parametrize("code", [200, 201, 302, 400, 404, 410, 501])
def test_other_codes_are_final(code):
    assert not RetryPolicy().should_retry(code, 1)


def test_full_jitter_draws_between_min_wait_and_a_doubling_ceiling_capped_at_max_wait():
    policy = RetryPolicy(min_wait=1.0, max_wait=10.0)
    # random() == 0 -> the minimum; random() == 1 -> the ceiling min_wait * 2**retry, capped.
    assert [policy.wait(n, fixed(0.0)) for n in (1, 2, 3, 4, 5)] == [1.0] * 5
    assert [policy.wait(n, fixed(1.0)) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.wait(2, fixed(0.5)) == 2.5
    assert policy.wait(200, fixed(1.0)) == 10.0  # no overflow for huge attempt numbers


def test_full_jitter_with_equal_bounds_is_that_wait():
    assert full_jitter(3, 0.05, 0.05, fixed(0.7)) == pytest.approx(0.05)


def test_retry_after_replaces_the_draw_clamped_to_the_bounds():
    policy = RetryPolicy(min_wait=2.0, max_wait=30.0)
    assert policy.wait(1, fixed(1.0), retry_after=7.0) == 7.0
    assert policy.wait(1, fixed(1.0), retry_after=0.0) == 2.0
    assert policy.wait(1, fixed(1.0), retry_after=3600.0) == 30.0


def test_retry_after_in_seconds_or_as_an_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(b" 5 ", now) == 5.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(90.0)
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now) is None


def test_annotations_override_the_defaults_with_openfaas_pros_names():
    policy = RetryPolicy().for_function(
        {
            "com.openfaas.retry.attempts": "9",
            "com.openfaas.retry.codes": "429, 503 500",
            "com.openfaas.retry.min_wait": "500ms",
            "com.openfaas.retry.max_wait": "1m30s",
        }
    )
    assert policy == RetryPolicy(
        max_attempts=9, min_wait=0.5, max_wait=90.0, codes=frozenset({429, 500, 503})
    )
    assert RetryPolicy().for_function({"other": "x"}) == RetryPolicy()


def test_a_min_wait_annotation_above_the_default_max_wait_raises_the_max_too():
    assert RetryPolicy(max_wait=120).for_function({"com.openfaas.retry.min_wait": "5m"}).max_wait == 300
    assert RetryPolicy(min_wait=10).for_function({"com.openfaas.retry.max_wait": "2s"}).min_wait == 2


@pytest.mark.parametrize(
    "annotations, field",
    [
        ({"com.openfaas.retry.attempts": "many"}, "com.openfaas.retry.attempts"),
        ({"com.openfaas.retry.attempts": "0"}, "com.openfaas.retry.attempts"),
        ({"com.openfaas.retry.codes": "429,abc"}, "com.openfaas.retry.codes"),
        ({"com.openfaas.retry.codes": "42"}, "com.openfaas.retry.codes"),
        ({"com.openfaas.retry.min_wait": "soon"}, "com.openfaas.retry.min_wait"),
        (
            {"com.openfaas.retry.min_wait": "10s", "com.openfaas.retry.max_wait": "1s"},
            "com.openfaas.retry.max_wait",
        ),
    ],
)
def test_bad_annotations_name_the_annotation(annotations, field):
    with pytest.raises(RetryConfigError) as info:
        RetryPolicy().for_function(annotations)
    assert info.value.field == field


def test_deploying_a_function_with_a_bad_retry_annotation_is_a_validation_error():
    with pytest.raises(ValidationError) as info:
        FunctionSpec.from_json({"service": "fn", "annotations": {"com.openfaas.retry.codes": "x"}})
    assert info.value.field == "annotations.com.openfaas.retry.codes"


def test_codes_parse_from_commas_spaces_or_a_list():
    assert parse_codes("429,503") == parse_codes(" 429  503 ") == parse_codes([503, 429]) == {429, 503}
    assert parse_codes("") == frozenset()


@pytest.mark.parametrize("status", [None, 301, 302, 307, 308, 408, 429, 500, 502, 503, 504, 599])
def test_callbacks_are_retried_on_no_answer_3xx_408_429_and_5xx(status):
    assert callback_retryable(status)


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 410, 422])
def test_callbacks_stop_on_410_and_other_4xx(status):
    assert not callback_retryable(status)


def test_callback_retries_stop_at_max_attempts_or_max_age():
    policy = CallbackPolicy(max_attempts=3, max_age=100.0)
    assert policy.should_retry(503, 1, first_at=0.0, now=10.0)
    assert policy.should_retry(None, 2, first_at=0.0, now=10.0)
    assert not policy.should_retry(503, 3, first_at=0.0, now=10.0)
    assert not policy.should_retry(503, 1, first_at=0.0, now=100.0)
    assert not policy.should_retry(410, 1, first_at=0.0, now=10.0)


def test_callback_wait_never_goes_past_max_age():
    policy = CallbackPolicy(max_age=100.0, min_wait=5.0, max_wait=60.0)
    assert policy.wait(1, fixed(1.0), first_at=0.0, now=0.0) == 10.0
    assert policy.wait(5, fixed(1.0), first_at=0.0, now=95.0) == 5.0
    assert policy.wait(1, fixed(1.0), first_at=0.0, now=100.0) is None


def test_tiers_parse_as_sorted_distinct_durations():
    assert parse_tiers("5s, 1s,500ms 1s") == (0.5, 1.0, 5.0)
    assert parse_tiers([0.2, 0.05]) == (0.05, 0.2)
    for bad in ("", "0", "0.0001", "soon"):
        with pytest.raises(ValueError):
            parse_tiers(bad)


def test_pick_tier_takes_the_largest_tier_not_above_the_wait():
    tiers = (1.0, 5.0, 30.0)
    assert pick_tier(tiers, 0.4) is None  # under half the smallest tier: now
    assert pick_tier(tiers, 0.6) == 1.0  # overshoots by less than half a tier
    assert pick_tier(tiers, 4.9) == 1.0
    assert pick_tier(tiers, 5.0) == 5.0
    assert pick_tier(tiers, 29.0) == 5.0
    assert pick_tier(tiers, 3600.0) == 30.0
    assert pick_tier((), 10.0) is None


def test_hopping_through_tiers_meets_any_wait_within_half_the_smallest_tier():
    """The worker sends an early message round again for the rest: the sum of the tiers it
    waits in ends within half the smallest tier of the wait."""
    tiers = parse_tiers("1s,2s,5s,10s,30s,1m,2m,5m,10m,30m,1h")
    for wait in itertools.chain(range(0, 200), range(200, 8000, 97)):
        left, hops = float(wait), 0
        while (tier := pick_tier(tiers, left)) is not None:
            left -= tier
            hops += 1
        assert -0.5 <= left < 0.5, wait
        assert hops <= 12, (wait, hops)
