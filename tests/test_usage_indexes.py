"""Schema migration 4: covering indexes for the token sums per key and per tenant.

`neuraldrive-gw usage` and the budget ledger the daemon rebuilds at start-up
(spend.spend_since) sum tokens per key and per tenant. bench/scale.py measures them at
1,000,000 rows (seconds before, ~0.2 s after); this pins the cause, on a small database:
their query plans read every column from an index (no table lookup per row), and `usage`
reads it in GROUP BY order (no temporary B-tree).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from neuraldrive_gw import store
from neuraldrive_gw.audit import AuditRecord
from neuraldrive_gw.spend import spend_since
from neuraldrive_gw.auditchain import INSERT, anchor, content_json, row_hash, verify
from neuraldrive_gw.auditreport import usage

T0 = 1_790_000_000.0


def rec(i: int, **changes: Any) -> AuditRecord:
    base = AuditRecord(request_id=f"req-{i}", at=T0 + i, key_id="abcd1234", tenant="acme",
                       client_ip="192.0.2.7", method="POST", route="/api/chat",
                       model="llama3.2:1b", status=200, outcome="ok", prompt_tokens=10,
                       completion_tokens=5, metering="exact", duration_ms=3.0)
    return replace(base, **changes)


ROWS = [rec(0), rec(1, key_id="efgh5678", metering="estimated"),
        rec(2, key_id="ijkl9012", tenant="beta", prompt_tokens=1, completion_tokens=1),
        rec(3, key_id="master", tenant=None, prompt_tokens=7, completion_tokens=0),
        rec(4, key_id=None, tenant=None, status=401, outcome="unauthorized",
            prompt_tokens=0, completion_tokens=0)]


def append(conn: sqlite3.Connection, records: list[AuditRecord]) -> None:
    """Rows as the writer appends them: consecutive ids, each hashed onto the last."""
    with store.write_transaction(conn):
        last_id, last_hash = anchor(conn)
        tail = conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if tail is not None:
            last_id, last_hash = tail
        for record in records:
            values = record.values()
            last_id += 1
            digest = row_hash(last_hash, last_id, content_json(values))
            conn.execute(INSERT, (last_id, *values, last_hash, digest))
            last_hash = digest


def plan(conn: sqlite3.Connection, sql: str) -> str:
    # Unbound parameters are NULL: the plan does not depend on them (no ANALYZE statistics).
    return " | ".join(str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))


@pytest.fixture
def conn(tmp_path: Path) -> Any:
    path = str(tmp_path / "gw.db")
    store.init_db(path)
    connection = store.open_db(path)
    append(connection, ROWS)
    yield connection
    connection.close()


def test_a_version_3_database_is_migrated_keeping_its_rows_and_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "v3.db")
    with monkeypatch.context() as old:
        old.setattr(store, "MIGRATIONS", store.MIGRATIONS[:3])
        old.setattr(store, "SCHEMA_VERSION", 3)
        assert store.init_db(path) == 3
        conn = store.open_db(path)
        append(conn, ROWS)
        conn.close()
    assert store.init_db(path) == store.SCHEMA_VERSION >= 4
    conn = store.open_db(path)
    try:
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit' "
            "AND name NOT LIKE 'sqlite_%'")}
        assert indexes == {"audit_at", "audit_key_usage", "audit_tenant_usage"}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        result = verify(conn)
        assert result.ok and result.rows_checked == len(ROWS)
        append(conn, [rec(5)])                   # the chain goes on after the migration
        assert verify(conn).rows_checked == len(ROWS) + 1
    finally:
        conn.close()


@pytest.mark.parametrize("filters", [{}, {"since": T0}, {"tenant": "acme"},
                                     {"key": "abcd1234"}, {"tenant": "acme", "since": T0}])
def test_usage_reads_its_sums_from_a_covering_index(conn: sqlite3.Connection,
                                                    filters: dict[str, Any]) -> None:
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    usage(conn, **filters)
    conn.set_trace_callback(None)
    reads = [sql for sql in statements if "FROM audit" in sql]
    assert len(reads) == 1                       # the log is read once
    shown = plan(conn, reads[0])
    assert "COVERING INDEX" in shown, shown
    if "tenant" not in filters:                  # a tenant's rows are few: sorting is cheap
        assert "TEMP B-TREE" not in shown, shown


def test_usage_tenant_totals_are_the_sums_of_their_keys(conn: sqlite3.Connection) -> None:
    report = usage(conn)
    assert [(t.name, t.tenant, t.requests, t.total_tokens, t.estimated)
            for t in report.keys] == [("abcd1234", "acme", 1, 15, 0),
                                      ("efgh5678", "acme", 1, 15, 1),
                                      ("ijkl9012", "beta", 1, 2, 0),
                                      ("master", None, 1, 7, 0)]
    assert [(t.name, t.tenant, t.requests, t.prompt_tokens, t.completion_tokens,
             t.estimated) for t in report.tenants] == [("acme", None, 2, 20, 10, 1),
                                                       ("beta", None, 1, 1, 1, 0)]
    assert usage(conn, since=T0 + 2).tenants == usage(conn, tenant="beta").tenants


async def test_the_start_up_spend_query_reads_covering_indexes(
        conn: sqlite3.Connection) -> None:
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    aconn = await store.open_async(path)
    statements: list[str] = []
    try:
        await aconn.set_trace_callback(statements.append)
        assert await spend_since(aconn, T0) == [
            ("key", "abcd1234", 15), ("key", "efgh5678", 15), ("key", "ijkl9012", 2),
            ("key", "master", 7), ("tenant", "acme", 30), ("tenant", "beta", 2)]
    finally:
        await aconn.close()
    shown = " | ".join(plan(conn, sql) for sql in statements if "FROM audit" in sql)
    assert "SCAN audit" not in shown and "USING INDEX" not in shown, shown
    assert "COVERING INDEX audit_key_usage" in shown, shown
    assert "COVERING INDEX audit_tenant_usage" in shown, shown
