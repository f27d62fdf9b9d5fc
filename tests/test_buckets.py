"""Token buckets: continuous refill, clamping, refunds and debt, on an injected clock."""

from __future__ import annotations

import math

import pytest

from conftest import FakeClock
from neuraldrive_gw.quotas.buckets import TokenBucket


def bucket(capacity: float = 60, per_minute: float = 60) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(capacity, per_minute, clock.monotonic), clock


def test_starts_full_and_take_debits() -> None:
    b, _ = bucket()
    assert b.level() == 60
    assert b.take(10) == 10
    assert b.level() == 50


def test_debit_after_a_check_counts_the_refill_that_check_read() -> None:
    b, clock = bucket()
    b.take(60)
    clock.advance(30)
    assert b.can_take(20)                     # reads the clock: 30 refilled
    assert b.debit(20) == 20 and b.debit(1000) == 60   # clamped like take()
    assert b.state() == b.headroom() == (-50, 110)     # what is owed, and when it is full


@pytest.mark.parametrize("elapsed, expected", [
    (0, 0), (1, 1), (0.5, 0.5), (30, 30), (60, 60), (61, 60), (3600, 60),
])
def test_refill_is_continuous_and_capped(elapsed: float, expected: float) -> None:
    b, clock = bucket()
    b.take(60)
    clock.advance(elapsed)
    assert b.level() == pytest.approx(expected)


def test_clock_stepping_back_never_drains_or_fills() -> None:
    b, clock = bucket()
    b.take(30)
    clock._mono -= 100
    assert b.level() == 30


def test_lone_request_larger_than_capacity_passes_when_full() -> None:
    b, clock = bucket(capacity=100, per_minute=100)
    assert b.can_take(5000)
    assert b.take(5000) == 100          # clamped
    assert b.level() == 0
    assert not b.can_take(5000)
    clock.advance(59)
    assert not b.can_take(5000)          # needs the whole capacity again
    clock.advance(1)
    assert b.can_take(5000)


def test_take_without_room_raises() -> None:
    b, _ = bucket()
    b.take(55)
    assert not b.can_take(10)
    with pytest.raises(ValueError):
        b.take(10)
    assert b.level() == 5


def test_give_back_is_capped_at_capacity() -> None:
    b, _ = bucket()
    b.take(20)
    b.give_back(5)
    assert b.level() == 45
    b.give_back(1000)
    assert b.level() == 60


def test_charge_may_go_into_debt_and_refills_out() -> None:
    b, clock = bucket()
    b.take(60)
    b.charge(30)
    assert b.level() == -30
    assert b.seconds_until(1) == pytest.approx(31)
    assert b.seconds_until(0) == pytest.approx(30)
    clock.advance(31)
    assert b.can_take(1)


@pytest.mark.parametrize("level_used, n, seconds", [
    (0, 10, 0.0), (60, 1, 1.0), (60, 60, 60.0), (30, 40, 10.0), (60, 600, 60.0),
])
def test_seconds_until(level_used: float, n: float, seconds: float) -> None:
    b, _ = bucket()
    b.take(level_used)
    assert b.seconds_until(n) == pytest.approx(seconds)


def test_seconds_until_full() -> None:
    b, clock = bucket(capacity=100_000, per_minute=100_000)
    assert b.seconds_until_full() == 0
    b.take(25_000)
    assert b.seconds_until_full() == pytest.approx(15.0)
    clock.advance(5)
    assert b.seconds_until_full() == pytest.approx(10.0)


def test_zero_rate_never_refills() -> None:
    b, clock = bucket(capacity=1, per_minute=0)
    b.take(1)
    clock.advance(10_000)
    assert b.level() == 0
    assert math.isinf(b.seconds_until(1))


def test_reconfigure_keeps_what_was_used_this_minute() -> None:
    b, _ = bucket(capacity=100, per_minute=100)
    b.take(30)
    b.reconfigure(50, 50)                 # 30 of the new 50 are already used
    assert (b.capacity, b.per_minute, b.level()) == (50, 50, 20)
    b.reconfigure(200, 200)
    assert b.level() == 170
    b.reconfigure(20, 20)                 # used more than the new limit: wait for refill
    assert b.level() == -10 and b.seconds_until(1) == pytest.approx(33.0)


@pytest.mark.parametrize("capacity, per_minute", [(0, 60), (-1, 60), (10, -1)])
def test_invalid_limits_refused(capacity: float, per_minute: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(capacity, per_minute, lambda: 0.0)
