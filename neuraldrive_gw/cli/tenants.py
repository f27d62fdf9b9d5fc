"""`neuraldrive-gw tenants …`: create, list, show, change models of, and delete tenants."""

from __future__ import annotations

from typing import Any

import click

from .. import admin, limits
from ..admin import TenantInfo, iso
from ..config import Config
from ..models import InvalidModelName, canonical_model
from .common import config_options, emit_json, fail, get_config
from .db import open_store, table, yes_no
from .limitopts import limit_options, settings

_WEIGHT = click.IntRange(1, limits.MAX_WEIGHT)


@click.group()
def tenants() -> None:
    """Manage tenants: groups of keys sharing a model allowlist and limits."""


@tenants.command("create")
@click.argument("name")
@click.option("--allow-all-models", is_flag=True, help="Allow every installed local model.")
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="Allow this model (repeatable); stored in canonical form.")
@click.option("--weight", type=_WEIGHT, default=1, show_default=True,
              help="Fair-share weight in the request queue.")
@limit_options(key=False)
@click.option("--json", "as_json", is_flag=True, help="Print the tenant as JSON.")
@config_options
def create(name: str, allow_all_models: bool, models: tuple[str, ...], weight: int,
           as_json: bool, config_path: str | None, db_path: str | None,
           **options: Any) -> None:
    """Create tenant NAME. Its limits are shared by all its keys; unset ones are unlimited."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.create_tenant(conn, name, allow_all_models=allow_all_models,
                                   models=models, weight=weight, settings=settings(options))
    _note_cloud(models, config)
    _report(info, config, as_json, f"created tenant {info.name}")


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@config_options
def list_(as_json: bool, config_path: str | None, db_path: str | None) -> None:
    """List tenants."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        infos = admin.list_tenants(conn)
    if as_json:
        emit_json([info.to_json() for info in infos])
        return
    if not infos:
        click.echo("no tenants")
        return
    click.echo(table(("NAME", "MODELS", "WEIGHT", "KEYS", "CREATED"),
                     [(i.name, "all" if i.allow_all_models else len(i.models), i.weight,
                       f"{i.active_keys} active / {i.keys}", iso(i.created_at))
                      for i in infos]))


@tenants.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the tenant as JSON.")
@config_options
def show(name: str, as_json: bool, config_path: str | None, db_path: str | None) -> None:
    """Show tenant NAME with its models, limits and key counts."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.get_tenant(conn, name)
    _report(info, config, as_json)


@tenants.command("set-models")
@click.argument("name")
@click.option("--add", multiple=True, metavar="MODEL", help="Allow this model (repeatable).")
@click.option("--remove", multiple=True, metavar="MODEL",
              help="Stop allowing this model (repeatable; it must be listed).")
@click.option("--set", "replace", multiple=True, metavar="MODEL",
              help="Replace the whole list with these models (repeatable).")
@click.option("--clear", is_flag=True, help="Empty the model list.")
@click.option("--allow-all-models/--no-allow-all-models", "allow_all", default=None,
              help="Allow every installed local model, or only the list.")
@click.option("--json", "as_json", is_flag=True, help="Print the tenant as JSON.")
@config_options
def set_models(name: str, add: tuple[str, ...], remove: tuple[str, ...],
               replace: tuple[str, ...], clear: bool, allow_all: bool | None, as_json: bool,
               config_path: str | None, db_path: str | None) -> None:
    """Change which models tenant NAME may use (takes effect within a second)."""
    if clear and replace:
        fail("--clear cannot be combined with --set")
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.set_tenant_models(conn, name, add=add, remove=remove,
                                       replace=() if clear else (replace or None),
                                       allow_all=allow_all)
    _note_cloud(add + replace, config)
    _report(info, config, as_json, f"updated tenant {info.name}")


@tenants.command("set-limits")
@click.argument("name")
@limit_options(key=False)
@click.option("--weight", type=_WEIGHT, default=None,
              help="Fair-share weight in the request queue.")
@click.option("--json", "as_json", is_flag=True, help="Print the tenant as JSON.")
@config_options
def set_limits(name: str, as_json: bool, config_path: str | None, db_path: str | None,
               **options: Any) -> None:
    """Change the limits or weight of tenant NAME, shared by all its keys (takes effect
    within a second). Give at least one option."""
    changes = settings(options)
    if not changes:
        fail("nothing to change: give at least one of --tokens-per-min, --token-budget, "
             "--budget-period, --max-concurrent, --weight", code=2)
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        info = admin.set_tenant_limits(conn, name, changes)
    _report(info, config, as_json, f"updated tenant {info.name}")


@tenants.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also delete the tenant's keys.")
@config_options
def delete(name: str, force: bool, config_path: str | None, db_path: str | None) -> None:
    """Delete tenant NAME (refused while it has keys, unless --force)."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        deleted = admin.delete_tenant(conn, name, force=force)
    suffix = f" and its {deleted} key(s)" if deleted else ""
    click.echo(f"deleted tenant {name}{suffix}")


def _report(info: TenantInfo, config: Config, as_json: bool, headline: str = "") -> None:
    if as_json:
        emit_json(info.to_json())
        return
    if headline:
        click.echo(headline)
    cloud = set(info.cloud_models)
    note = ("allowed: allow_cloud_models is set" if config.allow_cloud_models
            else "denied unless allow_cloud_models is set")
    models = [f"{m}  (cloud model: {note})" if m in cloud else m for m in info.models]
    rows = [
        ("name", info.name),
        ("allow all models", yes_no(info.allow_all_models)),
        ("models", models[0] if models else "-"),
        *(("", m) for m in models[1:]),
        ("weight", info.weight),
        ("tokens per minute", info.tokens_per_min or "unlimited"),
        ("token budget", _budget(info, config)),
        ("max concurrent", info.max_concurrent or "unlimited"),
        ("keys", f"{info.active_keys} active, {info.keys} total"),
        ("created", iso(info.created_at)),
    ]
    click.echo("\n".join(f"{k + ':' if k else '':<19}{'-' if v is None else v}"
                         for k, v in rows))
    if info.allow_all_models and info.models:
        click.echo("note: allow all models is on, so the list has no effect", err=True)


def _budget(info: TenantInfo, config: Config) -> str:
    if not info.token_budget:
        return "unlimited"
    if info.budget_period:
        return f"{info.token_budget} per {info.budget_period}"
    return f"{info.token_budget} per {config.limits.key_defaults.budget_period} (default period)"


def _note_cloud(names: tuple[str, ...], config: Config) -> None:
    """Warn about cloud names given on the command line (their stored key may not say so)."""
    if config.allow_cloud_models:
        return
    for name in names:
        try:
            ref = canonical_model(name)
        except InvalidModelName:
            continue    # admin rejects it with the reason
        if ref.cloud:
            click.echo(f"note: {name} is a cloud model (stored as {ref.key}); cloud models "
                       "are denied unless allow_cloud_models is set", err=True)
