"""Budgets: UTC calendar periods, reserve → settle, the no-overspend invariant, rebuild."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from neuraldrive_gw.quotas.budgets import (BudgetLedger, format_reset, period_key,
                                           reset_time)

KEY = ("key", "abcd1234")
TENANT = ("tenant", "acme")


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize("period, moment, key", [
    ("day", "2026-11-22T00:00:00", "2026-11-22"),
    ("day", "2026-11-22T23:59:59.999", "2026-11-22"),
    ("day", "2026-11-23T00:00:00", "2026-11-23"),
    ("month", "2026-11-30T23:59:59", "2026-11"),
    ("month", "2026-12-01T00:00:00", "2026-12"),
    ("month", "2027-01-01T00:00:00", "2027-01"),
])
def test_period_key_is_utc(period: str, moment: str, key: str) -> None:
    assert period_key(period, ts(moment)) == key


@pytest.mark.parametrize("period, moment, reset", [
    ("day", "2026-11-22T13:45:00", "2026-11-23T00:00:00Z"),
    ("day", "2026-12-31T23:59:59", "2027-01-01T00:00:00Z"),
    ("month", "2026-11-22T13:45:00", "2026-12-01T00:00:00Z"),
    ("month", "2026-12-05T00:00:00", "2027-01-01T00:00:00Z"),
    ("month", "2028-02-29T12:00:00", "2028-03-01T00:00:00Z"),
])
def test_reset_time(period: str, moment: str, reset: str) -> None:
    assert format_reset(period, ts(moment)) == reset
    assert reset_time(period, ts(moment)) == ts(reset.rstrip("Z"))


def test_unknown_period_refused() -> None:
    with pytest.raises(ValueError):
        period_key("week", 0.0)
    with pytest.raises(ValueError):
        reset_time("year", 0.0)


NOW = ts("2026-11-22T12:00:00")


def test_reserve_counts_against_the_budget_until_settled() -> None:
    ledger = BudgetLedger()
    assert ledger.can_reserve(KEY, 1000, "day", 600, NOW)
    r = ledger.reserve(KEY, "day", 600, NOW)
    assert not ledger.can_reserve(KEY, 1000, "day", 401, NOW)
    assert ledger.can_reserve(KEY, 1000, "day", 400, NOW)
    assert ledger.remaining(KEY, 1000, "day", NOW) == 400
    ledger.settle(r, 250)
    assert ledger.spent(KEY, "2026-11-22") == 250
    assert ledger.reserved(KEY, "2026-11-22") == 0
    assert ledger.remaining(KEY, 1000, "day", NOW) == 750
    assert ledger.open_reservations == 0


def test_settle_and_release_are_once_only() -> None:
    ledger = BudgetLedger()
    r = ledger.reserve(KEY, "day", 100, NOW)
    ledger.settle(r, 80)
    ledger.settle(r, 80)
    ledger.release(r)
    assert ledger.spent(KEY, "2026-11-22") == 80
    assert ledger.open_reservations == 0 and ledger.total_reserved() == 0


def test_release_gives_everything_back() -> None:
    ledger = BudgetLedger()
    r = ledger.reserve(TENANT, "month", 500, NOW)
    ledger.release(r)
    assert ledger.remaining(TENANT, 500, "month", NOW) == 500
    assert ledger.snapshot() == []


def test_actual_beyond_the_reservation_is_charged() -> None:
    ledger = BudgetLedger()
    r = ledger.reserve(KEY, "day", 100, NOW)
    ledger.settle(r, 130)
    assert ledger.spent(KEY, "2026-11-22") == 130
    assert ledger.remaining(KEY, 100, "day", NOW) == 0


def test_settlement_charges_the_admission_period() -> None:
    ledger = BudgetLedger()
    r = ledger.reserve(KEY, "day", 100, ts("2026-11-22T23:59:59"))
    ledger.settle(r, 90)                      # settled after midnight
    assert ledger.spent(KEY, "2026-11-22") == 90
    assert ledger.remaining(KEY, 100, "day", ts("2026-11-23T00:00:01")) == 100


def test_scopes_and_periods_are_separate() -> None:
    ledger = BudgetLedger()
    ledger.settle(ledger.reserve(KEY, "day", 10, NOW), 10)
    ledger.settle(ledger.reserve(TENANT, "month", 20, NOW), 20)
    assert ledger.spent(KEY, "2026-11") == 0
    assert ledger.spent(TENANT, "2026-11") == 20
    assert ledger.snapshot() == [
        {"scope": "key", "name": "abcd1234", "period": "2026-11-22", "spent": 10, "reserved": 0},
        {"scope": "tenant", "name": "acme", "period": "2026-11", "spent": 20, "reserved": 0}]


@pytest.mark.parametrize("seed", range(20))
def test_concurrent_reservations_never_overspend(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.randint(100, 5000)
    ledger = BudgetLedger()
    open_ = []
    for _ in range(500):
        if open_ and rng.random() < 0.4:
            r = open_.pop(rng.randrange(len(open_)))
            ledger.settle(r, rng.randint(0, r.amount))
        else:
            amount = rng.randint(1, 400)
            if ledger.can_reserve(KEY, budget, "day", amount, NOW):
                open_.append(ledger.reserve(KEY, "day", amount, NOW))
        pkey = "2026-11-22"
        assert ledger.spent(KEY, pkey) + ledger.reserved(KEY, pkey) <= budget
    for r in open_:
        ledger.settle(r, r.amount)
    assert ledger.spent(KEY, "2026-11-22") <= budget
    assert ledger.total_reserved() == 0 and ledger.open_reservations == 0


def test_load_rebuilds_spend_without_double_counting() -> None:
    ledger = BudgetLedger()
    r = ledger.reserve(KEY, "day", 50, NOW)
    ledger.settle(ledger.reserve(KEY, "day", 5, NOW), 5)
    rows = [(KEY, "2026-11-22", 300), (KEY, "2026-11-22", 200), (TENANT, "2026-11", 700)]
    ledger.load(rows)
    ledger.load(rows)                          # loading twice replaces, never adds
    assert ledger.spent(KEY, "2026-11-22") == 500
    assert ledger.spent(TENANT, "2026-11") == 700
    assert ledger.reserved(KEY, "2026-11-22") == 50     # open reservations survive
    assert ledger.remaining(KEY, 1000, "day", NOW) == 450
    ledger.settle(r, 50)
    assert ledger.spent(KEY, "2026-11-22") == 550


def test_prune_keeps_current_periods_and_reservations() -> None:
    ledger = BudgetLedger()
    ledger.load([(KEY, "2026-11-21", 1), (KEY, "2026-11-22", 2), (TENANT, "2026-10", 3),
                 (TENANT, "2026-11", 4)])
    r = ledger.reserve(KEY, "day", 9, ts("2026-11-20T00:00:00"))
    ledger.prune(NOW)
    assert [(row["period"], row["spent"], row["reserved"]) for row in ledger.snapshot()] == [
        ("2026-11-20", 0, 9), ("2026-11-22", 2, 0), ("2026-11", 4, 0)]
    ledger.settle(r, 9)
    assert ledger.spent(KEY, "2026-11-20") == 9


def test_period_keys_stay_right_across_boundaries_in_either_direction() -> None:
    """period_key remembers the current period; moving the clock anywhere (forwards over
    a day or month end, or backwards, as an injected clock may) must not reuse it wrongly."""
    def plain(period: str, t: float) -> str:
        moment = dt.datetime.fromtimestamp(t, dt.timezone.utc)
        return moment.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")
    end_of_year = dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
    base = end_of_year.timestamp()
    moments = [base, base + 0.999, base + 1, base - 86_400, base + 1, base + 31 * 86_400,
               base - 40 * 86_400, base - 40 * 86_400 + 1, base, 0.0, base + 1]
    for period in ("day", "month"):
        for t in moments:
            assert period_key(period, t) == plain(period, t), (period, t)

