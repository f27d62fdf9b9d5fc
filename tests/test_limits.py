"""Limits set with the CLI reach the running gateway; the master key's come from config
(SPEC §2, §8; limits.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from conftest import ALLOWED_MODEL, Gateway, GatewayFactory, cli_runner, run_cli
from neuraldrive_gw import keys as keyfmt
from neuraldrive_gw import limits
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
