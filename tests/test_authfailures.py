"""The per-client-IP authentication-failure limiter (SPEC §3 step 3, §8), unit and HTTP."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest

from conftest import ALLOWED_MODEL, FakeClock, Gateway, GatewayFactory
from neuraldrive_gw import keys
from neuraldrive_gw.errors import RateLimited
from neuraldrive_gw.quotas.authfailures import AuthFailureLimiter, address_group

BAD = {"Authorization": "Bearer nd-" + "x" * 32}
UNKNOWN_ID = {"Authorization": "Bearer nd-" + "Zz" * 16}


@pytest.mark.parametrize("address, group", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("unknown", "unknown"),
])
def test_limits_apply_to_an_ipv4_address_or_an_ipv6_64(address: str, group: str) -> None:
    assert address_group(address) == group


def test_failures_refill_continuously() -> None:
    clock = FakeClock()
    limiter = AuthFailureLimiter(3, clock.monotonic)
    for _ in range(3):
        limiter.check("192.0.2.1")
        limiter.failed("192.0.2.1")
    with pytest.raises(RateLimited) as refused:
        limiter.check("192.0.2.1")
    assert refused.value.headers["retry-after"] == "20"
    limiter.check("192.0.2.2")                      # other addresses are unaffected
    clock.advance(20)
    limiter.check("192.0.2.1")                      # one failure's worth has refilled
    limiter.failed("192.0.2.1")
    with pytest.raises(RateLimited):
        limiter.check("192.0.2.1")


def test_a_refund_that_leaves_nothing_owed_forgets_the_address() -> None:
    """A verified key's first request is counted in advance and refunded: the address
    must not stay tracked, or every later request from it pays for a lookup."""
    clock = FakeClock()
    limiter = AuthFailureLimiter(3, clock.monotonic)
    limiter.failed("192.0.2.1")                     # counted in advance ...
    limiter.refund("192.0.2.1")                     # ... and the key verified
    assert limiter.tracked == 0
    limiter.failed("192.0.2.1")
    limiter.failed("192.0.2.1")                     # a real failure, then an advance count
    limiter.refund("192.0.2.1")
    assert limiter.tracked == 1                     # the real failure is still owed
    limiter.failed("192.0.2.1")
    limiter.failed("192.0.2.1")
    with pytest.raises(RateLimited):
        limiter.check("192.0.2.1")


def test_memory_is_bounded_and_draining_addresses_are_kept_longest() -> None:
    clock = FakeClock()
    limiter = AuthFailureLimiter(2, clock.monotonic, max_tracked=100)
    limiter.failed("198.51.100.1")
    limiter.failed("198.51.100.1")                  # empty bucket: must be remembered
    for n in range(1000):
        limiter.failed(f"10.{n // 250}.{n % 250}.1")
        assert limiter.tracked <= 100
    # A flood of fresh addresses can evict the oldest; a recent offender stays refused.
    limiter.failed("198.51.100.9")
    limiter.failed("198.51.100.9")
    for n in range(50):
        limiter.failed(f"172.16.0.{n}")
    with pytest.raises(RateLimited):
        limiter.check("198.51.100.9")


async def _status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def test_the_eleventh_failure_in_a_minute_is_refused_before_any_key_work(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway()
    verifications = gw.pipeline.auth.verifier.verifications
    assert [await _status(http, gw.url + "/api/tags", BAD) for _ in range(10)] == [401] * 10
    async with http.get(gw.url + "/api/tags", headers=gw.auth()) as r:
        body = await r.json()
        assert r.status == 429
        assert "failed authentication" in body["error"]
        assert int(r.headers["Retry-After"]) >= 6 and "X-Request-ID" in r.headers
    # A valid key from the same address waits too, and nothing about keys ran.
    assert gw.pipeline.auth.verifier.verifications == verifications
    async with http.post(gw.url + "/v1/chat/completions", headers=gw.auth(),
                         json={"model": ALLOWED_MODEL, "messages": []}) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
    gw.clock.advance(6)                             # 10/min: one failure refills in 6 s
    assert await _status(http, gw.url + "/api/tags", gw.auth()) == 200
    await gw.pipeline.audit.flush()
    conn = sqlite3.connect(gw.db_path)
    try:
        outcomes = [row[0] for row in conn.execute("SELECT outcome FROM audit ORDER BY id")]
    finally:
        conn.close()
    assert outcomes == ["Unauthorized"] * 10 + ["RateLimited"] * 2 + ["ok"]


async def test_concurrent_wrong_secrets_cannot_buy_more_verifications_than_the_limit(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    """64 requests at once, each a different wrong secret for an existing key id: each
    would cost an Argon2 verification. The limit (10) bounds them, not the concurrency."""
    gw = await make_gateway()
    verifier = gw.pipeline.auth.verifier
    before = verifier.verifications
    key_id = keys.key_id(gw.keys.acme)
    assert key_id is not None
    wrong = [{"Authorization": f"Bearer nd-{key_id}{n:024d}"} for n in range(64)]
    statuses = await asyncio.gather(*(_status(http, gw.url + "/api/tags", h) for h in wrong))
    assert sorted(set(statuses)) == [401, 429] and statuses.count(401) == 10
    assert verifier.verifications - before == 10
    # A verification that succeeds is not held against the address.
    assert await _status(http, gw.url + "/api/tags", gw.auth(gw.keys.all_models)) == 429
    gw.clock.advance(6)                             # one failure's worth refills
    assert await _status(http, gw.url + "/api/tags", gw.auth(gw.keys.all_models)) == 200
    assert verifier.verifications - before == 11    # counted in advance, then refunded:
    assert await _status(http, gw.url + "/api/tags", BAD) == 401     # the refill is left


async def test_successes_and_public_answers_do_not_count(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    for _ in range(30):
        assert await _status(http, gw.url + "/api/version", gw.auth()) == 200
        assert await _status(http, gw.url + "/healthz", {}) == 200
        assert await _status(http, gw.url + "/nowhere", BAD) == 404
    assert await _status(http, gw.url + "/api/version", UNKNOWN_ID) == 401


async def test_addresses_forwarded_by_a_trusted_proxy_are_limited_apart(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    # The test client connects from 127.0.0.1, a trusted proxy by default.
    first = {**BAD, "X-Forwarded-For": "203.0.113.5"}
    for _ in range(10):
        assert await _status(http, gw.url + "/api/tags", first) == 401
    assert await _status(http, gw.url + "/api/tags", first) == 429
    second = {**gw.auth(), "X-Forwarded-For": "203.0.113.6"}
    assert await _status(http, gw.url + "/api/tags", second) == 200
    # What the client itself wrote to the left of the proxy's entry proves nothing.
    spoofed = {**gw.auth(), "X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
    assert await _status(http, gw.url + "/api/tags", spoofed) == 429


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(trusted_proxies=["192.0.2.0/24"])
    for n in range(10):
        headers = {**BAD, "X-Forwarded-For": f"203.0.113.{n}"}
        assert await _status(http, gw.url + "/api/tags", headers) == 401
    fresh = {**gw.auth(), "X-Forwarded-For": "203.0.113.200"}
    assert await _status(http, gw.url + "/api/tags", fresh) == 429
