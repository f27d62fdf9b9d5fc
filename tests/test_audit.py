"""The audit log: schema and triggers, the hash chain, tampering, pruning, the group-commit
writer, spend for budgets, and storage faults produced for real (locks, a full tmpfs, an
immutable file, a removed, replaced or truncated file, SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from faults import fill, immutable
from neuraldrive_gw import auditbatch
from neuraldrive_gw import store
from neuraldrive_gw.audit import AuditRecord, AuditWriter
from neuraldrive_gw.spend import spend_in_periods, spend_since
from neuraldrive_gw.auditchain import (CONTENT, ZERO_HASH, ChainBroken, content_json, prune,
                                       row_hash, verify)

REPO = Path(__file__).resolve().parent.parent
T0 = 1_790_000_000.0          # 2026-09-21T…Z: any fixed wall-clock time


def rec(i: int = 0, **changes: Any) -> AuditRecord:
    base = AuditRecord(request_id=f"req-{i}", at=T0 + i, key_id="abcd1234", tenant="acme",
                       client_ip="192.0.2.7", method="POST", route="/api/chat",
                       model="registry.ollama.ai/library/llama3:latest", status=200,
                       outcome="ok", stream=True, prompt_tokens=10, completion_tokens=5,
                       metering="exact", bytes_out=321, ttfb_ms=12.4, duration_ms=250.6)
    return replace(base, **changes)


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "gw.db")
    store.init_db(path)
    return path


def raw(path: str) -> sqlite3.Connection:
    """A plain connection that bypasses the store: an outsider, or an attacker."""
    return sqlite3.connect(path, isolation_level=None)


@contextlib.contextmanager
def connected(path: str) -> Iterator[sqlite3.Connection]:
    conn = store.open_db(path)
    try:
        yield conn
    finally:
        conn.close()


def check(path: str) -> Any:
    with connected(path) as conn:
        return verify(conn)


def count(path: str) -> int:
    with connected(path) as conn:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition (never a bare sleep as synchronisation), failing at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(path: str, **options: Any) -> AsyncIterator[AuditWriter]:
    writer = AuditWriter(path, **options)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.close(timeout=5.0)


async def write(path: str, records: list[AuditRecord]) -> None:
    async with running(path) as writer:
        for record in records:
            writer.submit(record)
        await writer.flush()


def unprotect(conn: sqlite3.Connection) -> None:
    """What someone with write access to the file can do: drop the audit triggers."""
    for name in ("audit_append", "audit_no_update", "audit_no_delete", "audit_anchor_update",
                 "audit_anchor_no_delete"):
        conn.execute(f"DROP TRIGGER {name}")


# -- schema -----------------------------------------------------------------------------------


def test_migration_2_adds_the_audit_tables_and_indexes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.SCHEMA_VERSION == len(store.MIGRATIONS) >= 2
    path = str(tmp_path / "v2.db")          # migration 4 replaces two of these indexes
    with monkeypatch.context() as old:
        old.setattr(store, "MIGRATIONS", store.MIGRATIONS[:2])
        old.setattr(store, "SCHEMA_VERSION", 2)
        assert store.init_db(path) == 2
        with connected(path) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            columns = [r[1] for r in conn.execute("PRAGMA table_info(audit)")]
            plan = " ".join(str(r) for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT sum(prompt_tokens) FROM audit "
                "WHERE key_id = 'k' AND at >= 1"))
    assert {"audit", "audit_anchor", "audit_prune_token", "audit_at", "audit_key_at",
            "audit_tenant_at"} <= names
    assert columns == ["id", *CONTENT, "prev_hash", "row_hash"]
    assert "audit_key_at" in plan


def test_a_version_1_database_is_migrated_keeping_its_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "old.db")
    with monkeypatch.context() as old:
        old.setattr(store, "MIGRATIONS", store.MIGRATIONS[:1])
        old.setattr(store, "SCHEMA_VERSION", 1)
        assert store.init_db(path) == 1
        with connected(path) as conn:
            conn.execute("INSERT INTO tenants (name, created_at) VALUES ('acme', 1)")
    assert store.init_db(path) == store.SCHEMA_VERSION
    with connected(path) as conn:
        assert conn.execute("SELECT name FROM tenants").fetchall() == [("acme",)]
        assert conn.execute("SELECT last_id, last_hash FROM audit_anchor").fetchone() == \
            (0, ZERO_HASH)


def test_record_fields_are_the_hashed_columns_in_order() -> None:
    assert tuple(f.name for f in fields(AuditRecord)) == CONTENT
    values = rec().values()
    assert values[CONTENT.index("at")] == T0 and type(values[1]) is float
    assert values[CONTENT.index("stream")] == 1
    assert values[CONTENT.index("ttfb_ms")] == 12 and values[-1] == 251


@pytest.mark.parametrize("changes", [
    {"status": True}, {"status": "200"}, {"prompt_tokens": -1}, {"metering": "guessed"},
    {"at": float("nan")}, {"duration_ms": float("inf")}, {"key_id": 7}, {"stream": 1},
    {"request_id": None},
])
def test_a_malformed_record_is_refused_at_submit(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="AuditRecord"):
        rec(**changes).values()
    writer = AuditWriter("/nonexistent")
    with pytest.raises(ValueError):
        writer.submit(rec(**changes))
    record = rec(**changes)
    with pytest.raises(ValueError, match="AuditRecord"):
        writer.submit_fields(tuple(getattr(record, name) for name in CONTENT))
    assert writer.queued == 0


@pytest.mark.parametrize("changes", [
    {}, {"at": 1_700_000_000}, {"ttfb_ms": None}, {"ttfb_ms": 3}, {"duration_ms": 0},
    {"key_id": None, "tenant": None, "model": None, "client_ip": None}, {"stream": False},
])
def test_fields_given_as_a_tuple_are_stored_as_the_record_would_be(
        changes: dict[str, Any]) -> None:
    """The request path's submit_fields() and submit(record) queue identical rows."""
    record = rec(**changes)
    by_record, by_fields = AuditWriter("/nonexistent"), AuditWriter("/nonexistent")
    by_record.submit(record)
    by_fields.submit_fields(tuple(getattr(record, name) for name in CONTENT))
    assert list(by_fields._queue) == list(by_record._queue)
    values, content = by_fields._queue[0]
    assert type(values[CONTENT.index("at")]) is float
    assert content == json.dumps(list(values), separators=(",", ":"), ensure_ascii=True)


@pytest.mark.parametrize("rows", [1, 2, 3, 63, 64, 65, 127, 200])
def test_a_batch_of_any_size_is_one_chain_of_consecutive_rows(db: str, rows: int) -> None:
    """Batches are written as multi-row INSERTs of a few shapes; every row must still
    extend the chain from the one before it, in order, under the append trigger."""
    batch = [(values, content_json(values)) for values in (rec(i).values() for i in range(rows))]
    with connected(db) as conn:
        conn.isolation_level = None
        appended = auditbatch.append(conn, batch, None, None)
        again = auditbatch.append(conn, batch, None, appended.head)   # a second batch
    assert appended.rows == rows and appended.head[0] == rows and again.head[0] == 2 * rows
    assert check(db).ok and check(db).rows_checked == 2 * rows
    with connected(db) as conn:
        stored = conn.execute("SELECT request_id FROM audit ORDER BY id").fetchall()
    assert [r[0] for r in stored] == [f"req-{i}" for i in range(rows)] * 2


def test_the_hash_is_sha256_of_prev_hash_and_the_canonical_row() -> None:
    """The documented definition, recomputed independently of the writer's shortcut."""
    values = rec(3, model=None, ttfb_ms=None).values()
    canonical = json.dumps([42, *values], separators=(",", ":"), ensure_ascii=True)
    expected = hashlib.sha256((ZERO_HASH + canonical).encode()).hexdigest()
    assert row_hash(ZERO_HASH, 42, content_json(values)) == expected
    assert '"model":' not in canonical and ",null," in canonical


# -- triggers ---------------------------------------------------------------------------------


async def test_rows_cannot_be_updated_deleted_or_inserted_out_of_chain(db: str) -> None:
    await write(db, [rec(i) for i in range(3)])
    conn = raw(db)
    try:
        for sql in ("UPDATE audit SET status = 500 WHERE id = 2",
                    "DELETE FROM audit WHERE id = 1",
                    "DELETE FROM audit",
                    "UPDATE audit_anchor SET last_id = 1",
                    "DELETE FROM audit_anchor"):
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(sql)
        last = conn.execute("SELECT * FROM audit WHERE id = 3").fetchone()
        for row_id, prev in ((4, "f" * 64), (5, last[-1]), (3, last[-1])):
            forged = (row_id, *last[1:-2], prev, "e" * 64)
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(f"INSERT INTO audit VALUES ({', '.join('?' * len(forged))})",
                             forged)
        # Even with the prune token, only rows the anchor has moved past may go.
        conn.execute("BEGIN")
        conn.execute("INSERT INTO audit_prune_token VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("DELETE FROM audit WHERE id = 1")
        with pytest.raises(sqlite3.IntegrityError):         # not onto a row's real hash
            conn.execute("UPDATE audit_anchor SET last_id = 2, last_hash = ?", ("0" * 64,))
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    assert count(db) == 3 and check(db).ok


# -- verification and tampering ------------------------------------------------------------


async def test_a_clean_log_verifies_and_reports_its_head(db: str) -> None:
    assert check(db) == check(db) and check(db).ok and check(db).head_id is None
    await write(db, [rec(i) for i in range(10)])
    result = check(db)
    assert result.ok and result.rows_checked == 10 and result.first_bad_id is None
    with connected(db) as conn:
        assert (result.head_id, result.head_hash) == \
            conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()


def _swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    cols = ", ".join(f"{c} = (SELECT {c} FROM audit WHERE id = :other)"
                     for c in (*CONTENT, "prev_hash", "row_hash"))
    conn.execute("CREATE TEMP TABLE saved AS SELECT * FROM audit")
    conn.execute(f"UPDATE audit SET {cols.replace('FROM audit', 'FROM saved')} "
                 "WHERE id = :this", {"this": a, "other": b})
    conn.execute(f"UPDATE audit SET {cols.replace('FROM audit', 'FROM saved')} "
                 "WHERE id = :this", {"this": b, "other": a})


def _insert_forged(conn: sqlite3.Connection, at_id: int) -> None:
    """Shift rows up one id and insert a row linked correctly to the row before it."""
    conn.execute("UPDATE audit SET id = id + 1000 WHERE id >= ?", (at_id,))
    conn.execute("UPDATE audit SET id = id - 999 WHERE id >= 1000")
    prev = conn.execute("SELECT row_hash FROM audit WHERE id = ?", (at_id - 1,)).fetchone()[0]
    values = rec(99, prompt_tokens=0).values()
    conn.execute(f"INSERT INTO audit VALUES ({', '.join('?' * (len(values) + 3))})",
                 (at_id, *values, prev, row_hash(prev, at_id, content_json(values))))


TAMPERING: dict[str, tuple[Callable[[sqlite3.Connection], object], int, str]] = {
    "edited tokens": (lambda c: c.execute("UPDATE audit SET prompt_tokens = 0 WHERE id = 5"),
                      5, "does not match its hash"),
    "edited time": (lambda c: c.execute("UPDATE audit SET at = at + 0.001 WHERE id = 7"),
                    7, "does not match its hash"),
    "edited type": (lambda c: c.execute("UPDATE audit SET at = 'yesterday' WHERE id = 3"),
                    3, "does not match its hash"),
    "rehashed row": (lambda c: c.execute("UPDATE audit SET row_hash = ? WHERE id = 4",
                                         ("a" * 64,)), 4, "does not match its hash"),
    "deleted row": (lambda c: c.execute("DELETE FROM audit WHERE id = 6"), 7,
                    "row 6 is missing"),
    "deleted first row": (lambda c: c.execute("DELETE FROM audit WHERE id = 1"), 2, "missing"),
    "deleted last rows": (lambda c: c.execute("DELETE FROM audit WHERE id >= 9"), 9,
                          "rows 9..10 are missing at the end"),
    "reordered rows": (lambda c: _swap(c, 4, 5), 4, "prev_hash"),
    "inserted row": (lambda c: _insert_forged(c, 6), 7, "prev_hash"),
    "moved anchor": (lambda c: c.execute("UPDATE audit_anchor SET last_id = 2"), 1,
                     "should have been pruned"),
}


@pytest.mark.parametrize("tamper", list(TAMPERING))
async def test_tampering_makes_verify_fail_naming_the_row(db: str, tamper: str) -> None:
    await write(db, [rec(i) for i in range(10)])
    action, bad_id, reason = TAMPERING[tamper]
    conn = raw(db)
    try:
        unprotect(conn)
        action(conn)
    finally:
        conn.close()
    result = check(db)
    assert not result.ok
    assert result.first_bad_id == bad_id
    assert result.reason is not None and reason in result.reason
    with connected(db) as conn:
        before = conn.execute("SELECT count(*) FROM audit WHERE id < ?", (bad_id,)).fetchone()[0]
    assert result.rows_checked == before


# -- pruning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [5000, 3])
async def test_a_pruned_log_verifies_and_keeps_growing(db: str, batch_size: int) -> None:
    async with running(db) as writer:
        for i in range(10):
            writer.submit(rec(i))
        await writer.flush()
        with connected(db) as conn:
            result = prune(conn, T0 + 6, batch_size=batch_size)      # rows 1..6 are older
        assert (result.deleted, result.anchor_id) == (6, 6)
        writer.submit(rec(10))
        await writer.flush()
    after = check(db)
    assert after.ok and after.anchor_id == 6 and after.rows_checked == 5
    assert after.head_id == 11
    with connected(db) as conn:
        assert conn.execute("SELECT min(id), max(id) FROM audit").fetchone() == (7, 11)
        assert conn.execute("SELECT pruned_rows FROM audit_anchor").fetchone()[0] == 6
        assert conn.execute("SELECT count(*) FROM audit_prune_token").fetchone()[0] == 0


async def test_pruning_everything_then_writing_continues_the_ids(db: str) -> None:
    await write(db, [rec(i) for i in range(4)])
    with connected(db) as conn:
        assert prune(conn, T0 + 100).deleted == 4
        assert prune(conn, T0 + 100).deleted == 0
    assert check(db).ok and check(db).rows_checked == 0
    await write(db, [rec(5)])
    with connected(db) as conn:
        assert conn.execute("SELECT id FROM audit").fetchall() == [(5,)]
    assert check(db).ok


async def test_prune_removes_only_a_prefix(db: str) -> None:
    # Rows are written when requests end: a long request can be older than the one before.
    await write(db, [rec(0), rec(1), rec(20), rec(2), rec(3)])
    with connected(db) as conn:
        assert prune(conn, T0 + 10).deleted == 2
    assert check(db).ok and count(db) == 3


async def test_prune_refuses_to_launder_a_tampered_row(db: str) -> None:
    await write(db, [rec(i) for i in range(10)])
    conn = raw(db)
    try:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET completion_tokens = 0 WHERE id = 4")
    finally:
        conn.close()
    with connected(db) as conn:
        with pytest.raises(ChainBroken, match="broken at row 4: .* pruned 2 rows before"):
            prune(conn, T0 + 8, batch_size=2)
    assert count(db) == 8                      # the batch of rows 3-4 was refused whole
    assert check(db).first_bad_id == 4


# -- the writer ---------------------------------------------------------------------------------


async def test_the_writer_group_commits_what_is_queued(db: str) -> None:
    async with running(db, batch_size=100) as writer:
        assert writer.healthy and writer.head == (0, ZERO_HASH)
        for i in range(250):                  # no await: all queued before the writer runs
            writer.submit(rec(i))
        assert writer.queued == 250
        await writer.flush()
        assert (writer.written, writer.queued, writer.batches) == (250, 0, 3)
        await writer.flush()                   # nothing pending: returns at once
        assert writer.snapshot()["head_id"] == 250
    assert check(db).rows_checked == 250


async def test_a_row_is_written_without_flush_and_later_rows_share_a_batch(db: str) -> None:
    locker = raw(db)
    try:
        async with running(db, busy_timeout=30.0) as writer:
            writer.submit(rec(0))
            await until(lambda: writer.written == 1)      # on its own, no flush
            locker.execute("BEGIN IMMEDIATE")              # hold the next batch in BEGIN
            writer.submit(rec(1))
            await until(lambda: writer.writing == 1)
            for i in range(2, 102):
                writer.submit(rec(i))
            locker.execute("ROLLBACK")
            await writer.flush()
            assert (writer.written, writer.batches) == (102, 3)
            assert writer.failures == 0
    finally:
        locker.close()


async def test_close_writes_everything_and_later_rows_are_counted_as_dropped(db: str) -> None:
    writer = AuditWriter(db)
    await writer.start()
    for i in range(100):
        writer.submit(rec(i))
    await writer.close()
    await writer.close()                       # idempotent
    assert count(db) == 100 and writer.written == 100
    writer.submit(rec(100))
    assert writer.dropped == 1 and not writer.healthy


async def test_two_writers_on_one_database_keep_one_chain(db: str) -> None:
    async with running(db) as first, running(db) as second:
        for i in range(20):
            (first if i % 3 else second).submit(rec(i))
            if i % 4 == 0:
                await asyncio.gather(first.flush(), second.flush())
        await asyncio.gather(first.flush(), second.flush())
    assert check(db).ok and count(db) == 20


async def test_a_commit_that_failed_after_committing_is_not_written_twice(
        db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error reported by COMMIT after the data reached the file (fsync failing after
    the write) cannot be produced on demand, so this one COMMIT commits, then says it failed."""
    async with running(db, retry_max_s=0.05) as writer:
        await write_one(writer, 0)
        real = auditbatch.commit                                 # the seam

        def commit_then_fail(conn: sqlite3.Connection) -> None:
            monkeypatch.setattr(auditbatch, "commit", real)
            real(conn)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(auditbatch, "commit", commit_then_fail)
        writer.submit(rec(1))
        writer.submit(rec(2))
        await writer.flush()
        assert writer.failures == 1 and writer.written == 3 and writer.healthy
        await write_one(writer, 3)
    assert check(db).ok and count(db) == 4


async def test_start_refuses_a_missing_or_old_database(tmp_path: Path) -> None:
    with pytest.raises(store.StoreError, match="does not exist"):
        await AuditWriter(str(tmp_path / "missing.db")).start()
    (tmp_path / "empty.db").touch()
    with pytest.raises(store.StoreError, match="schema version 0"):
        await AuditWriter(str(tmp_path / "empty.db")).start()


async def test_spend_since_sums_tokens_per_key_and_tenant(db: str) -> None:
    await write(db, [
        rec(0, prompt_tokens=100, completion_tokens=1),                 # before the period
        rec(10, prompt_tokens=3, completion_tokens=4),
        rec(11, key_id="efgh5678", prompt_tokens=5, completion_tokens=0,
            metering="estimated"),
        rec(12, key_id="master", tenant=None, prompt_tokens=7, completion_tokens=0),
        rec(13, key_id="zzzz0000", tenant="other", prompt_tokens=0, completion_tokens=0,
            status=429, outcome="BudgetExhausted"),
        rec(14, key_id=None, tenant=None, status=401, outcome="InvalidKey",
            prompt_tokens=0, completion_tokens=0),
        rec(30, prompt_tokens=1000, completion_tokens=0),               # after `until`
    ])
    conn = await store.open_async(db)
    try:
        assert await spend_since(conn, T0 + 10, until=T0 + 20) == [
            ("key", "abcd1234", 7), ("key", "efgh5678", 5), ("key", "master", 7),
            ("tenant", "acme", 12)]
        assert ("key", "abcd1234", 1007) in await spend_since(conn, T0 + 10)
        assert await spend_since(conn, T0 + 31) == []
        # Several periods in one pass give what spend_since gives for each.
        both = await spend_in_periods(conn, [T0 + 10, T0 - 100])
        for index, start in enumerate((T0 + 10, T0 - 100)):
            assert [(kind, name, totals[index]) for kind, name, totals in both
                    if totals[index]] == await spend_since(conn, start)
    finally:
        await conn.close()


# -- storage faults, produced for real -----------------------------------------------------------


async def test_a_locked_database_makes_the_writer_unhealthy_until_released(db: str) -> None:
    locker = raw(db)
    try:
        async with running(db, busy_timeout=0.1, retry_max_s=0.1) as writer:
            await write_one(writer, 0)
            locker.execute("BEGIN EXCLUSIVE")
            writer.submit(rec(1))
            await until(lambda: not writer.healthy)
            assert writer.last_error is not None and "locked" in writer.last_error
            assert writer.queued == 1
            reader = raw(db)                       # WAL: readers are not blocked
            try:
                assert reader.execute("SELECT count(*) FROM audit").fetchone()[0] == 1
            finally:
                reader.close()
            locker.execute("ROLLBACK")
            await writer.flush()
            assert writer.healthy and writer.last_error is None and writer.written == 2
    finally:
        locker.close()
    assert check(db).ok and count(db) == 2


async def write_one(writer: AuditWriter, i: int) -> None:
    writer.submit(rec(i))
    await writer.flush()


async def test_the_backlog_is_bounded_but_rows_with_tokens_are_kept(db: str) -> None:
    locker = raw(db)
    try:
        async with running(db, busy_timeout=0.05, max_queued=3, retry_max_s=0.05) as writer:
            locker.execute("BEGIN EXCLUSIVE")
            for i in range(3):
                writer.submit(rec(i, prompt_tokens=0, completion_tokens=0))
            assert not writer.healthy                    # the backlog alone is enough
            for i in range(3, 6):
                writer.submit(rec(i, prompt_tokens=0, completion_tokens=0))
            writer.submit(rec(6, prompt_tokens=0, completion_tokens=0, status=503))
            assert writer.dropped == 1 and writer.queued == 6     # hard limit: 2 x 3
            writer.submit(rec(7))                                   # carries tokens: kept
            assert writer.queued == 7
            locker.execute("ROLLBACK")
            await writer.flush()
            assert writer.healthy and writer.written == 7
    finally:
        locker.close()
    with connected(db) as conn:
        ids = [r[0] for r in conn.execute("SELECT request_id FROM audit ORDER BY id")]
    assert ids == [f"req-{i}" for i in (0, 1, 2, 3, 4, 5, 7)]


async def test_close_gives_up_after_its_timeout_while_writes_fail(db: str) -> None:
    locker = raw(db)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        writer = AuditWriter(db, busy_timeout=0.05, retry_max_s=0.05)
        await writer.start()
        writer.submit(rec(0))
        waiter = asyncio.ensure_future(writer.flush())
        await writer.close(timeout=0.3)
        with pytest.raises(store.StoreError, match="1 rows unwritten"):
            await waiter
        with pytest.raises(store.StoreError, match="not running"):
            await writer.flush()
    finally:
        locker.close()
    assert count(db) == 0


async def test_a_full_disk_makes_the_writer_unhealthy_and_nothing_is_lost(tmpfs: Path) -> None:
    path = str(tmpfs / "gw.db")
    store.init_db(path)
    async with running(path, busy_timeout=0.1, retry_max_s=0.1) as writer:
        await write_one(writer, 0)
        ballast = fill(tmpfs)
        for i in range(1, 201):           # ~200 KiB of rows: needs new pages
            writer.submit(rec(i, outcome="x" * 1000))
        await until(lambda: not writer.healthy)
        assert writer.last_error is not None and "full" in writer.last_error
        assert writer.queued == 200
        ballast.unlink()
        await writer.flush()
        assert writer.healthy and writer.written == 201
    with connected(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check(path).ok and count(path) == 201


async def test_a_read_only_file_makes_the_writer_unhealthy_until_writable(db: str) -> None:
    async with running(db, busy_timeout=0.1, retry_max_s=0.1) as writer:
        await write_one(writer, 0)
        with immutable(db, db + "-wal"):
            writer.submit(rec(1))
            await until(lambda: not writer.healthy)
            assert writer.last_error is not None
            assert "I/O error" in writer.last_error or "readonly" in writer.last_error
            failures = writer.failures
            await until(lambda: writer.failures > failures)    # retried, still refused
            assert writer.queued == 1
        await writer.flush()
        assert writer.healthy and writer.written == 2
    assert check(db).ok and count(db) == 2


async def test_a_removed_database_is_waited_for_and_a_new_one_continues(db: str) -> None:
    async with running(db, busy_timeout=0.1, retry_max_s=0.1) as writer:
        await write_one(writer, 0)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db + suffix)
        writer.submit(rec(1))
        await until(lambda: not writer.healthy)
        assert writer.last_error is not None and "removed" in writer.last_error
        failures = writer.failures
        await until(lambda: writer.failures > failures)        # retried: still missing
        assert writer.last_error is not None and "does not exist" in writer.last_error
        store.init_db(db)                                       # the operator recreates it
        await writer.flush()
        assert writer.healthy and writer.written == 2
    assert check(db).ok
    with connected(db) as conn:      # the new file has the row written after the fault
        assert conn.execute("SELECT id, request_id FROM audit").fetchall() == [(1, "req-1")]


async def test_a_replaced_corrupt_file_is_refused_until_restored(db: str, tmp_path: Path) -> None:
    backup = str(tmp_path / "backup.db")
    async with running(db, busy_timeout=0.1, retry_max_s=0.1) as writer:
        await write_one(writer, 0)
        source = raw(db)
        target = raw(backup)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"this is not an SQLite database" * 300)
        os.replace(garbage, db)
        writer.submit(rec(1))
        await until(lambda: not writer.healthy)
        failures = writer.failures
        await until(lambda: writer.failures > failures)
        assert writer.last_error is not None and "not a database" in writer.last_error
        os.replace(backup, db)                                 # the operator restores it
        await writer.flush()
        assert writer.healthy and writer.written == 2
    assert check(db).ok and count(db) == 2


async def test_a_truncated_file_is_detected_and_a_reinitialised_one_continues(db: str) -> None:
    async with running(db, busy_timeout=0.1, retry_max_s=0.1) as writer:
        for i in range(50):
            writer.submit(rec(i))
        await writer.flush()
        other = raw(db)
        try:       # everything into the main file, so the truncation loses it for real
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            other.close()
        os.truncate(db, 0)
        writer.submit(rec(50))
        await until(lambda: not writer.healthy)
        assert writer.last_error is not None and "shrank" in writer.last_error
        failures = writer.failures
        await until(lambda: writer.failures > failures)
        assert writer.last_error is not None and "schema version 0" in writer.last_error
        store.init_db(db)                        # the operator re-initialises the file
        await writer.flush()
        assert writer.healthy and writer.written == 51
    assert check(db).ok
    with connected(db) as conn:
        assert conn.execute("SELECT request_id FROM audit").fetchall() == [("req-50",)]


_CHILD = """
import asyncio, sys
from neuraldrive_gw.audit import AuditRecord, AuditWriter

async def main(path):
    writer = AuditWriter(path)
    await writer.start()
    i = 0
    while True:
        for _ in range(25):
            i += 1
            writer.submit(AuditRecord(request_id=f"r{i}", at=1.0 * i, key_id="abcd1234",
                                      tenant="acme", method="POST", route="/api/chat",
                                      status=200, outcome="ok", prompt_tokens=2,
                                      completion_tokens=1, metering="exact"))
        await writer.flush()
        print(writer.written, flush=True)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
def test_sigkill_while_writing_leaves_a_whole_verifiable_log(db: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, db], stdout=subprocess.PIPE,
                             text=True, env=env)
    confirmed = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            confirmed = int(line)
            if confirmed >= 1000:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL and confirmed >= 1000
    with connected(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows, low, high, tokens = conn.execute(
            "SELECT count(*), min(id), max(id), sum(prompt_tokens + completion_tokens) "
            "FROM audit").fetchone()
    assert rows >= confirmed and (low, high) == (1, rows) and tokens == 3 * rows
    assert check(db).ok and check(db).rows_checked == rows


@pytest.mark.parametrize("values", [
    ("id", 1.5, None, "tenant", "::1", "POST", "/api/chat", "m:1b", 200, "ok", 0, 1, 2,
     "exact", 3, None, 4),
    ("\u00e9\u4e2d\U0001f600", 1e16, 1e-7, 0.1, 123456789012345678901234567890, "\x00\x1f\"\\/",
     "\u2028", 0, -0.0, True, False),
    ("nan",),
    (float("nan"),),
    (float("inf"), "x"),
    ([1, 2], {"a": 1}),
    (),
])
def test_canonical_json_is_exactly_what_json_dumps_writes(values: tuple) -> None:
    """The chain's hashes depend on these bytes: the fast path must never differ."""
    try:
        expected = json.dumps(list(values), separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False)
    except ValueError:
        with pytest.raises(ValueError):
            content_json(values)
        return
    assert content_json(values) == expected
