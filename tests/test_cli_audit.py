"""`audit tail|verify|prune` and `usage` through click's CliRunner, plus one real process."""

from __future__ import annotations

import calendar
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from conftest import cli_runner

from neuraldrive_gw import store
from neuraldrive_gw.admin import AdminError
from neuraldrive_gw.audit import AuditRecord, AuditWriter
from neuraldrive_gw.auditreport import parse_time
from neuraldrive_gw.cli import main
from neuraldrive_gw.cli.audit import audit, usage

REPO = Path(__file__).resolve().parent.parent
DAY = 86400.0


@dataclass
class Cli:
    tmp: Path
    db: str
    config: str
    runner: CliRunner = field(default_factory=cli_runner)

    def __call__(self, command: click.Command, *args: str, code: int = 0) -> Result:
        result = self.runner.invoke(command, [*args, "--config", self.config],
                                    catch_exceptions=False)
        assert result.exit_code == code, (result.stdout, result.stderr)
        if code == 1 and "--json" not in args:
            assert result.stdout == ""
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith("neuraldrive-gw: ")
        assert "Traceback" not in result.stdout + result.stderr
        return result

    def json(self, command: click.Command, *args: str, code: int = 0) -> Any:
        return json.loads(self(command, *args, "--json", code=code).stdout)

    def fails(self, command: click.Command, *args: str) -> str:
        return str(self(command, *args, code=1).stderr.strip())

    async def write(self, records: list[AuditRecord]) -> None:
        """Rows through the daemon's own writer (tests that write are async for it: a
        private asyncio.run() would fight the test plugin's loop)."""
        writer = AuditWriter(self.db)
        await writer.start()
        try:
            for record in records:
                writer.submit(record)
            await writer.flush()
        finally:
            await writer.close()

    def sql(self, *statements: str) -> None:
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    for name in list(os.environ):
        if name.startswith("NEURALDRIVE_GW_"):
            monkeypatch.delenv(name)
    db = str(tmp_path / "gw.db")
    store.init_db(db)
    config = tmp_path / "gw.yaml"
    config.write_text(f"paths:\n  database: {db}\n")
    yield Cli(tmp_path, db, str(config))


def rec(i: int, at: float, **changes: Any) -> AuditRecord:
    base = AuditRecord(request_id=f"req-{i}", at=at, key_id="abcd1234", tenant="acme",
                       client_ip="192.0.2.7", method="POST", route="/api/chat",
                       model="registry.ollama.ai/library/llama3:latest", status=200,
                       outcome="ok", stream=False, prompt_tokens=10, completion_tokens=5,
                       metering="exact", bytes_out=100, ttfb_ms=20, duration_ms=300)
    return replace(base, **changes)


def test_the_commands_are_registered() -> None:
    result = cli_runner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "audit " in result.stdout and "usage " in result.stdout


# -- tail -----------------------------------------------------------------------------------


async def test_tail(cli: Cli) -> None:
    assert cli(audit, "tail").stdout == "no audit rows\n"
    assert cli.json(audit, "tail") == []
    now = time.time()
    await cli.write([rec(i, now + i) for i in range(5)] +
              [rec(5, now + 5, stream=True, status=403, outcome="ModelNotAllowed",
                   prompt_tokens=0, completion_tokens=0, metering="none", ttfb_ms=None)])
    lines = cli(audit, "tail", "-n", "3").stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "KEY", "TENANT", "CLIENT", "METHOD", "ROUTE",
                                "MODEL", "STATUS", "TOKENS", "METERING", "MS", "OUTCOME"]
    assert [line.split()[0] for line in lines[1:]] == ["4", "5", "6"]      # oldest first
    assert lines[-1].endswith("ModelNotAllowed") and "/api/chat (stream)" in lines[-1]
    rows = cli.json(audit, "tail", "-n", "2")
    assert [r["id"] for r in rows] == [5, 6]
    last = rows[-1]
    assert last["request_id"] == "req-5" and last["stream"] is True
    assert last["ttfb_ms"] is None and last["duration_ms"] == 300
    assert last["at_epoch"] == now + 5 and last["at"].endswith("Z")
    assert last["prev_hash"] == rows[0]["row_hash"] and len(last["row_hash"]) == 64


def test_tail_rejects_a_bad_count(cli: Cli) -> None:
    result = cli(audit, "tail", "-n", "0", code=2)
    assert "Invalid value" in result.stderr


# -- verify ---------------------------------------------------------------------------------


async def test_verify_a_clean_and_an_empty_log(cli: Cli) -> None:
    assert cli(audit, "verify").stdout == "audit chain ok: no rows\n"
    await cli.write([rec(i, 1000.0 + i) for i in range(4)])
    out = cli(audit, "verify").stdout
    assert out.startswith("audit chain ok: 4 rows, head row 4 ")
    result = cli.json(audit, "verify")
    assert result["ok"] is True and result["rows_checked"] == 4 and result["head_id"] == 4
    assert out.split()[-1] == result["head_hash"]


async def test_verify_names_the_first_bad_row(cli: Cli) -> None:
    await cli.write([rec(i, 1000.0 + i) for i in range(6)])
    cli.sql("DROP TRIGGER audit_no_update",
            "UPDATE audit SET completion_tokens = 500 WHERE id = 3")
    message = cli.fails(audit, "verify")
    assert message == ("neuraldrive-gw: audit chain broken at row 3: its content does not "
                       "match its hash (edited) (2 rows before it verified)")
    result = cli.json(audit, "verify", code=1)
    assert result["ok"] is False and result["first_bad_id"] == 3


async def test_verify_reports_deleted_rows(cli: Cli) -> None:
    await cli.write([rec(i, 1000.0 + i) for i in range(6)])
    cli.sql("DROP TRIGGER audit_no_delete", "DELETE FROM audit WHERE id IN (2, 3)")
    assert "broken at row 4: rows 2..3 are missing (deleted)" in cli.fails(audit, "verify")


# -- prune ----------------------------------------------------------------------------------


async def test_prune_keeps_the_chain_verifiable(cli: Cli) -> None:
    now = time.time()
    await cli.write([rec(i, now - 100 * DAY + i) for i in range(3)] +
              [rec(i, now - DAY + i) for i in range(3, 5)])
    out = cli(audit, "prune", "--older-than", "90d").stdout
    assert out.startswith("pruned 3 rows older than ") and "after row 3" in out
    assert cli(audit, "prune", "--older-than", "90d").stdout.startswith("nothing to prune")
    assert cli(audit, "verify").stdout.startswith("audit chain ok: 2 rows (pruned up to row 3)")
    await cli.write([rec(5, now)])
    assert cli.json(audit, "verify")["rows_checked"] == 3
    result = cli.json(audit, "prune", "--older-than", "2020-01-01")
    assert result == {"deleted": 0, "anchor_id": 3, "anchor_hash": result["anchor_hash"]}


async def test_prune_refuses_a_broken_chain_and_bad_ages(cli: Cli) -> None:
    now = time.time()
    await cli.write([rec(i, now - 100 * DAY + i) for i in range(3)])
    assert "invalid time 'ninety days'" in cli.fails(audit, "prune", "--older-than",
                                                      "ninety days")
    assert "must be positive" in cli.fails(audit, "prune", "--older-than", "0d")
    cli.sql("DROP TRIGGER audit_no_update", "UPDATE audit SET model = 'other' WHERE id = 2")
    message = cli.fails(audit, "prune", "--older-than", "30d")
    assert "audit chain broken at row 2" in message
    assert "broken at row 2" in cli.fails(audit, "verify")


def test_commands_refuse_a_missing_database(cli: Cli) -> None:
    missing = str(cli.tmp / "missing.db")
    for args in (("tail",), ("verify",), ("prune", "--older-than", "1d")):
        message = cli.fails(audit, *args, "--db", missing)
        assert message == f"neuraldrive-gw: database {missing} does not exist; run " \
                          "`neuraldrive-gw init-db`"
    assert not os.path.exists(missing)


# -- usage ----------------------------------------------------------------------------------


def _usage_rows(now: float) -> list[AuditRecord]:
    return [
        rec(0, now - 30 * DAY, prompt_tokens=1000, completion_tokens=1000),     # old
        rec(1, now - 60, prompt_tokens=10, completion_tokens=5),
        rec(2, now - 50, prompt_tokens=20, completion_tokens=0, metering="estimated"),
        rec(3, now - 40, key_id="efgh5678", prompt_tokens=7, completion_tokens=3),
        rec(4, now - 30, key_id="ijkl9012", tenant="beta", prompt_tokens=1,
            completion_tokens=1),
        rec(5, now - 20, key_id="master", tenant=None, prompt_tokens=4, completion_tokens=4),
        rec(6, now - 10, key_id=None, tenant=None, status=401, outcome="InvalidKey",
            prompt_tokens=0, completion_tokens=0, metering="none"),
    ]


async def test_usage_totals_per_key_and_tenant(cli: Cli) -> None:
    assert cli(usage).stdout == "no requests (all time)\n"
    await cli.write(_usage_rows(time.time()))
    report = cli.json(usage, "--since", "7d")
    keys = {k["name"]: k for k in report["keys"]}
    assert keys["abcd1234"] == {"name": "abcd1234", "tenant": "acme", "requests": 2,
                                "prompt_tokens": 30, "completion_tokens": 5,
                                "total_tokens": 35, "estimated_requests": 1}
    assert keys["master"]["tenant"] is None and keys["master"]["total_tokens"] == 8
    assert set(keys) == {"abcd1234", "efgh5678", "ijkl9012", "master"}
    tenants = {t["name"]: t["total_tokens"] for t in report["tenants"]}
    assert tenants == {"acme": 45, "beta": 2}
    assert report["since"].endswith("Z")
    everything = cli.json(usage)
    assert {t["name"]: t["total_tokens"] for t in everything["tenants"]} == \
        {"acme": 2045, "beta": 2}
    assert everything["since"] is None

    human = cli(usage, "--since", "7d").stdout.splitlines()
    assert human[0].startswith("per key (since ")
    assert human[1].split() == ["KEY", "TENANT", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL",
                                "ESTIMATED"]
    assert human[2].split() == ["abcd1234", "acme", "2", "30", "5", "35", "1"]
    assert "per tenant (since " in human[7]
    assert human[9].split() == ["acme", "3", "37", "8", "45", "1"]


async def test_usage_filters(cli: Cli) -> None:
    await cli.write(_usage_rows(time.time()))
    by_tenant = cli.json(usage, "--tenant", "acme", "--since", "1h")
    assert [k["name"] for k in by_tenant["keys"]] == ["abcd1234", "efgh5678"]
    assert [t["name"] for t in by_tenant["tenants"]] == ["acme"]
    by_key = cli.json(usage, "--key", "efgh5678")
    assert [(k["name"], k["total_tokens"]) for k in by_key["keys"]] == [("efgh5678", 10)]
    assert [(t["name"], t["total_tokens"]) for t in by_key["tenants"]] == [("acme", 10)]
    assert cli(usage, "--key", "nobody00").stdout == "no requests (all time)\n"
    future = cli.json(usage, "--since", "2999-01-01")
    assert future["keys"] == [] and future["since"] == "2999-01-01T00:00:00.000Z"
    assert "invalid time 'yesterday'" in cli.fails(usage, "--since", "yesterday")


def test_parse_time() -> None:
    now = 2_000_000_000.0
    assert parse_time("7d", now) == now - 7 * DAY
    assert parse_time("12h", now) == now - 12 * 3600
    assert parse_time("30m", now) == now - 1800
    assert parse_time("2w", now) == now - 14 * DAY
    assert parse_time("2026-11-01", now) == calendar.timegm((2026, 11, 1, 0, 0, 0))
    assert parse_time("2026-11-01T12:00:00Z", now) == calendar.timegm((2026, 11, 1, 12, 0, 0))
    assert parse_time("2026-11-01T12:00:00+01:00", now) == \
        calendar.timegm((2026, 11, 1, 11, 0, 0))
    for bad in ("0d", "7 days", "", "-1d"):
        with pytest.raises(AdminError):
            parse_time(bad, now)


@pytest.mark.slow
async def test_audit_verify_as_a_real_process(cli: Cli) -> None:
    await cli.write([rec(i, 1000.0 + i) for i in range(3)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "neuraldrive_gw", "audit", "verify",
                           "--db", cli.db, "--config", cli.config],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("audit chain ok: 3 rows, head row 3 ")
