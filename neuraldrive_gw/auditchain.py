"""The audit log's hash chain: the row and its canonical form, verification, and pruning.

Each row stores `prev_hash` (the previous row's `row_hash`) and

    row_hash = sha256_hex(prev_hash + canonical)

where `canonical` is the JSON array `[id, request_id, at, ..., duration_ms]` of CONTENT
(in that order), written by `json.dumps(..., separators=(",", ":"), ensure_ascii=True,
allow_nan=False)`: ASCII, no spaces, `at` a float, the stream flag 0/1, NULL as `null`.
The first row's `prev_hash` is the anchor: 64 zeros, or after a prune the hash of the last
pruned row (table `audit_anchor`, moved in the same transaction as the delete). Ids are
consecutive. So an edited row no longer matches its hash, and a deleted, inserted or moved
row breaks the link or the id sequence of the row after it; rows cut off the end are seen
against `sqlite_sequence`, which remembers the highest id ever used.

What a chain cannot show by itself is a rewrite of every hash from the altered row on by
someone with write access to the file. `verify` reports the head (last id and hash):
recording it elsewhere now and then (a log line, a ticket) makes such a rewrite evident.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .jsonstrict import compact_encoder
from .store import StoreError, write_transaction

ZERO_HASH = "0" * 64

# The hashed columns after `id`, in hash order. Changing this breaks every existing chain.
CONTENT = ("request_id", "at", "key_id", "tenant", "client_ip", "method", "route", "model",
           "status", "outcome", "stream", "prompt_tokens", "completion_tokens", "metering",
           "bytes_out", "ttfb_ms", "duration_ms")
COLUMNS = ("id", *CONTENT, "prev_hash", "row_hash")

INSERT = (f"INSERT INTO audit ({', '.join(COLUMNS)}) "
          f"VALUES ({', '.join('?' * len(COLUMNS))})")

METERING = ("exact", "estimated", "none")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One request, as the audit log stores it. The fields are CONTENT, in hash order."""

    request_id: str
    at: float                        # wall-clock time the request arrived (epoch seconds)
    key_id: str | None = None        # None: not authenticated
    tenant: str | None = None        # tenant name; None for the master key
    client_ip: str | None = None
    method: str
    route: str                       # the canonical path, e.g. "/api/chat"
    model: str | None = None         # canonical (installed) model name
    status: int
    outcome: str                     # "ok", an error class name, "client disconnected", ...
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metering: str = "none"           # "exact" | "estimated" | "none"
    bytes_out: int = 0
    ttfb_ms: float | None = None     # stored as whole milliseconds
    duration_ms: float = 0.0         # stored as whole milliseconds

    def values(self) -> tuple[Any, ...]:
        """The row's content values in hash order, normalised as they are stored.

        Raises ValueError for a malformed record (a programming error: the writer must
        never be handed a row it cannot store or hash identically later)."""
        return row_values((self.request_id, self.at, self.key_id, self.tenant, self.client_ip,
                           self.method, self.route, self.model, self.status, self.outcome,
                           self.stream, self.prompt_tokens, self.completion_tokens,
                           self.metering, self.bytes_out, self.ttfb_ms, self.duration_ms))


_INF = math.inf


def row_values(fields: Sequence[Any]) -> tuple[Any, ...]:
    """AuditRecord.values() for the record's fields given as one tuple in CONTENT order.

    The request path calls this directly: building a frozen record for each request cost
    more than checking it. Well-typed fields pass one chained test; anything else goes
    through the checks spelt out field by field, which name what is wrong.
    """
    (request_id, at, key_id, tenant, client_ip, method, route, model, status, outcome, stream,
     prompt_tokens, completion_tokens, metering, bytes_out, ttfb_ms, duration_ms) = fields
    if (type(request_id) is str and type(method) is str and type(route) is str
            and type(outcome) is str and type(stream) is bool and metering in METERING
            and (key_id is None or type(key_id) is str) and (tenant is None or type(tenant) is str)
            and (client_ip is None or type(client_ip) is str)
            and (model is None or type(model) is str)
            and type(status) is int and type(prompt_tokens) is int
            and type(completion_tokens) is int and type(bytes_out) is int
            and status >= 0 and prompt_tokens >= 0 and completion_tokens >= 0 and bytes_out >= 0
            and type(at) is float and 0.0 <= at < _INF
            and type(duration_ms) is float and 0.0 <= duration_ms < _INF
            and (ttfb_ms is None or type(ttfb_ms) is float and 0.0 <= ttfb_ms < _INF)):
        return (request_id, at, key_id, tenant, client_ip, method, route, model, status,
                outcome, int(stream), prompt_tokens, completion_tokens, metering, bytes_out,
                None if ttfb_ms is None else round(ttfb_ms), round(duration_ms))
    return _checked_values(fields)


def _checked_values(fields: Sequence[Any]) -> tuple[Any, ...]:
    (request_id, at, key_id, tenant, client_ip, method, route, model, status, outcome, stream,
     prompt_tokens, completion_tokens, metering, bytes_out, ttfb_ms, duration_ms) = fields
    _check(type(request_id) is str and type(method) is str and type(route) is str
           and type(outcome) is str, "request_id/method/route/outcome", "must be strings")
    for name, value in (("key_id", key_id), ("tenant", tenant), ("client_ip", client_ip),
                        ("model", model)):
        _check(value is None or type(value) is str, name, "must be a string or None")
    for name, number in (("status", status), ("prompt_tokens", prompt_tokens),
                         ("completion_tokens", completion_tokens), ("bytes_out", bytes_out)):
        _check(type(number) is int and number >= 0, name, "must be an int >= 0")
    _check(metering in METERING, "metering", f"must be one of {METERING}")
    _check(type(stream) is bool, "stream", "must be a bool")
    return (request_id, _number(at, "at"), key_id, tenant, client_ip, method, route, model,
            status, outcome, int(stream), prompt_tokens, completion_tokens, metering, bytes_out,
            None if ttfb_ms is None else round(_number(ttfb_ms, "ttfb_ms")),
            round(_number(duration_ms, "duration_ms")))


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"AuditRecord.{name} {message}")


def _number(value: object, name: str) -> float:
    _check(type(value) in (int, float), name, "must be a number")
    number = float(value)  # type: ignore[arg-type]
    _check(math.isfinite(number) and number >= 0, name, "must be finite and >= 0")
    return number


_CANONICAL = compact_encoder(ensure_ascii=True)


def content_json(values: Sequence[Any]) -> str:
    """The canonical JSON array of one row's CONTENT values (without the id): what
    `json.dumps(list(values), separators=(",", ":"), ensure_ascii=True, allow_nan=False)`
    writes (the same encoder, built once; tests compare the two)."""
    return _CANONICAL(list(values))


def row_hash(prev_hash: str, row_id: int, content: str) -> str:
    """The hash of the row `row_id` whose `content_json` is `content`, after `prev_hash`."""
    canonical = f"[{row_id:d},{content[1:]}"          # content is a non-empty JSON array
    return hashlib.sha256((prev_hash + canonical).encode("ascii")).hexdigest()


def anchor(conn: sqlite3.Connection) -> tuple[int, str]:
    """(last pruned id, its hash): where the chain starts; (0, zeros) before any prune."""
    row = conn.execute("SELECT last_id, last_hash FROM audit_anchor").fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the audit anchor row is missing")
    return int(row[0]), str(row[1])


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    rows_checked: int
    first_bad_id: int | None = None     # the first row whose hash, link or id is wrong
    reason: str | None = None
    anchor_id: int = 0                  # the chain starts after this id (0: never pruned)
    head_id: int | None = None          # the last row that checked out
    head_hash: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows_checked": self.rows_checked,
                "first_bad_id": self.first_bad_id, "reason": self.reason,
                "anchor_id": self.anchor_id, "head_id": self.head_id,
                "head_hash": self.head_hash}


@dataclass(slots=True)
class _Walk:
    """Checking rows in id order, continuing the chain from (after_id, prev_hash)."""

    after_id: int
    prev_hash: str
    checked: int = 0
    bad_id: int | None = None
    reason: str | None = None

    def check(self, rows: Iterable[Sequence[Any]]) -> bool:
        """Check COLUMNS rows; False (with bad_id, reason) at the first bad one."""
        for row in rows:
            row_id, values, prev, stored = row[0], row[1:-2], row[-2], row[-1]
            reason = self._fault(row_id, values, prev, stored)
            if reason is not None:
                self.bad_id, self.reason = row_id, reason
                return False
            self.checked += 1
            self.after_id, self.prev_hash = row_id, stored
        return True

    def _fault(self, row_id: int, values: Sequence[Any], prev: Any, stored: Any) -> str | None:
        if row_id <= self.after_id:
            return f"row {row_id} is out of order or should have been pruned"
        if row_id != self.after_id + 1:
            return f"{_rows(self.after_id + 1, row_id - 1)} missing (deleted)"
        if prev != self.prev_hash:
            return ("its prev_hash is not the hash of the row before it (a row was deleted, "
                    "inserted or moved)")
        try:
            actual = row_hash(prev, row_id, content_json(_normal(values)))
        except (TypeError, ValueError):
            return "it holds a value of the wrong type (edited)"
        if actual != stored:
            return "its content does not match its hash (edited)"
        return None


def verify(conn: sqlite3.Connection) -> VerifyResult:
    """Check the whole chain, oldest row first, and name the first row that is wrong.

    Runs in one read transaction, so a concurrent writer or prune cannot confuse it (WAL:
    it does not block them either). Memory use is constant.
    """
    conn.execute("BEGIN")
    try:
        anchor_id, anchor_hash = anchor(conn)
        walk = _Walk(anchor_id, anchor_hash)
        ok = walk.check(conn.execute(f"SELECT {_SELECT} FROM audit ORDER BY id"))
        if ok:
            issued = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
            if issued is not None and int(issued[0]) > walk.after_id:
                walk.bad_id = walk.after_id + 1
                walk.reason = (f"{_rows(walk.after_id + 1, int(issued[0]))} missing at "
                               "the end (deleted)")
                ok = False
    finally:
        conn.execute("ROLLBACK")
    head = (walk.after_id, walk.prev_hash) if walk.checked else (None, None)
    return VerifyResult(ok, walk.checked, walk.bad_id, walk.reason, anchor_id, *head)


_SELECT = ", ".join(COLUMNS)


def _rows(first: int, last: int) -> str:
    return f"row {first} is" if first == last else f"rows {first}..{last} are"


def _normal(values: Sequence[Any]) -> list[Any]:
    # `at` is a REAL column: SQLite hands back a float, as the writer hashed it. Anything
    # else is hashed as stored, so a type changed behind our back shows as an edit.
    normal = list(values)
    if type(normal[1]) is int:
        normal[1] = float(normal[1])
    return normal


# -- pruning -------------------------------------------------------------------------------


class ChainBroken(StoreError):
    """A prune found a row that does not verify and stopped, keeping the evidence."""


@dataclass(frozen=True, slots=True)
class PruneResult:
    deleted: int
    anchor_id: int                      # the chain now starts after this id
    anchor_hash: str

    def to_json(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "anchor_id": self.anchor_id,
                "anchor_hash": self.anchor_hash}


def prune(conn: sqlite3.Connection, before: float, *, batch_size: int = 5000,
          now: float | None = None) -> PruneResult:
    """Delete the oldest rows, up to the first one whose `at` is not before `before`.

    Only a prefix is removed (rows are written when requests end, so `at` is not strictly
    increasing; the first row at or after the cutoff stops the prune), so the rest of the
    chain still verifies from the moved anchor. Every row is verified before it is
    deleted: a broken chain raises ChainBroken and nothing from the bad row on is pruned,
    so a prune can never launder a tampered row. Each batch is one short BEGIN IMMEDIATE
    transaction (move the anchor onto its last row, delete up to it), so the daemon's
    writer never waits long and an interrupted prune leaves a verifiable log. Raises
    StoreError on database errors.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    deleted = 0
    while True:
        with write_transaction(conn):
            last_id, last_hash = anchor(conn)
            stop = conn.execute("SELECT min(id) FROM audit WHERE at >= ?",
                                (before,)).fetchone()[0]
            target = last_id + batch_size if stop is None else min(last_id + batch_size,
                                                                  int(stop) - 1)
            rows = conn.execute(f"SELECT {_SELECT} FROM audit WHERE id <= ? ORDER BY id",
                                (target,)).fetchall()
            if not rows:
                return PruneResult(deleted, last_id, last_hash)
            walk = _Walk(last_id, last_hash)
            if not walk.check(rows):
                raise ChainBroken(f"audit chain broken at row {walk.bad_id}: {walk.reason}; "
                                  f"pruned {deleted} rows before it, none from there on")
            # The token lets the triggers allow this, for this transaction only.
            conn.execute("INSERT INTO audit_prune_token (pid) VALUES (?)", (os.getpid(),))
            conn.execute("UPDATE audit_anchor SET last_id = ?, last_hash = ?, "
                         "pruned_rows = pruned_rows + ?, pruned_at = ?",
                         (walk.after_id, walk.prev_hash, len(rows),
                          time.time() if now is None else now))
            conn.execute("DELETE FROM audit WHERE id <= ?", (walk.after_id,))
            conn.execute("DELETE FROM audit_prune_token")
            deleted += len(rows)
