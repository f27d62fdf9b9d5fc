"""API keys: create, list, show, change limits, revoke, rotate (SPEC §2)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import keys as keyfmt
from .. import limits
from ..config import KeyDefaults
from ..store import write_transaction
from .common import (MAX_LABEL, AdminError, apply_limits, check_tenant_name, iso,
                     parse_key_id, tenant_row)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as shown to the operator. Deliberately has no hash field."""

    key_id: str
    tenant: str
    label: str
    status: str                      # "active", "revoked" or "expired"
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    allow_all_models: bool | None    # None: inherits the tenant's flag
    requests_per_min: int | None
    tokens_per_min: int | None
    token_budget: int | None
    budget_period: str | None
    max_concurrent: int | None
    log_prompts: bool

    def to_json(self, defaults: KeyDefaults | None = None) -> dict[str, Any]:
        """The record. Own limits: a number, "unlimited", or null (the config's key default).
        Given those defaults, `effective` also holds the limits in force, whatever their
        source: a number or "unlimited", and the budget period."""
        data = {"key_id": self.key_id, "tenant": self.tenant, "label": self.label,
                "status": self.status, "created_at": iso(self.created_at),
                "expires_at": iso(self.expires_at), "revoked_at": iso(self.revoked_at),
                "last_used_at": iso(self.last_used_at),
                "allow_all_models": self.allow_all_models,
                **{name: "unlimited" if getattr(self, name) == limits.UNLIMITED
                   else getattr(self, name) for name in limits.KEY_LIMITS},
                "budget_period": self.budget_period, "log_prompts": self.log_prompts}
        if defaults is not None:
            in_force = {name: limits.effective(getattr(self, name), getattr(defaults, name))
                        for name in limits.KEY_LIMITS}
            data["effective"] = {
                **{name: "unlimited" if value is None else value
                   for name, value in in_force.items()},
                "budget_period": self.budget_period or defaults.budget_period}
        return data


def create_key(conn: sqlite3.Connection, tenant: str, *, label: str = "",
               expires_at: float | None = None, allow_all_models: bool | None = None,
               settings: Mapping[str, object] | None = None) -> tuple[str, KeyInfo]:
    """Create a key for `tenant`; returns (the token, its record). `settings`: its own
    limits, budget period and log_prompts (columns and stored values: limits.py).

    The token exists only in the return value: the database keeps its Argon2id hash. The
    caller shows it once. Hashing (~25 ms) happens before the write lock is taken.
    """
    check_tenant_name(tenant)
    if len(label) > MAX_LABEL or not label.isprintable():
        raise AdminError(f"label must be at most {MAX_LABEL} printable characters")
    now = time.time()
    if expires_at is not None and expires_at <= now:
        raise AdminError("expiry is in the past")
    for _ in range(5):
        token = keyfmt.generate_key()
        key_hash = keyfmt.hash_key(token)
        public_id = keyfmt.key_id(token)
        assert public_id is not None
        with write_transaction(conn):
            row = tenant_row(conn, tenant)
            if row is None:
                raise AdminError(f"no tenant named {tenant}")
            # 62^8 ids: a collision is all but impossible, but must never reuse an id.
            if conn.execute("SELECT 1 FROM keys WHERE key_id = ?", (public_id,)).fetchone():
                continue
            conn.execute(
                "INSERT INTO keys (key_id, tenant_id, label, hash, created_at, expires_at, "
                "allow_all_models) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (public_id, row["id"], label, key_hash, now, expires_at,
                 None if allow_all_models is None else int(allow_all_models)))
            apply_limits(limits.update_key, conn, public_id, settings)
            return token, _key_info(conn, public_id)
    raise AdminError("could not allocate a unique key id; try again")


def list_keys(conn: sqlite3.Connection, tenant: str | None = None) -> list[KeyInfo]:
    if tenant is None:
        ids = [r[0] for r in conn.execute(
            "SELECT key_id FROM keys JOIN tenants ON tenants.id = keys.tenant_id "
            "ORDER BY tenants.name, keys.created_at, keys.key_id")]
    else:
        check_tenant_name(tenant)
        row = tenant_row(conn, tenant)
        if row is None:
            raise AdminError(f"no tenant named {tenant}")
        ids = [r[0] for r in conn.execute(
            "SELECT key_id FROM keys WHERE tenant_id = ? ORDER BY created_at, key_id",
            (row["id"],))]
    return [_key_info(conn, key_id) for key_id in ids]


def get_key(conn: sqlite3.Connection, key_id: str) -> KeyInfo:
    return _key_info(conn, parse_key_id(key_id))


def set_key_limits(conn: sqlite3.Connection, key_id: str,
                   settings: Mapping[str, object]) -> KeyInfo:
    """Change a key's own limits, budget period or log_prompts. Allowed on revoked and
    expired keys too (their records stay accurate, should they be looked at)."""
    public_id = parse_key_id(key_id)
    if not settings:
        raise AdminError("nothing to change")
    with write_transaction(conn):
        _key_info(conn, public_id)      # not found → AdminError, rolled back
        apply_limits(limits.update_key, conn, public_id, settings)
        return _key_info(conn, public_id)


def revoke_key(conn: sqlite3.Connection, key_id: str) -> KeyInfo:
    """Revoke a key now; idempotent (an already revoked key keeps its original time).

    The daemon refuses the key within about a second of the commit (auth revision poll).
    """
    public_id = parse_key_id(key_id)
    with write_transaction(conn):
        _key_info(conn, public_id)      # not found → AdminError, rolled back
        conn.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                     (time.time(), public_id))
        return _key_info(conn, public_id)


def rotate_key(conn: sqlite3.Connection, key_id: str) -> str:
    """Replace a key's secret, keeping its public id; returns the new token (shown once).

    The old token stops working when the daemon next reloads (the hash changed). Revoked
    and expired keys are refused: rotating them would hand out a token that cannot work.
    """
    public_id = parse_key_id(key_id)
    _check_rotatable(get_key(conn, public_id))
    token = keyfmt.rotate_secret(public_id)
    key_hash = keyfmt.hash_key(token)
    with write_transaction(conn):
        _check_rotatable(_key_info(conn, public_id))   # may have changed while hashing
        conn.execute("UPDATE keys SET hash = ? WHERE key_id = ?", (key_hash, public_id))
    return token


def _check_rotatable(info: KeyInfo) -> None:
    if info.status != "active":
        raise AdminError(f"key {info.key_id} is {info.status}; create a new key instead")


def _key_info(conn: sqlite3.Connection, public_id: str) -> KeyInfo:
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    row = cursor.execute(
        "SELECT keys.*, tenants.name AS tenant_name FROM keys "
        "JOIN tenants ON tenants.id = keys.tenant_id WHERE key_id = ?", (public_id,)).fetchone()
    if row is None:
        raise AdminError(f"no key with id {public_id}")
    now = time.time()
    if row["revoked_at"] is not None:
        status = "revoked"
    elif row["expires_at"] is not None and row["expires_at"] <= now:
        status = "expired"
    else:
        status = "active"
    allow_all = row["allow_all_models"]
    return KeyInfo(key_id=row["key_id"], tenant=row["tenant_name"], label=row["label"],
                   status=status, created_at=row["created_at"], expires_at=row["expires_at"],
                   revoked_at=row["revoked_at"], last_used_at=row["last_used_at"],
                   allow_all_models=None if allow_all is None else bool(allow_all),
                   requests_per_min=row["requests_per_min"],
                   tokens_per_min=row["tokens_per_min"], token_budget=row["token_budget"],
                   budget_period=row["budget_period"], max_concurrent=row["max_concurrent"],
                   log_prompts=bool(row["log_prompts"]))
