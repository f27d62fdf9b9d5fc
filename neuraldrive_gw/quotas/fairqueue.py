"""The global model-slot cap and its fair queue (SPEC §8, `upstream.max_parallel`).

At most `max_parallel` slots are held at once. Requests beyond that wait; when a slot frees
it is handed straight to the next waiter, chosen in three steps:

1. **Across tenants, by weight** — start-time fair queueing. Each tenant carries a virtual
   start tag; the waiting tenant with the smallest tag is served, and every grant (queued or
   immediate) advances the tenant's tag by 1/weight, so backlogged tenants are served in
   proportion to their weights (weights 1 and 3 → grants 1:3). A tenant that starts waiting
   is lifted to the current virtual time, so idling earns no credit and leaving and
   rejoining the line gains nothing. Ties go to the tenant served least recently.
2. **Across one tenant's keys, least recently served first** — round-robin for backlogged
   keys, and a key that starts waiting goes ahead of a key served since, so a one-at-a-time
   key waits for at most one request of a busy key per turn.
3. **Within one key, FIFO.**

A waiter that is cancelled (client gone) leaves the line at once; a slot handed to a waiter
in the same instant it was cancelled is passed on, never lost. Timeouts use the event loop's
clock; everything else is synchronous bookkeeping between awaits.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import QueueTimeout

GrantHook = Callable[[str, str, bool], None]     # (tenant, key, waited)
_MEMORY = 4096      # service history kept for idle keys and tenants before pruning
# Virtual time in integer units: a grant advances its tenant's tag by _UNIT // weight.
# lcm(1..20) × 2^32, so that for every weight up to 20 (and any divisor of _UNIT) the
# arithmetic is exact and ties stay ties; larger weights round down by less than one
# part in 2^32. (Fractions gave the same order at several times the cost per grant.)
_UNIT = 232_792_560 << 32


class Slot:
    """One held model slot. `release()` is idempotent and safe in any `finally`."""

    __slots__ = ("_queue", "tenant", "key", "released")

    def __init__(self, queue: FairQueue, tenant: str, key: str):
        self._queue = queue
        self.tenant = tenant
        self.key = key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._queue._hand_on()


@dataclass(eq=False)
class _Waiter:
    tenant: str
    key: str
    future: asyncio.Future[Slot | None]
    timer: asyncio.TimerHandle | None = None
    waiting: bool = True


@dataclass(eq=False)
class _TenantState:
    weight: int
    tag: int
    last_served: int = -1


class FairQueue:
    """`max_parallel` slots; waiters served by tenant weight, then key round-robin, then FIFO."""

    def __init__(self, max_parallel: int, *, on_grant: GrantHook | None = None):
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.max_parallel = max_parallel
        self.on_grant = on_grant
        self._in_flight = 0
        self._queued = 0
        # Waiting requests: tenant → key → FIFO. Dicts keep join order for tie-breaks.
        self._lines: dict[str, dict[str, deque[_Waiter]]] = {}
        # Service history, kept while idle too, so that immediate grants count as turns.
        self._tenants: dict[str, _TenantState] = {}
        self._key_served: dict[str, int] = {}
        self._virtual = 0
        self._serial = 0

    # -- status ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    def queue_lengths(self) -> dict[str, int]:
        """Waiters per key (keys with none are absent)."""
        return {key: len(waiters) for line in self._lines.values()
                for key, waiters in line.items()}

    def tenant_queue_lengths(self) -> dict[str, int]:
        return {tenant: sum(len(w) for w in line.values())
                for tenant, line in self._lines.items()}

    def snapshot(self) -> dict[str, object]:
        return {"max_parallel": self.max_parallel, "in_flight": self._in_flight,
                "queued": self._queued, "queued_by_key": self.queue_lengths(),
                "queued_by_tenant": self.tenant_queue_lengths()}

    # -- acquiring -------------------------------------------------------------------------

    def try_acquire(self, tenant: str, weight: int, key: str) -> Slot | None:
        """A slot now if one is free and nobody waits, else None (acquire() waits). The
        admission of a request that does not wait, without a coroutine."""
        if self._in_flight < self.max_parallel and self._queued == 0:
            self._in_flight += 1
            self._account(tenant, max(1, int(weight)), key)
            return self._grant(tenant, key, waited=False)
        return None

    async def acquire(self, tenant: str, weight: int, key: str,
                      timeout: float | None) -> Slot:
        """A slot now if one is free and nobody waits; else wait in line up to `timeout`
        seconds (None: no limit) and raise QueueTimeout. Cancellation leaves the line."""
        weight = max(1, int(weight))
        slot = self.try_acquire(tenant, weight, key)
        if slot is not None:
            return slot
        loop = asyncio.get_running_loop()
        waiter = _Waiter(tenant, key, loop.create_future())
        self._enqueue(waiter, weight)
        if timeout is not None and math.isfinite(timeout):
            waiter.timer = loop.call_later(max(0.0, timeout), self._expire, waiter)
        try:
            slot = await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()
        if slot is None:
            raise QueueTimeout(retry_after_s=max(1, min(60, math.ceil(timeout or 1))))
        return slot

    def _grant(self, tenant: str, key: str, *, waited: bool) -> Slot:
        if self.on_grant is not None:
            self.on_grant(tenant, key, waited)
        return Slot(self, tenant, key)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._remove(waiter)
            waiter.future.set_result(None)

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled: leave the line, or pass on a slot already handed
        over in the same instant (the future completed before the cancellation landed)."""
        future = waiter.future
        if future.done() and not future.cancelled():
            slot = future.result()
            if slot is not None:
                slot.release()
        self._remove(waiter)

    def resize(self, max_parallel: int) -> None:
        """Adopt a new number of slots (config reload): more slots serve waiters at once;
        fewer take effect as running requests finish (nobody is interrupted)."""
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.max_parallel = max_parallel
        while self._in_flight < self.max_parallel and self._queued:
            self._in_flight += 1
            self._hand_on()

    def _hand_on(self) -> None:
        """A slot was released: give it to the next live waiter, or free it."""
        if self._in_flight > self.max_parallel:      # shrunk by resize(): retire this one
            self._in_flight -= 1
            return
        while (waiter := self._head()) is not None:
            if waiter.future.done():            # cancelled a moment ago: not its turn to spend
                self._remove(waiter)
                continue
            self._serve(waiter)
            waiter.future.set_result(self._grant(waiter.tenant, waiter.key, waited=True))
            return
        self._in_flight -= 1

    # -- the line ----------------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter, weight: int) -> None:
        state = self._tenant(waiter.tenant, weight)
        line = self._lines.get(waiter.tenant)
        if line is None:
            line = self._lines[waiter.tenant] = {}
            state.tag = max(state.tag, self._virtual)     # no credit for having been idle
        line.setdefault(waiter.key, deque()).append(waiter)
        self._queued += 1

    def _tenant(self, tenant: str, weight: int) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState(weight, self._virtual)
        state.weight = weight
        return state

    def _head(self) -> _Waiter | None:
        """The waiter to serve next, left in line."""
        if not self._lines:
            return None
        tenant = min(self._lines, key=lambda t: (self._tenants[t].tag,
                                                  self._tenants[t].last_served))
        line = self._lines[tenant]
        key = min(line, key=lambda k: self._key_served.get(k, -1))
        return line[key][0]

    def _serve(self, waiter: _Waiter) -> None:
        """Take the head waiter out of line and charge its tenant and key one turn."""
        self._remove(waiter)
        self._account(waiter.tenant, self._tenants[waiter.tenant].weight, waiter.key)

    def _account(self, tenant: str, weight: int, key: str) -> None:
        """Record one grant: advance the tenant's tag and the key's last-served stamp."""
        state = self._tenant(tenant, weight)
        start = max(state.tag, self._virtual)
        self._virtual = start
        state.tag = start + _UNIT // state.weight
        self._serial += 1
        state.last_served = self._key_served[key] = self._serial
        if len(self._key_served) > _MEMORY or len(self._tenants) > _MEMORY:
            self._prune()

    def _prune(self) -> None:
        """Forget the oldest history of keys and tenants that are not waiting. Losing it only
        weakens tie-breaks: an idle tenant's tag is lifted to the virtual time anyway."""
        waiting = {key for line in self._lines.values() for key in line}
        by_age = sorted(self._key_served.items(), key=lambda item: item[1])
        for key, _ in by_age[:len(by_age) - _MEMORY // 2]:
            if key not in waiting:
                del self._key_served[key]
        self._tenants = {t: s for t, s in self._tenants.items()
                         if t in self._lines or s.tag > self._virtual}

    def _remove(self, waiter: _Waiter) -> None:
        if not waiter.waiting:
            return
        waiter.waiting = False
        self._queued -= 1
        line = self._lines[waiter.tenant]
        waiters = line[waiter.key]
        waiters.remove(waiter)
        if not waiters:
            del line[waiter.key]
        if not line:
            del self._lines[waiter.tenant]
