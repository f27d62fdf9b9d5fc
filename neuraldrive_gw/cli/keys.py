"""`neuraldrive-gw keys …`: create, list, show, revoke and rotate API keys.

A key is printed exactly once, by `create` or `rotate`; nothing else ever prints a key or
a hash (the database holds only the Argon2id hash, and KeyInfo has no hash field).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import admin
from ..admin import KeyInfo, iso
from ..config import Config
from .common import config_options, emit_json, fail, get_config
from .db import errors_to_exit, open_store, table, yes_no
from .limitopts import describe_key_limits, limit_options, settings

F = TypeVar("F", bound=Callable[..., Any])
_ONCE = "This key is shown only once and cannot be retrieved later. Store it now:"


@click.group()
def keys() -> None:
    """Manage API keys (nd-…): each belongs to one tenant."""


def _output_options(func: F) -> F:
    func = click.option("--print-key", is_flag=True,
                        help="Print only the key on stdout (for scripts).")(func)
    func = click.option("--json", "as_json", is_flag=True,
                        help="Print the record and the key as one JSON object.")(func)
    return func


@keys.command("create")
@click.option("--tenant", required=True, metavar="NAME", help="Tenant the key belongs to.")
@click.option("--label", default="", help="Free text shown in listings (who or what uses it).")
@click.option("--expires", metavar="WHEN",
              help="Expiry: a duration (30d, 12h, 90m, 2w) or a UTC time "
                   "(2027-01-01T00:00:00Z). Default: never.")
@click.option("--all-models/--no-all-models", "allow_all", default=None,
              help="Override the tenant's allow-all-models flag for this key "
                   "(default: inherit it).")
@limit_options(key=True)
@_output_options
@config_options
def create(tenant: str, label: str, expires: str | None, allow_all: bool | None,
           as_json: bool, print_key: bool, config_path: str | None,
           db_path: str | None, **options: Any) -> None:
    """Create a key for a tenant and print it once. Limits not given follow the config's
    key defaults (limits.key_defaults)."""
    _check_output(as_json, print_key)
    config = get_config(config_path, db_path)
    with errors_to_exit():
        expires_at = None if expires is None else admin.parse_expiry(expires, time.time())
    with open_store(config) as conn:
        token, info = admin.create_key(conn, tenant, label=label, expires_at=expires_at,
                                       allow_all_models=allow_all, settings=settings(options))
    _print_new_key(token, info, as_json, print_key, "created", config)


@keys.command("set-limits")
@click.argument("key_id")
@limit_options(key=True)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@config_options
def set_limits(key_id: str, as_json: bool, config_path: str | None, db_path: str | None,
               **options: Any) -> None:
    """Change the limits of key KEY_ID (takes effect within a second). Give at least one
    option; a limit of 'default' goes back to the config's key default. A revoked or expired
    key is changed too (its record stays accurate), with a note that nothing is enforced."""
    changes = settings(options)
    if not changes:
        fail("nothing to change: give at least one of --requests-per-min, --tokens-per-min, "
             "--token-budget, --budget-period, --max-concurrent, --log-prompts/--no-log-prompts",
             code=2)
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.set_key_limits(conn, key_id, changes)
    if info.status != "active":
        click.echo(f"note: key {info.key_id} is {info.status}: it cannot be used, so its "
                   "limits have no effect", err=True)
    if as_json:
        emit_json(info.to_json(config.limits.key_defaults))
    else:
        click.echo(f"updated key {info.key_id}")
        _print_record(info, config)


@keys.command("list")
@click.option("--tenant", metavar="NAME", help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@config_options
def list_(tenant: str | None, as_json: bool, config_path: str | None,
          db_path: str | None) -> None:
    """List keys (ids and metadata only; keys themselves are never stored)."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        infos = admin.list_keys(conn, tenant)
    if as_json:
        emit_json([info.to_json(config.limits.key_defaults) for info in infos])
        return
    if not infos:
        click.echo("no keys")
        return
    click.echo(table(("KEY ID", "TENANT", "STATUS", "ALL MODELS", "CREATED", "EXPIRES",
                      "LAST USED", "LABEL"),
                     [(i.key_id, i.tenant, i.status, yes_no(i.allow_all_models),
                       iso(i.created_at), iso(i.expires_at), iso(i.last_used_at), i.label)
                      for i in infos]))


@keys.command("show")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@config_options
def show(key_id: str, as_json: bool, config_path: str | None, db_path: str | None) -> None:
    """Show the key with id KEY_ID (the 8 characters after `nd-`)."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.get_key(conn, key_id)
    if as_json:
        emit_json(info.to_json(config.limits.key_defaults))
    else:
        _print_record(info, config)


@keys.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@config_options
def revoke(key_id: str, as_json: bool, config_path: str | None, db_path: str | None) -> None:
    """Revoke the key KEY_ID; the gateway refuses it within a second."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.revoke_key(conn, key_id)
    if as_json:
        emit_json(info.to_json(config.limits.key_defaults))
    else:
        click.echo(f"revoked key {info.key_id} (tenant {info.tenant}) at {iso(info.revoked_at)}")


@keys.command("rotate")
@click.argument("key_id")
@_output_options
@config_options
def rotate(key_id: str, as_json: bool, print_key: bool, config_path: str | None,
           db_path: str | None) -> None:
    """Give KEY_ID a new secret (same id) and print it once; the old key stops working."""
    _check_output(as_json, print_key)
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        token = admin.rotate_key(conn, key_id)
        info = admin.get_key(conn, key_id)
    _print_new_key(token, info, as_json, print_key, "rotated", config)


def _check_output(as_json: bool, print_key: bool) -> None:
    if as_json and print_key:
        fail("--json and --print-key cannot be combined")


def _print_new_key(token: str, info: KeyInfo, as_json: bool, print_key: bool,
                   verb: str, config: Config) -> None:
    """The one place a key is printed. In every mode the key is the last stdout line."""
    if print_key:
        click.echo(token)
    elif as_json:
        emit_json({"key": token, **info.to_json(config.limits.key_defaults)})
    else:
        click.echo(f"{verb} key {info.key_id} for tenant {info.tenant}")
        _print_record(info, config)
        click.echo("")
        click.echo(_ONCE, err=True)
        click.echo(token)


def _print_record(info: KeyInfo, config: Config) -> None:
    rows: list[tuple[str, object]] = [
        ("key id", info.key_id), ("tenant", info.tenant), ("label", info.label or None),
        ("status", info.status), ("all models", yes_no(info.allow_all_models)),
        ("created", iso(info.created_at)), ("expires", iso(info.expires_at)),
        ("revoked", iso(info.revoked_at)), ("last used", iso(info.last_used_at)),
        *describe_key_limits(info, config.limits.key_defaults),
        ("log prompts", yes_no(info.log_prompts))]
    click.echo("\n".join(f"{k + ':':<21}{'-' if v is None else v}" for k, v in rows))
