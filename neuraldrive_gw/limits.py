"""Per-key and per-tenant limits as the operator sets them (SPEC §2, §8): parsing,
checking, storing.

How a limit column reads:

* key columns — NULL: the config default (`limits.key_defaults`); `UNLIMITED` (0): no limit
  for this key whatever the default says; n > 0: n.
* tenant columns — NULL (or 0): no limit (tenants are unlimited unless set); n > 0: n.

Limits are whole numbers up to MAX_LIMIT; a weight is 1 to MAX_WEIGHT; a budget period is
day or month (NULL: `limits.key_defaults.budget_period`). Nothing else is ever written.

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
# Far above any real limit, far below SQLite's 2^63 and JSON's exact 2^53: a typo with too
# many digits is refused instead of overflowing the column or a script reading `--json`.
MAX_LIMIT = 10**15
MAX_WEIGHT = 10**6


class LimitError(ValueError):
    """Operator input that is not a limit; the message says what would be."""


def parse_limit(text: str, *, key: bool) -> int | None:
    """`unlimited`, a positive integer, or (keys only) `default`: the stored value."""
    word = text.strip().lower()
    if word == "unlimited":
        return UNLIMITED if key else None
    if word == "default" and key:
        return None
    # isascii: str.isdigit() also accepts "²", which int() then refuses.
    if word.isascii() and word.isdigit() and 0 < int(word) <= MAX_LIMIT:
        return int(word)
    allowed = ("a whole number from 1 to 10^15, 'unlimited' or 'default'" if key
               else "a whole number from 1 to 10^15 or 'unlimited'")
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
    for column, value in changes.items():
        _check(column, value, key=table == "keys")
    if not changes:
        return
    columns = sorted(changes)    # names from `allowed` only: safe to put in the SQL text
    conn.execute(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} "
                 f"WHERE {id_column} = ?", [*(changes[c] for c in columns), ident])


def _check(column: str, value: object, *, key: bool) -> None:
    """Refuse a stored value the gateway would misread: the library's callers are not
    only the CLI, whose options are parsed already (and the schema checks little)."""
    if column == "log_prompts":
        ok, expected = isinstance(value, bool), "true or false"
    elif column == "budget_period":
        ok, expected = value is None or value in PERIODS, "day, month or None (the default)"
    elif column == "weight":
        ok, expected = in_range(value, 1, MAX_WEIGHT), f"a whole number from 1 to {MAX_WEIGHT}"
    elif key:
        ok = value is None or in_range(value, UNLIMITED, MAX_LIMIT)
        expected = f"None (the config default), {UNLIMITED} (unlimited) or 1 to 10^15"
    else:
        ok = value is None or in_range(value, 1, MAX_LIMIT)
        expected = "None (unlimited) or 1 to 10^15"
    if not ok:
        raise LimitError(f"{column} must be {expected}, not {value!r}")


def in_range(value: object, low: int, high: int) -> bool:
    """A whole number (bool is not one) from low to high inclusive."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
