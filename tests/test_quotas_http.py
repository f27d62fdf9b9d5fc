"""Quotas under concurrency, cancellation and contention, through HTTP (SPEC §7, §8, §10).

* Budgets: 50 concurrent requests against a budget that fits 10 reservations never
  overspend, the refused ones are `insufficient_quota`, and the audit log adds up to the
  ledger.
* Leaks: 200 requests broken at random points (client aborts while queued or streaming,
  upstream resets, timeouts, truncations, in-band errors) leave no slot, reservation,
  count or queue entry behind, and exactly one audit row each.
* Fairness: with one model slot, a key that sends one request at a time waits for at most
  one request of a key that keeps 20 in flight — measured as grant order, not time.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from conftest import ALLOWED_MODEL, Gateway, GatewayFactory, run_cli
from neuraldrive_gw import keys as keyfmt
from neuraldrive_gw.cli.keys import keys
from neuraldrive_gw.cli.tenants import tenants
from neuraldrive_gw.devtools.fake_ollama import Fault
from neuraldrive_gw.quotas.budgets import period_key

OTHER_MODEL = "qwen2.5:0.5b"
ROOMY = {"limits__key_defaults__requests_per_min": 100_000,
         "limits__key_defaults__tokens_per_min": 100_000_000,
         "limits__key_defaults__max_concurrent": 1000}


def chat_body(stream: bool, cap: int = 200, model: str = ALLOWED_MODEL) -> dict[str, Any]:
    return {"model": model, "stream": stream, "options": {"num_predict": cap},
            "messages": [{"role": "user", "content": "count to three"}]}


async def until(condition: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s"
        await asyncio.sleep(0.01)


def audit(gw: Gateway) -> list[sqlite3.Row]:
    conn = sqlite3.connect(gw.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


async def post(http: aiohttp.ClientSession, gw: Gateway, key: str, path: str,
               body: dict[str, Any]) -> tuple[int, str, dict[str, Any] | None]:
    async with http.post(gw.url + path, json=body, headers=gw.auth(key)) as r:
        text = await r.text()
        parsed = json.loads(text) if r.status != 200 else None
        return r.status, r.headers["X-Request-ID"], parsed


# -- budgets ----------------------------------------------------------------------------------


def estimate(body: dict[str, Any]) -> int:
    """What admission reserves: the forwarded body's bytes plus the output cap."""
    return len(json.dumps(body).encode()) + body["options"]["num_predict"]


@pytest.mark.parametrize("stream", [False, True])
async def test_fifty_concurrent_requests_never_overspend_a_budget_that_fits_ten(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession, stream: bool) -> None:
    gw = await make_gateway(upstream__max_parallel=64, **ROOMY)
    body = chat_body(stream)
    budget = 10 * estimate(body) + 5          # ten reservations fit, an eleventh does not
    key_id = keyfmt.key_id(gw.keys.acme) or ""
    await run_cli(gw, keys, "set-limits", key_id, "--token-budget", str(budget))
    results = await asyncio.gather(*(post(http, gw, gw.keys.acme, "/api/chat", body)
                                     for _ in range(50)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(ok) >= 10                        # the first ten always fit
    for status, _, error in refused:
        assert status == 429 and error is not None
        assert "token budget exhausted for this key; it resets at" in error["error"]
    ledger = gw.pipeline.admission.ledger
    spent = ledger.spent(("key", key_id), period_key("day", gw.clock.time()))
    assert 0 < spent <= budget
    assert ledger.open_reservations == 0
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()
    rows = [row for row in audit(gw) if row["key_id"] == key_id]
    assert sorted(row["request_id"] for row in rows) == sorted(r[1] for r in results)
    assert sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows) == spent
    assert {row["outcome"] for row in rows if row["status"] == 429} <= {"BudgetExhausted"}


async def test_a_tenant_budget_holds_across_its_keys(make_gateway: GatewayFactory,
                                                     http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(upstream__max_parallel=64, **ROOMY)
    body = chat_body(False)
    budget = 6 * estimate(body) + 5
    await run_cli(gw, tenants, "set-limits", "acme", "--token-budget", str(budget))
    await run_cli(gw, keys, "create", "--tenant", "acme", "--label", "second")
    second = next(k for k in gw.pipeline.auth.verifier.snapshot.keys.values()
                  if k.label == "second")
    # The second key's token is not printed to us: give it a known one instead.
    token = keyfmt.rotate_secret(second.key_id)
    conn = sqlite3.connect(gw.db_path)
    try:
        with conn:
            conn.execute("UPDATE keys SET hash = ? WHERE key_id = ?",
                         (keyfmt.hash_key(token), second.key_id))
    finally:
        conn.close()
    await until(lambda: gw.pipeline.auth.verifier.snapshot.keys[second.key_id].hash !=
                second.hash, "rotation loaded")
    results = await asyncio.gather(*(post(http, gw, key, "/api/chat", body)
                                     for key in [gw.keys.acme, token] * 20))
    assert sum(r[0] == 200 for r in results) >= 6
    assert {r[0] for r in results} <= {200, 429}
    spent = gw.pipeline.admission.ledger.spent(("tenant", "acme"),
                                               period_key("day", gw.clock.time()))
    assert 0 < spent <= budget


# -- no leaks ---------------------------------------------------------------------------------

# Per (path, model): how the fake Ollama breaks the answer. Faults stay for the whole test.
BREAKAGE: dict[tuple[str, str], Fault | None] = {
    ("/api/chat", ALLOWED_MODEL): Fault("slow", delay_s=0.01),          # clients give up
    ("/api/chat", OTHER_MODEL): Fault("reset", after_frames=3),
    ("/v1/chat/completions", ALLOWED_MODEL): Fault("hang", after_frames=2),   # read timeout
    ("/v1/chat/completions", OTHER_MODEL): Fault("slow", delay_s=0.01),
    ("/v1/messages", ALLOWED_MODEL): Fault("truncate", after_frames=2),
    ("/v1/messages", OTHER_MODEL): None,                                     # completes
    ("/api/generate", ALLOWED_MODEL): Fault("hang_before_headers"),
    ("/api/generate", OTHER_MODEL): Fault("error", after_frames=2),
}


def body_for(path: str, model: str) -> dict[str, Any]:
    if path == "/v1/messages":
        return {"model": model, "max_tokens": 50, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
    if path == "/api/generate":
        return {"model": model, "prompt": "hi", "options": {"num_predict": 50}}
    if path == "/v1/chat/completions":
        return {"model": model, "stream": True, "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi"}]}
    return chat_body(True, 50, model)


async def broken_request(http: aiohttp.ClientSession, gw: Gateway, rng: random.Random,
                         seen: list[str]) -> None:
    """One request; the client may give up at a random moment (while queued, before the
    headers, or mid-stream)."""
    path, model = rng.choice(list(BREAKAGE))
    give_up_after = rng.choice([None, 0.0, 0.005, 0.02, 0.05, 0.1])

    async def run() -> None:
        async with http.post(gw.url + path, json=body_for(path, model),
                             headers=gw.auth(gw.keys.all_models)) as r:
            seen.append(r.headers["X-Request-ID"])
            async for _ in r.content.iter_any():
                pass

    task = asyncio.ensure_future(run())
    if give_up_after is None:
        await asyncio.wait({task}, timeout=5)
    else:
        await asyncio.wait({task}, timeout=give_up_after)
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, aiohttp.ClientError):
        pass


async def test_two_hundred_broken_requests_leave_nothing_behind(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(upstream__max_parallel=4, upstream__read_timeout_s=0.3,
                            limits__queue_timeout_s=0.5,
                            limits__key_defaults__token_budget=10_000_000, **ROOMY)
    for (path, model), fault in BREAKAGE.items():
        if fault is not None:
            gw.fake.add_fault(Fault(**{**fault.__dict__, "path": path, "model": model}))
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    seen: list[str] = []
    for _ in range(10):                                     # 10 waves of 20
        await asyncio.gather(*(broken_request(http, gw, rng, seen) for _ in range(20)))

    pipeline = gw.pipeline
    handled = lambda: sum(pipeline.requests_by_status.values())    # noqa: E731
    await until(lambda: pipeline.watch.in_flight == 0 and gw.fake.active_streams == 0,
                f"requests still running (seed {seed})")
    state = pipeline.admission.snapshot()
    queue = state["queue"]
    assert isinstance(queue, dict)
    assert (state["in_flight_by_key"], state["in_flight_by_tenant"]) == ({}, {}), seed
    assert (queue["in_flight"], queue["queued"]) == (0, 0), seed
    assert state["open_reservations"] == 0 and pipeline.admission.ledger.total_reserved() == 0
    assert pipeline.audit is not None
    await pipeline.audit.flush()
    rows = audit(gw)
    ids = [row["request_id"] for row in rows]
    assert len(ids) == len(set(ids)) == handled(), seed       # one row per request
    assert set(seen) <= set(ids), seed
    # A client giving up at once (1 in 6) may not even have sent its request.
    assert len(rows) >= 100, f"most requests should reach the gateway (seed {seed})"
    outcomes = {row["outcome"] for row in rows}
    assert "client disconnected" in outcomes and "ok" in outcomes, (seed, outcomes)


# -- fairness ---------------------------------------------------------------------------------


async def test_a_one_at_a_time_key_waits_for_at_most_one_request_of_a_busy_key(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(upstream__max_parallel=1, limits__queue_timeout_s=60, **ROOMY)
    grants: list[str] = []
    gw.pipeline.admission.queue.on_grant = lambda tenant, key, waited: grants.append(key)
    busy, patient = gw.keys.all_models, gw.keys.acme
    busy_id, patient_id = keyfmt.key_id(busy), keyfmt.key_id(patient)
    gw.fake.add_fault(Fault("slow", delay_s=0.002, path="/api/chat"))
    body = chat_body(False, 5)
    stop = asyncio.Event()

    async def keep_busy() -> None:
        while not stop.is_set():
            await post(http, gw, busy, "/api/chat", body)

    for key in (busy, patient):              # keys verified (Argon2) before measuring
        assert (await post(http, gw, key, "/api/chat", body))[0] == 200
    grants.clear()
    flooders = [asyncio.ensure_future(keep_busy()) for _ in range(20)]
    await until(lambda: gw.pipeline.admission.queue.queued >= 15, "the queue to fill")
    try:
        for _ in range(10):
            grants.append("sent")               # B's request leaves the client now
            status, _, _ = await post(http, gw, patient, "/api/chat", body)
            assert status == 200
    finally:
        stop.set()
        await asyncio.gather(*flooders)
    sent = [i for i, key in enumerate(grants) if key == "sent"]
    granted = [i for i, key in enumerate(grants) if key == patient_id]
    assert len(sent) == len(granted) == 10
    for start, grant in zip(sent, granted):
        # From sending to being served, B lets at most one of A's requests go first: the
        # one that may take a slot freed while B's request is still on its way in.
        assert grants[start:grant].count(busy_id) <= 1, grants


async def test_a_client_leaving_the_queue_frees_its_place_at_once(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(upstream__max_parallel=1, limits__queue_timeout_s=60, **ROOMY)
    gw.fake.add_fault(Fault("hang", after_frames=1, path="/api/chat", times=1))
    held = await http.post(gw.url + "/api/chat", json=chat_body(True),
                           headers=gw.auth(gw.keys.all_models))
    await held.content.readline()
    waiter = asyncio.ensure_future(post(http, gw, gw.keys.acme, "/api/chat",
                                        chat_body(False)))
    queue = gw.pipeline.admission.queue
    await until(lambda: queue.queued == 1, "queued")
    waiter.cancel()
    await until(lambda: queue.queued == 0, "left the queue")
    assert queue.in_flight == 1                 # no slot was taken for it
    held.close()
    await until(lambda: queue.in_flight == 0, "slot released")
    assert gw.pipeline.audit is not None
    await until(lambda: sum(gw.pipeline.requests_by_status.values()) == 2, "both handled")
    await gw.pipeline.audit.flush()
    queued_row = [r for r in audit(gw) if r["key_id"] == keyfmt.key_id(gw.keys.acme)]
    assert [(r["status"], r["prompt_tokens"] + r["completion_tokens"]) for r in queued_row] \
        == [(499, 0)]


