"""Tenant and key administration on the SQLite store: what the CLI's commands do."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import keys as keyfmt
from . import limits
from .models import InvalidModelName, canonical_model
from .store import write_transaction

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
MAX_LABEL = 100
_DURATION = re.compile(r"([0-9]{1,6})([mhdw])", re.ASCII)
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AdminError(Exception):
    """An operation was refused: not found, duplicate, or invalid input. The message is
    one line, safe to print, and never contains a key or a hash."""


def iso(ts: float | None) -> str | None:
    """Unix time → ISO 8601 UTC with a `Z` (seconds precision), None stays None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        return tuple(m for m in self.models if _is_cloud(m))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "allow_all_models": self.allow_all_models,
                "models": list(self.models), "cloud_models": list(self.cloud_models),
                # null: unlimited (a tenant's limits are only what is set on it).
                "weight": self.weight, "tokens_per_min": self.tokens_per_min or None,
                "token_budget": self.token_budget or None, "budget_period": self.budget_period,
                "max_concurrent": self.max_concurrent or None, "created_at": iso(self.created_at),
                "keys": self.keys, "active_keys": self.active_keys}


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

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "tenant": self.tenant, "label": self.label,
                "status": self.status, "created_at": iso(self.created_at),
                "expires_at": iso(self.expires_at), "revoked_at": iso(self.revoked_at),
                "last_used_at": iso(self.last_used_at),
                "allow_all_models": self.allow_all_models,
                # null: the config's key default; "unlimited": none for this key.
                **{name: "unlimited" if getattr(self, name) == limits.UNLIMITED
                   else getattr(self, name) for name in limits.KEY_LIMITS},
                "budget_period": self.budget_period, "log_prompts": self.log_prompts}


# -- input parsing ------------------------------------------------------------------------


def parse_moment(text: str, now: float, *, sign: int, what: str, examples: str) -> float:
    """A duration (`30d`, `12h`, `90m`, `2w`) counted from `now` in direction `sign`
    (+1 future, -1 past), or an ISO 8601 date/time (no zone = UTC). AdminError names
    `what` and shows `examples` when the text is neither."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if match:
        amount = int(match.group(1))
        if amount == 0:
            raise AdminError(f"{what} duration must be positive" if sign > 0 else
                             f"invalid {what} {text!r}: a duration must be positive")
        return now + sign * amount * _UNIT_S[match.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise AdminError(f"invalid {what} {text!r}: use e.g. {examples}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def parse_expiry(text: str, now: float) -> float:
    """`30d` / `12h` / `90m` / `2w` from `now`, or an ISO 8601 time (no zone = UTC)."""
    return parse_moment(text, now, sign=+1, what="expiry",
                        examples="30d, 12h, 90m, 2w or 2027-01-01T00:00:00Z")


def _check_tenant_name(name: str) -> None:
    # A pasted key would match the name pattern and be echoed in "not found" errors.
    if keyfmt.key_id(name) is not None:
        raise AdminError("that looks like an API key, not a tenant name")
    if TENANT_NAME.fullmatch(name) is None:
        raise AdminError(f"invalid tenant name {name!r}: 1-64 characters from "
                         "A-Z a-z 0-9 _ . -, starting with a letter or digit")


def _public_id(text: str) -> str:
    """The key id from an id or, forgivingly, a whole pasted key (never echoed back)."""
    from_token = keyfmt.key_id(text)
    if from_token is not None:
        return from_token
    if len(text) == keyfmt.ID_LEN and text.isascii() and text.isalnum():
        return text
    raise AdminError("invalid key id: expected the 8 characters after `nd-`")


def _canonical(models: Iterable[str]) -> list[str]:
    out = []
    for name in models:
        try:
            out.append(canonical_model(name).key)
        except InvalidModelName as exc:
            raise AdminError(f"invalid model name {name!r}: {exc}") from None
    return out


def _is_cloud(model_key: str) -> bool:
    try:
        return canonical_model(model_key).cloud
    except InvalidModelName:
        return False


# -- tenants ------------------------------------------------------------------------------


def create_tenant(conn: sqlite3.Connection, name: str, *, allow_all_models: bool = False,
                  models: Iterable[str] = (), weight: int = 1,
                  settings: Mapping[str, object] | None = None) -> TenantInfo:
    """Add a tenant; models are stored canonical; `settings` are limit columns (limits.py).
    AdminError if the name is taken."""
    _check_tenant_name(name)
    if weight < 1:
        raise AdminError("weight must be at least 1")
    canonical = set(_canonical(models))
    with write_transaction(conn):
        if _tenant_row(conn, name) is not None:
            raise AdminError(f"tenant {name} already exists")
        cursor = conn.execute(
            "INSERT INTO tenants (name, allow_all_models, weight, created_at) VALUES (?, ?, ?, ?)",
            (name, int(allow_all_models), weight, time.time()))
        conn.executemany("INSERT INTO tenant_models (tenant_id, model) VALUES (?, ?)",
                         [(cursor.lastrowid, m) for m in sorted(canonical)])
        assert cursor.lastrowid is not None
        _apply(limits.update_tenant, conn, cursor.lastrowid, settings)
        return _tenant_info(conn, name)


def set_tenant_limits(conn: sqlite3.Connection, name: str,
                      settings: Mapping[str, object]) -> TenantInfo:
    """Change a tenant's limits and/or weight (columns and stored values: limits.py)."""
    _check_tenant_name(name)
    if not settings:
        raise AdminError("nothing to change")
    with write_transaction(conn):
        row = _tenant_row(conn, name)
        if row is None:
            raise AdminError(f"no tenant named {name}")
        _apply(limits.update_tenant, conn, row["id"], settings)
        return _tenant_info(conn, name)


def _apply(update: Any, conn: sqlite3.Connection, ident: object,
           settings: Mapping[str, object] | None) -> None:
    try:
        update(conn, ident, settings or {})
    except limits.LimitError as exc:
        raise AdminError(str(exc)) from None


def list_tenants(conn: sqlite3.Connection) -> list[TenantInfo]:
    names = [row[0] for row in conn.execute("SELECT name FROM tenants ORDER BY name")]
    return [_tenant_info(conn, name) for name in names]


def get_tenant(conn: sqlite3.Connection, name: str) -> TenantInfo:
    _check_tenant_name(name)
    return _tenant_info(conn, name)


def set_tenant_models(conn: sqlite3.Connection, name: str, *, add: Iterable[str] = (),
                      remove: Iterable[str] = (), replace: Iterable[str] | None = None,
                      allow_all: bool | None = None) -> TenantInfo:
    """Change a tenant's allowlist and/or allow_all flag in one transaction.

    `replace` sets the whole list and cannot be combined with add/remove. Removing a model
    that is not listed is an error, so a typo cannot silently leave access in place.
    """
    _check_tenant_name(name)
    to_add, to_remove = _canonical(add), _canonical(remove)
    new_list = None if replace is None else set(_canonical(replace))
    if new_list is not None and (to_add or to_remove):
        raise AdminError("--set cannot be combined with --add or --remove")
    if new_list is None and not to_add and not to_remove and allow_all is None:
        raise AdminError("nothing to change")
    with write_transaction(conn):
        row = _tenant_row(conn, name)
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
    _check_tenant_name(name)
    with write_transaction(conn):
        row = _tenant_row(conn, name)
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


def _tenant_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    row: sqlite3.Row | None = cursor.execute("SELECT * FROM tenants WHERE name = ?",
                                             (name,)).fetchone()
    return row


def _tenant_info(conn: sqlite3.Connection, name: str) -> TenantInfo:
    row = _tenant_row(conn, name)
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


# -- keys ---------------------------------------------------------------------------------


def create_key(conn: sqlite3.Connection, tenant: str, *, label: str = "",
               expires_at: float | None = None, allow_all_models: bool | None = None,
               settings: Mapping[str, object] | None = None) -> tuple[str, KeyInfo]:
    """Create a key for `tenant`; returns (the token, its record). `settings`: its own
    limits, budget period and log_prompts (columns and stored values: limits.py).

    The token exists only in the return value: the database keeps its Argon2id hash. The
    caller shows it once. Hashing (~25 ms) happens before the write lock is taken.
    """
    _check_tenant_name(tenant)
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
            row = _tenant_row(conn, tenant)
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
            _apply(limits.update_key, conn, public_id, settings)
            return token, _key_info(conn, public_id)
    raise AdminError("could not allocate a unique key id; try again")


def list_keys(conn: sqlite3.Connection, tenant: str | None = None) -> list[KeyInfo]:
    if tenant is None:
        ids = [r[0] for r in conn.execute(
            "SELECT key_id FROM keys JOIN tenants ON tenants.id = keys.tenant_id "
            "ORDER BY tenants.name, keys.created_at, keys.key_id")]
    else:
        _check_tenant_name(tenant)
        row = _tenant_row(conn, tenant)
        if row is None:
            raise AdminError(f"no tenant named {tenant}")
        ids = [r[0] for r in conn.execute(
            "SELECT key_id FROM keys WHERE tenant_id = ? ORDER BY created_at, key_id",
            (row["id"],))]
    return [_key_info(conn, key_id) for key_id in ids]


def get_key(conn: sqlite3.Connection, key_id: str) -> KeyInfo:
    return _key_info(conn, _public_id(key_id))


def set_key_limits(conn: sqlite3.Connection, key_id: str,
                   settings: Mapping[str, object]) -> KeyInfo:
    """Change a key's own limits, budget period or log_prompts. Allowed on revoked and
    expired keys too (their records stay accurate, should they be looked at)."""
    public_id = _public_id(key_id)
    if not settings:
        raise AdminError("nothing to change")
    with write_transaction(conn):
        _key_info(conn, public_id)      # not found → AdminError, rolled back
        _apply(limits.update_key, conn, public_id, settings)
        return _key_info(conn, public_id)


def revoke_key(conn: sqlite3.Connection, key_id: str) -> KeyInfo:
    """Revoke a key now; idempotent (an already revoked key keeps its original time).

    The daemon refuses the key within about a second of the commit (auth revision poll).
    """
    public_id = _public_id(key_id)
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
    public_id = _public_id(key_id)
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
