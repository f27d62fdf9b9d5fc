"""`neuraldrive-gw init-db`, and the database plumbing shared by tenants and keys commands."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence

import click

from .. import store
from ..admin import AdminError
from ..config import Config
from .common import config_options, fail, get_config


@click.command("init-db")
@config_options
def init_db(config_path: str | None, db_path: str | None) -> None:
    """Create the database (mode 0600) or migrate it to this version's schema.

    Safe to run again: an up-to-date database is left as it is.
    """
    config = get_config(config_path, db_path)
    path = config.paths.database
    with errors_to_exit():
        version = store.init_db(path)
    click.echo(f"{path}: schema version {version}")


@contextlib.contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn refusals and database failures into one stderr line and exit status 1.

    Messages come from AdminError/StoreError (which never hold keys or hashes) or from
    SQLite itself (which names columns, not values); never a traceback.
    """
    try:
        yield
    except (AdminError, store.StoreError) as exc:
        fail(str(exc))
    except sqlite3.Error as exc:
        fail(f"database error: {exc}")


@contextlib.contextmanager
def open_store(config: Config) -> Iterator[sqlite3.Connection]:
    """The configured database, opened (never created) for one command, then closed."""
    with errors_to_exit():
        conn = store.open_db(config.paths.database)
        try:
            yield conn
        finally:
            conn.close()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns; the last column is not padded (labels can be long)."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row]
                                           for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def yes_no(value: bool | None, *, none: str = "inherit") -> str:
    return none if value is None else ("yes" if value else "no")
