"""SQLite store: creation, migrations, refusals, the auth revision, the auth snapshot, locking."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from neuraldrive_gw import admin, store
from neuraldrive_gw.principals import AuthSnapshot

FAKE_HASH = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$" + "h" * 43


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "gw.db")
    store.init_db(path)
    return path


@pytest.fixture
def conn(db: str) -> Iterator[sqlite3.Connection]:
    connection = store.open_db(db)
    yield connection
    connection.close()


def raw(path: str) -> sqlite3.Connection:
    """A plain connection that bypasses the store (an outsider or an older release)."""
    return sqlite3.connect(path, isolation_level=None)


def revision(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE name = 'auth_revision'").fetchone()[0])


def add_tenant(conn: sqlite3.Connection, name: str = "acme", **columns: object) -> int:
    fields = {"name": name, "created_at": time.time(), **columns}
    cursor = conn.execute(f"INSERT INTO tenants ({', '.join(fields)}) "
                          f"VALUES ({', '.join('?' * len(fields))})", tuple(fields.values()))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def add_key(conn: sqlite3.Connection, key_id: str, tenant_id: int, **columns: object) -> None:
    fields = {"key_id": key_id, "tenant_id": tenant_id, "hash": FAKE_HASH,
              "created_at": time.time(), **columns}
    conn.execute(f"INSERT INTO keys ({', '.join(fields)}) "
                 f"VALUES ({', '.join('?' * len(fields))})", tuple(fields.values()))


# -- creation and migrations --------------------------------------------------------------


def test_init_creates_a_private_wal_database_at_the_current_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "gw.db")
    assert store.init_db(path) == store.SCHEMA_VERSION == 4
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    conn = store.open_db(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "tenants", "tenant_models", "keys"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert revision(conn) == 0
    finally:
        conn.close()
    for suffix in ("-wal", "-shm"):       # SQLite copies the main file's mode
        if os.path.exists(path + suffix):
            assert stat.S_IMODE(os.stat(path + suffix).st_mode) == 0o600


def test_init_is_idempotent_and_keeps_data(db: str) -> None:
    conn = store.open_db(db)
    try:
        admin.create_tenant(conn, "acme")
    finally:
        conn.close()
    assert store.init_db(db) == store.SCHEMA_VERSION
    conn = store.open_db(db)
    try:
        assert [t.name for t in admin.list_tenants(conn)] == ["acme"]
    finally:
        conn.close()


def test_an_empty_existing_file_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    path.touch()
    conn = store.open_db(str(path))
    try:
        assert store.user_version(conn) == store.SCHEMA_VERSION
    finally:
        conn.close()


def test_an_older_schema_is_migrated_step_by_step(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    nxt = "CREATE TABLE extra (x INTEGER);\nINSERT INTO extra VALUES (42);"
    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, nxt))
    monkeypatch.setattr(store, "SCHEMA_VERSION", store.SCHEMA_VERSION + 1)
    conn = store.open_db(db)
    try:
        assert store.user_version(conn) == store.SCHEMA_VERSION
        assert conn.execute("SELECT x FROM extra").fetchone()[0] == 42
    finally:
        conn.close()


def test_a_failing_migration_changes_nothing(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    current = store.SCHEMA_VERSION
    nxt = "CREATE TABLE extra (x INTEGER);\nINSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, nxt))
    monkeypatch.setattr(store, "SCHEMA_VERSION", current + 1)
    with pytest.raises(store.StoreError, match="no such table"):
        store.open_db(db)
    check = raw(db)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == current
        assert check.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'"
                             ).fetchone()[0] == 0
    finally:
        check.close()


def test_a_newer_schema_is_refused_everywhere(db: str) -> None:
    outsider = raw(db)
    outsider.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    outsider.close()
    message = (f"database schema version {store.SCHEMA_VERSION + 1} is newer than this "
               f"neuraldrive-gw ({store.SCHEMA_VERSION})")
    with pytest.raises(store.StoreError) as excinfo:
        store.open_db(db)
    assert str(excinfo.value) == message
    with pytest.raises(store.StoreError, match="newer than this"):
        store.init_db(db)


async def test_a_newer_schema_is_refused_by_the_daemon(db: str) -> None:
    outsider = raw(db)
    outsider.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    outsider.close()
    with pytest.raises(store.StoreError, match="newer than this"):
        await store.open_async(db)


async def test_the_daemon_connection_never_migrates(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    path.touch()
    with pytest.raises(store.StoreError, match="init-db"):
        await store.open_async(str(path))
    assert path.stat().st_size == 0


@pytest.mark.parametrize("opener", ["sync", "async"])
async def test_a_missing_file_is_an_error_and_is_not_created(tmp_path: Path, opener: str) -> None:
    path = str(tmp_path / "missing.db")
    message = f"database {path} does not exist; run `neuraldrive-gw init-db`"
    with pytest.raises(store.StoreError) as excinfo:
        if opener == "sync":
            store.open_db(path)
        else:
            await store.open_async(path)
    assert str(excinfo.value) == message
    assert os.listdir(tmp_path) == []


def test_init_in_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(store.StoreError, match="cannot create database"):
        store.init_db(str(tmp_path / "no" / "such" / "gw.db"))


def test_an_unrelated_database_is_not_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "other.db")
    other = raw(path)
    other.execute("CREATE TABLE mine (x)")
    other.close()
    with pytest.raises(store.StoreError, match="not a neuraldrive-gw database"):
        store.open_db(path)


def test_a_corrupt_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    path.write_bytes(b"this is not an SQLite database" * 200)
    with pytest.raises(store.StoreError, match="cannot open database"):
        store.open_db(str(path))


def test_uri_special_characters_in_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "we?ird#name%20 &mode=ro.db")
    assert store.init_db(path) == store.SCHEMA_VERSION
    conn = store.open_db(path)
    try:
        admin.create_tenant(conn, "acme")            # really read-write
    finally:
        conn.close()
    assert sorted(os.listdir(tmp_path))[0] == "we?ird#name%20 &mode=ro.db"


# -- the auth revision ----------------------------------------------------------------------


def _key_columns(conn: sqlite3.Connection) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(keys)")]


CHANGES: list[tuple[str, Callable[[sqlite3.Connection, int], object]]] = [
    ("insert tenant", lambda c, t: add_tenant(c, "other")),
    ("update tenant", lambda c, t: c.execute("UPDATE tenants SET weight = 3 WHERE id = ?", (t,))),
    ("update tenant flag",
     lambda c, t: c.execute("UPDATE tenants SET allow_all_models = 1 WHERE id = ?", (t,))),
    ("insert model", lambda c, t: c.execute(
        "INSERT INTO tenant_models VALUES (?, 'registry.ollama.ai/library/x:latest')", (t,))),
    ("update model", lambda c, t: c.execute("UPDATE tenant_models SET model = 'y'")),
    ("delete model", lambda c, t: c.execute("DELETE FROM tenant_models")),
    ("insert key", lambda c, t: add_key(c, "BBBBBBBB", t)),
    ("delete key", lambda c, t: c.execute("DELETE FROM keys WHERE key_id = 'AAAAAAAA'")),
    ("delete tenant", lambda c, t: (c.execute("DELETE FROM keys"),
                                    c.execute("DELETE FROM tenants WHERE id = ?", (t,)))),
]


@pytest.fixture
def seeded(conn: sqlite3.Connection) -> tuple[sqlite3.Connection, int]:
    tenant_id = add_tenant(conn)
    conn.execute("INSERT INTO tenant_models VALUES (?, 'registry.ollama.ai/library/m:latest')",
                 (tenant_id,))
    add_key(conn, "AAAAAAAA", tenant_id)
    return conn, tenant_id


@pytest.mark.parametrize("name, change", CHANGES, ids=[c[0] for c in CHANGES])
def test_each_kind_of_change_bumps_the_revision(
        seeded: tuple[sqlite3.Connection, int], name: str,
        change: Callable[[sqlite3.Connection, int], object]) -> None:
    conn, tenant_id = seeded
    before = revision(conn)
    change(conn, tenant_id)
    assert revision(conn) > before


def test_updating_any_key_column_but_last_used_bumps_the_revision(
        seeded: tuple[sqlite3.Connection, int]) -> None:
    conn, tenant_id = seeded
    columns = _key_columns(conn)
    # Derived from the live table, so a column added later without updating the trigger fails.
    assert "last_used_at" in columns and len(columns) == 15
    values = {"key_id": "CCCCCCCC", "tenant_id": tenant_id, "label": "x", "hash": "h2",
              "budget_period": "day"}
    for column in columns:
        if column == "last_used_at":
            continue
        before = revision(conn)
        value = values.get(column, 7)
        conn.execute(f"UPDATE keys SET {column} = ?", (value,))
        assert revision(conn) == before + 1, column


def test_last_used_updates_do_not_bump_the_revision(seeded: tuple[sqlite3.Connection, int]) -> None:
    conn, _ = seeded
    before = revision(conn)
    for _ in range(3):
        conn.execute("UPDATE keys SET last_used_at = ? WHERE key_id = 'AAAAAAAA'", (time.time(),))
    assert revision(conn) == before


async def test_auth_revision_async_sees_other_connections(
        db: str, conn: sqlite3.Connection) -> None:
    daemon = await store.open_async(db)
    try:
        assert await store.auth_revision(daemon) == 0
        admin.create_tenant(conn, "acme")
        assert await store.auth_revision(daemon) == 1
        # Even a read transaction left open (a cancelled load) must not pin an old view.
        await daemon.execute("BEGIN")
        await daemon.execute("SELECT count(*) FROM keys")
        admin.create_tenant(conn, "other")
        assert await store.auth_revision(daemon) == 2
    finally:
        await daemon.close()


# -- the auth snapshot ----------------------------------------------------------------------


async def load(db: str) -> AuthSnapshot:
    daemon = await store.open_async(db)
    try:
        return await store.load_auth_snapshot(daemon)
    finally:
        await daemon.close()


async def test_snapshot_contents(db: str, conn: sqlite3.Connection) -> None:
    llama, qwen = "registry.ollama.ai/library/llama3:latest", "registry.ollama.ai/library/qwen:7b"
    listed = add_tenant(conn, "listed")
    conn.executemany("INSERT INTO tenant_models VALUES (?, ?)", [(listed, llama), (listed, qwen)])
    everything = add_tenant(conn, "everything", allow_all_models=1, weight=3, tokens_per_min=500,
                            token_budget=10_000, budget_period="month", max_concurrent=2)
    add_key(conn, "inherit1", listed, label="inherits")
    add_key(conn, "override", listed, allow_all_models=1, requests_per_min=5, tokens_per_min=6,
            token_budget=7, budget_period="day", max_concurrent=1, log_prompts=1)
    add_key(conn, "narrowed", everything, allow_all_models=0)
    add_key(conn, "revoked1", everything, revoked_at=time.time() - 1, expires_at=time.time() + 60)

    snapshot = await load(db)
    assert snapshot.revision == revision(conn)
    assert set(snapshot.keys) == {"inherit1", "override", "narrowed", "revoked1"}
    inherit, override = snapshot.keys["inherit1"], snapshot.keys["override"]
    assert inherit.tenant.name == "listed" and inherit.label == "inherits"
    assert inherit.tenant.allowed_models == frozenset({llama, qwen})
    assert inherit.hash == FAKE_HASH
    assert inherit.allow_all_models is None and inherit.allow_all is False
    assert override.allow_all_models is True and override.allow_all is True
    assert (override.requests_per_min, override.tokens_per_min, override.token_budget,
            override.budget_period, override.max_concurrent, override.log_prompts) == \
        (5, 6, 7, "day", 1, True)
    narrowed = snapshot.keys["narrowed"]
    assert narrowed.tenant.allow_all_models is True and narrowed.allow_all is False
    assert narrowed.tenant.allowed_models == frozenset()
    assert (narrowed.tenant.weight, narrowed.tenant.tokens_per_min, narrowed.tenant.token_budget,
            narrowed.tenant.budget_period, narrowed.tenant.max_concurrent) == \
        (3, 500, 10_000, "month", 2)
    assert not snapshot.keys["revoked1"].usable(time.time())
    assert inherit.usable(time.time())
    assert inherit.tenant is snapshot.keys["override"].tenant      # one Tenant per tenant


async def test_snapshot_of_an_empty_database(db: str) -> None:
    snapshot = await load(db)
    assert snapshot.revision == 0 and dict(snapshot.keys) == {}


async def test_snapshot_of_ten_thousand_keys(db: str, conn: sqlite3.Connection) -> None:
    tenant_ids = [add_tenant(conn, f"t{i}") for i in range(10)]
    now = time.time()
    with store.write_transaction(conn):
        conn.executemany(
            "INSERT INTO keys (key_id, tenant_id, hash, created_at) VALUES (?, ?, ?, ?)",
            [(f"k{i:07d}", tenant_ids[i % 10], FAKE_HASH, now) for i in range(10_000)])
    snapshot = await load(db)
    assert len(snapshot.keys) == 10_000
    assert snapshot.keys["k0000042"].tenant.name == "t2"


# -- locking --------------------------------------------------------------------------------


def test_a_held_write_lock_fails_writes_after_the_busy_timeout(db: str) -> None:
    holder = raw(db)
    writer = store.open_db(db, timeout=0.2)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(store.StoreError, match="database is locked"):
            admin.create_tenant(writer, "acme")
        assert time.monotonic() - started >= 0.15          # it waited, then gave up
        assert not writer.in_transaction
        # WAL: readers keep working while the writer is locked out.
        assert admin.list_tenants(writer) == []
        holder.execute("ROLLBACK")
        assert admin.create_tenant(writer, "acme").name == "acme"
    finally:
        writer.close()
        holder.close()


def test_write_transaction_rolls_back_on_error(conn: sqlite3.Connection) -> None:
    with pytest.raises(RuntimeError):
        with store.write_transaction(conn):
            add_tenant(conn, "acme")
            raise RuntimeError("boom")
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM tenants").fetchone()[0] == 0
    assert revision(conn) == 0


def test_check_db_reports_without_changing_anything(tmp_path: Path) -> None:
    path = str(tmp_path / "gw.db")
    with pytest.raises(store.StoreError, match="init-db"):
        store.check_db(path)
    assert not os.path.exists(path)
    store.init_db(path)
    before = os.stat(path).st_mtime_ns
    assert store.check_db(path) == store.SCHEMA_VERSION
    assert os.stat(path).st_mtime_ns == before
