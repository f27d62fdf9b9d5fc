"""`serve` and `check-config`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import yaml

from .. import store
from ..auth import read_master_key
from ..config import load_config
from ..daemon import serve as run_daemon
from ..daemon import setup_logging
from ..promptlog import HookError, load_hook
from .common import config_options, fail, get_config


@click.command()
@config_options
@click.option("--listen", metavar="HOST:PORT", help="Override listen.host and listen.port.")
@click.option("--upstream", metavar="URL", help="Override upstream.url (Ollama).")
def serve(config_path: str | None, db_path: str | None, listen: str | None,
          upstream: str | None) -> None:
    """Run the gateway in the foreground (systemd runs exactly this)."""
    overrides: dict[str, Any] = {}
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
        overrides["listen.host"] = host.strip("[]") or "127.0.0.1"
        overrides["listen.port"] = int(port)
    if upstream:
        overrides["upstream.url"] = upstream
    config = get_config(config_path, db_path, overrides)
    if db_path:
        overrides["paths.database"] = db_path
    setup_logging(config.log_level)
    # SIGHUP reloads from the same sources: the file, the environment, these options.
    sys.exit(asyncio.run(run_daemon(
        config, load=lambda: load_config(config_path, overrides=overrides))))


@click.command("check-config")
@config_options
def check_config(config_path: str | None, db_path: str | None) -> None:
    """Validate the configuration, print the effective values, and check the key file and DB.

    Exit status: 0 all good, 1 a problem with the master key or database, 2 invalid config.
    """
    config = get_config(config_path, db_path)
    try:
        load_hook(config.prompt_logging.redact_hook)     # the daemon would refuse to start
    except HookError as exc:
        fail(f"config error: {exc}", code=2)
    click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
    problems = []
    master = read_master_key(config.paths.master_key_file)
    if master.problem:
        problems.append(f"master key disabled: {master.problem}")
    try:
        version = store.check_db(config.paths.database)
    except store.StoreError as exc:
        problems.append(str(exc))
    else:
        if version < store.SCHEMA_VERSION:
            click.echo(f"note: database schema {version} will be migrated to "
                       f"{store.SCHEMA_VERSION} at the next start", err=True)
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo("# configuration OK", err=True)
