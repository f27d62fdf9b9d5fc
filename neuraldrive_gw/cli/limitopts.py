"""The limit options shared by `keys create|set-limits` and `tenants create|set-limits`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import limits
from ..config import KeyDefaults

F = TypeVar("F", bound=Callable[..., Any])

_HELP = {
    "requests_per_min": "Requests per minute.",
    "tokens_per_min": "Tokens (prompt + completion) per minute.",
    "token_budget": "Tokens per budget period.",
    "max_concurrent": "Requests at the same time.",
}


def limit_options(*, key: bool) -> Callable[[F], F]:
    """Add the limit options of a key (key=True) or a tenant to a command; each is stored
    only when given. The command receives them as keyword arguments named like the
    columns; `settings(kwargs)` turns them into admin's `settings` mapping."""
    names = limits.KEY_LIMITS if key else limits.TENANT_LIMITS
    value = "N|unlimited|default" if key else "N|unlimited"
    inherit = " 'default': the config's key default." if key else ""

    def parse_limit(ctx: click.Context, param: click.Parameter, text: str | None) -> object:
        if text is None:
            return _UNSET
        try:
            return limits.parse_limit(text, key=key)
        except limits.LimitError as exc:
            raise click.BadParameter(str(exc)) from None

    def parse_period(ctx: click.Context, param: click.Parameter, text: str | None) -> object:
        if text is None:
            return _UNSET
        try:
            return limits.parse_period(text, key=key)
        except limits.LimitError as exc:
            raise click.BadParameter(str(exc)) from None

    def decorate(func: F) -> F:
        if key:
            func = click.option("--log-prompts/--no-log-prompts", "log_prompts", default=None,
                                help="Store this key's prompts and answers in the prompt "
                                     "log (off unless set).")(func)
        func = click.option("--budget-period", metavar="day|month" + ("|default" if key else ""),
                            callback=parse_period, expose_value=True,
                            help="Calendar period (UTC) of the token budget.")(func)
        for name in reversed(names):
            func = click.option(f"--{name.replace('_', '-')}", name, metavar=value,
                                callback=parse_limit,
                                help=f"{_HELP[name]}{inherit}")(func)
        return func
    return decorate


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def settings(options: dict[str, Any]) -> dict[str, object]:
    """The given limit options (and log_prompts, weight) as column → stored value; the
    options are removed from `options`."""
    out: dict[str, object] = {}
    for name in (*limits.KEY_LIMITS, "budget_period", "log_prompts", "weight"):
        if name not in options:
            continue
        value = options.pop(name)
        if value is _UNSET or (name in ("log_prompts", "weight") and value is None):
            continue
        out[name] = value
    return out


def describe_key_limits(record: Any, defaults: KeyDefaults) -> list[tuple[str, str]]:
    """Rows for `keys show`: the limit in force and whether it is the key's own."""
    rows = [(label, limits.describe(getattr(record, name), getattr(defaults, name)))
            for label, name in (("requests per minute", "requests_per_min"),
                                ("tokens per minute", "tokens_per_min"),
                                ("max concurrent", "max_concurrent"),
                                ("token budget", "token_budget"))]
    period = record.budget_period or f"{defaults.budget_period} (default)"
    return rows + [("budget period", period)]
