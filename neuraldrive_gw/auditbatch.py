"""One batch of audit rows appended to the hash chain in one transaction (audit.py's
writer runs `append` whole in its connection's thread): BEGIN IMMEDIATE, the chain's
tail, multi-row INSERTs, COMMIT."""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

from .auditchain import COLUMNS, INSERT, row_hash
from .store import StoreError

# A queued row: (content values, their canonical JSON).
Pending = tuple[tuple[Any, ...], str]


class Appended:
    """What a batch transaction did: rows now committed, the new head, and the head the
    database had if it was not the one the writer last saw."""

    __slots__ = ("rows", "head", "moved")

    def __init__(self, rows: int, head: tuple[int, str], moved: tuple[int, str] | None):
        self.rows, self.head, self.moved = rows, head, moved


class CommitFailed(Exception):
    def __init__(self, error: BaseException, attempt: tuple[int, str, int]):
        super().__init__(str(error))
        self.error, self.attempt = error, attempt


def commit(db: sqlite3.Connection) -> None:
    db.execute("COMMIT")      # a seam: test_audit makes one COMMIT fail after committing


def append(db: sqlite3.Connection, batch: list[Pending], attempt: tuple[int, str, int] | None,
            seen: tuple[int, str] | None) -> Appended:
    """Append `batch` to the chain in one transaction (runs in the connection's thread).
    `attempt`: (id, hash, rows) of a batch whose COMMIT raised; if the database ends
    there, it did commit, and this batch's rows are not written twice."""
    db.execute("BEGIN IMMEDIATE")
    row = db.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        row = db.execute("SELECT last_id, last_hash FROM audit_anchor").fetchone()
    if row is None:
        raise StoreError("the audit anchor row is missing")
    tail = (int(row[0]), str(row[1]))
    if attempt is not None and tail == attempt[:2]:
        db.execute("ROLLBACK")
        return Appended(attempt[2], tail, None)
    params: list[Any] = []
    last_id, last_hash = tail
    for values, content in batch:
        last_id += 1
        digest = row_hash(last_hash, last_id, content)
        params += (last_id, *values, last_hash, digest)
        last_hash = digest
    _insert(db, params, len(batch))
    try:
        commit(db)
    except BaseException as exc:
        raise CommitFailed(exc, (last_id, last_hash, len(batch))) from None
    return Appended(len(batch), (last_id, last_hash), None if tail == seen else tail)


# Rows per INSERT statement: one statement of many rows costs about a quarter less per
# row than executemany() of one-row statements (docs/performance.md). Powers of two, so
# that any batch is a few statements of a few shapes (each prepared once and cached).
_WIDTH = len(COLUMNS)
_MAX_ROWS = 64


@functools.lru_cache(maxsize=None)
def _insert_sql(rows: int) -> str:
    """INSERT (one row's VALUES) followed by the VALUES of `rows - 1` more."""
    return INSERT + (", (" + ", ".join("?" * _WIDTH) + ")") * (rows - 1)


def _insert(db: sqlite3.Connection, params: list[Any], rows: int) -> None:
    """Insert `rows` rows whose values are `params`, flattened, in row order (the chain's
    trigger sees each row after the ones before it, as with one row per statement)."""
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    most = max(1, min(_MAX_ROWS, limit // _WIDTH))
    start = 0
    while rows:
        take = most if rows >= most else 1 << (rows.bit_length() - 1)
        end = start + take * _WIDTH
        db.execute(_insert_sql(take), params[start:end])
        start, rows = end, rows - take


def busy(exc: Exception) -> bool:
    """The database is locked by another connection (the only fault that keeps ours)."""
    return getattr(exc, "sqlite_errorname", None) in ("SQLITE_BUSY", "SQLITE_LOCKED")
