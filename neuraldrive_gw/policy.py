"""Model policy (SPEC §6): what a key may use = its allowlist ∩ what Ollama has installed.

The installed set comes from Ollama's `/api/tags`, refreshed in the background. When no
refresh has succeeded for longer than the TTL the catalog is empty and nothing resolves
(fail closed). "Not allowed", "not installed", "cloud" and "stale" are one ModelNotAllowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from .errors import BadRequest, ModelNotAllowed
from .models import InvalidModelName, ModelRef, canonical_model, installed_names
from .principals import Principal

log = logging.getLogger(__name__)


# listing kind → (the list's field, the entry fields naming the model, first non-empty wins)
_LISTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tags": ("models", ("model", "name")),
    "ps": ("models", ("model", "name")),
    "models": ("data", ("id",)),
}


class Catalog:
    """The installed models as last seen by discovery, with fail-closed staleness."""

    def __init__(self, *, ttl_s: float, monotonic: Callable[[], float]):
        self.ttl_s = ttl_s            # changed by a config reload
        self._monotonic = monotonic
        self._models: dict[str, str] = {}        # canonical key -> installed name
        self.refreshed_at: float | None = None
        self.latency_ms: float | None = None     # of the last successful discovery
        self.last_error: str | None = None
        self.discovered = asyncio.Event()     # set once the first discovery succeeded

    def update(self, tags_json: object) -> None:
        """Install the result of a successful `/api/tags` call (raises ValueError on bad shape)."""
        models = installed_names(tags_json)
        self._models = {key: value[0] if isinstance(value, tuple) else value
                        for key, value in models.items()}
        self.refreshed_at = self._monotonic()
        self.last_error = None
        self.discovered.set()

    def fail(self, reason: str) -> None:
        self.last_error = reason

    def age(self) -> float:
        """Seconds since the last successful discovery (inf before the first)."""
        if self.refreshed_at is None:
            return float("inf")
        return self._monotonic() - self.refreshed_at

    def fresh(self) -> bool:
        return self.refreshed_at is not None and \
            self._monotonic() - self.refreshed_at <= self.ttl_s

    def installed(self) -> dict[str, str]:
        """canonical key → installed name; empty when discovery is stale."""
        return self._models if self.fresh() else {}


class ModelPolicy:
    def __init__(self, catalog: Catalog, *, allow_cloud_models: bool):
        self.catalog = catalog
        self.allow_cloud_models = allow_cloud_models

    def _permitted(self, principal: Principal, ref: ModelRef) -> bool:
        if ref.cloud and not self.allow_cloud_models:
            return False
        return principal.allow_all_models or ref.key in principal.allowed_models

    def resolve(self, principal: Principal, name: str) -> str:
        """The installed name to forward for `name`, or ModelNotAllowed / BadRequest."""
        try:
            ref = canonical_model(name)
        except InvalidModelName:
            raise BadRequest("invalid model name") from None
        installed = self.catalog.installed().get(ref.key)
        if installed is None or not self._permitted(principal, ref):
            raise ModelNotAllowed()
        return installed

    def visible(self, principal: Principal, name: object) -> bool:
        """Whether a listing entry named `name` may be shown to `principal`."""
        if not isinstance(name, str):
            return False
        try:
            ref = canonical_model(name)
        except InvalidModelName:
            return False
        return ref.key in self.catalog.installed() and self._permitted(principal, ref)

    def filter_listing(self, kind: str, principal: Principal, body: bytes) -> bytes:
        """Filter an upstream listing (`tags`, `ps`, `models`) to the principal's models.

        Raises ValueError when the upstream body is not the expected shape (→ 502).
        """
        data: Any = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("listing is not an object")
        field, name_keys = _LISTINGS[kind]
        entries = data.get(field)
        if not isinstance(entries, list):
            raise ValueError(f"listing has no {field} list")
        data[field] = [e for e in entries if isinstance(e, dict) and
                       self.visible(principal, next((e[k] for k in name_keys if e.get(k)), None))]
        return json.dumps(data, separators=(",", ":")).encode()
