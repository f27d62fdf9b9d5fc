"""`neuraldrive-gw prompts tail`: read the prompt log of keys that opted in.

It prints prompt and answer text — that is its purpose — as stored, i.e. after redaction
(API keys and e-mail addresses never reach the table). See docs/prompt-log.md.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import click

from ..admin import iso
from .common import config_options, emit_json, get_config
from .db import errors_to_exit, open_store

_COLUMNS = ("id", "request_id", "at", "expires_at", "key_id", "tenant", "route", "model",
            "status", "request_text", "response_text", "truncated")


@click.group()
def prompts() -> None:
    """Read the prompt log (only keys with --log-prompts are logged)."""


@prompts.command("tail")
@click.option("-n", "count", type=click.IntRange(min=1), default=10, show_default=True,
              metavar="N", help="How many of the latest entries.")
@click.option("--key", "key_id", metavar="KEY_ID", help="Only this key's entries.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, oldest first.")
@config_options
def tail(count: int, key_id: str | None, as_json: bool, config_path: str | None,
         db_path: str | None) -> None:
    """Show the latest prompt-log entries, oldest first."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn, errors_to_exit():
        rows = _latest(conn, count, key_id)
    entries: list[dict[str, Any]] = [dict(zip(_COLUMNS, row)) for row in reversed(rows)]
    for entry in entries:
        entry["at"], entry["expires_at"] = iso(entry["at"]), iso(entry["expires_at"])
        entry["truncated"] = bool(entry["truncated"])
    if as_json:
        emit_json(entries)
        return
    if not entries:
        click.echo("no prompt-log entries")
        return
    for entry in entries:
        click.echo(f"--- {entry['at']}  key {entry['key_id']}  {entry['route']}  "
                   f"{entry['model'] or '-'}  status {entry['status']}  "
                   f"request {entry['request_id']}"
                   + ("  (truncated)" if entry["truncated"] else ""))
        click.echo(f"request:  {entry['request_text']}")
        click.echo(f"response: {entry['response_text']}")


def _latest(conn: sqlite3.Connection, count: int, key_id: str | None) -> list[tuple[object, ...]]:
    where, args = ("WHERE key_id = ?", [key_id]) if key_id else ("", [])
    return conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM prompt_log {where} "
                        "ORDER BY id DESC LIMIT ?", [*args, count]).fetchall()
