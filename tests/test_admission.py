"""Admission: checks before debits, refunds, headers, budgets under concurrency, no leaks.

Time comes from a FakeClock; tasks are synchronised with events and `asyncio.sleep(0)`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import random
from typing import Any

import pytest

from conftest import FakeClock
from neuraldrive_gw.config import Config, KeyDefaults, LimitsConfig
from neuraldrive_gw.errors import (BudgetExhausted, Dialect, QueueTimeout, RateLimited,
                                   TooManyConcurrent, error_body)
from neuraldrive_gw.principals import MASTER, KeyRecord, Principal, Tenant, principal_for
from neuraldrive_gw.quotas import Admission, BudgetLedger, FairQueue, Ticket, openai_duration

NOON = dt.datetime(2026, 11, 22, 12, tzinfo=dt.timezone.utc).timestamp()


async def spin(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def make(max_parallel: int = 1, queue_timeout_s: float = 30.0,
         **defaults: Any) -> tuple[Admission, FakeClock]:
    clock = FakeClock()
    clock._wall = NOON
    config = Config(limits=LimitsConfig(queue_timeout_s=queue_timeout_s,
                                        key_defaults=KeyDefaults(**defaults)))
    return Admission(config, clock, FairQueue(max_parallel), BudgetLedger()), clock


def key(key_id: str = "k1", tenant: Tenant | None = None, **limits: Any) -> Principal:
    return principal_for(KeyRecord(key_id=key_id, tenant=tenant or Tenant(1, "acme"), hash="",
                                   **limits))


def state(adm: Admission) -> dict[str, Any]:
    """The quota state, without the counters (those do count rejections)."""
    snap = adm.snapshot()
    snap.pop("counters")
    return snap


def assert_clean(adm: Admission) -> None:
    snap = adm.snapshot()
    assert snap["in_flight_by_key"] == {} and snap["in_flight_by_tenant"] == {}
    assert snap["queue"] == {"max_parallel": adm.queue.max_parallel, "in_flight": 0,
                             "queued": 0, "queued_by_key": {}, "queued_by_tenant": {}}
    assert snap["open_reservations"] == 0 and adm.ledger.total_reserved() == 0


# -- durations and limits ------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.0001, "1ms"), (0.25, "250ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"),
    (8.64, "8.64s"), (59.9985, "59.999s"), (59.9994, "1m0s"), (60, "1m0s"), (360, "6m0s"),
    (361.25, "6m1.25s"),
    (3600, "1h0m0s"), (3723, "1h2m3s"), (float("inf"), "0s"),
])
def test_openai_duration(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text


def test_key_limits_fall_back_to_defaults_and_master_is_unlimited() -> None:
    adm, _ = make(requests_per_min=60, tokens_per_min=1000, max_concurrent=4,
                  token_budget=5000, budget_period="month")
    tenant = Tenant(1, "acme", tokens_per_min=900, max_concurrent=7)
    own, ten = adm.limits_for(key(tenant=tenant, requests_per_min=5, budget_period="day"))
    assert (own.requests_per_min, own.tokens_per_min, own.max_concurrent, own.token_budget,
            own.budget_period) == (5, 1000, 4, 5000, "day")
    assert ten is not None
    assert (ten.tokens_per_min, ten.max_concurrent, ten.token_budget) == (900, 7, None)
    master, master_tenant = adm.limits_for(MASTER)
    assert master_tenant is None
    assert master == dataclasses.replace(master, requests_per_min=None, tokens_per_min=None,
                                         token_budget=None, max_concurrent=None)


# -- admitting -------------------------------------------------------------------------------

async def test_headers_reflect_the_debit() -> None:
    adm, clock = make(requests_per_min=60, tokens_per_min=100_000)
    ticket = await adm.admit(key(), True, 25_000)
    assert ticket.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "100000",
        "x-ratelimit-remaining-tokens": "75000", "x-ratelimit-reset-tokens": "15s"}
    ticket.settle(100, 150)
    ticket.release()
    clock.advance(0.5)
    second = await adm.admit(key(), False, 0)
    assert second.headers["x-ratelimit-remaining-requests"] == "58"     # 59.5 - 1
    assert second.headers["x-ratelimit-reset-requests"] == "1.5s"
    assert second.headers["x-ratelimit-remaining-tokens"] == "100000"   # 250 used, refilled
    second.release()
    assert_clean(adm)


async def test_tokens_headers_report_the_tighter_bucket() -> None:
    adm, _ = make(tokens_per_min=100_000)
    ticket = await adm.admit(key(tenant=Tenant(1, "acme", tokens_per_min=6000)), False, 3000)
    assert ticket.headers["x-ratelimit-limit-tokens"] == "6000"
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "3000"
    assert ticket.headers["x-ratelimit-reset-tokens"] == "30s"
    ticket.release()


async def test_master_is_unlimited_and_has_no_rate_headers() -> None:
    adm, _ = make(requests_per_min=1, tokens_per_min=1, max_concurrent=1, token_budget=1)
    tickets = [await adm.admit(MASTER, False, 10**9) for _ in range(5)]
    assert all(t.headers == {} for t in tickets)
    assert adm.snapshot()["in_flight_by_key"] == {"master": 5}
    for t in tickets:
        t.settle(10**9, 0)
        t.release()
    assert_clean(adm)


async def test_key_concurrency_cap_refuses_at_once() -> None:
    adm, _ = make(max_concurrent=2)
    held = [await adm.admit(key(), False, 10) for _ in range(2)]
    before = state(adm)
    with pytest.raises(TooManyConcurrent) as info:
        await adm.admit(key(), False, 10)
    assert info.value.status == 429
    assert info.value.message == "too many concurrent requests for this key"
    assert info.value.headers["retry-after"] == "1"
    assert info.value.headers["x-ratelimit-remaining-requests"] == "58"
    assert state(adm) == before
    held[0].release()
    (await adm.admit(key(), False, 10)).release()
    held[1].release()
    assert_clean(adm)


async def test_tenant_concurrency_cap_spans_its_keys() -> None:
    adm, _ = make()
    tenant = Tenant(1, "acme", max_concurrent=2)
    a = await adm.admit(key("k1", tenant), False, 1)
    b = await adm.admit(key("k2", tenant), False, 1)
    with pytest.raises(TooManyConcurrent, match="for this tenant"):
        await adm.admit(key("k3", tenant), False, 1)
    other = await adm.admit(key("k4", Tenant(2, "other")), False, 1)
    for t in (a, b, other):
        t.release()
    assert_clean(adm)


async def test_requests_per_minute() -> None:
    adm, clock = make(requests_per_min=3)
    for _ in range(3):
        (await adm.admit(key(), False, 0)).release()
    with pytest.raises(RateLimited) as info:
        await adm.admit(key(), False, 0)
    assert info.value.headers["retry-after"] == "20"
    assert info.value.headers["retry-after-ms"] == "20000"
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert info.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.advance(19.9)
    with pytest.raises(RateLimited) as info:
        await adm.admit(key(), False, 0)
    headers = info.value.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "100")
    clock.advance(0.1)
    (await adm.admit(key(), False, 0)).release()


async def test_tokens_per_minute_reserve_then_settle_refunds_or_charges() -> None:
    adm, clock = make(tokens_per_min=1200)
    t1 = await adm.admit(key(), False, 1000)
    with pytest.raises(RateLimited, match="token rate") as info:
        await adm.admit(key(), False, 300)
    assert info.value.headers["retry-after-ms"] == "5000"
    t1.settle(100, 50)                          # 850 come back
    t2 = await adm.admit(key(), False, 300)
    t2.settle(1000, 500)                        # 1200 beyond the reservation: debt
    assert adm.snapshot()["buckets"]["key_tokens"]["k1"]["level"] == pytest.approx(-450)
    with pytest.raises(RateLimited):
        await adm.admit(key(), False, 1)
    clock.advance(23)
    (await adm.admit(key(), False, 1)).release()
    t1.release()
    t2.release()
    assert_clean(adm)


async def test_tenant_tokens_per_minute() -> None:
    adm, _ = make()
    tenant = Tenant(1, "acme", tokens_per_min=500)
    (await adm.admit(key("k1", tenant), False, 400)).settle(400, 0)
    with pytest.raises(RateLimited):
        await adm.admit(key("k2", tenant), False, 200)


async def test_a_lone_request_larger_than_the_bucket_passes_when_full() -> None:
    adm, clock = make(tokens_per_min=1000)
    ticket = await adm.admit(key(), False, 50_000)
    ticket.settle(30_000, 0)        # 29,000 beyond the clamped 1,000 debit
    ticket.release()
    assert adm.snapshot()["buckets"]["key_tokens"]["k1"]["level"] == pytest.approx(-29_000)
    clock.advance(30 * 60)
    (await adm.admit(key(), False, 50_000)).release()


async def test_requests_without_tokens_skip_token_limits() -> None:
    adm, _ = make(tokens_per_min=10, token_budget=10)
    t = await adm.admit(key(), True, 10)
    t.settle(40, 0)                 # over budget and in debt
    t.release()
    listing = await adm.admit(key(), False, 0)
    assert adm.queue.in_flight == 0
    listing.release()
    with pytest.raises(BudgetExhausted):
        await adm.admit(key(), True, 1)


async def test_budget_exhausted_names_the_reset_and_says_do_not_retry() -> None:
    adm, _ = make(token_budget=1000)
    t = await adm.admit(key(), False, 800)
    t.settle(700, 100)
    t.release()
    with pytest.raises(BudgetExhausted) as info:
        await adm.admit(key(), False, 201)
    err = info.value
    assert err.status == 429
    assert err.message == ("token budget exhausted for this key; it resets at "
                           "2026-11-23T00:00:00Z")
    assert err.headers["x-should-retry"] == "false"
    assert err.headers["retry-after"] == str(12 * 3600)
    body = json.loads(error_body(err, Dialect.OPENAI, "RID"))
    assert body["error"]["type"] == "insufficient_quota"
    assert body["error"]["code"] == "insufficient_quota"
    assert json.loads(error_body(err, Dialect.ANTHROPIC, "RID"))["error"]["type"] == \
        "rate_limit_error"
    (await adm.admit(key(), False, 200)).release()
    assert adm.budget_headroom(key()) == 200


async def test_tenant_budget_by_month() -> None:
    adm, _ = make()
    tenant = Tenant(1, "acme", token_budget=100, budget_period="month")
    t = await adm.admit(key("k1", tenant), False, 60)
    with pytest.raises(BudgetExhausted, match="for this tenant; it resets at 2026-12-01T00"):
        await adm.admit(key("k2", tenant), False, 41)
    t.release()
    assert adm.budget_headroom(key("k2", tenant)) == 100
    assert adm.budget_headroom(MASTER) is None


REJECTIONS = [
    ("concurrency", dict(max_concurrent=1), TooManyConcurrent),
    ("budget", dict(token_budget=150), BudgetExhausted),
    ("requests", dict(requests_per_min=1), RateLimited),
    ("tokens", dict(tokens_per_min=150), RateLimited),
]


@pytest.mark.parametrize("limit, defaults, error", REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_a_rejected_request_consumes_nothing(limit: str, defaults: dict[str, Any],
                                                   error: type[Exception]) -> None:
    adm, _ = make(max_parallel=1, **defaults)
    tenant = Tenant(1, "acme", tokens_per_min=10_000, token_budget=10_000)
    held = await adm.admit(key(tenant=tenant), True, 100)
    before = state(adm)
    for _ in range(3):
        with pytest.raises(error):
            await adm.admit(key(tenant=tenant), True, 100)
    assert state(adm) == before
    held.release()
    assert_clean(adm)


# -- the queue -----------------------------------------------------------------------------

async def test_queue_timeout_undoes_every_debit() -> None:
    adm, _ = make(max_parallel=1, queue_timeout_s=0, token_budget=10_000)
    held = await adm.admit(key("k1"), True, 100)
    before = state(adm)
    with pytest.raises(QueueTimeout) as info:
        await adm.admit(key("k2"), True, 100)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
    after = state(adm)
    # The refused request's buckets were created by its check, and refilled to full.
    assert [b.pop("left") for b in after["budgets"] if b["name"] == "k2"] == [10_000]
    after["budgets"] = [b for b in after["budgets"] if b["name"] != "k2"]
    for table in ("key_requests", "key_tokens"):
        assert after["buckets"][table].pop("k2")["level"] == pytest.approx(
            after["buckets"][table]["k1"]["capacity"])
    assert after == before
    held.release()
    assert_clean(adm)


async def test_cancel_while_queued_undoes_every_debit() -> None:
    adm, _ = make(max_parallel=1, token_budget=10_000)
    held = await adm.admit(key("k1"), True, 100)
    before = state(adm)
    task = asyncio.create_task(adm.admit(key("k1"), True, 100))
    await spin()
    assert adm.snapshot()["in_flight_by_key"] == {"k1": 2}
    assert adm.queue.queue_lengths() == {"k1": 1}
    task.cancel()
    await asyncio.sleep(0)
    assert task.cancelled()
    assert state(adm) == before
    held.release()
    assert_clean(adm)


async def test_only_inference_routes_take_a_slot() -> None:
    adm, _ = make(max_parallel=1)
    held = await adm.admit(key("k1"), True, 10)
    listing = await adm.admit(key("k2"), False, 0)      # does not queue behind the slot
    assert held.slot is not None and listing.slot is None
    listing.release()
    held.release()
    assert_clean(adm)


async def test_ticket_release_is_idempotent_and_settle_is_once() -> None:
    adm, _ = make(token_budget=1000)
    t = await adm.admit(key(), True, 100)
    t.settle(10, 20)
    t.settle(500, 500)                      # ignored
    assert t.metering == "counted"
    t.release()
    t.release()
    with pytest.raises(RuntimeError):
        t.settle(1, 1)
    assert adm.ledger.spent(("key", "k1"), "2026-11-22") == 30
    u = await adm.admit(key(), True, 100)
    u.release()                             # never settled: charged nothing
    assert adm.ledger.spent(("key", "k1"), "2026-11-22") == 30
    v = await adm.admit(key(), True, 100)
    v.settle(60, 40, estimated=True)
    v.release()
    assert v.metering == "estimated" and adm.counters["settled_estimated"] == 1
    assert_clean(adm)


# -- under load ------------------------------------------------------------------------------

async def admit_or_error(adm: Admission, principal: Principal, inference: bool,
                         estimate: int) -> Ticket | Exception:
    try:
        return await adm.admit(principal, inference, estimate)
    except (BudgetExhausted, RateLimited, QueueTimeout) as exc:
        return exc


@pytest.mark.parametrize("scope", ["key", "tenant"])
async def test_fifty_concurrent_requests_against_a_budget_for_ten(scope: str) -> None:
    """50 requests of 100 tokens each arrive together against a budget of 1000: exactly 10
    are admitted (and hold their reservations while they queue for the one slot), 40 get
    429 insufficient_quota, and the settled spend is exactly the budget, never more."""
    adm, _ = make(max_parallel=1, max_concurrent=100, requests_per_min=1000,
                  tokens_per_min=10**6, token_budget=1000 if scope == "key" else None)
    tenant = Tenant(1, "acme", token_budget=1000 if scope == "tenant" else None)
    principals = ([key(tenant=tenant)] * 50 if scope == "key"
                  else [key(f"k{i % 5}", tenant) for i in range(50)])
    tasks = [asyncio.create_task(admit_or_error(adm, p, True, 100)) for p in principals]
    await spin()
    rejected = [t.result() for t in tasks if t.done() and isinstance(t.result(), Exception)]
    assert len(rejected) == 40 and all(isinstance(e, BudgetExhausted) for e in rejected)
    assert adm.ledger.total_reserved() == 1000
    assert adm.queue.in_flight == 1 and adm.queue.queued == 9
    settled = 0
    while settled < 10:
        ticket = next(r for t in tasks if t.done()
                      for r in [t.result()] if isinstance(r, Ticket) and not r.released)
        ticket.settle(40, 60)
        ticket.release()
        settled += 1
        await spin()
    name = ("key", "k1") if scope == "key" else ("tenant", "acme")
    assert adm.ledger.spent(name, "2026-11-22") == 1000
    assert adm.counters["admitted"] == 10 and adm.counters["rejected_budget"] == 40
    assert_clean(adm)


async def test_concurrent_admissions_with_interleaved_settlement_never_overspend() -> None:
    rng = random.Random(7)
    adm, _ = make(max_parallel=3, max_concurrent=1000, requests_per_min=10**6,
                  tokens_per_min=10**9, token_budget=5000)
    spent_by_us = 0
    passed = 0

    async def request() -> None:
        nonlocal spent_by_us, passed
        estimate = rng.randint(50, 400)
        try:
            ticket = await adm.admit(key(), True, estimate)
        except BudgetExhausted:
            return
        passed += 1
        try:
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            actual = rng.randint(0, estimate)
            ticket.settle(actual // 2, actual - actual // 2)
            spent_by_us += actual
        finally:
            ticket.release()

    await asyncio.gather(*(request() for _ in range(300)))
    assert adm.ledger.spent(("key", "k1"), "2026-11-22") == spent_by_us <= 5000
    assert passed > 5000 // 400
    assert_clean(adm)


@pytest.mark.parametrize("seed", range(3))
async def test_two_hundred_tickets_cancelled_or_released_at_random_leave_nothing(
        seed: int) -> None:
    rng = random.Random(seed)
    adm, clock = make(max_parallel=2, queue_timeout_s=30, max_concurrent=30,
                      requests_per_min=10**6, tokens_per_min=10**7, token_budget=10**7)
    tenants = [Tenant(i, f"t{i}", weight=i + 1, max_concurrent=50, token_budget=30_000,
                      tokens_per_min=10**7) for i in range(3)]
    principals = [key(f"k{i}", tenants[i % 3]) for i in range(6)] + [MASTER]
    outcomes: dict[str, int] = {}

    async def request(i: int, gate: asyncio.Event) -> None:
        ticket: Ticket | None = None
        try:
            ticket = await adm.admit(rng.choice(principals), rng.random() < 0.8,
                                     rng.randint(0, 2000))
            await gate.wait()
            if rng.random() < 0.5:
                ticket.settle(rng.randint(0, 1000), rng.randint(0, 1000),
                              estimated=rng.random() < 0.2)
            if rng.random() < 0.3:
                raise ConnectionResetError("upstream reset")
        except (RateLimited, BudgetExhausted, QueueTimeout, ConnectionResetError) as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        finally:
            if ticket is not None:
                ticket.release()

    gates = [asyncio.Event() for _ in range(200)]
    tasks = [asyncio.create_task(request(i, gates[i])) for i in range(200)]
    for _ in range(400):
        roll = rng.random()
        i = rng.randrange(200)
        if roll < 0.3:
            tasks[i].cancel()           # client gone: queued, holding a slot, or streaming
        elif roll < 0.7:
            gates[i].set()
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        if rng.random() < 0.05:
            clock.advance(1)
    for gate in gates:
        gate.set()
    for _ in range(200):
        await spin(3)
        if all(t.done() for t in tasks):
            break
    assert all(t.done() for t in tasks)
    assert_clean(adm)
    assert sum(outcomes.values()) + sum(t.cancelled() for t in tasks) <= 200
    assert adm.counters["admitted"] > 50
