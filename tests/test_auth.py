"""Authentication through HTTP (SPEC §2): keys, the master key file, the verify cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from multidict import CIMultiDict

from conftest import MASTER_KEY, Gateway, GatewayFactory, write_key_file
from neuraldrive_gw import admin, keys, store


async def status_of(http: aiohttp.ClientSession, gw: Gateway, key: str) -> int:
    async with http.get(gw.url + "/api/tags", headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status


async def until(check: Callable[[], Awaitable[bool]], limit_s: float) -> float:
    """Seconds until `check()` holds, polling; fails the test after `limit_s` (the contract)."""
    start = time.monotonic()
    while not await check():
        elapsed = time.monotonic() - start
        assert elapsed < limit_s, f"not within {limit_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def in_db(gw: Gateway, fn: Callable[..., object], *args: object, **kwargs: object) -> Awaitable[object]:
    """Run an admin function on its own connection, off the loop (like another process)."""
    def run() -> object:
        conn = store.open_db(gw.db_path)
        try:
            return fn(conn, *args, **kwargs)
        finally:
            conn.close()
    return asyncio.to_thread(run)


async def test_revocation_takes_effect_within_one_second(gw: Gateway, http) -> None:
    assert await status_of(http, gw, gw.keys.acme) == 200
    await in_db(gw, admin.revoke_key, keys.key_id(gw.keys.acme))
    async def revoked() -> bool:
        return await status_of(http, gw, gw.keys.acme) == 401
    await until(revoked, 1.0)
    assert await status_of(http, gw, gw.keys.all_models) == 200      # others unaffected


async def test_rotation_replaces_the_secret(gw: Gateway, http) -> None:
    assert await status_of(http, gw, gw.keys.acme) == 200
    new = await in_db(gw, admin.rotate_key, keys.key_id(gw.keys.acme))
    assert isinstance(new, str) and keys.key_id(new) == keys.key_id(gw.keys.acme)
    async def rotated() -> bool:
        return await status_of(http, gw, gw.keys.acme) == 401
    await until(rotated, 1.0)
    assert await status_of(http, gw, new) == 200


async def test_expired_key_is_refused(gw: Gateway, http) -> None:
    token, _ = await in_db(gw, admin.create_key, "acme", expires_at=gw.clock.time() + 3600)
    async def loaded() -> bool:     # polling with the key itself would trip the
        return keys.key_id(token) in gw.pipeline.auth.verifier.snapshot.keys   # failure limit
    await until(loaded, 1.0)
    assert await status_of(http, gw, token) == 200
    gw.clock.advance(3601)
    assert await status_of(http, gw, token) == 401


async def test_argon2_runs_once_per_key_and_never_for_unknown_ids(gw: Gateway, http) -> None:
    verifier = gw.pipeline.auth.verifier
    before = verifier.verifications
    for _ in range(3):
        assert await status_of(http, gw, gw.keys.all_models) == 200
    assert verifier.verifications == before + 1
    for _ in range(3):
        assert await status_of(http, gw, "nd-" + "Q" * 32) == 401        # unknown id
    assert verifier.verifications == before + 1
    wrong_secret = gw.keys.acme[:11] + "A" * 24
    for _ in range(3):
        assert await status_of(http, gw, wrong_secret) == 401          # known id, wrong secret
    assert verifier.verifications == before + 2                        # then negatively cached


async def test_verified_keys_are_held_only_as_a_keyed_hmac(gw: Gateway, http) -> None:
    """SPEC §2: the cache is keyed by an HMAC of the token under a per-process secret,
    never by the token; a later request finds it without an await (Authenticator.known)."""
    verifier = gw.pipeline.auth.verifier
    assert await status_of(http, gw, gw.keys.all_models) == 200
    token = gw.keys.all_models
    cached = list(verifier._cache)
    assert cached and all(len(k) == 32 for k in cached)
    assert token.encode() not in cached and hashlib.sha256(token.encode()).digest() not in cached
    principal = gw.pipeline.auth.known(CIMultiDict(Authorization=f"Bearer {token}"))
    assert principal is not None and principal.key_id == keys.key_id(token)


async def test_concurrent_first_requests_with_one_key_share_one_verification(
        make_gateway: GatewayFactory, http) -> None:
    gw = await make_gateway(limits__key_defaults__max_concurrent=16)
    verifier = gw.pipeline.auth.verifier
    before = verifier.verifications
    statuses = await asyncio.gather(*(status_of(http, gw, gw.keys.all_models)
                                      for _ in range(16)))
    assert statuses == [200] * 16
    assert verifier.verifications == before + 1


async def test_a_client_giving_up_does_not_fail_others_waiting_on_its_verification(
        gw: Gateway, http) -> None:
    verifier = gw.pipeline.auth.verifier
    before = verifier.verifications
    first = asyncio.ensure_future(status_of(http, gw, gw.keys.acme))
    while verifier.verifications == before:        # the first request's Argon2 is running
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(status_of(http, gw, gw.keys.acme))
    first.cancel()
    assert await second == 200
    assert verifier.verifications == before + 1


async def test_unauthorised_answers_are_identical(gw: Gateway, http) -> None:
    revoked, _ = await in_db(gw, admin.create_key, "acme")
    await in_db(gw, admin.revoke_key, keys.key_id(revoked))
    async def reloaded() -> bool:
        record = gw.pipeline.auth.verifier.snapshot.keys.get(keys.key_id(revoked) or "")
        return record is not None and record.revoked_at is not None
    await until(reloaded, 1.0)
    bodies = set()
    for token in ("nd-" + "Q" * 32, "garbage", gw.keys.acme[:11] + "A" * 24, revoked):
        async with http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Bearer"
            rid = r.headers["X-Request-ID"]
            bodies.add((await r.text()).replace(rid, "RID"))
    assert len(bodies) == 1


async def test_master_key_rotation_is_picked_up_within_two_seconds(gw: Gateway, http) -> None:
    assert await status_of(http, gw, MASTER_KEY) == 200
    new_master = "nd-" + "N" * 32
    write_key_file(gw.key_file, new_master + "\n")
    async def rotated() -> bool:    # the old key, so polling adds one auth failure at most
        return await status_of(http, gw, MASTER_KEY) == 401
    await until(rotated, 2.0)
    assert await status_of(http, gw, new_master) == 200


@pytest.mark.parametrize("mode,content", [(0o644, MASTER_KEY), (0o640, MASTER_KEY), (0o600, "")])
async def test_unsafe_master_key_file_disables_only_the_master_key(gw: Gateway, http, mode, content) -> None:
    write_key_file(gw.key_file, content, mode)
    async def disabled() -> bool:
        return await status_of(http, gw, MASTER_KEY) == 401
    await until(disabled, 2.0)
    assert gw.pipeline.auth.master.state.problem
    assert await status_of(http, gw, gw.keys.all_models) == 200


async def test_missing_master_key_file(gw: Gateway, http) -> None:
    os.unlink(gw.key_file)
    async def disabled() -> bool:
        return await status_of(http, gw, MASTER_KEY) == 401
    await until(disabled, 2.0)
    assert "missing" in (gw.pipeline.auth.master.state.problem or "")
