"""The per-client-IP authentication-failure limiter (SPEC §3 step 3, §8).

Each client address has a bucket of `per_minute` failures that refills continuously. A
request whose bucket is empty gets 429 before any key work (no key parsing, no cache
lookup, no Argon2), so guessing keys from one address costs at most `per_minute` tries a
minute. IPv6 clients are grouped by /64, the block one host usually holds, so walking
through addresses inside it does not buy more guesses.

Memory is bounded: at most `max_tracked` addresses are held; a full table first forgets
addresses whose bucket has refilled, then, if that was not enough, the ones that failed
least recently.
Pure state on an injected monotonic clock; no tasks, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable

from ..errors import RateLimited
from .buckets import TokenBucket

DEFAULT_MAX_TRACKED = 10_000


@functools.lru_cache(maxsize=4096)
def address_group(address: str) -> str:
    """The unit the limit applies to: the IPv4 address, or the IPv6 /64 it lies in."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthFailureLimiter:
    """`check()` before authenticating, `failed()` after a refusal (config guarantees
    `per_minute` > 0: the limiter cannot be switched off, only widened)."""

    def __init__(self, per_minute: int, monotonic: Callable[[], float], *,
                 max_tracked: int = DEFAULT_MAX_TRACKED):
        self.per_minute = per_minute
        self._monotonic = monotonic
        self._max_tracked = max_tracked
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.refused = 0

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    def reconfigure(self, per_minute: int) -> None:
        """A new limit (config reload), keeping the failures already counted."""
        self.per_minute = per_minute
        for bucket in self._buckets.values():
            bucket.reconfigure(per_minute, per_minute)

    def check(self, address: str) -> None:
        """Raise RateLimited when this address has used up its failures for now."""
        if not self._buckets:
            return                # nobody has failed lately: no address to parse
        bucket = self._buckets.get(address_group(address))
        if bucket is not None and not bucket.can_take(1):
            self.refused += 1
            raise RateLimited("too many failed authentication attempts from this address",
                              retry_after_s=bucket.seconds_until(1))

    def failed(self, address: str) -> None:
        """Count one failed authentication from this address."""
        group = address_group(address)
        bucket = self._buckets.get(group)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[group] = TokenBucket(self.per_minute, self.per_minute,
                                                        self._monotonic)
        else:
            self._buckets.move_to_end(group)
        if bucket.can_take(1):
            bucket.take(1)

    def refund(self, address: str) -> None:
        """Give back a failure counted in advance (an Argon2 verification that succeeded)."""
        group = address_group(address)
        bucket = self._buckets.get(group)
        if bucket is not None:
            bucket.give_back(1)
            if bucket.level() >= bucket.capacity:
                # Nothing left to remember: an empty table lets check() skip all work
                # for every later request (a verified key's first request put it there).
                del self._buckets[group]

    def _make_room(self) -> None:
        if len(self._buckets) < self._max_tracked:
            return
        # Refilled buckets carry no state worth keeping.
        for group in [g for g, b in self._buckets.items() if b.level() >= b.capacity]:
            del self._buckets[group]
        # Still full: forget the least recently failing tenth at once, so a flood of new
        # addresses pays for this scan once per max_tracked/10 inserts, not on every one.
        target = self._max_tracked - max(1, self._max_tracked // 10)
        while len(self._buckets) > target:
            self._buckets.popitem(last=False)
