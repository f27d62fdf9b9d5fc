"""Per-key and per-tenant limits as the operator sets them (SPEC §2, §8): parsing, storing.

How a limit column reads:

* key columns — NULL: the config default (`limits.key_defaults`); `UNLIMITED` (0): no limit
  for this key whatever the default says; n > 0: n.
* tenant columns — NULL (or 0): no limit (tenants are unlimited unless set); n > 0: n.

Both apply to a request: the key's and its tenant's, the tighter one wins. Every change
bumps the auth revision (store.py triggers), so the daemon applies it within a second.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

UNLIMITED = 0
KEY_LIMITS = ("requests_per_min", "tokens_per_min", "token_budget", "max_concurrent")
TENANT_LIMITS = ("tokens_per_min", "token_budget", "max_concurrent")
PERIODS = ("day", "month")


class LimitError(ValueError):
    """Operator input that is not a limit; the message says what would be."""


def parse_limit(text: str, *, key: bool) -> int | None:
    """`unlimited`, a positive integer, or (keys only) `default`: the stored value."""
    word = text.strip().lower()
    if word == "unlimited":
        return UNLIMITED if key else None
    if word == "default" and key:
        return None
    if word.isdigit() and int(word) > 0:
        return int(word)
    allowed = "a positive integer, 'unlimited' or 'default'" if key else \
        "a positive integer or 'unlimited'"
    raise LimitError(f"{text!r} is not a limit: use {allowed}")


def parse_period(text: str, *, key: bool) -> str | None:
    """`day` or `month`; for keys also `default` (the config's period)."""
    word = text.strip().lower()
    if word in PERIODS:
        return word
    if word == "default" and key:
        return None
    raise LimitError(f"{text!r} is not a budget period: use day or month"
                     + (" (or default)" if key else ""))


def effective(stored: int | None, default: int | None) -> int | None:
    """A key's limit in force: its own, else the default; None means no limit."""
    if stored is None:
        return default
    return None if stored == UNLIMITED else stored


def describe(stored: int | None, default: int | None) -> str:
    """For `keys show`: "120", "unlimited", "60 (default)" or "unlimited (default)"."""
    value = effective(stored, default)
    text = "unlimited" if value is None else str(value)
    return f"{text} (default)" if stored is None else text


def update_key(conn: sqlite3.Connection, key_id: str, changes: Mapping[str, object]) -> None:
    """Write `changes` (column → stored value) to one key, inside the caller's transaction."""
    _update(conn, "keys", "key_id", key_id, changes, (*KEY_LIMITS, "budget_period",
                                                      "log_prompts"))


def update_tenant(conn: sqlite3.Connection, tenant_id: int,
                  changes: Mapping[str, object]) -> None:
    _update(conn, "tenants", "id", tenant_id, changes, (*TENANT_LIMITS, "budget_period",
                                                        "weight"))


def _update(conn: sqlite3.Connection, table: str, id_column: str, ident: object,
            changes: Mapping[str, object], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise LimitError(f"not a {table[:-1]} setting: {', '.join(unknown)}")
    if not changes:
        return
    if "weight" in changes and not (isinstance(changes["weight"], int)
                                    and changes["weight"] >= 1):
        raise LimitError("weight must be a whole number of at least 1")
    columns = sorted(changes)    # names from `allowed` only: safe to put in the SQL text
    conn.execute(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} "
                 f"WHERE {id_column} = ?", [*(changes[c] for c in columns), ident])

