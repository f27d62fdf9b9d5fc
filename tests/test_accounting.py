"""Admission, metering and the audit log through HTTP (SPEC §7, §8, §9 headers, §10)."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp

from conftest import ALLOWED_MODEL, Gateway
from neuraldrive_gw import keys
from neuraldrive_gw.devtools.fake_ollama import Fault

CHAT = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hello"}]}


def audit_rows(gw: Gateway) -> list[sqlite3.Row]:
    conn = sqlite3.connect(gw.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_rate_limit_headers_on_streams_too(gw: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth()) as r:
        assert r.status == 200
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert int(r.headers["x-ratelimit-remaining-requests"]) == 59
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        await r.read()


async def test_every_request_leaves_one_audit_row(gw: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                         headers=gw.auth()) as r:
        answer = await r.json()
    async with http.post(gw.url + "/api/chat", json={**CHAT, "model": "qwen2.5:0.5b"},
                         headers=gw.auth()) as r:
        assert r.status == 403
    async with http.get(gw.url + "/api/tags", headers={"Authorization": "Bearer nd-" + "x" * 32}) as r:
        assert r.status == 401
    await gw.pipeline.audit.flush()
    rows = audit_rows(gw)
    assert [(row["route"], row["status"]) for row in rows] == [
        ("/api/chat", 200), ("/api/chat", 403), ("/api/tags", 401)]
    ok = rows[0]
    assert ok["key_id"] == keys.key_id(gw.keys.acme) and ok["tenant"] == "acme"
    assert ok["model"] == ALLOWED_MODEL and ok["metering"] == "exact"
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (
        answer["prompt_eval_count"], answer["eval_count"])
    assert rows[1]["outcome"] == "ModelNotAllowed" and rows[2]["key_id"] is None


async def test_a_broken_stream_is_charged_an_estimate(gw: Gateway, http: aiohttp.ClientSession) -> None:
    gw.fake.add_fault(Fault("reset", after_frames=3, path="/api/chat"))
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth()) as r:
        await r.read()
    await gw.pipeline.audit.flush()
    row = audit_rows(gw)[-1]
    assert row["metering"] == "estimated" and row["stream"] == 1
    assert row["prompt_tokens"] + row["completion_tokens"] > 0


async def test_budget_exhausted_is_final(gw: Gateway, http: aiohttp.ClientSession) -> None:
    conn = sqlite3.connect(gw.db_path)
    with conn:
        conn.execute("UPDATE keys SET token_budget = 50, budget_period = 'day' WHERE key_id = ?",
                     (keys.key_id(gw.keys.acme),))
    conn.close()
    async def reloaded() -> bool:
        record = gw.pipeline.auth.verifier.snapshot.keys[keys.key_id(gw.keys.acme) or ""]
        return record.token_budget == 50
    while not await reloaded():
        await asyncio.sleep(0.02)      # bounded by the test timeout; the reload takes ≤ 0.25 s
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth()) as r:
        assert r.status == 429
        assert r.headers["x-should-retry"] == "false"
        assert int(r.headers["retry-after"]) >= 1 and r.headers["retry-after-ms"]
        assert "resets at" in (await r.json())["error"]
    assert not [q for q in gw.fake.requests if q.path == "/api/chat"]


async def test_metered_requests_stop_when_usage_cannot_be_recorded(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    holder = sqlite3.connect(gw.db_path, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        async with http.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                             headers=gw.auth()) as r:
            assert r.status == 200                  # admitted while the writer was healthy
        for _ in range(200):                        # the writer notices the lock (≤ 2 s busy timeout)
            if not gw.pipeline.audit.healthy:
                break
            await asyncio.sleep(0.05)
        assert not gw.pipeline.audit.healthy
        async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth()) as r:
            assert r.status == 503 and r.headers["Retry-After"]
        async with http.get(gw.url + "/api/tags", headers=gw.auth()) as r:
            assert r.status == 200                  # listings are not metered
    finally:
        holder.rollback()
        holder.close()
    await gw.pipeline.audit.flush()
    assert gw.pipeline.audit.healthy
    assert [row["status"] for row in audit_rows(gw)] == [200, 503, 200]
