"""Model-name canonicalisation the way Ollama does it, and the installed set from /api/tags."""

from __future__ import annotations

import functools

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Go's unicode.IsSpace set, which is what strings.TrimSpace strips in Ollama's
# modelref.ParseRef. Python's str.strip() would also strip \x1c-\x1f, which Go keeps
# (and then rejects as an invalid name), so the set is spelled out.
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# Anything outside this set is refused before parsing (SPEC §5): it keeps `@digest`,
# percent-escapes, spaces and look-alike Unicode out of the allowlist comparison.
_ALLOWED = re.compile(r"[A-Za-z0-9_.:/-]+")

# Ollama's part grammar (types/model/name.go isValidPart / isValidLen).
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL_OR_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")

_SCHEMES = frozenset({"http", "https"})


class InvalidModelName(ValueError):
    """The name cannot be canonicalised. `str(e)` is safe to show to the client."""

    def __init__(self, message: str = "invalid model name") -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A canonical model identity. All parts are lower-case ASCII.

    `cloud` is True when the name asks for (or may resolve to) ollama.com instead of a
    local model: an explicit `:cloud` suffix, or a tag or model part ending in `-cloud`.
    """

    host: str
    namespace: str
    model: str
    tag: str
    cloud: bool

    @property
    def key(self) -> str:
        """`host/namespace/model:tag`: the identity allowlists and discovery compare."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def _source_suffix(s: str) -> tuple[str, str | None, bool]:
    """Mirror of modelref.parseSourceSuffix.

    Returns (Ollama's base, "cloud" | "local" | None, whether the suffix was a whole
    `:cloud` / `:local` segment rather than a `-cloud` ending of the tag).
    """
    idx = s.rfind(":")
    if idx >= 0:
        suffix = s[idx + 1 :]
        low = suffix.lower()
        if low in ("cloud", "local"):
            return s[:idx], low, True
        if "/" not in suffix and low.endswith("-cloud"):
            return s[: idx + 1] + suffix[: -len("-cloud")], "cloud", False
    return s, None, False


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    """Go's cutPromised: split at the last `sep`; an empty side becomes "" (invalid)."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i], s[i + len(sep) :], True


@functools.lru_cache(maxsize=4096)     # every request names a model; most name the same few
def canonical_model(name: str) -> ModelRef:
    """Canonicalise a client-supplied model name; raise InvalidModelName if Ollama would
    not accept it, or if it contains anything outside `[A-Za-z0-9_.:/-]`.

    Security contract: two names that Ollama resolves to the same local model get the
    same `key` (Ollama matches every part case-insensitively, so the key is lower-cased),
    and any name Ollama might send to ollama.com has `cloud=True`. Where the gateway and
    Ollama could disagree, this function refuses the name or flags it cloud (fail closed).
    """
    if not isinstance(name, str):
        raise InvalidModelName()
    s = name.strip(_GO_SPACE)
    if not s or _ALLOWED.fullmatch(s) is None:
        raise InvalidModelName()

    # Ollama (modelref.ParseRef): an explicit source suffix whose base carries another
    # explicit suffix is "use either :local or :cloud, not both".
    ollama_base, source, whole_segment = _source_suffix(s)
    if source is not None and _source_suffix(ollama_base)[1] is not None:
        raise InvalidModelName("use either :local or :cloud, not both")
    # `:cloud` / `:local` are removed. Ollama also strips a `-cloud` tag ending, but the
    # key keeps it as spelled: a pulled cloud stub is listed by /api/tags under exactly
    # that name, and the cloud flag already carries the meaning.
    base = ollama_base if whole_segment else s

    # types/model/name.go ParseNameBare: a tag only if the last ':' follows the last '/'.
    tag = ""
    if base.rfind(":") > base.rfind("/"):
        base, tag, _ = _cut_last(base, ":")
        if not tag:
            raise InvalidModelName()
    rest, model, promised = _cut_last(base, "/")
    namespace = host = ""
    if not promised:
        model = rest
    else:
        rest, namespace, promised = _cut_last(rest, "/")
        if not promised:
            namespace = rest
        else:
            host = rest
            if "://" in host:
                # Ollama accepts any scheme here and ignores it for local lookup; only
                # http(s) is plausible, so anything else is refused rather than guessed.
                scheme, _, host = host.partition("://")
                if scheme.lower() not in _SCHEMES:
                    raise InvalidModelName()
            if not host:
                raise InvalidModelName()
        if not namespace:
            raise InvalidModelName()

    host = host or DEFAULT_HOST
    namespace = namespace or DEFAULT_NAMESPACE
    tag = tag or DEFAULT_TAG
    if (
        _HOST.fullmatch(host) is None
        or _NAMESPACE.fullmatch(namespace) is None
        or _MODEL_OR_TAG.fullmatch(model) is None
        or _MODEL_OR_TAG.fullmatch(tag) is None
    ):
        raise InvalidModelName()

    host, namespace, model, tag = host.lower(), namespace.lower(), model.lower(), tag.lower()
    # Ollama only treats a `-cloud` *tag* as cloud; a model part ending in `-cloud` is
    # flagged too so that `foo-cloud` and `foo-cloud:latest` cannot differ in policy.
    cloud = source == "cloud" or tag.endswith("-cloud") or model.endswith("-cloud")
    return ModelRef(host=host, namespace=namespace, model=model, tag=tag, cloud=cloud)


def installed_names(tags_json: object) -> dict[str, tuple[str, ModelRef]]:
    """Map each installed model's canonical key to (installed name, ModelRef).

    `tags_json` is the parsed body of Ollama's `GET /api/tags`. The installed name is the
    entry's `name`, else its `model`. Entries that are not objects or whose name does not
    canonicalise are skipped (they can never be allowed). An entry with `remote_host` or
    `remote_model` is a stub that forwards to another server, so its ref is marked cloud.
    When several entries share a key, the first name is kept and the ref is cloud if any
    of them is: fail closed. Raises ValueError if the shape is not `{"models": [...]}`.
    """
    if not isinstance(tags_json, Mapping):
        raise ValueError("tags response is not an object")
    entries = tags_json.get("models")
    if not isinstance(entries, list):
        raise ValueError("tags response has no models list")
    out: dict[str, tuple[str, ModelRef]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        installed = entry.get("name")
        if not isinstance(installed, str) or not installed:
            installed = entry.get("model")
        if not isinstance(installed, str):
            continue
        try:
            ref = canonical_model(installed)
        except InvalidModelName:
            continue
        if entry.get("remote_host") or entry.get("remote_model"):
            ref = replace(ref, cloud=True)
        previous = out.get(ref.key)
        if previous is None:
            out[ref.key] = (installed, ref)
        elif ref.cloud and not previous[1].cloud:
            out[ref.key] = (previous[0], replace(previous[1], cloud=True))
    return out
