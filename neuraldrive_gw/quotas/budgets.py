"""Token budgets per key and per tenant, per calendar day or month in UTC (SPEC §8).

Reserve → settle. Admission reserves the most a request can use (prompt estimate + output
cap) and refuses when `spent + reserved + amount` would pass the budget, so any number of
concurrent requests whose actual use stays within their reservation can never together
overspend. Settlement releases the reservation and adds the actual count. If the actual
count is larger than the reservation (the prompt estimate was low), the actual is charged
anyway: the ledger records what was used, and the audit rows must add up to it.

The ledger is in memory; spend is rebuilt at start with `load()` from the persisted usage.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

Scope = tuple[str, str]          # ("key", key_id) or ("tenant", tenant_name)
PERIODS = ("day", "month")


def _utc(wall_now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(wall_now, tz=dt.timezone.utc)


# period → (start, end, key) of the period last asked for. Every budgeted admission and
# every budget row of /status asks; formatting a date each time cost about 2 µs a call.
_current: dict[str, tuple[float, float, str]] = {}


def period_key(period: str, wall_now: float) -> str:
    """The UTC calendar period containing `wall_now`: "2026-11-22" (day) or "2026-11" (month)."""
    known = _current.get(period)
    if known is not None and known[0] <= wall_now < known[1]:
        return known[2]
    moment = _utc(wall_now)
    if period == "day":
        key = moment.strftime("%Y-%m-%d")
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "month":
        key = moment.strftime("%Y-%m")
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    _current[period] = (start.timestamp(), reset_time(period, wall_now), key)
    return key


def reset_time(period: str, wall_now: float) -> float:
    """The wall-clock time (epoch seconds) at which the period containing `wall_now` ends."""
    moment = _utc(wall_now)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + dt.timedelta(days=1)
    elif period == "month":
        first = start.replace(day=1)
        end = (first.replace(year=first.year + 1, month=1) if first.month == 12
               else first.replace(month=first.month + 1))
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return end.timestamp()


def format_reset(period: str, wall_now: float) -> str:
    """The reset time for a 429 message, e.g. "2026-11-23T00:00:00Z"."""
    end = _utc(reset_time(period, wall_now))
    return end.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(eq=False)
class Reservation:
    """Tokens held for one request against one scope's budget in one period."""

    scope: Scope
    period_key: str
    amount: int
    open: bool = True


class BudgetLedger:
    """Spent and reserved tokens per (scope, period key)."""

    def __init__(self) -> None:
        self._spent: dict[tuple[Scope, str], int] = {}
        self._reserved: dict[tuple[Scope, str], int] = {}
        self._open = 0

    # -- reading ---------------------------------------------------------------------------

    def spent(self, scope: Scope, pkey: str) -> int:
        return self._spent.get((scope, pkey), 0)

    def reserved(self, scope: Scope, pkey: str) -> int:
        return self._reserved.get((scope, pkey), 0)

    def remaining(self, scope: Scope, budget: int, period: str, now: float) -> int:
        """Tokens still available to new reservations (never negative)."""
        pkey = period_key(period, now)
        return max(0, budget - self.spent(scope, pkey) - self.reserved(scope, pkey))

    def can_reserve(self, scope: Scope, budget: int, period: str, amount: int,
                    now: float) -> bool:
        pkey = period_key(period, now)
        return self.spent(scope, pkey) + self.reserved(scope, pkey) + max(amount, 0) <= budget

    @property
    def open_reservations(self) -> int:
        return self._open

    def total_reserved(self) -> int:
        return sum(self._reserved.values())

    def snapshot(self) -> list[dict[str, object]]:
        """Plain data for the status socket: one row per scope and period with activity."""
        keys = sorted(set(self._spent) | set(self._reserved))
        return [{"scope": scope[0], "name": scope[1], "period": pkey,
                 "spent": self.spent(scope, pkey), "reserved": self.reserved(scope, pkey)}
                for scope, pkey in keys]

    # -- changing --------------------------------------------------------------------------

    def reserve(self, scope: Scope, period: str, amount: int, now: float) -> Reservation:
        """Hold `amount` tokens in the current period. Check `can_reserve` first: this does not
        refuse, so that admission can check every limit before debiting any."""
        amount = max(int(amount), 0)
        pkey = period_key(period, now)
        slot = (scope, pkey)
        self._reserved[slot] = self._reserved.get(slot, 0) + amount
        self._open += 1
        return Reservation(scope, pkey, amount)

    def settle(self, reservation: Reservation, actual: int) -> None:
        """Release the reservation and charge `actual` tokens to the reservation's period (the
        period the request was admitted in). A second settle of the same reservation is a
        no-op, so cleanup paths may call it unconditionally."""
        if not reservation.open:
            return
        reservation.open = False
        self._open -= 1
        slot = (reservation.scope, reservation.period_key)
        left = self._reserved.get(slot, 0) - reservation.amount
        if left > 0:
            self._reserved[slot] = left
        else:
            self._reserved.pop(slot, None)
        actual = max(int(actual), 0)
        if actual:
            self._spent[slot] = self._spent.get(slot, 0) + actual

    def release(self, reservation: Reservation) -> None:
        """Give the reservation back unused (the request never reached the model)."""
        self.settle(reservation, 0)

    def load(self, rows: Iterable[tuple[Scope, str, int]]) -> None:
        """Rebuild spend from persisted (scope, period key, tokens) rows; replaces what was
        spent before, keeps open reservations. Rows for the same slot are summed."""
        spent: dict[tuple[Scope, str], int] = {}
        for scope, pkey, tokens in rows:
            slot = ((scope[0], scope[1]), pkey)
            spent[slot] = spent.get(slot, 0) + int(tokens)
        self._spent = spent

    def prune(self, now: float) -> None:
        """Drop spend of past periods (everything but the current day and month), so the ledger
        does not grow forever; open reservations are kept."""
        keep = {period_key("day", now), period_key("month", now)}
        self._spent = {slot: n for slot, n in self._spent.items() if slot[1] in keep}
