"""Admission: every quota check for one request, then every debit, then the model slot.

Contract (SPEC §8): all limits are checked before any is debited, with no await in between,
so a refused request consumes nothing and two requests cannot both pass on the same
headroom. The order of checks: per-key and per-tenant concurrency (429 at once), budgets
(429 `insufficient_quota`, reported first because retrying cannot help), the key's
requests/min bucket, the key's and the tenant's tokens/min buckets. Only then are the
buckets debited, the budgets reserved and the concurrency counted; inference routes then
wait for a fair-queue slot, and if that wait ends in a timeout or a cancellation every
debit is undone. The returned Ticket is settled with the real token counts and released
in `finally`; release is idempotent and frees the concurrency counts and the slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..clock import Clock
from ..config import Config, KeyDefaults, MasterLimits
from ..errors import BudgetExhausted, RateLimited, TooManyConcurrent
from ..limits import effective
from ..principals import Principal, Tenant
from .budgets import BudgetLedger, Reservation, Scope, format_reset, reset_time
from .buckets import TokenBucket
from .fairqueue import FairQueue, Slot
from .ratelimit import ratelimit_headers

MASTER_QUEUE_TENANT = ""       # tenant names are never empty; the master key waits as its own


@dataclass(frozen=True)
class Limits:
    """One scope's limits; None means unlimited."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    token_budget: int | None = None
    budget_period: str = "day"
    max_concurrent: int | None = None


_LIMITS_MEMO_MAX = 65_536


def key_limits(principal: Principal, defaults: KeyDefaults, master: MasterLimits) -> Limits:
    """A key's own limits where set (limits.UNLIMITED: none), the configured defaults
    elsewhere; the master key: `limits.master` (unlimited unless configured)."""
    record = principal.record
    if record is None:
        return Limits(requests_per_min=master.requests_per_min,
                      tokens_per_min=master.tokens_per_min, token_budget=master.token_budget,
                      budget_period=master.budget_period, max_concurrent=master.max_concurrent)
    return Limits(
        requests_per_min=effective(record.requests_per_min, defaults.requests_per_min),
        tokens_per_min=effective(record.tokens_per_min, defaults.tokens_per_min),
        token_budget=effective(record.token_budget, defaults.token_budget),
        budget_period=record.budget_period or defaults.budget_period,
        max_concurrent=effective(record.max_concurrent, defaults.max_concurrent))


def tenant_limits(tenant: Tenant, default_period: str) -> Limits:
    """A tenant's limits: exactly what is set on it (tenants are unlimited by default;
    a stored 0 also means none)."""
    return Limits(tokens_per_min=tenant.tokens_per_min or None,
                  token_budget=tenant.token_budget or None,
                  budget_period=tenant.budget_period or default_period,
                  max_concurrent=tenant.max_concurrent or None)


class Ticket:
    """What one admitted request holds: bucket debits, budget reservations, concurrency
    counts and (inference routes) a model slot."""

    __slots__ = ("_admission", "principal", "estimate", "headers", "slot", "metering",
                 "_request_debit", "_token_debits", "_reservations", "_counted", "_settled",
                 "_released")

    def __init__(self, admission: Admission, principal: Principal, estimate: int):
        self._admission = admission
        self.principal = principal
        self.estimate = estimate
        self.headers: dict[str, str] = {}
        self.slot: Slot | None = None
        self.metering: str | None = None     # "counted" or "estimated" once settle() is called
        self._request_debit: tuple[TokenBucket, float] | None = None
        self._token_debits: list[tuple[TokenBucket, float]] = []
        self._reservations: list[Reservation] = []
        self._counted: list[tuple[dict[str, int], str]] = []
        self._settled = False
        self._released = False

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def released(self) -> bool:
        return self._released

    def settle(self, prompt_tokens: int, completion_tokens: int, estimated: bool = False) -> None:
        """Charge the real use: buckets get back (or are charged) the difference from what
        was taken, budgets turn the reservation into spend. Once only; call before release."""
        if self._released:
            raise RuntimeError("settle() after release(): the reservation was already freed")
        if self._settled:
            return
        self._settled = True
        self.metering = "estimated" if estimated else "counted"
        actual = max(0, int(prompt_tokens)) + max(0, int(completion_tokens))
        for bucket, taken in self._token_debits:
            if actual < taken:
                bucket.give_back(taken - actual)
            elif actual > taken:
                bucket.charge(actual - taken)
        for reservation in self._reservations:
            self._admission.ledger.settle(reservation, actual)
        self._admission._settled(actual, estimated)

    def release(self) -> None:
        """Free the slot and concurrency counts; an unsettled ticket is settled at zero (the
        request never reached the model). Idempotent; call in `finally`."""
        if self._released:
            return
        if not self._settled:
            self.settle(0, 0)
            self.metering = None
        self._released = True
        self._free()

    def _rollback(self) -> None:
        """Undo every debit, the request count included (the request never ran)."""
        self._released = self._settled = True
        if self._request_debit is not None:
            self._request_debit[0].give_back(self._request_debit[1])
        for bucket, taken in self._token_debits:
            bucket.give_back(taken)
        for reservation in self._reservations:
            self._admission.ledger.release(reservation)
        self._free()

    def _free(self) -> None:
        if self.slot is not None:
            self.slot.release()
        for counts, name in self._counted:
            left = counts[name] - 1
            if left:
                counts[name] = left
            else:
                del counts[name]
        self._counted.clear()


class _Plan:
    """One key's admission, resolved (Admission._plan)."""

    __slots__ = ("record", "config", "requests", "tokens", "counters", "budgets",
                 "queue_tenant", "weight")

    def __init__(self, record: object, config: Config, requests: TokenBucket | None,
                 tokens: list[TokenBucket],
                 counters: list[tuple[str, str, dict[str, int], int | None]],
                 budgets: list[tuple[Scope, int, str]], queue_tenant: str, weight: int):
        self.record, self.config = record, config
        self.requests, self.tokens = requests, tokens
        self.counters = counters           # (kind, name, in-flight counts, max or None)
        self.budgets = budgets             # (scope, budget, period)
        self.queue_tenant, self.weight = queue_tenant, weight


class Admission:
    """Holds the in-memory quota state of the daemon and admits requests against it."""

    def __init__(self, config: Config, clock: Clock, fairqueue: FairQueue,
                 ledger: BudgetLedger):
        self.config = config
        self.clock = clock
        self.queue = fairqueue
        self.ledger = ledger
        self._key_requests: dict[str, TokenBucket] = {}
        self._key_tokens: dict[str, TokenBucket] = {}
        self._tenant_tokens: dict[str, TokenBucket] = {}
        self._key_active: dict[str, int] = {}
        self._tenant_active: dict[str, int] = {}
        self._budgets: dict[Scope, tuple[int, str]] = {}      # last seen, for status
        self._limits_memo: dict[str, tuple[object, Config, tuple[Limits, Limits | None]]] = {}
        self._plans: dict[str, _Plan] = {}
        self.counters: dict[str, int] = {"admitted": 0, "rejected_concurrency": 0,
                                         "rejected_budget": 0, "rejected_rate": 0,
                                         "queue_abandoned": 0, "settled_tokens": 0,
                                         "settled_estimated": 0}

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded config: new defaults apply from the next admission (buckets are
        resized then, keeping their use), the slot count at once."""
        self.config = config
        self.queue.resize(config.upstream.max_parallel)

    # -- limits ----------------------------------------------------------------------------

    def limits_for(self, principal: Principal) -> tuple[Limits, Limits | None]:
        """(key limits, tenant limits or None for the master key).

        Remembered per key while its record (replaced on every key-store refresh that
        changed it) and the config (replaced on reload) are the same objects."""
        record, config = principal.record, self.config
        memo = self._limits_memo.get(principal.key_id)
        if memo is not None and memo[0] is record and memo[1] is config:
            return memo[2]
        defaults = config.limits.key_defaults
        tenant = None if record is None else tenant_limits(record.tenant, defaults.budget_period)
        limits = key_limits(principal, defaults, config.limits.master), tenant
        if len(self._limits_memo) >= _LIMITS_MEMO_MAX:
            self._limits_memo.clear()
        self._limits_memo[principal.key_id] = (record, config, limits)
        return limits

    def _bucket(self, table: dict[str, TokenBucket], name: str,
                per_min: int | None) -> TokenBucket | None:
        if per_min is None:
            table.pop(name, None)
            return None
        bucket = table.get(name)
        capacity = max(per_min, 1)       # a limit of 0 refills never: everything waits
        if bucket is None:
            bucket = table[name] = TokenBucket(capacity, max(per_min, 0), self.clock.monotonic)
        elif bucket.capacity != capacity or bucket.per_minute != max(per_min, 0):
            bucket.reconfigure(capacity, max(per_min, 0))
        return bucket

    def _scopes(self, principal: Principal, key: Limits,
                tenant: Limits | None) -> list[tuple[Scope, Limits]]:
        scopes: list[tuple[Scope, Limits]] = [(("key", principal.key_id), key)]
        if tenant is not None and principal.tenant is not None:
            scopes.append((("tenant", principal.tenant), tenant))
        return scopes

    def budget_headroom(self, principal: Principal) -> int | None:
        """Tokens the caller may still reserve this period (None: no budget). The pipeline may
        lower the output cap to fit, instead of refusing outright."""
        key, tenant = self.limits_for(principal)
        now = self.clock.time()
        left = [self.ledger.remaining(scope, lim.token_budget, lim.budget_period, now)
                for scope, lim in self._scopes(principal, key, tenant)
                if lim.token_budget is not None]
        return min(left) if left else None

    # -- admitting -------------------------------------------------------------------------

    def _plan(self, principal: Principal) -> _Plan:
        """The buckets, scopes and counters one key's admission touches, remembered while
        the key's record and the config are the same objects (a key-store refresh that
        changed them, or a reload, replaces those, and the next admission builds anew)."""
        record, config = principal.record, self.config
        memo = self._plans.get(principal.key_id)
        if memo is not None and memo.record is record and memo.config is config:
            return memo
        key_lim, tenant_lim = self.limits_for(principal)
        key_id, tenant = principal.key_id, principal.tenant
        requests = self._bucket(self._key_requests, key_id, key_lim.requests_per_min)
        tokens = [b for b in (self._bucket(self._key_tokens, key_id, key_lim.tokens_per_min),
                              None if tenant is None or tenant_lim is None else
                              self._bucket(self._tenant_tokens, tenant, tenant_lim.tokens_per_min))
                  if b is not None]
        scopes = self._scopes(principal, key_lim, tenant_lim)
        counters = [(kind, name, self._key_active if kind == "key" else self._tenant_active,
                     lim.max_concurrent) for (kind, name), lim in scopes]
        budgets = [(scope, lim.token_budget, lim.budget_period) for scope, lim in scopes
                   if lim.token_budget is not None]
        for scope, budget, period in budgets:
            self._budgets[scope] = (budget, period)
        plan = _Plan(record, config, requests, tokens, counters, budgets,
                     MASTER_QUEUE_TENANT if tenant is None else tenant,
                     1 if record is None else record.tenant.weight)
        if len(self._plans) >= _LIMITS_MEMO_MAX:
            self._plans.clear()
        self._plans[key_id] = plan
        return plan

    async def admit(self, principal: Principal, route_inference: bool,
                    estimate_tokens: int) -> Ticket:
        """Check every limit, debit them all, then (inference) wait for a model slot.
        Raises TooManyConcurrent, BudgetExhausted, RateLimited or QueueTimeout."""
        estimate = max(0, int(estimate_tokens))
        plan = self._plan(principal)
        requests, tokens = plan.requests, plan.tokens

        # 1. Checks. Nothing below mutates quota state until every check has passed.
        # Refusals carry the headers as they stand (computed only when refusing).
        for kind, name, counts, limit in plan.counters:
            if limit is not None and counts.get(name, 0) >= limit:
                self.counters["rejected_concurrency"] += 1
                raise TooManyConcurrent(f"too many concurrent requests for this {kind}",
                                        headers=ratelimit_headers(requests, tokens))
        # A request that reserves no tokens (listings, show) is not held to token limits.
        budgets = plan.budgets if estimate > 0 else ()
        now = self.clock.time() if budgets else 0.0
        for scope, budget, period in budgets:
            if not self.ledger.can_reserve(scope, budget, period, estimate, now):
                self.counters["rejected_budget"] += 1
                raise BudgetExhausted(
                    f"token budget exhausted for this {scope[0]}; it resets at "
                    f"{format_reset(period, now)}",
                    retry_after_s=reset_time(period, now) - now,
                    headers=ratelimit_headers(requests, tokens))
        if requests is not None and not requests.can_take(1):
            self.counters["rejected_rate"] += 1
            raise RateLimited("request rate limit reached for this key",
                              retry_after_s=requests.seconds_until(1),
                              headers=ratelimit_headers(requests, tokens))
        for bucket in tokens if estimate > 0 else ():
            if not bucket.can_take(estimate):
                self.counters["rejected_rate"] += 1
                raise RateLimited("token rate limit reached",
                                  retry_after_s=bucket.seconds_until(estimate),
                                  headers=ratelimit_headers(requests, tokens))

        # 2. Debits: all of them, with no await since the checks.
        ticket = Ticket(self, principal, estimate)
        if requests is not None:
            ticket._request_debit = (requests, requests.debit(1))
        if estimate > 0:
            ticket._token_debits = [(bucket, bucket.debit(estimate)) for bucket in tokens]
            ticket._reservations = [self.ledger.reserve(scope, period, estimate, now)
                                    for scope, _, period in budgets]
        counted = ticket._counted
        for _, name, counts, _ in plan.counters:
            counts[name] = counts.get(name, 0) + 1
            counted.append((counts, name))
        ticket.headers = ratelimit_headers(requests, tokens, requests_read=True,
                                           tokens_read=estimate > 0)
        self.counters["admitted"] += 1

        # 3. The model slot: may wait; a timeout or a cancellation undoes everything.
        if route_inference:
            queue = self.queue
            slot = queue.try_acquire(plan.queue_tenant, plan.weight, principal.key_id)
            if slot is None:
                try:
                    slot = await queue.acquire(plan.queue_tenant, plan.weight,
                                               principal.key_id,
                                               self.config.limits.queue_timeout_s)
                except BaseException:
                    self.counters["queue_abandoned"] += 1
                    ticket._rollback()
                    raise
            ticket.slot = slot
        return ticket

    def _settled(self, actual: int, estimated: bool) -> None:
        self.counters["settled_tokens"] += actual
        if estimated:
            self.counters["settled_estimated"] += 1

    # -- status ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Plain data for the status socket and for tests that look for leaks."""
        now = self.clock.time()

        def levels(table: dict[str, TokenBucket]) -> dict[str, dict[str, float]]:
            return {name: {"level": round(b.level(), 3), "capacity": b.capacity}
                    for name, b in sorted(table.items())}

        budgets = [{"scope": scope[0], "name": scope[1], "budget": budget, "period": period,
                    "left": self.ledger.remaining(scope, budget, period, now)}
                   for scope, (budget, period) in sorted(self._budgets.items())]
        return {"in_flight_by_key": dict(self._key_active),
                "in_flight_by_tenant": dict(self._tenant_active),
                "queue": self.queue.snapshot(),
                "buckets": {"key_requests": levels(self._key_requests),
                            "key_tokens": levels(self._key_tokens),
                            "tenant_tokens": levels(self._tenant_tokens)},
                "budgets": budgets,
                "ledger": self.ledger.snapshot(),
                "open_reservations": self.ledger.open_reservations,
                "counters": dict(self.counters)}

