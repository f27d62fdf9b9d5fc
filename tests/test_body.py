"""Strict JSON parsing (the Go encoding/json differentials) and per-route request shaping."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from neuraldrive_gw.body import BodyError, ShapeLimits, parse_json_body, serialise, shape_request
from neuraldrive_gw.body import parse_go_duration


def nested(depth: int) -> bytes:
    """An object nested `depth` levels deep (the root object is level 1)."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


# (raw body, substring of the client-facing message)
REJECTED = [
    # NOTES-platform §2.1, row by row.
    pytest.param(
        b'{"model":"allowed","model":"blocked"}', 'duplicate key "model"',
        id="exact-duplicate",
    ),
    pytest.param(
        b'{"model":"allowed","MODEL":"blocked"}', 'key "MODEL" must be lower-case',
        id="case-variant-after",
    ),
    pytest.param(
        b'{"MODEL":"blocked","model":"allowed"}', 'key "MODEL" must be lower-case',
        id="case-variant-before",
    ),
    pytest.param(b'{"model":"blocked","model":null}', 'duplicate key "model"', id="null-shadowing"),
    pytest.param(
        b'{"model":"x","\\u006dodel":"blocked"}', 'duplicate key "model"',
        id="escaped-duplicate",
    ),
    pytest.param(b'{"keep_alive":"5m","\\u212aeep_alive":"-1"}', "non-ASCII key", id="kelvin-sign-fold"),
    pytest.param(b'{"\\u017ftream":false}', "non-ASCII key", id="long-s-fold"),
    pytest.param('{"ſtream":false}'.encode(), "non-ASCII key", id="long-s-raw-utf8"),
    pytest.param(
        b'{"options":{"num_ctx":1},"OPTIONS":{"num_ctx":999999}}', "must be lower-case",
        id="options-merge",
    ),
    pytest.param(
        b'{"options":{"num_ctx":1,"num_ctx":999999}}', 'duplicate key "num_ctx"',
        id="options-duplicate",
    ),
    pytest.param(b'{"model":"ok"} {"model":"blocked"}', "invalid JSON body", id="trailing-object"),
    pytest.param(b'{"model":"ok"}x', "invalid JSON body", id="trailing-garbage"),
    pytest.param(b'{"temperature":NaN}', "NaN is not allowed", id="nan"),
    pytest.param(b'{"temperature":Infinity}', "Infinity is not allowed", id="infinity"),
    pytest.param(b'{"temperature":-Infinity}', "-Infinity is not allowed", id="minus-infinity"),
    pytest.param(b'{"temperature":1e400}', "number out of range", id="float-overflow"),
    pytest.param(b'{"temperature":-1e400}', "number out of range", id="float-overflow-negative"),
    pytest.param(b'{"model":"\xff"}', "not valid UTF-8", id="invalid-utf8"),
    pytest.param(b'{"model":"\xed\xa0\x80"}', "not valid UTF-8", id="utf8-encoded-surrogate"),
    pytest.param(b'{"model":"\xc0\xaf"}', "not valid UTF-8", id="overlong-utf8"),
    pytest.param(b'{"prompt":"\\ud800"}', "lone surrogate in string", id="lone-high-surrogate-value"),
    pytest.param(b'{"prompt":"\\udc00x"}', "lone surrogate in string", id="lone-low-surrogate-value"),
    pytest.param(b'{"prompt":"\\ude00\\ud83d"}', "lone surrogate in string", id="reversed-pair"),
    pytest.param(
        b'{"format":{"\\ud800":1}}', "lone surrogate in key",
        id="lone-surrogate-key-free-form",
    ),
    pytest.param(b'{"\\udfff":1}', "non-ASCII key", id="lone-surrogate-key-struct"),
    pytest.param(
        b'{"input":["a","\\uD800"]}', "lone surrogate in string",
        id="lone-surrogate-string-list",
    ),
    pytest.param(
        b'{"messages":[{"role":"user","content":"\\uDBFF"}]}', "lone surrogate",
        id="lone-surrogate-nested",
    ),
    pytest.param(b"\xef\xbb\xbf{}", "byte order mark", id="bom"),
    pytest.param(b"", "empty", id="empty-body"),
    pytest.param(b"  \n", "invalid JSON body", id="whitespace-body"),
    pytest.param(b"[]", "top level must be an object", id="array"),
    pytest.param(b'"model"', "top level must be an object", id="string"),
    pytest.param(b"1", "top level must be an object", id="number"),
    pytest.param(b"null", "top level must be an object", id="null"),
    pytest.param(b"true", "top level must be an object", id="bool"),
    pytest.param(b"{'model':'x'}", "invalid JSON body", id="single-quotes"),
    pytest.param(b'{"model":"x",}', "invalid JSON body", id="trailing-comma"),
    pytest.param(b'{"prompt":"a\nb"}', "invalid JSON body", id="raw-control-char"),
    pytest.param(b'{"seed":9223372036854775808}', "integer out of range", id="int-2pow63"),
    pytest.param(b'{"seed":-9223372036854775808}', "integer out of range", id="int-minus-2pow63"),
    pytest.param(
        b'{"context":[1,2,9223372036854775808]}', "integer out of range",
        id="int-list-fast-path",
    ),
    pytest.param(
        b'{"context":[1,"a",-9223372036854775809]}', "integer out of range",
        id="int-mixed-list",
    ),
    pytest.param(b'{"x":[1.5,1e400]}', "number out of range", id="float-list-fast-path"),
    pytest.param(b'{"seed":1' + b"0" * 5000 + b"}", "invalid JSON body", id="int-digit-limit"),
    pytest.param(nested(65), "nested too deeply", id="depth-65"),
    pytest.param(b'{"a":' + b"[" * 70 + b"]" * 70 + b"}", "nested too deeply", id="depth-arrays"),
    pytest.param(b'{"format":' + nested(64) + b"}", "nested too deeply", id="depth-inside-free-form"),
    pytest.param(b"[" * 100_000, "nested too deeply", id="recursion-error"),
    pytest.param(
        b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply",
        id="recursion-error-objects",
    ),
    # Struct objects below the top level.
    pytest.param(b'{"messages":[{"Role":"user","content":"x"}]}', 'key "Role"', id="message-key-upper"),
    pytest.param(b'{"messages":[{"r\\u00f4le":"user"}]}', "non-ASCII key", id="message-key-non-ascii"),
    pytest.param(b'{"options":{"NUM_CTX":999999}}', 'key "NUM_CTX"', id="options-key-upper"),
    pytest.param(b'{"options":{"\\u212a":1}}', "non-ASCII key", id="options-key-kelvin"),
    pytest.param(b'{"Keep_Alive":-1}', 'key "Keep_Alive"', id="keep-alive-mixed-case"),
    pytest.param(
        b'{"tools":[{"type":"function","function":{"Name":"f"}}]}', 'key "Name"',
        id="tool-function-key",
    ),
    pytest.param(
        b'{"stream_options":{"Include_Usage":false}}', 'key "Include_Usage"',
        id="stream-options-key",
    ),
    pytest.param(b'{"response_format":{"Type":"json_object"}}', 'key "Type"', id="response-format-key"),
    pytest.param(
        b'{"messages":[{"role":"user","content":[{"Type":"text","text":"x"}]}]}', 'key "Type"', id="content-part-key"
    ),
    pytest.param(
        b'{"messages":[{"role":"assistant","tool_calls":[{"Function":{}}]}]}', 'key "Function"', id="tool-call-key"
    ),
    pytest.param(
        b'{"input":[{"Role":"user","content":"x"}]}', 'key "Role"',
        id="responses-input-list-is-struct",
    ),
    pytest.param(b'{"format":{"a":1,"a":2}}', 'duplicate key "a"', id="duplicate-in-free-form"),
    pytest.param(
        b'{"tools":[{"function":{"parameters":{"properties":{"x":{},"x":{}}}}}]}', "duplicate key",
        id="dup-deep-free",
    ),
]


@pytest.mark.parametrize(("raw", "message"), REJECTED)
def test_rejected_bodies(raw: bytes, message: str) -> None:
    with pytest.raises(BodyError) as excinfo:
        parse_json_body(raw)
    assert message in str(excinfo.value)
    assert str(excinfo.value).isascii()


ACCEPTED = [
    pytest.param(b'{"model":"llama3","stream":false}', id="plain"),
    pytest.param(
        b'{"format":{"type":"object","properties":{"firstName":{"type":"string"}}}}',
        id="format-schema-camel",
    ),
    pytest.param(
        b'{"tools":[{"type":"function","function":{"name":"f","parameters":'
        b'{"type":"object","properties":{"Name":{"type":"string"},"name":{"type":"string"}}}}}]}',
        id="tool-params-name-and-Name",
    ),
    pytest.param(
        b'{"tools":[{"name":"w","input_schema":{"type":"object","properties":{"ZipCode":{"type":"string"}}}}]}',
        id="anthropic-input-schema",
    ),
    pytest.param(
        b'{"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"w","input":{"City":"Paris"}}]}]}',
        id="anthropic-tool-use-input",
    ),
    pytest.param(
        b'{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{"Stra\\u00dfe":"x"}}}]}]}',
        id="native-tool-arguments-non-ascii",
    ),
    pytest.param(
        b'{"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"$defs":{"Foo":{}},"anyOf":[]}}}}',
        id="json-schema-defs",
    ),
    pytest.param(
        b'{"text":{"format":{"type":"json_schema","schema":{"properties":{"A":{}}}}}}',
        id="responses-text-format",
    ),
    pytest.param(b'{"metadata":{"UserId":"u"},"logit_bias":{"50256":-100}}', id="metadata-logit-bias"),
    pytest.param(b'{"format":{"definitions":{"\\u00c9t\\u00e9":{}}}}', id="non-ascii-key-free-form"),
    pytest.param(b'{"prompt":"\\ud83d\\ude00 h\\u00e9llo \xe2\x82\xac"}', id="surrogate-pair-and-utf8"),
    pytest.param(b'{"prompt":"\\\\ud800 is just text"}', id="escaped-backslash-not-surrogate"),
    pytest.param(b'{"context":["\\\\ud800",1]}', id="escaped-backslash-mixed-list"),
    pytest.param(nested(64), id="depth-64"),
    pytest.param(b'{"seed":9223372036854775807,"x":-9223372036854775807}', id="int64-extremes"),
    pytest.param(b'{"context":[1,2,3],"v":[0.5,1e308],"w":[]}', id="scalar-lists"),
    pytest.param(b'{"t":1e-400,"u":-0.0,"v":1E+2}', id="float-edge-cases"),
    pytest.param(b' \t{"model":"x"}\r\n ', id="surrounding-whitespace"),
    pytest.param(b'{"_debug_render_only":true,"$x":1,"a_1":2,"":3}', id="lower-case-non-letter-keys"),
    pytest.param(b'{"prompt":"\\u0000"}', id="nul-escape-in-value"),
]


@pytest.mark.parametrize("raw", ACCEPTED)
def test_accepted_bodies(raw: bytes) -> None:
    assert parse_json_body(raw) == json.loads(raw)


def test_max_depth_is_configurable() -> None:
    assert parse_json_body(nested(3), max_depth=3) == {"a": {"a": {}}}
    with pytest.raises(BodyError, match="nested too deeply"):
        parse_json_body(nested(4), max_depth=3)


def test_hostile_key_is_quoted_and_truncated() -> None:
    with pytest.raises(BodyError) as excinfo:
        parse_json_body(b'{"X' + b"\\n" * 200 + b'":1}')
    assert len(str(excinfo.value)) < 200
    assert "\n" not in str(excinfo.value)


def test_serialise_is_compact_utf8_and_refuses_nan() -> None:
    assert serialise({"a": "\u00e9", "b": [1, 2.5]}) == '{"a":"\u00e9","b":[1,2.5]}'.encode()
    with pytest.raises(ValueError):
        serialise({"a": float("nan")})


L = ShapeLimits()
SMALL = ShapeLimits(num_predict_cap=100, max_num_ctx=2048, max_keep_alive_s=60)


def case(
    case_id: str,
    route: str,
    body: dict[str, Any],
    expected: dict[str, Any],
    *,
    model: str | None = "m",
    stream: bool = False,
    usage: bool = False,
    cap: int = 0,
    limits: ShapeLimits = L,
) -> Any:
    """One shaping case: the body forwarded and the ShapedRequest fields."""
    return pytest.param(route, body, limits, expected, model, stream, usage, cap, id=case_id)


NATIVE_CAP = {"num_predict": 4096}
REMOVED_OPTIONS = {
    "num_gpu": 99, "main_gpu": 1, "num_thread": 64, "num_batch": 4096, "use_mmap": False,
    "use_mlock": True, "numa": True, "low_vram": True, "draft_num_predict": 8, "shift": False,
}  # fmt: skip

def ka(case_id: str, value: object, forwarded: object, *, limits: ShapeLimits = L) -> Any:
    """keep_alive on /api/embed, which has no other field the gateway changes."""
    return case(case_id, "api_embed", {"model": "m", "keep_alive": value},
                {"model": "m", "keep_alive": forwarded}, limits=limits)  # fmt: skip


SHAPED = [
    # Native chat / generate: stream defaults on, written explicitly; num_predict injected.
    case("chat-defaults", "api_chat", {"model": "m"},
         {"model": "m", "stream": True, "options": NATIVE_CAP}, stream=True, cap=4096),
    case("generate-null-stream-is-default", "api_generate", {"model": "m", "stream": None},
         {"model": "m", "stream": True, "options": NATIVE_CAP}, stream=True, cap=4096),
    case("chat-stream-false-null-options", "api_chat", {"model": "m", "stream": False, "options": None},
         {"model": "m", "stream": False, "options": NATIVE_CAP}, cap=4096),
    case("num-predict-kept", "api_chat", {"model": "m", "options": {"num_predict": 100}},
         {"model": "m", "stream": True, "options": {"num_predict": 100}}, stream=True, cap=100),
    case("num-predict-clamped", "api_generate", {"model": "m", "options": {"num_predict": 10**12}},
         {"model": "m", "stream": True, "options": NATIVE_CAP}, stream=True, cap=4096),
    case("num-predict-infinite-replaced", "api_chat", {"model": "m", "options": {"num_predict": -1}},
         {"model": "m", "stream": True, "options": {"num_predict": 100}}, stream=True, cap=100,
         limits=SMALL),
    case("num-predict-zero-replaced", "api_chat", {"model": "m", "options": {"num_predict": 0}},
         {"model": "m", "stream": True, "options": NATIVE_CAP}, stream=True, cap=4096),
    case("num-predict-null-replaced", "api_chat", {"model": "m", "options": {"num_predict": None}},
         {"model": "m", "stream": True, "options": NATIVE_CAP}, stream=True, cap=4096),
    case("num-ctx-clamped-others-kept", "api_chat",
         {"model": "m", "options": {"num_ctx": 999_999, "temperature": 1, "top_p": 0.5, "seed": 2**40}},
         {"model": "m", "stream": True,
          "options": {"num_ctx": 32768, "temperature": 1, "top_p": 0.5, "seed": 2**40, "num_predict": 4096}},
         stream=True, cap=4096),
    case("hardware-and-reload-options-removed", "api_chat",
         {"model": "m", "options": {**REMOVED_OPTIONS, "num_ctx": 1024}},
         {"model": "m", "stream": True, "options": {"num_ctx": 1024, "num_predict": 4096}},
         stream=True, cap=4096),
    case("shift-debug-removed-unknown-option-kept", "api_chat",
         {"model": "m", "shift": True, "_debug_render_only": True, "options": {"foo": "bar", "stop": ["x"]}},
         {"model": "m", "stream": True, "options": {"foo": "bar", "stop": ["x"], "num_predict": 4096}},
         stream=True, cap=4096),
    case("empty-model-falls-back-to-name", "api_chat", {"model": "", "name": "llama3"},
         {"model": "", "name": "llama3", "stream": True, "options": NATIVE_CAP},
         model="llama3", stream=True, cap=4096),
    case("model-wins-over-name", "api_chat", {"model": "a", "name": "b"},
         {"model": "a", "name": "b", "stream": True, "options": NATIVE_CAP},
         model="a", stream=True, cap=4096),
    case("no-model", "api_chat", {"messages": []},
         {"messages": [], "stream": True, "options": NATIVE_CAP}, model=None, stream=True, cap=4096),
    # keep_alive: seconds out, clamped, negative (= forever) is the maximum, 0 unloads.
    ka("ka-5m", "5m", 300),
    ka("ka-clamped", "1h30m", 3600),
    ka("ka-negative-string", "-1s", 3600),
    ka("ka-negative-number", -1, 60, limits=SMALL),
    ka("ka-negative-float", -0.5, 3600),
    ka("ka-minus-zero-unloads", -0.0, 0),
    ka("ka-zero-unloads", 0, 0),
    ka("ka-zero-string", "0", 0),
    ka("ka-float-clamped", 7200.0, 3600),
    ka("ka-integral-float", 2.0, 2),
    ka("ka-subsecond", "300ms", 0.3),
    ka("ka-fraction", "1.5m", 90),
    ka("ka-null-untouched", None, None),
    # Embeddings and show: no stream field, no output cap, options still policed.
    case("embeddings-num-ctx", "api_embeddings", {"model": "m", "prompt": "p", "options": {"num_ctx": 4096}},
         {"model": "m", "prompt": "p", "options": {"num_ctx": 2048}}, limits=SMALL),
    case("embed-has-no-stream-field", "api_embed", {"model": "m", "input": "x", "stream": "ignored"},
         {"model": "m", "input": "x", "stream": "ignored"}),
    case("show-name", "api_show", {"name": "llama3", "verbose": True},
         {"name": "llama3", "verbose": True}, model="llama3"),
    # OpenAI chat and completions.
    case("v1-chat-defaults", "v1_chat", {"model": "m", "messages": []},
         {"model": "m", "messages": [], "stream": False, "max_tokens": 4096}, cap=4096),
    case("v1-chat-max-tokens-kept-debug-removed", "v1_chat",
         {"model": "m", "max_tokens": 10, "_debug_render_only": True},
         {"model": "m", "max_tokens": 10, "stream": False}, cap=10),
    case("v1-chat-max-tokens-null", "v1_chat", {"model": "m", "max_tokens": None},
         {"model": "m", "max_tokens": 100, "stream": False}, cap=100, limits=SMALL),
    case("mct-translated", "v1_chat", {"model": "m", "max_completion_tokens": 100},
         {"model": "m", "stream": False, "max_tokens": 100}, cap=100),
    case("mct-smaller-wins", "v1_chat", {"model": "m", "max_completion_tokens": 100, "max_tokens": 50},
         {"model": "m", "stream": False, "max_tokens": 50}, cap=50),
    case("mct-positive-wins", "v1_chat", {"model": "m", "max_completion_tokens": 100, "max_tokens": 0},
         {"model": "m", "stream": False, "max_tokens": 100}, cap=100),
    case("mct-clamped", "v1_chat", {"model": "m", "max_completion_tokens": 10**9},
         {"model": "m", "stream": False, "max_tokens": 4096}, cap=4096),
    case("mct-null-removed", "v1_chat", {"model": "m", "max_completion_tokens": None},
         {"model": "m", "stream": False, "max_tokens": 4096}, cap=4096),
    case("v1-chat-stream-usage-injected", "v1_chat", {"model": "m", "stream": True},
         {"model": "m", "stream": True, "max_tokens": 4096, "stream_options": {"include_usage": True}},
         stream=True, cap=4096),
    case("v1-chat-client-wants-usage", "v1_chat",
         {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
         {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4096},
         stream=True, usage=True, cap=4096),
    case("v1-chat-usage-forced-other-keys-kept", "v1_chat",
         {"model": "m", "stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}},
         {"model": "m", "stream": True, "max_tokens": 4096,
          "stream_options": {"include_usage": True, "include_obfuscation": False}},
         stream=True, cap=4096),
    case("v1-chat-no-stream-options-untouched", "v1_chat",
         {"model": "m", "stream_options": {"include_usage": True}},
         {"model": "m", "stream_options": {"include_usage": True}, "stream": False, "max_tokens": 4096},
         cap=4096),
    case("v1-completions-stream", "v1_completions",
         {"model": "m", "prompt": "p", "stream": True, "stream_options": None},
         {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True},
          "max_tokens": 100},
         stream=True, cap=100, limits=SMALL),
    case("v1-completions-negative-max-tokens", "v1_completions", {"model": "m", "prompt": "p", "max_tokens": -5},
         {"model": "m", "prompt": "p", "max_tokens": 4096, "stream": False}, cap=4096),
    case("v1-embeddings-untouched", "v1_embeddings", {"model": "m", "input": ["a"]},
         {"model": "m", "input": ["a"]}),
    # Responses and Anthropic messages.
    case("v1-responses-stream-no-stream-options", "v1_responses", {"model": "m", "input": "hi", "stream": True},
         {"model": "m", "input": "hi", "stream": True, "max_output_tokens": 4096}, stream=True, cap=4096),
    case("v1-responses-max-output-clamped", "v1_responses", {"model": "m", "max_output_tokens": 5000},
         {"model": "m", "max_output_tokens": 4096, "stream": False}, cap=4096),
    case("v1-messages-max-tokens-injected", "v1_messages", {"model": "m", "messages": [], "stream": True},
         {"model": "m", "messages": [], "stream": True, "max_tokens": 4096}, stream=True, cap=4096),
    case("v1-messages-zero-max-tokens", "v1_messages", {"model": "m", "max_tokens": 0},
         {"model": "m", "max_tokens": 100, "stream": False}, cap=100, limits=SMALL),
    case("v1-messages-kept-and-keep-alive", "v1_messages", {"model": "m", "max_tokens": 64, "keep_alive": "2h"},
         {"model": "m", "max_tokens": 64, "stream": False, "keep_alive": 3600}, cap=64),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "body", "limits", "expected", "model", "stream", "wants_usage", "cap"), SHAPED
)
def test_shape_request(
    route: str,
    body: dict[str, Any],
    limits: ShapeLimits,
    expected: dict[str, Any],
    model: str | None,
    stream: bool,
    wants_usage: bool,
    cap: int,
) -> None:
    original = copy.deepcopy(body)
    shaped = shape_request(route, original, limits)
    assert shaped.body == expected
    assert shaped.body is original  # documented: shaped in place
    got = (shaped.model, shaped.stream, shaped.client_wants_usage, shaped.output_cap)
    assert got == (model, stream, wants_usage, cap)
    assert parse_json_body(serialise(shaped.body)) == expected


def bad(case_id: str, route: str, body: dict[str, Any], message: str) -> Any:
    """A body shape_request must refuse, and a substring of the client-facing message."""
    return pytest.param(route, body, message, id=case_id)


def bad_option(case_id: str, options: dict[str, Any], route: str = "api_chat") -> Any:
    """An `options` object that must be refused with a message naming its only key."""
    (key,) = options
    return bad(case_id, route, {"model": "m", "options": options}, f'"options.{key}"')


def bad_keep_alive(case_id: str, value: object) -> Any:
    return bad(case_id, "api_chat", {"model": "m", "keep_alive": value}, '"keep_alive"')


SHAPE_ERRORS = [
    bad("model-null", "api_chat", {"model": None}, '"model" must be a string'),
    bad("model-number", "v1_chat", {"model": 5}, '"model" must be a string'),
    bad("name-list", "api_show", {"model": "m", "name": ["x"]}, '"name" must be a string'),
    bad("stream-string", "api_chat", {"model": "m", "stream": "yes"}, '"stream" must be a boolean'),
    bad("stream-int", "v1_messages", {"model": "m", "stream": 1}, '"stream" must be a boolean'),
    bad("options-list", "api_chat", {"model": "m", "options": []}, '"options" must be an object'),
    bad("embed-options-string", "api_embed", {"model": "m", "options": "x"}, '"options" must be an object'),
    bad_option("num-predict-float", {"num_predict": 10.0}),
    bad_option("num-predict-bool", {"num_predict": True}),
    bad_option("num-predict-string", {"num_predict": "10"}),
    bad_option("embed-num-predict-float", {"num_predict": 1.5}, route="api_embed"),
    bad_option("num-ctx-zero", {"num_ctx": 0}),
    bad_option("num-ctx-float", {"num_ctx": 4096.0}),
    bad_option("show-num-ctx-negative", {"num_ctx": -1}, route="api_show"),
    bad_option("top-k-float", {"top_k": 1.5}),
    bad_option("top-k-out-of-int32", {"top_k": 2**31}),
    bad_option("repeat-last-n-below-int32", {"repeat_last_n": -(2**31) - 1}),
    bad_option("legacy-mirostat-float", {"mirostat": 1.0}),
    bad_option("seed-float", {"seed": 1.5}),
    bad_option("temperature-string", {"temperature": "hot"}),
    bad_option("temperature-bool", {"temperature": True}),
    bad_option("top-p-beyond-float32", {"top_p": 1e39}),
    bad_option("stop-string", {"stop": "x"}),
    bad_option("stop-mixed", {"stop": ["a", 1]}),
    bad_option("penalize-newline-int", {"penalize_newline": 1}),
    bad("max-tokens-float", "v1_chat", {"model": "m", "max_tokens": 10.0}, '"max_tokens"'),
    bad("max-tokens-bool", "v1_chat", {"model": "m", "max_tokens": True}, '"max_tokens"'),
    bad("mct-string", "v1_chat", {"model": "m", "max_completion_tokens": "9"}, '"max_completion_tokens"'),
    bad("mct-with-bad-mt", "v1_chat", {"model": "m", "max_completion_tokens": 9, "max_tokens": "9"},
        '"max_tokens"'),
    bad("completions-max-tokens-list", "v1_completions", {"model": "m", "max_tokens": [1]}, '"max_tokens"'),
    bad("responses-cap-float", "v1_responses", {"model": "m", "max_output_tokens": 1.5}, '"max_output_tokens"'),
    bad("messages-cap-string", "v1_messages", {"model": "m", "max_tokens": "64"}, '"max_tokens"'),
    bad("stream-options-string", "v1_chat", {"model": "m", "stream_options": "x"}, '"stream_options"'),
    bad("include-usage-string", "v1_chat", {"model": "m", "stream": True, "stream_options": {"include_usage": "y"}},
        "include_usage"),
    bad("include-usage-int", "v1_completions", {"model": "m", "stream_options": {"include_usage": 1}},
        "include_usage"),
    bad_keep_alive("ka-bare-number-string", "300"),
    bad_keep_alive("ka-space", "5 m"),
    bad_keep_alive("ka-unknown-unit", "5d"),
    bad_keep_alive("ka-empty", ""),
    bad_keep_alive("ka-sign-only", "-"),
    bad_keep_alive("ka-no-digits", ".s"),
    bad_keep_alive("ka-overflow", "9999999999h"),
    bad_keep_alive("ka-bool", True),
    bad_keep_alive("ka-object", {"s": 1}),
    bad_keep_alive("ka-list", [5]),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "message"), SHAPE_ERRORS)
def test_shape_request_type_errors(route: str, body: dict[str, Any], message: str) -> None:
    with pytest.raises(BodyError) as excinfo:
        shape_request(route, body, L)
    assert message in str(excinfo.value)


def test_unknown_route_is_a_programming_error() -> None:
    with pytest.raises(ValueError) as excinfo:
        shape_request("api_pull", {"model": "m"}, L)
    assert not isinstance(excinfo.value, BodyError)


GO_DURATIONS = [
    pytest.param("0", 0, id="zero"),
    pytest.param("-0", 0, id="minus-zero"),
    pytest.param("5m", 300 * 10**9, id="minutes"),
    pytest.param("+5m", 300 * 10**9, id="plus-sign"),
    pytest.param("1h30m", 5400 * 10**9, id="compound"),
    pytest.param("300ms", 300 * 10**6, id="millis"),
    pytest.param("1.5h", 5400 * 10**9, id="fraction"),
    pytest.param(".5s", 5 * 10**8, id="leading-dot"),
    pytest.param("5.s", 5 * 10**9, id="trailing-dot"),
    pytest.param("-1s", -(10**9), id="negative"),
    pytest.param("2\u00b5s", 2000, id="micro-sign"),
    pytest.param("2\u03bcs", 2000, id="greek-mu"),
    pytest.param("1ns", 1, id="nanos"),
    pytest.param("-2562047h47m16.854775808s", -(2**63), id="int64-min"),
    pytest.param("2562047h47m16.854775808s", None, id="int64-overflow"),
    pytest.param("300", None, id="missing-unit"),
    pytest.param("", None, id="empty"),
    pytest.param("1d", None, id="days-unknown"),
    pytest.param("1e3s", None, id="exponent"),
    pytest.param("s", None, id="unit-only"),
    pytest.param("1h 30m", None, id="space"),
    pytest.param("\u0661s", None, id="arabic-digit"),
    pytest.param("1" + "0" * 5000 + "s", None, id="huge-integer-part"),
    pytest.param("0000000000000000000000001s", 10**9, id="leading-zeros"),
    pytest.param("0." + "1" * 5000 + "s", 111_111_111, id="huge-fraction"),
]


@pytest.mark.parametrize(("text", "nanoseconds"), GO_DURATIONS)
def test_parse_go_duration(text: str, nanoseconds: int | None) -> None:
    assert parse_go_duration(text) == nanoseconds


def test_parse_then_shape_refuses_case_bypass_before_policy() -> None:
    """The NOTES §2.1 headline bypass, end to end: nothing reaches shaping."""
    with pytest.raises(BodyError):
        shape_request("api_chat", parse_json_body(b'{"model":"ok","MODEL":"blocked"}'), L)
