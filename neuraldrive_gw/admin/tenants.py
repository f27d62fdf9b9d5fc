"""Tenants: create, list, show, change models and limits, delete."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import limits
from ..store import write_transaction
from .common import (AdminError, apply_limits, canonical_models, check_tenant_name, is_cloud,
                     iso, tenant_row)


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    name: str
    allow_all_models: bool
    models: tuple[str, ...]          # canonical keys, sorted
    weight: int
    tokens_per_min: int | None
    token_budget: int | None
    budget_period: str | None
    max_concurrent: int | None
    created_at: float
    keys: int                        # all keys, revoked and expired included
    active_keys: int

    @property
    def cloud_models(self) -> tuple[str, ...]:
        """Listed models that are cloud models (denied unless allow_cloud_models is set)."""
        return tuple(m for m in self.models if is_cloud(m))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "allow_all_models": self.allow_all_models,
                "models": list(self.models), "cloud_models": list(self.cloud_models),
                # null: unlimited (a tenant's limits are only what is set on it).
                "weight": self.weight, "tokens_per_min": self.tokens_per_min or None,
                "token_budget": self.token_budget or None, "budget_period": self.budget_period,
                "max_concurrent": self.max_concurrent or None, "created_at": iso(self.created_at),
                "keys": self.keys, "active_keys": self.active_keys}


def create_tenant(conn: sqlite3.Connection, name: str, *, allow_all_models: bool = False,
                  models: Iterable[str] = (), weight: int = 1,
                  settings: Mapping[str, object] | None = None) -> TenantInfo:
    """Add a tenant; models are stored canonical; `settings` are limit columns (limits.py).
    AdminError if the name is taken."""
    check_tenant_name(name)
    if not limits.in_range(weight, 1, limits.MAX_WEIGHT):
        raise AdminError(f"weight must be a whole number from 1 to {limits.MAX_WEIGHT}")
    canonical = set(canonical_models(models))
    with write_transaction(conn):
        if tenant_row(conn, name) is not None:
            raise AdminError(f"tenant {name} already exists")
        cursor = conn.execute(
            "INSERT INTO tenants (name, allow_all_models, weight, created_at) VALUES (?, ?, ?, ?)",
            (name, int(allow_all_models), weight, time.time()))
        conn.executemany("INSERT INTO tenant_models (tenant_id, model) VALUES (?, ?)",
                         [(cursor.lastrowid, m) for m in sorted(canonical)])
        assert cursor.lastrowid is not None
        apply_limits(limits.update_tenant, conn, cursor.lastrowid, settings)
        return _tenant_info(conn, name)


def set_tenant_limits(conn: sqlite3.Connection, name: str,
                      settings: Mapping[str, object]) -> TenantInfo:
    """Change a tenant's limits and/or weight (columns and stored values: limits.py)."""
    check_tenant_name(name)
    if not settings:
        raise AdminError("nothing to change")
    with write_transaction(conn):
        row = tenant_row(conn, name)
        if row is None:
            raise AdminError(f"no tenant named {name}")
        apply_limits(limits.update_tenant, conn, row["id"], settings)
        return _tenant_info(conn, name)


def list_tenants(conn: sqlite3.Connection) -> list[TenantInfo]:
    names = [row[0] for row in conn.execute("SELECT name FROM tenants ORDER BY name")]
    return [_tenant_info(conn, name) for name in names]


def get_tenant(conn: sqlite3.Connection, name: str) -> TenantInfo:
    check_tenant_name(name)
    return _tenant_info(conn, name)


def set_tenant_models(conn: sqlite3.Connection, name: str, *, add: Iterable[str] = (),
                      remove: Iterable[str] = (), replace: Iterable[str] | None = None,
                      allow_all: bool | None = None) -> TenantInfo:
    """Change a tenant's allowlist and/or allow_all flag in one transaction.

    `replace` sets the whole list and cannot be combined with add/remove. Removing a model
    that is not listed is an error, so a typo cannot silently leave access in place.
    """
    check_tenant_name(name)
    to_add, to_remove = canonical_models(add), canonical_models(remove)
    new_list = None if replace is None else set(canonical_models(replace))
    if new_list is not None and (to_add or to_remove):
        raise AdminError("--set cannot be combined with --add or --remove")
    if new_list is None and not to_add and not to_remove and allow_all is None:
        raise AdminError("nothing to change")
    with write_transaction(conn):
        row = tenant_row(conn, name)
        if row is None:
            raise AdminError(f"no tenant named {name}")
        tenant_id = row["id"]
        current = {r[0] for r in conn.execute(
            "SELECT model FROM tenant_models WHERE tenant_id = ?", (tenant_id,))}
        missing = sorted(set(to_remove) - current)
        if missing:
            raise AdminError(f"tenant {name} does not list {', '.join(missing)}")
        wanted = new_list if new_list is not None else (current | set(to_add)) - set(to_remove)
        conn.executemany("DELETE FROM tenant_models WHERE tenant_id = ? AND model = ?",
                         [(tenant_id, m) for m in sorted(current - wanted)])
        conn.executemany("INSERT INTO tenant_models (tenant_id, model) VALUES (?, ?)",
                         [(tenant_id, m) for m in sorted(wanted - current)])
        if allow_all is not None and bool(row["allow_all_models"]) != allow_all:
            conn.execute("UPDATE tenants SET allow_all_models = ? WHERE id = ?",
                         (int(allow_all), tenant_id))
        return _tenant_info(conn, name)


def delete_tenant(conn: sqlite3.Connection, name: str, *, force: bool = False) -> int:
    """Delete a tenant and its model list; returns how many keys were deleted with it.

    Refused while the tenant has keys (revoked ones included: they carry its audit
    identity) unless `force`, which deletes them too — they stop working at once.
    """
    check_tenant_name(name)
    with write_transaction(conn):
        row = tenant_row(conn, name)
        if row is None:
            raise AdminError(f"no tenant named {name}")
        count = conn.execute("SELECT count(*) FROM keys WHERE tenant_id = ?",
                             (row["id"],)).fetchone()[0]
        if count and not force:
            raise AdminError(f"tenant {name} has {count} key(s), revoked ones included; "
                             "use --force to delete them with the tenant")
        conn.execute("DELETE FROM keys WHERE tenant_id = ?", (row["id"],))
        conn.execute("DELETE FROM tenants WHERE id = ?", (row["id"],))
        return int(count)


def _tenant_info(conn: sqlite3.Connection, name: str) -> TenantInfo:
    row = tenant_row(conn, name)
    if row is None:
        raise AdminError(f"no tenant named {name}")
    models = tuple(r[0] for r in conn.execute(
        "SELECT model FROM tenant_models WHERE tenant_id = ? ORDER BY model", (row["id"],)))
    total, active = conn.execute(
        "SELECT count(*), coalesce(sum(revoked_at IS NULL AND "
        "(expires_at IS NULL OR expires_at > ?)), 0) FROM keys WHERE tenant_id = ?",
        (time.time(), row["id"])).fetchone()
    return TenantInfo(id=row["id"], name=row["name"],
                      allow_all_models=bool(row["allow_all_models"]), models=models,
                      weight=row["weight"], tokens_per_min=row["tokens_per_min"],
                      token_budget=row["token_budget"], budget_period=row["budget_period"],
                      max_concurrent=row["max_concurrent"], created_at=row["created_at"],
                      keys=total, active_keys=active)
