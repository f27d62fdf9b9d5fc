"""The fake Ollama's model catalogue: name resolution, listings, model details, embeddings.

Pure data and functions, no I/O. Shapes follow Ollama's `api/types.go` (ListModelResponse,
ProcessModelResponse, ShowResponse, ModelDetails) and `openai/openai.go` (Model, ListCompletion).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
CLOUD_HOST = "https://ollama.com:443"
MODIFIED_AT = "2025-06-01T12:00:00.123456789Z"  # Go's RFC 3339 with nanoseconds
MODIFIED_UNIX = 1748779200

_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


class InvalidModelName(ValueError):
    """The name cannot be parsed the way Ollama parses model references."""


def canonical_model(name: str) -> tuple[str, bool]:
    """Return (`host/namespace/model:tag` case-folded, is_cloud) the way Ollama resolves names.

    Follows NOTES-ollama-api §6: trim, strip a `:cloud`/`:local` source suffix (or a
    `-cloud` tag suffix), drop any scheme, default host/namespace/tag, compare
    case-insensitively. Raises InvalidModelName for anything Ollama would refuse.
    """
    text = name.strip()
    cloud = local = False
    while True:
        head, sep, last = text.rpartition(":")
        suffix = last.strip().casefold()
        if sep and "/" not in last and suffix in ("cloud", "local"):
            cloud = cloud or suffix == "cloud"
            local = local or suffix == "local"
            text = head
            continue
        break
    if cloud and local:
        raise InvalidModelName("use either :local or :cloud, not both")
    head, sep, last = text.rpartition(":")
    if sep and "/" not in last and last.casefold().endswith("-cloud"):
        cloud = True
        text = head + ":" + last[: -len("-cloud")]
    if "://" in text:
        text = text.split("://", 1)[1]
    parts = text.split("/")
    if len(parts) > 3:
        raise InvalidModelName(f"invalid model name {name!r}")
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    model, sep, tag = parts[-1].partition(":")
    tag = tag if sep else DEFAULT_TAG
    checks = ((_HOST, host), (_NAMESPACE, namespace), (_PART, model), (_PART, tag))
    if not all(rx.fullmatch(value) for rx, value in checks):
        raise InvalidModelName(f"invalid model name {name!r}")
    return f"{host}/{namespace}/{model}:{tag}".casefold(), cloud


def same_model(a: str, b: str) -> bool:
    """True if Ollama would resolve both names to the same model (falls back to casefold)."""
    try:
        return canonical_model(a) == canonical_model(b)
    except InvalidModelName:
        return a.strip().casefold() == b.strip().casefold()


@dataclass(frozen=True)
class _Spec:
    family: str
    parameter_size: str
    quantization: str
    size: int
    context_length: int
    embedding_length: int
    capabilities: tuple[str, ...]


_KNOWN: Mapping[str, _Spec] = MappingProxyType({
    "llama3.2": _Spec("llama", "1.2B", "Q8_0", 1_321_098_329, 131072, 2048,
                      ("completion", "tools")),
    "qwen2.5": _Spec("qwen2", "494.03M", "Q4_K_M", 397_821_319, 32768, 896,
                     ("completion", "tools")),
    "nomic-embed-text": _Spec("nomic-bert", "137M", "F16", 274_302_450, 2048, 768,
                              ("embedding",)),
    "gpt-oss": _Spec("gptoss", "116.8B", "MXFP4", 384, 131072, 2880,
                     ("completion", "tools", "thinking")),
})


@dataclass(frozen=True)
class ModelEntry:
    """One installed model as `/api/tags` would list it."""

    name: str
    key: tuple[str, bool]
    spec: _Spec
    digest: str
    cloud: bool

    @property
    def embedding_only(self) -> bool:
        return self.spec.capabilities == ("embedding",)

    @property
    def remote_model(self) -> str:
        head, _, tag = self.name.rpartition(":")
        return f"{head}:{tag[: -len('-cloud')]}" if tag.endswith("-cloud") else head

    def details(self) -> dict[str, Any]:
        s = self.spec
        return {"parent_model": "", "format": "" if self.cloud else "gguf", "family": s.family,
                "families": [s.family], "parameter_size": s.parameter_size,
                "quantization_level": s.quantization}

    def tags_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "model": self.name}
        if self.cloud:
            entry.update(remote_model=self.remote_model, remote_host=CLOUD_HOST)
        entry.update(modified_at=MODIFIED_AT, size=self.spec.size, digest=self.digest,
                     details=self.details())
        return entry

    def ps_entry(self, now: datetime) -> dict[str, Any]:
        expires = (now + timedelta(minutes=5)).astimezone(timezone.utc)
        return {"name": self.name, "model": self.name, "size": self.spec.size * 2,
                "digest": self.digest, "details": self.details(),
                "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%f000Z"),
                "size_vram": self.spec.size * 2, "context_length": 4096}

    def show(self) -> dict[str, Any]:
        s = self.spec
        template = "{{ .Prompt }}"
        modelfile = (f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on'
                     f' this, replace FROM with:\n# FROM {self.name}\n\nFROM {self.name}\n'
                     f'TEMPLATE """{template}"""\nPARAMETER stop "<|eot_id|>"\n')
        body: dict[str, Any] = {"license": "FAKE LICENSE: for tests only", "modelfile": modelfile,
                                "parameters": 'stop                           "<|eot_id|>"',
                                "template": template, "details": self.details()}
        if self.cloud:
            body.update(remote_model=self.remote_model, remote_host=CLOUD_HOST, model_info={})
        else:
            arch = s.family
            body["model_info"] = {"general.architecture": arch, "general.file_type": 7,
                                  "general.parameter_count": _param_count(s.parameter_size),
                                  f"{arch}.context_length": s.context_length,
                                  f"{arch}.embedding_length": s.embedding_length}
        body.update(capabilities=list(s.capabilities), modified_at=MODIFIED_AT)
        return body

    def openai_model(self, model_id: str | None = None) -> dict[str, Any]:
        ident = model_id if model_id is not None else self.name
        parts = ident.split("/")
        owner = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        return {"id": ident, "object": "model", "created": MODIFIED_UNIX, "owned_by": owner}


def _param_count(size: str) -> int:
    scale = {"M": 10**6, "B": 10**9}.get(size[-1:], 1)
    try:
        return int(float(size[:-1]) * scale)
    except ValueError:
        return 0


def _spec_for(name: str) -> _Spec:
    model, _, tag = name.rsplit("/", 1)[-1].partition(":")
    model = model.casefold()
    if model in _KNOWN:
        return _KNOWN[model]
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    family = re.sub(r"[^a-z]", "", model.split("-")[0]) or "llama"
    m = re.match(r"(\d+(?:\.\d+)?)([bm])", tag.casefold())
    params = f"{m.group(1)}{m.group(2).upper()}" if m else "7B"
    caps = ("embedding",) if "embed" in model else ("completion", "tools")
    return _Spec(family, params, "Q4_K_M", 1_000_000_000 + digest % 10**8, 8192, 4096, caps)


class Catalogue:
    """The installed models, resolvable by any spelling Ollama accepts."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.entries: list[ModelEntry] = []
        self._by_key: dict[tuple[str, bool], ModelEntry] = {}
        for name in names:
            key = canonical_model(name)
            entry = ModelEntry(name=name, key=key, spec=_spec_for(name),
                               digest=hashlib.sha256(name.encode()).hexdigest(), cloud=key[1])
            self.entries.append(entry)
            self._by_key.setdefault(key, entry)

    def resolve(self, name: str) -> ModelEntry | None:
        try:
            return self._by_key.get(canonical_model(name))
        except InvalidModelName:
            return None

    def tags(self) -> dict[str, Any]:
        return {"models": [e.tags_entry() for e in self.entries]}

    def openai_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [e.openai_model() for e in self.entries]}


def embedding_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector of `dim` floats derived from the text."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = bytearray(seed)
    while len(raw) < dim:
        seed = hashlib.sha256(seed).digest()
        raw += seed
    values = [(b - 127.5) / 127.5 for b in raw[:dim]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]
