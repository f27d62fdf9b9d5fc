"""SQLite storage: opening, pragmas, schema migrations, and the daemon's auth snapshot."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from typing import Any

import aiosqlite

from .principals import AuthSnapshot, KeyRecord, Tenant

# Every UPDATE of these `keys` columns bumps the auth revision. `last_used_at` is left out
# on purpose: the daemon writes it on use and must not trigger its own snapshot reload.
# A migration that adds a column to `keys` must recreate `keys_auth_update` with it.
_KEY_AUTH_COLUMNS = ("key_id", "tenant_id", "label", "hash", "created_at", "expires_at",
                     "revoked_at", "allow_all_models", "requests_per_min", "tokens_per_min",
                     "token_budget", "budget_period", "max_concurrent", "log_prompts")

_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'auth_revision';"

# The limit columns (limits.py writes and reads them). `keys`: NULL = the config default
# (limits.key_defaults), 0 = no limit for this key whatever the default, n > 0 = n.
# `tenants`: NULL (or 0) = no limit, n > 0 = n. 0 was always storable, so giving it a meaning
# needed no migration; limits.py refuses every other value before it is written.
_V1 = f"""
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('auth_revision', 0);

CREATE TABLE tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    allow_all_models INTEGER NOT NULL DEFAULT 0,
    tokens_per_min INTEGER,
    token_budget INTEGER,
    budget_period TEXT CHECK (budget_period IN ('day', 'month')),
    max_concurrent INTEGER,
    weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1),
    created_at REAL NOT NULL
);

CREATE TABLE tenant_models (
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    PRIMARY KEY (tenant_id, model)
);

-- No ON DELETE CASCADE: deleting a tenant that still has keys must be deliberate.
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    label TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL,
    allow_all_models INTEGER,
    requests_per_min INTEGER,
    tokens_per_min INTEGER,
    token_budget INTEGER,
    budget_period TEXT,
    max_concurrent INTEGER,
    log_prompts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX keys_tenant ON keys (tenant_id);

CREATE TRIGGER tenants_auth_insert AFTER INSERT ON tenants BEGIN {_BUMP} END;
CREATE TRIGGER tenants_auth_update AFTER UPDATE ON tenants BEGIN {_BUMP} END;
CREATE TRIGGER tenants_auth_delete AFTER DELETE ON tenants BEGIN {_BUMP} END;
CREATE TRIGGER tenant_models_auth_insert AFTER INSERT ON tenant_models BEGIN {_BUMP} END;
CREATE TRIGGER tenant_models_auth_update AFTER UPDATE ON tenant_models BEGIN {_BUMP} END;
CREATE TRIGGER tenant_models_auth_delete AFTER DELETE ON tenant_models BEGIN {_BUMP} END;
CREATE TRIGGER keys_auth_insert AFTER INSERT ON keys BEGIN {_BUMP} END;
CREATE TRIGGER keys_auth_update AFTER UPDATE OF {", ".join(_KEY_AUTH_COLUMNS)} ON keys
BEGIN {_BUMP} END;
CREATE TRIGGER keys_auth_delete AFTER DELETE ON keys BEGIN {_BUMP} END;
"""

# The audit log (SPEC §10; auditchain.py defines the hash chain). Rows are only ever
# appended, with consecutive ids, each extending the chain from the row before it (or from
# the anchor). The only rows that may be deleted are those a prune has already moved the
# anchor past, and only inside the prune's own transaction: `audit_prune_token` holds a row
# only between the prune's INSERT and DELETE of it, before COMMIT, so no other connection
# ever sees one (SQLite has no session variables). These triggers stop mistakes and other
# programs, not the file's owner, who can drop them: `audit verify` is the real check.
_ZERO_HASH = "0" * 64
_NOT_APPENDED = "audit rows can only be appended, extending the hash chain"
_APPEND_ONLY = "audit rows are append-only (use neuraldrive-gw audit prune)"

_V2 = f"""
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,      -- never reused, even after a prune
    request_id TEXT NOT NULL,
    at REAL NOT NULL,                          -- when the request arrived (epoch seconds)
    key_id TEXT,
    tenant TEXT,                               -- tenant name; NULL for the master key
    client_ip TEXT,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,                                -- canonical (installed) model name
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    stream INTEGER NOT NULL CHECK (stream IN (0, 1)),
    prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    metering TEXT NOT NULL CHECK (metering IN ('exact', 'estimated', 'none')),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    ttfb_ms INTEGER,
    duration_ms INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_key_at ON audit (key_id, at);
CREATE INDEX audit_tenant_at ON audit (tenant, at);

-- Where the chain starts: the id and hash of the last pruned row (0 and zeros before any).
CREATE TABLE audit_anchor (
    only INTEGER PRIMARY KEY CHECK (only = 1),
    last_id INTEGER NOT NULL,
    last_hash TEXT NOT NULL,
    pruned_rows INTEGER NOT NULL DEFAULT 0,
    pruned_at REAL
);
INSERT INTO audit_anchor (only, last_id, last_hash) VALUES (1, 0, '{_ZERO_HASH}');

CREATE TABLE audit_prune_token (pid INTEGER NOT NULL);

CREATE TRIGGER audit_append BEFORE INSERT ON audit
WHEN NEW.id IS NOT coalesce((SELECT max(id) FROM audit),
                            (SELECT last_id FROM audit_anchor)) + 1
  OR NEW.prev_hash IS NOT coalesce((SELECT row_hash FROM audit ORDER BY id DESC LIMIT 1),
                                   (SELECT last_hash FROM audit_anchor))
BEGIN SELECT RAISE(ABORT, '{_NOT_APPENDED}'); END;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN NOT EXISTS (SELECT 1 FROM audit_prune_token)
  OR OLD.id > (SELECT last_id FROM audit_anchor)
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END;

CREATE TRIGGER audit_anchor_update BEFORE UPDATE ON audit_anchor
WHEN NOT EXISTS (SELECT 1 FROM audit_prune_token)
  OR NEW.only IS NOT 1 OR NEW.last_id <= OLD.last_id
  OR NOT EXISTS (SELECT 1 FROM audit WHERE id = NEW.last_id AND row_hash = NEW.last_hash)
BEGIN SELECT RAISE(ABORT, 'the audit anchor only moves forward onto a row, in a prune'); END;

CREATE TRIGGER audit_anchor_no_delete BEFORE DELETE ON audit_anchor
BEGIN SELECT RAISE(ABORT, 'the audit anchor cannot be deleted'); END;
"""

# MIGRATIONS[n - 1] brings a database from schema version n - 1 to n, in one transaction.
# Append only: a released migration is never edited.
MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION: int = len(MIGRATIONS)

# Keys and revocations must not un-happen on power loss: sync the WAL on every commit.
_PRAGMAS = ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL",
            "PRAGMA foreign_keys = ON", "PRAGMA journal_size_limit = 67108864")


class StoreError(Exception):
    """The database cannot be used: missing, unreadable, locked, or of an unknown schema."""


def _uri(path: str) -> str:
    # mode=rw: a missing file is an error instead of a silently created empty database.
    # Quote everything URI-special ('?', '#', '%') so odd paths cannot inject parameters.
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw"


def _missing(path: str) -> StoreError:
    return StoreError(f"database {path} does not exist; run `neuraldrive-gw init-db`")


# -- sync API (CLI; the daemon at start-up, in a thread) ----------------------------------


def init_db(path: str) -> int:
    """Create the database if missing (mode 0600), migrate it, return its schema version.

    The only function that may create the file. Idempotent; safe to run while the daemon
    runs (migrations take the write lock). Raises StoreError when the directory does not
    exist or the schema is newer than this code.
    """
    try:
        # O_EXCL + 0600 before SQLite sees the file: keys' hashes are never world-readable,
        # not even for an instant. SQLite gives -wal/-shm the main file's mode.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create database {path}: {exc.strerror}") from None
    else:
        os.close(fd)
    conn = open_db(path)
    try:
        return user_version(conn)
    finally:
        conn.close()


def open_db(path: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """Open an existing database read-write, apply the pragmas, and bring its schema up to date.

    An older schema is migrated (first start after an upgrade); a newer one raises
    StoreError, as does a missing file (never created here) or an unreadable/corrupt one.
    The connection is in autocommit mode: use `write_transaction` for every change. It may
    be closed from another thread, but must not be used from two threads at once.
    """
    if not os.path.exists(path):
        raise _missing(path)
    try:
        # check_same_thread=False: the daemon opens (and migrates) in a worker thread and
        # closes on the loop thread. Safe: the SQLite library is built serialized
        # (sqlite3.threadsafety == 3) and no caller uses one connection concurrently.
        conn = sqlite3.connect(_uri(path), uri=True, isolation_level=None, timeout=timeout,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    try:
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        _migrate(conn, path)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise _open_error(path, exc) from None
        raise
    return conn


def check_db(path: str) -> int:
    """Check a database without changing it (for `check-config`): its schema version.

    Raises StoreError when it is missing, unreadable, corrupt, or of a newer schema.
    """
    if not os.path.exists(path):
        raise _missing(path)
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=2.0)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    try:
        version = user_version(conn)
        _check_not_newer(version)
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise StoreError(f"database {path} is damaged: {result}")
        return version
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    finally:
        conn.close()


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database file."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so a read-modify-write never hits
    SQLITE_BUSY_SNAPSHOT half-way (which ignores the busy timeout). SQLite errors,
    including "database is locked" after the busy timeout, surface as StoreError.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"database error: {exc}") from None
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"database error: {exc}") from None
        raise


def _open_error(path: str, exc: sqlite3.Error) -> StoreError:
    if not os.path.exists(path):
        return _missing(path)
    return StoreError(f"cannot open database {path}: {exc}")


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    version = user_version(conn)
    _check_not_newer(version)
    if version == SCHEMA_VERSION:
        return
    with write_transaction(conn):
        # Re-read under the write lock: another process may have migrated meanwhile.
        version = user_version(conn)
        _check_not_newer(version)
        if version == 0 and conn.execute(
                "SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{path} is not a neuraldrive-gw database "
                             "(it has tables but no schema version)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _statements(MIGRATIONS[target - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target:d}")


def _check_not_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"database schema version {version} is newer than this "
                         f"neuraldrive-gw ({SCHEMA_VERSION})")


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT our open transaction first, so run the script one
    # complete statement at a time (complete_statement understands trigger bodies).
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending.strip()
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]}")


# -- async API (the daemon) ---------------------------------------------------------------


async def open_async(path: str, *, timeout: float = 5.0) -> aiosqlite.Connection:
    """Open an existing, current-schema database for the daemon (never creates or migrates).

    Call the sync `open_db` in a thread first to migrate. Raises StoreError when the file
    is missing, unreadable or not at SCHEMA_VERSION. The caller must `await conn.close()`:
    an open aiosqlite 0.17 connection keeps the process alive.
    """
    if not os.path.exists(path):
        raise _missing(path)
    try:
        conn = await aiosqlite.connect(_uri(path), uri=True, isolation_level=None,
                                       timeout=timeout)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    try:
        # Version first: setting journal_mode would already write to an empty file.
        async with conn.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        _check_not_newer(version)
        if version != SCHEMA_VERSION:
            raise StoreError(f"database {path} has schema version {version}, expected "
                             f"{SCHEMA_VERSION}; run `neuraldrive-gw init-db`")
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
    except BaseException as exc:
        await conn.close()
        if isinstance(exc, sqlite3.Error):
            raise _open_error(path, exc) from None
        raise
    return conn


async def auth_revision(conn: aiosqlite.Connection) -> int:
    """The counter every tenant/key change bumps; cheap enough to poll every 250 ms."""
    await _end_stray_transaction(conn)
    return await _revision(conn)


async def _end_stray_transaction(conn: aiosqlite.Connection) -> None:
    # A load cancelled by a timeout could leave a read transaction open; every later read
    # would then see that old snapshot and the daemon would miss revocations. Never poll
    # from inside one.
    if conn.in_transaction:
        await conn.execute("ROLLBACK")


async def _revision(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT value FROM meta WHERE name = 'auth_revision'") as cursor:
        row = await cursor.fetchone()
    if row is None:
        raise StoreError("auth_revision row is missing")
    return int(row[0])


_TENANT_COLUMNS = ("id, name, allow_all_models, tokens_per_min, token_budget, budget_period, "
                   "max_concurrent, weight")
_KEY_COLUMNS = ("key_id, tenant_id, hash, label, created_at, expires_at, revoked_at, "
                "allow_all_models, requests_per_min, tokens_per_min, token_budget, "
                "budget_period, max_concurrent, log_prompts")


async def load_auth_snapshot(conn: aiosqlite.Connection) -> AuthSnapshot:
    """Every key with its tenant and the tenant's model set, plus the revision they match.

    One read transaction, so the revision and the rows are one consistent view: a change
    committed mid-load is either wholly in this snapshot or bumps the revision past it.
    Revoked and expired keys are included; `KeyRecord.usable` decides at request time.
    """
    await _end_stray_transaction(conn)
    await conn.execute("BEGIN")
    try:
        revision = await _revision(conn)
        model_rows = await _fetchall(conn, "SELECT tenant_id, model FROM tenant_models")
        tenant_rows = await _fetchall(conn, f"SELECT {_TENANT_COLUMNS} FROM tenants")
        key_rows = await _fetchall(conn, f"SELECT {_KEY_COLUMNS} FROM keys")
    finally:
        await conn.execute("ROLLBACK")    # read-only: nothing to commit
    models: dict[int, set[str]] = {}
    for tenant_id, model in model_rows:
        models.setdefault(tenant_id, set()).add(model)
    tenants = {row[0]: _tenant(row, models.get(row[0], ())) for row in tenant_rows}
    keys = {row[0]: _key(row, tenants[row[1]]) for row in key_rows}
    return AuthSnapshot(revision=revision, keys=keys)


async def _fetchall(conn: aiosqlite.Connection, sql: str) -> list[Any]:
    async with conn.execute(sql) as cursor:
        return list(await cursor.fetchall())


def _tenant(row: Any, models: Any) -> Tenant:
    (tenant_id, name, allow_all, tokens_per_min, token_budget, budget_period,
     max_concurrent, weight) = row
    return Tenant(id=tenant_id, name=name, allow_all_models=bool(allow_all),
                  allowed_models=frozenset(models), tokens_per_min=tokens_per_min,
                  token_budget=token_budget, budget_period=budget_period,
                  max_concurrent=max_concurrent, weight=weight)


def _key(row: Any, tenant: Tenant) -> KeyRecord:
    (key_id, _tenant_id, key_hash, label, created_at, expires_at, revoked_at, allow_all,
     requests_per_min, tokens_per_min, token_budget, budget_period, max_concurrent,
     log_prompts) = row
    return KeyRecord(key_id=key_id, tenant=tenant, hash=key_hash, label=label,
                     created_at=created_at, expires_at=expires_at, revoked_at=revoked_at,
                     allow_all_models=None if allow_all is None else bool(allow_all),
                     requests_per_min=requests_per_min, tokens_per_min=tokens_per_min,
                     token_budget=token_budget, budget_period=budget_period,
                     max_concurrent=max_concurrent, log_prompts=bool(log_prompts))
