"""The fair model queue: slot cap, weighted tenant order, key round-robin, FIFO, timeouts
and cancellation. Fairness is measured by grant order (the `on_grant` hook), never by time;
tasks are synchronised with `asyncio.sleep(0)` yields only."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from neuraldrive_gw.errors import QueueTimeout
from neuraldrive_gw.quotas.fairqueue import FairQueue, Slot


async def spin(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


class Recorder:
    """The queue's grant order plus the driver's own marks, in one sequence."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, tenant: str, key: str, waited: bool) -> None:
        self.events.append(key)


def make(max_parallel: int = 1) -> tuple[FairQueue, Recorder]:
    rec = Recorder()
    return FairQueue(max_parallel, on_grant=rec), rec


def assert_empty(q: FairQueue) -> None:
    assert (q.in_flight, q.queued, q.queue_lengths()) == (0, 0, {})
    assert q._lines == {}


async def test_grants_at_once_while_slots_are_free() -> None:
    q, rec = make(2)
    a = await q.acquire("t", 1, "A", None)
    b = await q.acquire("t", 1, "B", None)
    assert q.in_flight == 2 and q.queued == 0
    a.release()
    a.release()                      # idempotent
    assert q.in_flight == 1
    b.release()
    assert_empty(q)
    assert rec.events == ["A", "B"]


async def test_waiters_get_the_released_slot_fifo_within_a_key() -> None:
    q, _ = make(1)
    held = await q.acquire("t", 1, "A", None)
    tasks = [asyncio.create_task(q.acquire("t", 1, "A", None)) for _ in range(3)]
    await spin()
    assert q.queued == 3 and q.queue_lengths() == {"A": 3}
    order = []
    for _ in range(3):
        held.release()
        await spin()
        done = [t for t in tasks if t.done() and t not in order]
        assert len(done) == 1 and q.in_flight == 1
        order.append(done[0])
        held = done[0].result()
    assert order == tasks
    held.release()
    assert_empty(q)


async def drain(q: FairQueue, held: Slot, tasks: list[asyncio.Task[Slot]], grants: int) -> Slot:
    """Release the held slot `grants` times, each time holding whatever was granted next."""
    for _ in range(grants):
        held.release()
        await spin()
        winners = [t for t in tasks if t.done() and not t.result().released]
        assert len(winners) == 1
        held = winners[0].result()
    return held


@pytest.mark.parametrize("b_tenant", ["t", "u"], ids=["same-tenant", "other-tenant"])
@pytest.mark.parametrize("seed", range(5))
async def test_one_at_a_time_key_waits_for_at_most_one_of_the_busy_key(
        b_tenant: str, seed: int) -> None:
    """Key A keeps 20 requests waiting; key B sends one at a time, at random moments.
    B waits for at most one of A's requests per turn: if A holds the slot when B joins,
    B is next; if B's own previous request still holds it, A gets exactly one turn first."""
    rng = random.Random(seed)
    q, rec = make(1)
    held = await q.acquire("t", 1, "A", None)
    a_tasks: list[asyncio.Task[Slot]] = []

    def top_up_a() -> None:
        while sum(not t.done() for t in a_tasks) < 20:
            a_tasks.append(asyncio.create_task(q.acquire("t", 1, "A", None)))

    top_up_a()
    await spin()
    b_turns = 0
    while b_turns < 15:
        # B sends its next request after a random number of A completions.
        for _ in range(rng.randint(0, 3)):
            held = await drain(q, held, a_tasks, 1)
            top_up_a()
            await spin()
        holder = held.key
        rec.events.append("B-joins")
        b_task = asyncio.create_task(q.acquire(b_tenant, 1, "B", None))
        await spin()
        for _ in range(3):             # bounded: a starving B fails instead of hanging
            if b_task.done():
                break
            held = await drain(q, held, [*a_tasks, b_task], 1)
            top_up_a()
            await spin()
        assert b_task.done(), rec.events[-10:]
        held = b_task.result()
        b_turns += 1
        since = rec.events[len(rec.events) - 1 - rec.events[::-1].index("B-joins"):]
        assert since == (["B-joins", "B"] if holder == "A" else ["B-joins", "A", "B"]), since
    held.release()
    await spin()
    for t in a_tasks:
        if not t.done():
            t.cancel()
    await spin()
    for t in a_tasks:
        if t.done() and not t.cancelled():
            t.result().release()
    assert_empty(q)


@pytest.mark.parametrize("b_tenant", ["t", "u"], ids=["same-tenant", "other-tenant"])
async def test_an_immediate_grant_counts_as_a_turn(b_tenant: str) -> None:
    q, rec = make(1)
    held = await q.acquire("t", 1, "A", None)          # granted at once, nobody waiting
    a_tasks = [asyncio.create_task(q.acquire("t", 1, "A", None)) for _ in range(3)]
    await spin()
    b_task = asyncio.create_task(q.acquire(b_tenant, 1, "B", None))
    await spin()
    held = await drain(q, held, [*a_tasks, b_task], 1)
    assert rec.events == ["A", "B"]
    held = await drain(q, held, a_tasks, 3)
    held.release()
    assert_empty(q)


async def test_an_idle_tenant_earns_no_credit() -> None:
    """Tenant "busy" is served 10 times while "idle" sends nothing; once both are backlogged
    with equal weights they alternate: "idle" does not get 10 turns in a row."""
    q, rec = make(1)
    (await q.acquire("idle", 1, "i", None)).release()      # served once, long ago
    held = await q.acquire("busy", 1, "b", None)
    busy = [asyncio.create_task(q.acquire("busy", 1, "b", None)) for _ in range(20)]
    await spin()
    held = await drain(q, held, busy, 10)
    idle = [asyncio.create_task(q.acquire("idle", 1, "i", None)) for _ in range(10)]
    await spin()
    held = await drain(q, held, [*busy, *idle], 8)
    assert rec.events[12:] == ["i", "b"] * 4
    for t in [*busy, *idle]:
        t.cancel()
    await spin()
    held.release()
    assert_empty(q)


async def run_backlogged(q: FairQueue, waiters: list[tuple[str, int, str]], grants: int,
                         rec: Recorder) -> list[str]:
    held = await q.acquire("holder", 1, "holder", None)
    tasks = [asyncio.create_task(q.acquire(t, w, k, None)) for t, w, k in waiters]
    await spin()
    held = await drain(q, held, tasks, grants)
    granted = rec.events[1:]
    for t in tasks:
        t.cancel()
    await spin()
    held.release()
    assert_empty(q)
    return granted


async def test_tenant_weights_1_and_3_get_grants_1_to_3() -> None:
    q, rec = make(1)
    waiters = [("light", 1, "L")] * 40 + [("heavy", 3, "H")] * 40
    granted = await run_backlogged(q, waiters, 40, rec)
    counts = Counter(granted)
    assert counts == {"L": 10, "H": 30}
    for start in range(0, 40, 4):       # smooth: every window of 4 has exactly one L
        assert granted[start:start + 4].count("L") == 1


async def test_equal_tenants_alternate_regardless_of_how_many_keys_they_use() -> None:
    q, rec = make(1)
    waiters = ([("many", 1, f"k{i % 4}") for i in range(40)] + [("one", 1, "solo")] * 20)
    granted = await run_backlogged(q, waiters, 40, rec)
    assert Counter(k == "solo" for k in granted) == {True: 20, False: 20}
    many = [k for k in granted if k != "solo"]
    assert many == ["k0", "k1", "k2", "k3"] * 5          # round-robin across the keys


async def test_fifo_within_key_and_round_robin_across_keys() -> None:
    q, _ = make(1)
    held = await q.acquire("t", 1, "X", None)
    tasks = [asyncio.create_task(q.acquire("t", 1, key, None)) for key in "AABBBA"]
    await spin()
    order = []
    for _ in tasks:
        held.release()
        await spin()
        winner = next(t for t in tasks if t.done() and t not in order)
        order.append(winner)
        held = winner.result()
    assert [tasks.index(t) for t in order] == [0, 2, 1, 3, 5, 4]
    held.release()
    assert_empty(q)


async def test_timeout_raises_queue_timeout_and_leaves_the_line() -> None:
    q, _ = make(1)
    held = await q.acquire("t", 1, "A", None)
    with pytest.raises(QueueTimeout) as info:
        await q.acquire("t", 1, "B", 0)
    assert info.value.status == 503
    assert info.value.headers == {"Retry-After": "1"}
    assert (q.in_flight, q.queued) == (1, 0)
    held.release()
    assert_empty(q)


async def test_cancelled_waiter_leaves_the_line_at_once() -> None:
    q, _ = make(1)
    held = await q.acquire("t", 1, "A", None)
    task = asyncio.create_task(q.acquire("t", 1, "B", None))
    await spin()
    assert q.queue_lengths() == {"B": 1}
    task.cancel()
    await asyncio.sleep(0)
    assert q.queued == 0 and q.queue_lengths() == {}
    held.release()
    assert_empty(q)


async def test_cancelled_head_is_skipped_when_the_slot_frees_in_the_same_instant() -> None:
    q, rec = make(1)
    held = await q.acquire("t", 1, "A", None)
    first = asyncio.create_task(q.acquire("t", 1, "B", None))
    second = asyncio.create_task(q.acquire("t", 1, "C", None))
    await spin()
    first.cancel()
    held.release()                  # before the cancelled task could leave the line
    await spin()
    assert first.cancelled() and second.done()
    assert rec.events == ["A", "C"]
    second.result().release()
    assert_empty(q)


async def test_slot_granted_to_a_waiter_cancelled_in_the_same_instant_is_passed_on() -> None:
    q, rec = make(1)
    held = await q.acquire("t", 1, "A", None)
    first = asyncio.create_task(q.acquire("t", 1, "B", None))
    second = asyncio.create_task(q.acquire("t", 1, "C", None))
    await spin()
    held.release()                  # hands the slot to `first`'s future ...
    first.cancel()                  # ... which is cancelled before it can run
    await spin()
    assert first.cancelled()
    assert rec.events == ["A", "B", "C"]
    assert second.done() and q.in_flight == 1
    second.result().release()
    assert_empty(q)


async def test_max_parallel_slots_are_all_used() -> None:
    q, _ = make(3)
    held = [await q.acquire("t", 1, "A", None) for _ in range(3)]
    waiting = [asyncio.create_task(q.acquire("t", 1, "A", None)) for _ in range(2)]
    await spin()
    assert (q.in_flight, q.queued) == (3, 2)
    assert q.snapshot() == {"max_parallel": 3, "in_flight": 3, "queued": 2,
                            "queued_by_key": {"A": 2}, "queued_by_tenant": {"t": 2}}
    held[0].release()
    held[1].release()
    await spin()
    assert (q.in_flight, q.queued) == (3, 0)
    for slot in [held[2], *(t.result() for t in waiting)]:
        slot.release()
    assert_empty(q)


async def test_more_slots_serve_waiters_at_once_fewer_wait_for_running_ones() -> None:
    q, rec = make(1)
    held = await q.acquire("t", 1, "A", None)
    waiting = [asyncio.create_task(q.acquire("t", 1, k, None)) for k in "BCD"]
    await spin()
    q.resize(3)                                   # two more slots: B and C get them now
    await spin()
    assert (q.in_flight, q.queued, rec.events) == (3, 1, ["A", "B", "C"])
    q.resize(1)                                   # nobody is interrupted...
    assert q.in_flight == 3
    held.release()
    waiting[0].result().release()
    await spin()
    assert (q.in_flight, q.queued) == (1, 1)      # ...but D waits until one slot is left
    waiting[1].result().release()
    await spin()
    assert (q.in_flight, q.queued, rec.events[-1]) == (1, 0, "D")
    waiting[2].result().release()
    assert_empty(q)
    with pytest.raises(ValueError):
        q.resize(0)


async def test_rejects_invalid_max_parallel() -> None:
    with pytest.raises(ValueError):
        FairQueue(0)


@pytest.mark.parametrize("seed", range(4))
async def test_random_cancels_timeouts_and_releases_leave_nothing(seed: int) -> None:
    rng = random.Random(seed)
    q, _ = make(2)
    tasks: list[asyncio.Task[Slot]] = []
    for i in range(200):
        tenant = rng.choice("xyz")
        timeout = rng.choice([None, None, None, 0])
        tasks.append(asyncio.create_task(
            q.acquire(tenant, rng.randint(1, 3), f"{tenant}{rng.randint(0, 3)}", timeout)))
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        for t in rng.sample(tasks, k=min(3, len(tasks))):
            roll = rng.random()
            if not t.done() and roll < 0.3:
                t.cancel()
            elif t.done() and not t.cancelled() and t.exception() is None and roll < 0.6:
                t.result().release()
    for _ in range(1000):
        await spin(2)
        pending = [t for t in tasks if not t.done()]
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                t.result().release()
        if not pending:
            break
    assert all(t.done() for t in tasks)
    assert_empty(q)
