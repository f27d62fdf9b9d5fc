"""Storage faults under a running gateway (SPEC §1, §8, §10; issue 3 item 11).

Each fault is produced for real on the gateway's own database file: a second connection
holding `BEGIN EXCLUSIVE`, a full size-capped tmpfs, an immutable file (`chattr +i`), a
truncated file and a removed one (both restored from a backup, as an operator would).
While it lasts, metered requests get 503 with `Retry-After` and `/healthz` says degraded;
no audit row is lost for a request that was answered 2xx; afterwards it serves again
without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import ALLOWED_MODEL, Gateway, GatewayFactory, Keys
from faults import fill, immutable

CHAT = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
# Faults are noticed on the writer's first failed batch; a generous bound.
FAULT_SEEN_S = 15.0


async def chat(http: aiohttp.ClientSession, gw: Gateway, path: str = "/api/chat",
               body: dict[str, Any] | None = None) -> aiohttp.ClientResponse:
    async with http.post(gw.url + path, json=body or CHAT, headers=gw.auth()) as r:
        await r.read()
        return r


async def healthz(http: aiohttp.ClientSession, gw: Gateway) -> tuple[int, dict[str, Any]]:
    async with http.get(gw.url + "/healthz") as r:
        return r.status, await r.json()


async def until(condition: Callable[[], Awaitable[bool]], what: str,
                limit_s: float = FAULT_SEEN_S) -> None:
    deadline = time.monotonic() + limit_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s"
        await asyncio.sleep(0.05)


def audit_ids(db: str) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT request_id FROM audit")}
    finally:
        conn.close()


def backup(db: str, to: str) -> None:
    source, target = sqlite3.connect(db), sqlite3.connect(to)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


async def ride_out(gw: Gateway, http: aiohttp.ClientSession, db: str,
                   fault: contextlib.AbstractContextManager[Any]) -> None:
    """Answer a request, produce `fault`, check the gateway fails closed while it lasts,
    end it, check the gateway recovers by itself and every 2xx left its audit row."""
    answered: list[str] = []
    first = await chat(http, gw)
    assert first.status == 200
    answered.append(first.headers["X-Request-ID"])
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()      # before a backup is taken of the file
    with fault:
        # Requests answered before the writer notices are 2xx; their rows must survive.
        async def degraded() -> bool:
            status, body = await healthz(http, gw)
            if status == 200:
                r = await chat(http, gw)
                assert r.status in (200, 503)
                if r.status == 200:
                    answered.append(r.headers["X-Request-ID"])
                return False
            assert body["status"] == "degraded"
            return True
        await until(degraded, "degraded")
        native = await chat(http, gw)
        assert native.status == 503 and int(native.headers["Retry-After"]) >= 1
        openai = await chat(http, gw, "/v1/chat/completions",
                            {"model": ALLOWED_MODEL, "messages": CHAT["messages"]})
        assert openai.status == 503 and int(openai.headers["Retry-After"]) >= 1
    async def healthy() -> bool:
        return (await healthz(http, gw))[0] == 200
    await until(healthy, "recovery")
    after = await chat(http, gw)
    assert after.status == 200
    answered.append(after.headers["X-Request-ID"])
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()
    missing = set(answered) - audit_ids(db)
    assert not missing, f"2xx answers without an audit row: {missing}"


@contextlib.contextmanager
def exclusive_lock(db: str) -> Iterator[None]:
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield
        locker.execute("ROLLBACK")
    finally:
        locker.close()


@contextlib.contextmanager
def disk_full(directory: Path) -> Iterator[None]:
    ballast = fill(directory)
    try:
        yield
    finally:
        ballast.unlink()


@contextlib.contextmanager
def replaced_then_restored(db: str, spare: str, damage: Callable[[], None]) -> Iterator[None]:
    """Back the file up, damage it, and when the fault ends put the backup in its place.

    Rows written after the backup die with the damaged file: the caller flushed the writer
    first, and the WAL is checkpointed here so the backup has everything."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        conn.close()
    backup(db, spare)
    damage()
    try:
        yield
    finally:
        os.replace(spare, db)


@pytest.fixture
async def gw_fast(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(limits__key_defaults__requests_per_min=100_000,
                              audit__busy_timeout_s=0.2)


async def test_a_locked_database(gw_fast: Gateway, http: aiohttp.ClientSession) -> None:
    await ride_out(gw_fast, http, gw_fast.db_path, exclusive_lock(gw_fast.db_path))


async def test_a_read_only_database(gw_fast: Gateway, http: aiohttp.ClientSession) -> None:
    db = gw_fast.db_path
    await ride_out(gw_fast, http, db, immutable(db, db + "-wal"))


async def test_a_truncated_database_restored_from_backup(
        gw_fast: Gateway, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    db = gw_fast.db_path
    await ride_out(gw_fast, http, db, replaced_then_restored(
        db, str(tmp_path / "backup.db"), lambda: os.truncate(db, 0)))


async def test_a_removed_database_restored_from_backup(
        gw_fast: Gateway, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    db = gw_fast.db_path

    def remove() -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db + suffix)

    await ride_out(gw_fast, http, db, replaced_then_restored(
        db, str(tmp_path / "backup.db"), remove))


async def test_a_full_disk(make_gateway: GatewayFactory, keys_db: tuple[str, Keys],
                           tmpfs: Path, http: aiohttp.ClientSession) -> None:
    db = str(tmpfs / "gw.db")
    shutil.copyfile(keys_db[0], db)
    gw = await make_gateway(paths__database=db,
                            limits__key_defaults__requests_per_min=100_000)
    await ride_out(gw, http, db, disk_full(tmpfs))
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
