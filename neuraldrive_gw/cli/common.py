"""Options and helpers shared by every CLI command (thin: parse, call the library, print)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ..config import Config, ConfigError, load_config

F = TypeVar("F", bound=Callable[..., Any])


def config_options(func: F) -> F:
    """Add `--config PATH` and `--db PATH` (a shortcut for paths.database) to a command."""
    func = click.option("--db", "db_path", metavar="PATH", default=None,
                        help="SQLite database (overrides paths.database).")(func)
    func = click.option("--config", "config_path", metavar="PATH", default=None,
                        help="YAML config file (default: /etc/neuraldrive/gw.yaml if present).")(func)
    return func


def get_config(config_path: str | None, db_path: str | None = None,
               overrides: dict[str, Any] | None = None) -> Config:
    """Load the config (with `--db` and other option overrides) or exit 2 with the reason."""
    overrides = dict(overrides or {})
    if db_path:
        overrides["paths.database"] = db_path
    try:
        return load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        fail(f"config error: {exc}", code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"neuraldrive-gw: {message}", err=True)
    sys.exit(code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))
