"""Token buckets with continuous refill: the per-minute request and token limits (SPEC §8).

A bucket holds at most `capacity` units and refills at `per_minute / 60` units a second,
measured on an injected monotonic clock. Pure arithmetic: no I/O, no tasks, no waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class TokenBucket:
    """One limit. The level goes below zero only through `charge` (use beyond a reservation)."""

    def __init__(self, capacity: float, per_minute: float, monotonic: Callable[[], float]):
        if capacity <= 0 or per_minute < 0:
            raise ValueError("a bucket needs capacity > 0 and per_minute >= 0")
        self.capacity = float(capacity)
        self.capacity_text = str(int(self.capacity))     # x-ratelimit-limit-*
        self.per_minute = float(per_minute)
        self._monotonic = monotonic
        self._level = self.capacity
        self._stamp = monotonic()

    def _refill(self) -> float:
        """Bring the level up to now and return it (every public method calls this once)."""
        now = self._monotonic()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0.0:                       # a clock that steps back never drains
            level = self._level + elapsed * self.per_minute / 60.0
            self._level = level if level < self.capacity else self.capacity
        return self._level

    def reconfigure(self, capacity: float, per_minute: float) -> None:
        """Adopt new limits (an operator edit), keeping what was already used this minute."""
        if capacity <= 0 or per_minute < 0:
            raise ValueError("a bucket needs capacity > 0 and per_minute >= 0")
        self._refill()
        used = self.capacity - self._level
        self.capacity = float(capacity)
        self.capacity_text = str(int(self.capacity))
        self.per_minute = float(per_minute)
        self._level = self.capacity - used     # below zero: the use already exceeds it

    def level(self) -> float:
        return self._refill()

    def clamp(self, n: float) -> float:
        """The amount `take(n)` debits: never more than the capacity, so a lone request of any
        size passes once the bucket is full."""
        return min(max(n, 0.0), self.capacity)

    def can_take(self, n: float) -> bool:
        return self._refill() >= self.clamp(n)

    def take(self, n: float) -> float:
        """Debit `clamp(n)` and return it; the caller checked `can_take(n)` first."""
        if not self.can_take(n):
            raise ValueError("bucket cannot cover this amount; check can_take() first")
        return self.debit(n)

    def debit(self, n: float) -> float:
        """take(n) straight after can_take(n) returned True, with no await between: the
        level is current, so the clock is not read again. Returns the amount debited."""
        amount = self.clamp(n)
        self._level -= amount
        return amount

    def charge(self, n: float) -> None:
        """Debit usage beyond what was taken; the level may go negative (later requests wait)."""
        self._refill()
        self._level -= max(n, 0.0)

    def give_back(self, n: float) -> None:
        """Refund unused units; the level never exceeds the capacity."""
        self._refill()
        self._level = min(self.capacity, self._level + max(n, 0.0))

    def seconds_until(self, n: float) -> float:
        """How long until `can_take(n)` is true: 0.0 if it is now, inf if it never refills."""
        return self._wait(self.clamp(n) - self._refill())

    def seconds_until_full(self) -> float:
        """The `x-ratelimit-reset-*` value: time until the bucket is back at capacity."""
        return self._wait(self.capacity - self._refill())

    def headroom(self) -> tuple[float, float]:
        """(level, seconds until full) from one reading of the clock: the rate-limit
        headers of every admitted request need both."""
        self._refill()
        return self.state()

    def state(self) -> tuple[float, float]:
        """headroom() as of the last reading of the clock (straight after a debit)."""
        level = self._level
        return level, self._wait(self.capacity - level)

    def _wait(self, missing: float) -> float:
        if missing <= 0:
            return 0.0
        if self.per_minute == 0:
            return math.inf
        return missing * 60.0 / self.per_minute
