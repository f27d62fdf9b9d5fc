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
from .schema import MIGRATIONS as MIGRATIONS  # re-exported: the schema lives in schema.py
from .schema import SCHEMA_VERSION as SCHEMA_VERSION

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
