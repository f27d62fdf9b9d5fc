"""Hostile inputs: path, method, header, JSON and model-name tricks (SPEC §3–§6).

Each case asserts the answer AND, through the fake Ollama's record, that nothing refused
ever reached the upstream, and that what was accepted reached it only as the gateway's
own canonical re-serialisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from conftest import ALLOWED_MODEL, OTHER_MODEL, Gateway
from rawhttp import raw_request

CHAT = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
CHAT_BYTES = json.dumps(CHAT).encode()
KEY = "<acme>"            # placeholders, replaced by the real keys
MASTER = "<master>"
NO_KEY = None
# Refused by aiohttp's own HTTP parser before our handler runs (so no X-Request-ID).
PARSER_REFUSED = {"lower-case-method", "non-ascii"}


def chat_with(**fields: object) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


@dataclass
class Case:
    id: str
    status: int
    target: str | bytes = "/api/chat"
    method: str = "POST"
    body: bytes = CHAT_BYTES
    headers: list[tuple[str, str]] = field(default_factory=list)
    key: str | None = KEY
    forwarded_path: str | None = None    # for accepted requests: the path Ollama must see


def bad_json(id: str, body: bytes | str) -> Case:
    return Case(id, 400, body=body if isinstance(body, bytes) else body.encode())


def deep(n: int) -> bytes:
    return ('{"model":"%s","messages":[],"format":' % ALLOWED_MODEL + "[" * n + "]" * n + "}").encode()


CASES = [
    # -- paths: decided on the raw target, never forwarded when not canonical
    Case("pct-encoded-letter", 400, "/api/p%75ll"),
    Case("pct-encoded-slash", 400, "/api%2Fpull"),
    Case("trailing-slash", 400, "/api/pull/"),
    Case("trailing-slash-chat", 400, "/api/chat/"),
    Case("double-slash", 400, "//api/pull"),
    Case("dotdot", 400, "/api/../api/pull"),
    Case("dot", 400, "/api/./chat"),
    Case("encoded-dotdot", 400, "/api/%2e%2e/api/pull"),
    Case("semicolon", 400, "/api/pull;x=1"),
    Case("backslash", 400, "/api\\pull"),
    Case("fragment", 400, "/api/pull#frag"),
    Case("absolute-form", 400, "http://evil.example/api/pull"),
    Case("nul-escape", 400, "/api/chat%00"),
    Case("non-ascii", 400, "/api/ch\u00e4t".encode("utf-8")),
    Case("trailing-dot-segment", 400, "/api/pull/."),
    Case("query-is-dropped", 200, "/api/chat?model=" + OTHER_MODEL, forwarded_path="/api/chat"),
    Case("upper-case-path", 404, "/API/PULL"),
    Case("unknown-api", 404, "/api/nothing", key=NO_KEY),
    Case("unknown-v1", 404, "/v1/images/generations", key=NO_KEY),
    Case("v1-models-nested", 404, "/v1/models/a/b", method="GET", body=b""),
    # -- blocked endpoints: 401 without a key, 403 with any key, for every method
    Case("pull-no-key", 401, "/api/pull", key=NO_KEY),
    Case("pull", 403, "/api/pull"),
    Case("pull-get", 403, "/api/pull", method="GET", body=b""),
    Case("pull-master", 403, "/api/pull", key=MASTER),
    Case("push", 403, "/api/push"),
    Case("create", 403, "/api/create"),
    Case("copy", 403, "/api/copy"),
    Case("delete", 403, "/api/delete", method="DELETE"),
    Case("blobs-head", 403, "/api/blobs/sha256:" + "0" * 64, method="HEAD", body=b""),
    Case("blobs-post", 403, "/api/blobs/sha256:" + "0" * 64),
    Case("me", 403, "/api/me"),
    Case("signout", 403, "/api/signout"),
    Case("user-keys", 403, "/api/user/keys/abc", method="DELETE", body=b""),
    Case("web-search", 403, "/api/experimental/web_search"),
    # -- methods
    Case("get-chat", 405, method="GET", body=b"", key=NO_KEY),
    Case("post-tags", 405, "/api/tags", key=NO_KEY),
    Case("options", 405, method="OPTIONS", body=b"", key=NO_KEY),
    Case("put-chat", 405, method="PUT", key=NO_KEY),
    Case("lower-case-method", 400, method="post"),
    # -- credentials
    Case("no-credential", 401, key=NO_KEY),
    Case("two-authorization", 400, headers=[("Authorization", "Bearer x")]),
    Case("authorization-and-x-api-key", 400, headers=[("x-api-key", "nd-whatever")]),
    Case("basic-scheme", 401, key=NO_KEY, headers=[("Authorization", "Basic dXNlcjpwYXNz")]),
    Case("empty-bearer", 401, key=NO_KEY, headers=[("Authorization", "Bearer ")]),
    Case("placeholder-key", 401, key=NO_KEY, headers=[("Authorization", "Bearer ollama")]),
    Case("unknown-key-id", 401, key=NO_KEY, headers=[("Authorization", "Bearer nd-" + "Z" * 32)]),
    Case("lower-case-scheme", 200, key=NO_KEY, headers=[("Authorization", "bearer <acme>")],
         forwarded_path="/api/chat"),
    Case("x-api-key", 200, key=NO_KEY, headers=[("x-api-key", "<acme>")],
         forwarded_path="/api/chat"),
    # -- body framing and encoding
    Case("gzip", 415, headers=[("Content-Encoding", "gzip")]),
    Case("zstd", 415, "/v1/chat/completions", headers=[("Content-Encoding", "zstd")]),
    Case("declared-too-large", 413, headers=[("Content-Length", str(10 ** 9))], body=b"{}"),
    Case("text-plain-is-still-json", 200, headers=[("Content-Type", "text/plain")],
         forwarded_path="/api/chat"),
    Case("utf16-charset", 400, headers=[("Content-Type", "application/json; charset=utf-16")],
         body=CHAT_BYTES.decode().encode("utf-16")),
    Case("latin1-byte", 400, body=chat_with(extra="x").replace(b'"x"', b'"\xff"')),
    # -- JSON differentials with Go's encoding/json
    bad_json("case-variant-model", '{"model":"%s","MODEL":"%s","messages":[]}' % (ALLOWED_MODEL, OTHER_MODEL)),
    bad_json("duplicate-model", '{"model":"%s","model":"%s","messages":[]}' % (ALLOWED_MODEL, ALLOWED_MODEL)),
    bad_json("long-s-stream", '{"model":"%s","messages":[],"\u017ftream":true}' % ALLOWED_MODEL),
    bad_json("kelvin-keep-alive", '{"model":"%s","messages":[],"\\u212aeep_alive":-1}' % ALLOWED_MODEL),
    bad_json("options-twice", '{"model":"%s","options":{"num_ctx":1},"OPTIONS":{"num_ctx":999999}}' % ALLOWED_MODEL),
    bad_json("option-case-variant", '{"model":"%s","options":{"num_ctx":1,"NUM_CTX":2}}' % ALLOWED_MODEL),
    bad_json("non-ascii-message-key", '{"model":"%s","messages":[{"r\u00f6le":"user","content":"x"}]}' % ALLOWED_MODEL),
    bad_json("trailing-object", '{"model":"%s","messages":[]} {"model":"%s"}' % (ALLOWED_MODEL, OTHER_MODEL)),
    bad_json("nan", '{"model":"%s","options":{"temperature":NaN}}' % ALLOWED_MODEL),
    bad_json("infinity", '{"model":"%s","options":{"temperature":Infinity}}' % ALLOWED_MODEL),
    bad_json("huge-float", '{"model":"%s","options":{"temperature":1e400}}' % ALLOWED_MODEL),
    bad_json("huge-int", '{"model":"%s","options":{"seed":%d}}' % (ALLOWED_MODEL, 2 ** 70)),
    bad_json("deep-nesting", deep(200)),
    bad_json("bom", b"\xef\xbb\xbf" + CHAT_BYTES),
    bad_json("array-body", "[%s]" % CHAT_BYTES.decode()),
    bad_json("string-body", '"hello"'),
    bad_json("empty-body", b""),
    bad_json("lone-surrogate", '{"model":"%s","messages":[{"role":"user","content":"\\ud800"}]}' % ALLOWED_MODEL),
    bad_json("null-model", '{"model":null,"name":"%s","messages":[]}' % ALLOWED_MODEL),
    bad_json("model-number", '{"model":7,"messages":[]}'),
    bad_json("num-predict-string", '{"model":"%s","options":{"num_predict":"9"}}' % ALLOWED_MODEL),
    bad_json("stream-string", '{"model":"%s","stream":"false"}' % ALLOWED_MODEL),
    bad_json("no-model", '{"messages":[]}'),
    # -- model names: one identical 403 for not allowed / not installed / cloud
    Case("other-tenant-model", 403, body=chat_with(model=OTHER_MODEL)),
    Case("case-folded-other-model", 403, body=chat_with(model=OTHER_MODEL.upper())),
    Case("not-installed", 403, body=chat_with(model="mistral:7b")),
    Case("cloud-suffix", 403, body=chat_with(model=ALLOWED_MODEL + ":cloud")),
    Case("cloud-tag", 403, body=chat_with(model="gpt-oss:120b-cloud")),
    Case("name-fallback-other", 403, body=json.dumps({"name": OTHER_MODEL, "messages": []}).encode()),
    Case("empty-model-name-other", 403, body=chat_with(model="", name=OTHER_MODEL)),
    Case("model-with-space", 400, body=chat_with(model="llama3.2 1b")),
    Case("model-with-at", 400, body=chat_with(model="llama3.2@sha256:abc")),
    Case("model-path-other", 403, "/v1/models/" + OTHER_MODEL, method="GET", body=b""),
    Case("upper-case-allowed", 200, body=chat_with(model=ALLOWED_MODEL.upper()),
         forwarded_path="/api/chat"),
    Case("fully-qualified-allowed", 200,
         body=chat_with(model="registry.ollama.ai/library/" + ALLOWED_MODEL),
         forwarded_path="/api/chat"),
]


def resolve_placeholders(gw: Gateway, text: str) -> str:
    return text.replace("<acme>", gw.keys.acme).replace("<master>", gw.keys.master)


def inference_requests(gw: Gateway) -> list[object]:
    """What reached the fake, minus the gateway's own model discovery."""
    return [r for r in gw.fake.requests if r.path != "/api/tags"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_input(gw: Gateway, case: Case) -> None:
    headers = [(name, resolve_placeholders(gw, value)) for name, value in case.headers]
    if case.key is not None:
        headers.append(("Authorization", "Bearer " + resolve_placeholders(gw, case.key)))
    content_length = not any(name == "Content-Length" for name, _ in headers)
    before = len(inference_requests(gw))
    response = await raw_request(gw.url, case.method, case.target, headers, case.body,
                                 content_length=content_length)

    assert response.status == case.status, response.body
    if case.id not in PARSER_REFUSED:
        assert response.headers.get("x-request-id")
    reached = inference_requests(gw)[before:]
    if case.forwarded_path is None:
        assert reached == [], f"refused request reached Ollama: {reached}"
        return
    assert [r.path for r in reached] == [case.forwarded_path]
    forwarded = reached[0]
    # Exactly the gateway's own serialisation, spelt with the installed model name.
    assert forwarded.json["model"] == ALLOWED_MODEL
    assert json.dumps(forwarded.json, ensure_ascii=False, separators=(",", ":")).encode() \
        == forwarded.body
    lowered = {name.lower() for name in forwarded.headers}
    assert not lowered & {"authorization", "x-api-key", "cookie", "origin", "x-forwarded-for"}


async def test_denied_and_missing_models_get_identical_answers(gw: Gateway) -> None:
    """No oracle for "is this model installed": bodies differ only by the request id."""
    bodies = []
    for model in (OTHER_MODEL, "mistral:7b", "gpt-oss:120b-cloud"):
        response = await raw_request(gw.url, "POST", "/api/chat",
                                     [("Authorization", f"Bearer {gw.keys.acme}")],
                                     chat_with(model=model))
        assert response.status == 403
        rid = response.headers["x-request-id"]
        bodies.append((response.body.replace(rid.encode(), b"RID"),
                       {k: v for k, v in response.headers.items() if k not in ("x-request-id", "date")}))
    assert bodies[0] == bodies[1] == bodies[2]


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 60
