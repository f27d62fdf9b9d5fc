"""Limits set with the CLI reach the running gateway; the master key's come from config
(SPEC §2, §8; limits.py)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import ALLOWED_MODEL, Gateway, GatewayFactory, cli_runner, run_cli
from neuraldrive_gw import admin, limits, store
from neuraldrive_gw import keys as keyfmt
from neuraldrive_gw.cli.keys import keys
from neuraldrive_gw.cli.tenants import tenants
from neuraldrive_gw.devtools.fake_ollama import Fault

CHAT = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.mark.parametrize("text, key, stored", [
    ("12", True, 12), ("unlimited", True, limits.UNLIMITED), ("default", True, None),
    ("UNLIMITED", False, None), (" 7 ", False, 7),
])
def test_parse_limit(text: str, key: bool, stored: int | None) -> None:
    assert limits.parse_limit(text, key=key) == stored


@pytest.mark.parametrize("text, key", [("0", True), ("-1", True), ("1.5", True), ("", True),
                                       ("default", False), ("many", False)])
def test_parse_limit_refuses(text: str, key: bool) -> None:
    with pytest.raises(limits.LimitError):
        limits.parse_limit(text, key=key)


@pytest.mark.parametrize("stored, default, shown", [
    (None, 60, "60 (default)"), (None, None, "unlimited (default)"), (0, 60, "unlimited"),
    (5, 60, "5"),
])
def test_describe(stored: int | None, default: int | None, shown: str) -> None:
    assert limits.describe(stored, default) == shown


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    path = str(tmp_path / "gw.db")
    store.init_db(path)
    db = store.open_db(path)
    admin.create_tenant(db, "acme")
    yield db
    db.close()


def revision(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE name = 'auth_revision'").fetchone()[0])


@pytest.mark.parametrize("settings, message", [
    ({"requests_per_min": -1}, "requests_per_min must be None (the config default), 0"),
    ({"tokens_per_min": limits.MAX_LIMIT + 1}, "tokens_per_min must be"),
    ({"token_budget": "5000"}, "token_budget must be"),
    ({"max_concurrent": True}, "max_concurrent must be"),
    ({"max_concurrent": 2.5}, "max_concurrent must be"),
    ({"budget_period": "week"}, "budget_period must be day, month or None"),
    ({"log_prompts": 1}, "log_prompts must be true or false"),
    ({"weight": 2}, "not a key setting: weight"),
    ({"max_concurrent": 2, "hash": "x"}, "not a key setting: hash"),
])
def test_admin_refuses_key_settings_the_gateway_would_misread(
        conn: sqlite3.Connection, settings: dict[str, object], message: str) -> None:
    """The library checks values too: not every caller parses them like the CLI does."""
    _, key = admin.create_key(conn, "acme")
    before = revision(conn)
    with pytest.raises(admin.AdminError, match=re.escape(message)):
        admin.set_key_limits(conn, key.key_id, settings)
    assert admin.get_key(conn, key.key_id) == key and revision(conn) == before
    with pytest.raises(admin.AdminError):
        admin.create_key(conn, "acme", settings=settings)
    assert [k.key_id for k in admin.list_keys(conn)] == [key.key_id]     # rolled back


@pytest.mark.parametrize("settings, message", [
    ({"tokens_per_min": 0}, "tokens_per_min must be None (unlimited) or 1"),
    ({"max_concurrent": -3}, "max_concurrent must be"),
    ({"weight": 0}, "weight must be a whole number from 1"),
    ({"weight": limits.MAX_WEIGHT + 1}, "weight must be"),
    ({"budget_period": "year"}, "budget_period must be"),
    ({"requests_per_min": 5}, "not a tenant setting: requests_per_min"),
])
def test_admin_refuses_tenant_settings_the_gateway_would_misread(
        conn: sqlite3.Connection, settings: dict[str, object], message: str) -> None:
    tenant = admin.get_tenant(conn, "acme")
    with pytest.raises(admin.AdminError, match=re.escape(message)):
        admin.set_tenant_limits(conn, "acme", settings)
    assert admin.get_tenant(conn, "acme") == tenant
    with pytest.raises(admin.AdminError):
        admin.create_tenant(conn, "beta", settings=settings)
    assert [t.name for t in admin.list_tenants(conn)] == ["acme"]


def test_admin_stores_unlimited_and_default_for_keys(conn: sqlite3.Connection) -> None:
    _, key = admin.create_key(conn, "acme", settings={"requests_per_min": limits.UNLIMITED,
                                                      "token_budget": 10, "log_prompts": True})
    assert (key.requests_per_min, key.token_budget, key.log_prompts) == (0, 10, True)
    changed = admin.set_key_limits(conn, key.key_id, {"token_budget": None,
                                                      "budget_period": "month"})
    assert (changed.requests_per_min, changed.token_budget, changed.budget_period) == \
        (limits.UNLIMITED, None, "month")
    with pytest.raises(admin.AdminError, match="nothing to change"):
        admin.set_key_limits(conn, key.key_id, {})


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str | None = None,
               body: dict[str, Any] = CHAT) -> aiohttp.ClientResponse:
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth(key)) as r:
        await r.read()
        return r


async def test_key_requests_per_minute_set_with_the_cli(gw: Gateway,
                                                        http: aiohttp.ClientSession) -> None:
    await run_cli(gw, keys, "set-limits", keyfmt.key_id(gw.keys.acme) or "",
                  "--requests-per-min", "2")
    statuses = [(await chat(http, gw)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = await chat(http, gw)
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert int(refused.headers["retry-after"]) >= 1
    gw.clock.advance(30)                       # 2/min: one request back every 30 s
    assert (await chat(http, gw)).status == 200
    assert (await chat(http, gw, gw.keys.all_models)).status == 200    # others unaffected


async def test_unlimited_key_beats_a_low_default(make_gateway: GatewayFactory,
                                                 http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(limits__key_defaults__requests_per_min=1)
    assert [(await chat(http, gw)).status for _ in range(2)] == [200, 429]
    await run_cli(gw, keys, "set-limits", keyfmt.key_id(gw.keys.acme) or "",
                  "--requests-per-min", "unlimited")
    answers = [await chat(http, gw) for _ in range(5)]
    assert [r.status for r in answers] == [200] * 5
    assert "x-ratelimit-limit-requests" not in answers[-1].headers


async def test_tenant_concurrency_is_shared_by_its_keys(make_gateway: GatewayFactory,
                                                        http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(upstream__max_parallel=4)      # the model slot is not the limit
    await run_cli(gw, tenants, "set-limits", "acme", "--max-concurrent", "1")
    second = await asyncio.to_thread(cli_runner().invoke, keys,
                                     ["create", "--tenant", "acme", "--print-key",
                                      "--db", gw.db_path])
    other_key = second.stdout.strip().splitlines()[-1]
    gw.fake.add_fault(Fault("hang", after_frames=1, path="/api/chat", times=1))
    held = await http.post(gw.url + "/api/chat", json={**CHAT, "stream": True},
                           headers=gw.auth())
    try:
        await held.content.readline()            # the tenant's one request is running
        deadline = time.monotonic() + 2
        while keyfmt.key_id(other_key) not in gw.pipeline.auth.verifier.snapshot.keys:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        refused = await chat(http, gw, other_key)
        assert refused.status == 429
        # Other tenants are not part of acme's count.
        assert (await chat(http, gw, gw.keys.all_models)).status == 200
    finally:
        held.close()


async def test_master_key_limits_come_from_config(make_gateway: GatewayFactory,
                                                  http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(limits__master__requests_per_min=2)
    statuses = [(await chat(http, gw, gw.keys.master)).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_master_key_is_unlimited_by_default(gw: Gateway,
                                                  http: aiohttp.ClientSession) -> None:
    answers = [await chat(http, gw, gw.keys.master) for _ in range(70)]    # > 60/min
    assert {r.status for r in answers} == {200}
    assert not any(name.startswith("x-ratelimit") for name in answers[-1].headers)


async def test_key_concurrency_set_with_the_cli(make_gateway: GatewayFactory,
                                               http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(upstream__max_parallel=4)      # the model slot is not the limit
    await run_cli(gw, keys, "set-limits", keyfmt.key_id(gw.keys.acme) or "",
                  "--max-concurrent", "1")
    gw.fake.add_fault(Fault("hang", after_frames=1, path="/api/chat", times=1))
    held = await http.post(gw.url + "/api/chat", json={**CHAT, "stream": True},
                           headers=gw.auth())
    try:
        await held.content.readline()            # the key's one request is running
        refused = await chat(http, gw)
        assert refused.status == 429
        assert "concurrent" in (await refused.json())["error"]
        assert (await chat(http, gw, gw.keys.all_models)).status == 200   # other keys run
    finally:
        held.close()
    deadline = time.monotonic() + 5
    while gw.pipeline.admission.snapshot()["in_flight_by_key"]:     # the slot comes back
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert (await chat(http, gw)).status == 200


async def test_master_key_rate_limit_answers_like_any_key(make_gateway: GatewayFactory,
                                                          http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(limits__master__requests_per_min=1)
    first = await chat(http, gw, gw.keys.master)
    assert first.status == 200 and first.headers["x-ratelimit-limit-requests"] == "1"
    refused = await chat(http, gw, gw.keys.master)
    assert refused.status == 429
    assert int(refused.headers["retry-after"]) == 60 and refused.headers["retry-after-ms"]
    assert (await chat(http, gw)).status == 200          # tenant keys keep their own limits
    gw.clock.advance(60)
    assert (await chat(http, gw, gw.keys.master)).status == 200


async def test_master_key_budget_from_config(make_gateway: GatewayFactory,
                                             http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(limits__master__token_budget=10, limits__master__budget_period="month")
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth(gw.keys.master)) as r:
        assert r.status == 429 and r.headers["x-should-retry"] == "false"
        assert "budget" in (await r.json())["error"]
    assert not [q for q in gw.fake.requests if q.path == "/api/chat"]
    async with http.get(gw.url + "/api/tags", headers=gw.auth(gw.keys.master)) as r:
        assert r.status == 200                           # listings reserve no tokens
