"""Who is calling: tenants and keys as immutable in-memory records (the auth snapshot).

The daemon never asks SQLite on the hot path. It holds one AuthSnapshot, swapped whole
whenever the database's auth revision changes (the CLI bumps it in the same transaction
as any tenant or key change), so every request sees one consistent view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

MASTER_KEY_ID = "master"


@dataclass(frozen=True, slots=True)
class Tenant:
    id: int
    name: str
    allow_all_models: bool = False
    # Canonical model keys (models.ModelRef.key), e.g. "registry.ollama.ai/library/llama3:latest".
    allowed_models: frozenset[str] = frozenset()
    tokens_per_min: int | None = None
    token_budget: int | None = None
    budget_period: str | None = None
    max_concurrent: int | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str                      # the 8 public characters after "nd-"
    tenant: Tenant
    hash: str                        # Argon2id PHC string of the whole key
    label: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    allow_all_models: bool | None = None   # None: inherit the tenant's flag
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    token_budget: int | None = None
    budget_period: str | None = None
    max_concurrent: int | None = None
    log_prompts: bool = False

    def usable(self, now: float) -> bool:
        """Not revoked (whenever that was stamped) and not expired at wall-clock time `now`."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    @property
    def allow_all(self) -> bool:
        return self.tenant.allow_all_models if self.allow_all_models is None else self.allow_all_models


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    revision: int = -1
    keys: Mapping[str, KeyRecord] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    key_id: str
    tenant: str | None
    allow_all_models: bool
    allowed_models: frozenset[str]
    record: KeyRecord | None = None   # None for the master key

    @property
    def is_master(self) -> bool:
        return self.record is None


MASTER = Principal(key_id=MASTER_KEY_ID, tenant=None, allow_all_models=True,
                   allowed_models=frozenset())


def principal_for(record: KeyRecord) -> Principal:
    return Principal(key_id=record.key_id, tenant=record.tenant.name,
                     allow_all_models=record.allow_all,
                     allowed_models=record.tenant.allowed_models, record=record)
