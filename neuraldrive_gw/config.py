"""Configuration: embedded defaults, optional YAML, environment overrides → frozen dataclasses.

This module is the only place defaults live. Loading is all-or-nothing: any unknown key,
wrong type or out-of-range value raises ConfigError naming the dotted path, and nothing
half-applied ever reaches the running gateway.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG_PATH = "/etc/neuraldrive/gw.yaml"
ENV_PREFIX = "NEURALDRIVE_GW_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending dotted path."""


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 3002


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:11434"
    connect_timeout_s: float = 5.0
    # Longest silence tolerated between two upstream reads: a cold model load sends
    # nothing for minutes (Ollama's own load timeout is 5 min).
    read_timeout_s: float = 600.0
    discovery_interval_s: float = 30.0
    discovery_ttl_s: float = 120.0
    max_parallel: int = 1

    @property
    def host_port(self) -> str:
        """`host:port` of the upstream, the only `Host` header Ollama ever sees from us."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 80}"


@dataclass(frozen=True)
class PathsConfig:
    database: str = "/var/lib/neuraldrive-gw/gw.db"
    master_key_file: str = "/etc/neuraldrive/api.key"
    status_socket: str = "/run/neuraldrive-gw/status.sock"


@dataclass(frozen=True)
class KeyDefaults:
    requests_per_min: int = 60
    tokens_per_min: int = 100_000
    max_concurrent: int = 4
    token_budget: int | None = None
    budget_period: str = "day"


@dataclass(frozen=True)
class MasterLimits:
    # The appliance key is unlimited unless set here (null: no limit).
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_concurrent: int | None = None
    token_budget: int | None = None
    budget_period: str = "day"


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 256 * 1024
    body_timeout_s: float = 30.0
    num_predict_cap: int = 4096
    max_num_ctx: int = 32768
    max_keep_alive_s: int = 3600
    auth_failures_per_ip_per_min: int = 10
    queue_timeout_s: float = 30.0
    key_defaults: KeyDefaults = field(default_factory=KeyDefaults)
    master: MasterLimits = field(default_factory=MasterLimits)


@dataclass(frozen=True)
class AuditConfig:
    # A batch that waits this long for a lock held by another program counts as failed:
    # metered requests get 503 until a batch commits again.
    busy_timeout_s: float = 2.0
    # Rows waiting beyond this also make the gateway fail closed; beyond twice this, rows
    # without tokens (refusals, listings) are dropped and counted.
    max_queued: int = 10_000


@dataclass(frozen=True)
class PromptLoggingConfig:
    # Only keys with log_prompts set are logged; these settings shape what is kept.
    retention_days: float = 7.0
    redact_hook: str | None = None      # "module:function", str -> str, after the built-ins
    max_chars: int = 32768              # per text (request, answer); longer is cut, marked
    purge_interval_s: float = 3600.0
    purge_batch: int = 1000
    max_queued: int = 1000


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    prompt_logging: PromptLoggingConfig = field(default_factory=PromptLoggingConfig)
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    allow_cloud_models: bool = False
    shutdown_grace_s: float = 30.0
    log_level: str = "info"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for `check-config` and the docs test."""
        data = dataclasses.asdict(self)
        data["trusted_proxies"] = list(self.trusted_proxies)
        return data


# -- loading -----------------------------------------------------------------------------


def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Load defaults, then the YAML file, then `NEURALDRIVE_GW_*` variables, then
    `overrides` (dotted path → value, from command-line options); validate all.

    `path=None` reads DEFAULT_CONFIG_PATH if it exists (the appliance needs no file at
    all); an explicitly named file that is missing is an error.
    """
    data: dict[str, Any] = {}
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    return config_from_mapping(data, env=os.environ if env is None else env, overrides=overrides)


def config_from_mapping(data: Mapping[str, Any], env: Mapping[str, str] | None = None,
                        overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a validated Config from nested plain data (YAML shape) plus overrides."""
    merged = _deep_copy(data)
    known = _leaf_paths(Config)
    for dotted in overrides or {}:
        if dotted not in known:
            raise ConfigError(f"{dotted}: unknown setting")
    for dotted, value in {**_env_overrides(env or {}), **(overrides or {})}.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for name in parents:
            child = node.get(name)
            if child is None:            # absent, or a section with every line commented out
                child = node[name] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parents)}: must be a mapping")
            node = child
        node[leaf] = value
    config: Config = _build(Config, merged, "")
    _validate(config)
    return config


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, type]:
    """Every dotted leaf path of a config dataclass, with its annotated type."""
    out: dict[str, type] = {}
    for name, hint in typing.get_type_hints(cls).items():
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            out.update(_leaf_paths(typing.cast(type, hint), dotted + "."))
        else:
            out[dotted] = hint
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """`NEURALDRIVE_GW_LIMITS_MAX_BODY_BYTES=1024` → {"limits.max_body_bytes": 1024}."""
    by_env_name = {p.replace(".", "_").upper(): p for p in _leaf_paths(Config)}
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = by_env_name.get(name[len(ENV_PREFIX):])
        if dotted is None:
            raise ConfigError(f"environment variable {name}: unknown setting")
        if dotted == "trusted_proxies":
            out[dotted] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            try:
                out[dotted] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                out[dotted] = raw
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting")
    kwargs: dict[str, Any] = {}
    for name, hint in hints.items():
        if name not in data:
            continue
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            # An empty section (every line commented out) is YAML null: all defaults.
            section = {} if data[name] is None else data[name]
            kwargs[name] = _build(typing.cast(type, hint), section, dotted + ".")
        else:
            kwargs[name] = _coerce(hint, data[name], dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    if typing.get_origin(hint) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{dotted}: must be a list of strings")
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{dotted}: must not be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: must be true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: must be an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{dotted}: must be a number")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{dotted}: must be a string")
    raise ConfigError(f"{dotted}: unsupported type")  # pragma: no cover - schema bug


def _validate(c: Config) -> None:
    def positive(dotted: str, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"{dotted}: must be greater than 0")

    if not 0 <= c.listen.port <= 65535:
        raise ConfigError("listen.port: must be between 0 and 65535")
    parts = urlsplit(c.upstream.url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError("upstream.url: must be an http:// URL with a host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("upstream.url: invalid port") from None
    if port is None or parts.username or parts.password or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ConfigError("upstream.url: must be http://HOST:PORT with no path, query or credentials")
    for dotted, value in (
        ("upstream.connect_timeout_s", c.upstream.connect_timeout_s),
        ("upstream.read_timeout_s", c.upstream.read_timeout_s),
        ("upstream.discovery_interval_s", c.upstream.discovery_interval_s),
        ("upstream.discovery_ttl_s", c.upstream.discovery_ttl_s),
        ("upstream.max_parallel", c.upstream.max_parallel),
        ("limits.max_body_bytes", c.limits.max_body_bytes),
        ("limits.body_timeout_s", c.limits.body_timeout_s),
        ("limits.num_predict_cap", c.limits.num_predict_cap),
        ("limits.max_num_ctx", c.limits.max_num_ctx),
        ("limits.auth_failures_per_ip_per_min", c.limits.auth_failures_per_ip_per_min),
        ("limits.queue_timeout_s", c.limits.queue_timeout_s),
        ("audit.busy_timeout_s", c.audit.busy_timeout_s),
        ("audit.max_queued", c.audit.max_queued),
        ("prompt_logging.retention_days", c.prompt_logging.retention_days),
        ("prompt_logging.max_chars", c.prompt_logging.max_chars),
        ("prompt_logging.purge_interval_s", c.prompt_logging.purge_interval_s),
        ("prompt_logging.purge_batch", c.prompt_logging.purge_batch),
        ("prompt_logging.max_queued", c.prompt_logging.max_queued),
        ("limits.key_defaults.requests_per_min", c.limits.key_defaults.requests_per_min),
        ("limits.key_defaults.tokens_per_min", c.limits.key_defaults.tokens_per_min),
        ("limits.key_defaults.max_concurrent", c.limits.key_defaults.max_concurrent),
    ):
        positive(dotted, value)
    if c.upstream.discovery_ttl_s < c.upstream.discovery_interval_s:
        raise ConfigError("upstream.discovery_ttl_s: must not be shorter than discovery_interval_s")
    if c.limits.max_keep_alive_s < 0:
        raise ConfigError("limits.max_keep_alive_s: must not be negative")
    if c.shutdown_grace_s < 0:
        raise ConfigError("shutdown_grace_s: must not be negative")
    budget = c.limits.key_defaults.token_budget
    if budget is not None and budget <= 0:
        raise ConfigError("limits.key_defaults.token_budget: must be greater than 0 (or null)")
    master = c.limits.master
    for name in ("requests_per_min", "tokens_per_min", "max_concurrent", "token_budget"):
        value = getattr(master, name)
        if value is not None and value <= 0:
            raise ConfigError(f"limits.master.{name}: must be greater than 0 (or null)")
    for section, period in (("key_defaults", c.limits.key_defaults.budget_period),
                            ("master", master.budget_period)):
        if period not in ("day", "month"):
            raise ConfigError(f"limits.{section}.budget_period: must be day or month")
    for index, item in enumerate(c.trusted_proxies):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies[{index}]: not an IP address or network: {item!r}") from None
    hook = c.prompt_logging.redact_hook
    if hook is not None and (hook.count(":") != 1 or not all(hook.split(":"))):
        raise ConfigError("prompt_logging.redact_hook: must be module:function (or null)")
    if c.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level: must be debug, info, warning or error")
    for dotted, path in (("paths.database", c.paths.database),
                         ("paths.master_key_file", c.paths.master_key_file),
                         ("paths.status_socket", c.paths.status_socket)):
        if not path:
            raise ConfigError(f"{dotted}: must not be empty")
