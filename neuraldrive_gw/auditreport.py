"""Reading the audit log for operators: the last rows, usage totals, and time arguments."""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass, fields
from typing import Any

from .admin import parse_moment
from .auditchain import AuditRecord
from .auditchain import COLUMNS

def parse_time(text: str, now: float) -> float:
    """A point in the past: a duration back from `now` (`90d`, `12h`, `30m`, `2w`), a UTC
    date (`2026-11-01`: its midnight) or an ISO 8601 time (no zone = UTC)."""
    return parse_moment(text, now, sign=-1, what="time",
                        examples="7d, 12h, 30m, 2w, 2026-11-01 or 2026-11-01T12:00:00Z")


def iso_ms(ts: float) -> str:
    """Unix time → ISO 8601 UTC with milliseconds and a `Z`."""
    moment = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# -- tail ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    record: AuditRecord
    prev_hash: str
    row_hash: str

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id}
        data.update((f.name, getattr(self.record, f.name)) for f in fields(AuditRecord))
        data["at"] = iso_ms(self.record.at)
        data["at_epoch"] = self.record.at
        data["prev_hash"], data["row_hash"] = self.prev_hash, self.row_hash
        return data


def tail(conn: sqlite3.Connection, count: int = 20) -> list[AuditEntry]:
    """The last `count` rows, oldest first."""
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY id DESC LIMIT ?",
                        (max(count, 0),)).fetchall()
    return [_entry(row) for row in reversed(rows)]


def _entry(row: Any) -> AuditEntry:
    names = [f.name for f in fields(AuditRecord)]
    values = dict(zip(names, row[1:-2]))
    values["stream"] = bool(values["stream"])
    return AuditEntry(row[0], AuditRecord(**values), row[-2], row[-1])


# -- usage ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageTotal:
    name: str                        # key id or tenant name
    tenant: str | None               # a key's tenant (None for the master key and tenants)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    estimated: int                   # requests whose counts were estimated

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tenant": self.tenant, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "estimated_requests": self.estimated}


@dataclass(frozen=True, slots=True)
class UsageReport:
    since: float | None
    keys: list[UsageTotal]
    tenants: list[UsageTotal]

    def to_json(self) -> dict[str, Any]:
        return {"since": None if self.since is None else iso_ms(self.since),
                "keys": [t.to_json() for t in self.keys],
                "tenants": [t.to_json() for t in self.tenants]}


_SUMS = ("count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
         "coalesce(sum(metering = 'estimated'), 0)")


def usage(conn: sqlite3.Connection, *, tenant: str | None = None, key: str | None = None,
          since: float | None = None) -> UsageReport:
    """Requests and tokens per key and per tenant over the matching rows (the filters apply
    to both lists). Unauthenticated requests (no key) are not counted.

    One statement, per (key, tenant) pair, read from the covering index audit_key_usage in
    its order; the tenant totals are the sums of those rows (every counted row has a key),
    so the two lists agree by construction and the log is read once, not twice.
    """
    where, params = ["key_id IS NOT NULL"], []
    for clause, value in (("tenant = ?", tenant), ("key_id = ?", key), ("at >= ?", since)):
        if value is not None:
            where.append(clause)
            params.append(value)
    key_rows = conn.execute(
        f"SELECT key_id, tenant, {_SUMS} FROM audit WHERE {' AND '.join(where)} "
        "GROUP BY key_id, tenant ORDER BY key_id, tenant", params).fetchall()
    keys = [UsageTotal(*row) for row in key_rows]
    sums: dict[str, list[int]] = {}
    for total in keys:
        if total.tenant is not None:
            acc = sums.setdefault(total.tenant, [0, 0, 0, 0])
            acc[0] += total.requests
            acc[1] += total.prompt_tokens
            acc[2] += total.completion_tokens
            acc[3] += total.estimated
    # Python orders str by code point, as SQLite's BINARY collation orders UTF-8 text.
    tenants = [UsageTotal(name, None, *acc) for name, acc in sorted(sums.items())]
    return UsageReport(since, keys, tenants)
