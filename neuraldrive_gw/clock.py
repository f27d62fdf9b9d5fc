"""Time as a dependency: components take a Clock so tests can move time without sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    """The real clocks: monotonic for intervals and TTLs, wall time for expiry dates.
    (The functions themselves, not wrappers: the request path reads them a dozen times.)"""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)
