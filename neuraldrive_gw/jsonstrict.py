"""Strict JSON parsing of request bodies: one object, no value Go could read differently."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

# Values of these keys are decoded by Ollama into map[string]any / json.RawMessage /
# user schemas, where keys are matched exactly, so their keys stay as the client wrote
# them. Everything else is treated as a Go struct (case-insensitive, Unicode-folding).
_FREE_FORM_KEYS = frozenset(
    {
        "format",
        "parameters",
        "input_schema",
        "schema",
        "arguments",
        "metadata",
        "logit_bias",
        "properties",
        "$defs",
        "definitions",
    }
)

# Go refuses (struct ints) or cannot represent exactly (map floats) integers this large.
_INT_LIMIT = 2**63

# A lone surrogate can only arrive as a \uD800-\uDFFF escape (the bytes are strict
# UTF-8), so the per-string check runs only when such an escape occurs at all. An
# escaped backslash before "u" is a harmless false positive that merely enables it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BodyError(ValueError):
    """The request body is refused. `str(e)` is a short message safe to show the client."""


def _quote(key: str) -> str:
    # ASCII-only and bounded, so a hostile key cannot inject text into the message.
    return json.dumps(key[:64], ensure_ascii=True)


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyError(f"invalid JSON body: duplicate key {_quote(key)}")
            seen.add(key)
    return d


def _reject_constant(name: str) -> NoReturn:
    raise BodyError(f"invalid JSON body: {name} is not allowed")


def compact_encoder(*, ensure_ascii: bool) -> Callable[[Any], str]:
    """`json.dumps(obj, separators=(",", ":"), ensure_ascii=…, allow_nan=False)` as a
    function, byte for byte (it is the same C encoder), built once: json.dumps with
    options builds a JSONEncoder, a closure and a C encoder on every call. No check for
    circular references: what it encodes came from a JSON parser or from literals."""
    quote = json.encoder.encode_basestring_ascii if ensure_ascii \
        else json.encoder.encode_basestring
    make = getattr(json.encoder, "c_make_encoder", None)   # None where _json is not built
    if make is None:
        return json.JSONEncoder(ensure_ascii=ensure_ascii, allow_nan=False,
                                separators=(",", ":")).encode

    def default(o: object) -> NoReturn:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    encode = make(None, default, quote, None, ":", ",", False, False, False)
    return lambda obj: "".join(encode(obj, 0))


# Built once: json.loads and json.dumps with options build a new coder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_to_dict, parse_constant=_reject_constant)
_ENCODE = compact_encoder(ensure_ascii=False)


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_struct_keys(obj: dict[str, Any]) -> None:
    """Refuse keys that are not lower-case ASCII.

    Distinct lower-case ASCII keys can never fold to each other in Go, so this also
    covers "two keys equal after case folding". The one upper-case json tag in Ollama's
    request types (`anyOf`, api.ToolProperty) only occurs under tool `parameters`, a
    free-form subtree, so no spelling needs an exception.
    """
    # One join and two C-level checks per object; the loop only runs to name the key.
    joined = "".join(obj)
    if joined.isascii() and joined.lower() == joined:
        return
    for key in obj:
        if not key.isascii():
            raise BodyError(f"invalid JSON body: non-ASCII key {_quote(key)}")
        if key.lower() != key:
            raise BodyError(f"invalid JSON body: key {_quote(key)} must be lower-case")


def _check_scalar(value: object, check_surrogates: bool) -> None:
    if isinstance(value, str):
        if check_surrogates and _has_surrogate(value):
            raise BodyError("invalid JSON body: lone surrogate in string")
    elif isinstance(value, int):
        if not -_INT_LIMIT < value < _INT_LIMIT:
            raise BodyError("invalid JSON body: integer out of range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BodyError("invalid JSON body: number out of range")


def _check_leaf_list(items: list[Any], check_surrogates: bool) -> bool:
    """Fast path for homogeneous lists of scalars (token contexts, string batches).

    Returns True if the list was fully checked, False if the caller must walk it.
    """
    kinds = set(map(type, items))
    if kinds == {int}:
        if min(items) <= -_INT_LIMIT or max(items) >= _INT_LIMIT:
            raise BodyError("invalid JSON body: integer out of range")
        return True
    if kinds == {float}:
        if not (math.isfinite(min(items)) and math.isfinite(max(items))):
            raise BodyError("invalid JSON body: number out of range")
        return True
    if kinds == {str}:
        if check_surrogates:
            for s in items:
                if not s.isascii() and _has_surrogate(s):
                    raise BodyError("invalid JSON body: lone surrogate in string")
        return True
    return False


def _check_tree(root: dict[str, Any], max_depth: int, check_surrogates: bool) -> None:
    """One iterative walk: depth, struct-object keys, surrogates, number ranges.

    Iterative so that depth is enforced without recursion; `free` marks subtrees under
    a free-form key, where only exact duplicates (already refused), depth, surrogates
    and ranges are checked.
    """
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, free = stack.pop()
        if depth > max_depth:
            raise BodyError("invalid JSON body: nested too deeply")
        if type(node) is dict:
            if not free:
                _check_struct_keys(node)
            for key, value in node.items():
                if check_surrogates and not key.isascii() and _has_surrogate(key):
                    raise BodyError("invalid JSON body: lone surrogate in key")
                t = type(value)
                if t is str:                  # the common case, inline
                    if check_surrogates and _has_surrogate(value):
                        raise BodyError("invalid JSON body: lone surrogate in string")
                elif t is dict or t is list:
                    child_free = free or key in _FREE_FORM_KEYS or (key == "input" and t is dict)
                    stack.append((value, depth + 1, child_free))
                else:
                    _check_scalar(value, check_surrogates)
        else:
            if not node or _check_leaf_list(node, check_surrogates):
                continue
            for value in node:
                t = type(value)
                if t is dict or t is list:
                    stack.append((value, depth + 1, free))
                else:
                    _check_scalar(value, check_surrogates)


def parse_json_body(raw: bytes, *, max_depth: int = 64) -> dict[str, Any]:
    """Parse a request body the way no Go decoder can read differently, or raise BodyError.

    Accepts only strict UTF-8 (no BOM, whatever the Content-Type said) holding exactly
    one JSON object. Refuses NaN/Infinity, floats that overflow, integers with
    |n| >= 2**63, nesting deeper than `max_depth` (the root object is depth 1), lone
    surrogates, and duplicate keys in any object. In struct objects (everything outside
    the free-form subtrees named in _FREE_FORM_KEYS, plus `input` when it is an object)
    every key must be lower-case ASCII: Go's encoding/json matches struct fields
    case-insensitively with Unicode folding, so `MODEL` or `ſtream` would alias a field
    the gateway did not check. No Ollama request field name has an upper-case letter.
    """
    if not raw:
        raise BodyError("request body is empty")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise BodyError("invalid JSON body: byte order mark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("invalid JSON body: not valid UTF-8") from None
    try:
        obj = _DECODER.decode(text)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("invalid JSON body: nested too deeply") from None
    except ValueError:
        # JSONDecodeError (syntax, trailing data) and int()'s digit-count limit.
        raise BodyError("invalid JSON body") from None
    if type(obj) is not dict:
        raise BodyError("invalid JSON body: top level must be an object")
    _check_tree(obj, max_depth, _SURROGATE_ESCAPE.search(raw) is not None)
    return obj


def serialise(obj: Mapping[str, Any]) -> bytes:
    """The bytes forwarded upstream: compact UTF-8 JSON, never NaN."""
    return _ENCODE(obj).encode("utf-8")
