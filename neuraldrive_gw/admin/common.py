"""What the admin modules share: the error they raise, input parsing, name and id checks."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import keys as keyfmt
from .. import limits
from ..models import InvalidModelName, canonical_model

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


def check_tenant_name(name: str) -> None:
    # A pasted key would match the name pattern and be echoed in "not found" errors.
    if keyfmt.key_id(name) is not None:
        raise AdminError("that looks like an API key, not a tenant name")
    if TENANT_NAME.fullmatch(name) is None:
        raise AdminError(f"invalid tenant name {name!r}: 1-64 characters from "
                         "A-Z a-z 0-9 _ . -, starting with a letter or digit")


def parse_key_id(text: str) -> str:
    """The key id from an id or, forgivingly, a whole pasted key (never echoed back)."""
    from_token = keyfmt.key_id(text)
    if from_token is not None:
        return from_token
    if len(text) == keyfmt.ID_LEN and text.isascii() and text.isalnum():
        return text
    raise AdminError("invalid key id: expected the 8 characters after `nd-`")


def canonical_models(models: Iterable[str]) -> list[str]:
    out = []
    for name in models:
        try:
            out.append(canonical_model(name).key)
        except InvalidModelName as exc:
            raise AdminError(f"invalid model name {name!r}: {exc}") from None
    return out


def is_cloud(model_key: str) -> bool:
    try:
        return canonical_model(model_key).cloud
    except InvalidModelName:
        return False


def apply_limits(update: Callable[[sqlite3.Connection, Any, Mapping[str, object]], None],
                 conn: sqlite3.Connection, ident: object,
                 settings: Mapping[str, object] | None) -> None:
    """Write limit settings with limits.update_key/update_tenant, inside the caller's
    transaction; a value that is not a limit becomes an AdminError (rolled back)."""
    try:
        update(conn, ident, settings or {})
    except limits.LimitError as exc:
        raise AdminError(str(exc)) from None


def tenant_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    row: sqlite3.Row | None = cursor.execute("SELECT * FROM tenants WHERE name = ?",
                                             (name,)).fetchone()
    return row
