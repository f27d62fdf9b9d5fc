"""Request shaping: type checks, output caps and resource clamps on the parsed body."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from neuraldrive_gw.jsonstrict import BodyError, parse_json_body, serialise

__all__ = [
    "BodyError",
    "ShapeLimits",
    "ShapedRequest",
    "parse_go_duration",
    "parse_json_body",
    "serialise",
    "shape_request",
]

_ROUTES = frozenset(
    {
        "api_chat",
        "api_generate",
        "api_embed",
        "api_embeddings",
        "api_show",
        "v1_chat",
        "v1_completions",
        "v1_embeddings",
        "v1_responses",
        "v1_messages",
    }
)
_NATIVE_ROUTES = frozenset({"api_chat", "api_generate", "api_embed", "api_embeddings", "api_show"})
_GENERATING_NATIVE = frozenset({"api_chat", "api_generate"})
# Ollama's default when `stream` is absent: *bool nil means "stream" natively, the /v1
# and Anthropic structs default to false. Routes not listed have no stream field.
_STREAM_DEFAULT = {
    "api_chat": True,
    "api_generate": True,
    "v1_chat": False,
    "v1_completions": False,
    "v1_responses": False,
    "v1_messages": False,
}
_CAP_FIELD = {
    "v1_chat": "max_tokens",
    "v1_completions": "max_tokens",
    "v1_messages": "max_tokens",
    "v1_responses": "max_output_tokens",
}
_USAGE_ROUTES = frozenset({"v1_chat", "v1_completions"})
# `_debug_render_only` returns the rendered prompt (system prompt included) without
# running the model; `shift` changes how the runner is launched.
_REMOVED_TOP_LEVEL = ("shift", "_debug_render_only")

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
# Ollama stores float options as float32; larger magnitudes would become ±Inf.
_FLOAT32_MAX = 3.4028234663852886e38


class _OptionKind(enum.Enum):
    INT = "int"  # Go int; the gateway also bounds it to int32 as a sanity range
    INT64 = "int64"  # Go int where large values are legitimate (seed)
    OUTPUT_CAP = "output_cap"  # num_predict: any integer, clamped by the caller
    FLOAT = "float"  # Go float32: a JSON int or float
    BOOL = "bool"
    STRING_LIST = "string_list"  # Go []string: Options.FromMap refuses a bare string


# api/types.go Options and Runner at ollama fb30760, keyed by json tag. Options.FromMap
# matches keys exactly and ignores unknown ones. mirostat*, tfs_z and penalize_newline
# are gone from current Ollama but were Options fields in older releases, which the
# appliance may still run, so they keep their old types.
_OPTION_KINDS: dict[str, _OptionKind] = {
    "num_keep": _OptionKind.INT,
    "seed": _OptionKind.INT64,
    "num_predict": _OptionKind.OUTPUT_CAP,
    "top_k": _OptionKind.INT,
    "top_p": _OptionKind.FLOAT,
    "min_p": _OptionKind.FLOAT,
    "typical_p": _OptionKind.FLOAT,
    "repeat_last_n": _OptionKind.INT,
    "temperature": _OptionKind.FLOAT,
    "repeat_penalty": _OptionKind.FLOAT,
    "presence_penalty": _OptionKind.FLOAT,
    "frequency_penalty": _OptionKind.FLOAT,
    "stop": _OptionKind.STRING_LIST,
    "num_ctx": _OptionKind.INT,
    "mirostat": _OptionKind.INT,
    "mirostat_tau": _OptionKind.FLOAT,
    "mirostat_eta": _OptionKind.FLOAT,
    "tfs_z": _OptionKind.FLOAT,
    "penalize_newline": _OptionKind.BOOL,
}

# Runner options that force a model reload when they differ from the loaded runner
# (server/sched.go needsReload) or pick hardware, plus older releases' equivalents.
_REMOVED_OPTIONS = frozenset(
    {
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_batch",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "draft_num_predict",
        "shift",
    }
)

_UNIT_NS = {
    "ns": 1,
    "us": 10**3,
    "\u00b5s": 10**3,  # U+00B5 MICRO SIGN
    "\u03bcs": 10**3,  # U+03BC GREEK SMALL LETTER MU
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
# One "[digits][.digits]unit" component; the unit runs to the next digit or dot, as in Go.
_COMPONENT = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def parse_go_duration(text: str) -> int | None:
    """Nanoseconds for a string Go's time.ParseDuration accepts, else None.

    Mirrors Go: optional sign, then one or more `<number><unit>` components, or the bare
    string "0"; a unit is required otherwise (so "300" is refused, as by Ollama's
    Duration.UnmarshalJSON). Fractions are truncated to whole nanoseconds.
    """
    s = text
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        return None
    total = 0
    pos = 0
    while pos < len(s):
        m = _COMPONENT.match(s, pos)
        assert m is not None  # every part of the pattern may be empty
        whole, frac, unit = m.group(1), m.group(2) or "", m.group(3)
        if not whole and not frac:
            return None
        # Go's leadingInt overflows past int64 (leading zeros are fine); its fraction
        # parser just stops using digits, so more than nanosecond precision is dropped.
        # Both bounds also keep int() clear of its 4300-digit limit.
        if len(whole.lstrip("0")) > 19:
            return None
        frac = frac[:30]
        scale = _UNIT_NS.get(unit)
        if scale is None:
            return None
        total += int(whole or "0") * scale + int(frac or "0") * scale // 10 ** len(frac)
        pos = m.end()
    # Go refuses anything beyond int64 nanoseconds (-2**63 itself is representable).
    if total > 2**63 - (0 if negative else 1):
        return None
    return -total if negative else total


@dataclass(frozen=True, slots=True)
class ShapeLimits:
    """Operator limits applied to every request (config `limits.*`)."""

    num_predict_cap: int = 4096
    max_num_ctx: int = 32768
    max_keep_alive_s: int = 3600


@dataclass(slots=True)
class ShapedRequest:
    """The result of shape_request. `body` is the caller's dict, modified in place."""

    body: dict[str, Any]
    model: str | None
    stream: bool
    client_wants_usage: bool
    output_cap: int


def _effective_model(body: dict[str, Any]) -> str | None:
    for field in ("model", "name"):
        if field in body and type(body[field]) is not str:
            raise BodyError(f'"{field}" must be a string')
    # Ollama's cmp.Or(req.Model, req.Name): the first non-empty one.
    model = body.get("model") or body.get("name")
    return model or None


def _as_int(value: object, label: str) -> int:
    # bool is an int subclass and 10.0 is a float: Ollama's *int struct fields refuse
    # both, and its options map truncates floats, so only JSON integers are accepted.
    if type(value) is not int:
        raise BodyError(f'"{label}" must be an integer')
    return value


def _clamp_cap(container: dict[str, Any], key: str, cap: int, label: str) -> int:
    """Clamp an output-token limit to `cap`, injecting it when absent, null or <= 0."""
    value = container.get(key)
    if value is None:
        container[key] = cap
        return cap
    n = _as_int(value, label)
    if n <= 0 or n > cap:
        n = cap
    container[key] = n
    return n


def _fold_max_completion_tokens(body: dict[str, Any]) -> None:
    """Ollama has no `max_completion_tokens` field; move it into `max_tokens`."""
    if "max_completion_tokens" not in body:
        return
    mct = body.pop("max_completion_tokens")
    if mct is None:
        return
    mct = _as_int(mct, "max_completion_tokens")
    mt = body.get("max_tokens")
    if mt is None:
        body["max_tokens"] = mct
        return
    mt = _as_int(mt, "max_tokens")
    positive = [n for n in (mt, mct) if n > 0]
    body["max_tokens"] = min(positive) if positive else mt


def _shape_options(opts: dict[str, Any], limits: ShapeLimits) -> None:
    """Type-check the options Ollama knows, clamp num_ctx, drop reload/hardware options."""
    for key in list(opts):
        if key in _REMOVED_OPTIONS:
            del opts[key]
            continue
        value = opts[key]
        kind = _OPTION_KINDS.get(key)
        # Ollama's Options.FromMap skips nil values and ignores unknown keys.
        if value is None or kind is None:
            continue
        label = f"options.{key}"
        if kind is _OptionKind.INT:
            n = _as_int(value, label)
            if key == "num_ctx":
                if n < 1:
                    raise BodyError(f'"{label}" must be at least 1')
                opts[key] = min(n, limits.max_num_ctx)
            elif not _INT32_MIN <= n <= _INT32_MAX:
                raise BodyError(f'"{label}" is out of range')
        elif kind is _OptionKind.INT64 or kind is _OptionKind.OUTPUT_CAP:
            _as_int(value, label)
        elif kind is _OptionKind.FLOAT:
            if type(value) not in (int, float) or not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                raise BodyError(f'"{label}" must be a number in range')
        elif kind is _OptionKind.BOOL:
            if type(value) is not bool:
                raise BodyError(f'"{label}" must be a boolean')
        elif kind is _OptionKind.STRING_LIST:
            if type(value) is not list or not all(type(s) is str for s in value):
                raise BodyError(f'"{label}" must be an array of strings')


def _keep_alive(value: object, max_s: int) -> int | float:
    """Clamp a keep_alive (seconds or Go duration) to [0, max_s]; negative = forever = max."""
    seconds: int | float
    if isinstance(value, str):
        ns = parse_go_duration(value)
        if ns is None:
            raise BodyError('"keep_alive" must be a number of seconds or a duration like "5m"')
        seconds = ns // 10**9 if ns % 10**9 == 0 else ns / 10**9
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value
    else:
        raise BodyError('"keep_alive" must be a number of seconds or a duration like "5m"')
    if seconds < 0 or seconds > max_s:
        return max_s
    if isinstance(seconds, float) and seconds.is_integer():
        return int(seconds)
    return seconds


def shape_request(route: str, body: dict[str, Any], limits: ShapeLimits) -> ShapedRequest:
    """Validate what policy reads and apply the gateway's clamps, in place on `body`.

    `route` names the endpoint (see _ROUTES; anything else is a programming error:
    ValueError). Raises BodyError, whose message names the field, for type errors; on
    error `body` may be partly modified and must be discarded. The result's `body` is
    the same dict, ready for serialise(). Only fields Ollama's request structs know are
    added: `stream` (explicit, so Ollama cannot apply another default), the output cap,
    `options` (native chat/generate) and `stream_options.include_usage` (/v1 streams).
    """
    if route not in _ROUTES:
        raise ValueError(f"unknown route {route!r}")
    model = _effective_model(body)
    for key in _REMOVED_TOP_LEVEL:
        body.pop(key, None)

    stream = False
    default = _STREAM_DEFAULT.get(route)
    if default is not None:
        value = body.get("stream")
        if value is None:  # Go leaves a field untouched on JSON null.
            stream = default
        elif type(value) is bool:
            stream = value
        else:
            raise BodyError('"stream" must be a boolean')
        body["stream"] = stream

    output_cap = 0
    if route in _NATIVE_ROUTES:
        opts = body.get("options")
        if opts is None and route in _GENERATING_NATIVE:
            opts = body["options"] = {}
        if opts is not None:
            if type(opts) is not dict:
                raise BodyError('"options" must be an object')
            _shape_options(opts, limits)
            if route in _GENERATING_NATIVE:
                output_cap = _clamp_cap(
                    opts, "num_predict", limits.num_predict_cap, "options.num_predict"
                )
    elif route in _CAP_FIELD:
        if route == "v1_chat":
            _fold_max_completion_tokens(body)
        field = _CAP_FIELD[route]
        output_cap = _clamp_cap(body, field, limits.num_predict_cap, field)

    if body.get("keep_alive") is not None:
        body["keep_alive"] = _keep_alive(body["keep_alive"], limits.max_keep_alive_s)

    client_wants_usage = False
    if route in _USAGE_ROUTES:
        so = body.get("stream_options")
        if so is not None and type(so) is not dict:
            raise BodyError('"stream_options" must be an object')
        include = None if so is None else so.get("include_usage")
        if include is not None and type(include) is not bool:
            raise BodyError('"stream_options.include_usage" must be a boolean')
        client_wants_usage = stream and include is True
        if stream:
            # The gateway meters /v1 streams from the usage chunk; the proxy strips it
            # again when the client did not ask for it.
            if so is None:
                so = body["stream_options"] = {}
            so["include_usage"] = True

    return ShapedRequest(
        body=body,
        model=model,
        stream=stream,
        client_wants_usage=client_wants_usage,
        output_cap=output_cap,
    )
