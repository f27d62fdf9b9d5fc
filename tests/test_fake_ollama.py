"""The fake Ollama: endpoint shapes, token counts, recording, control API, faults, disconnects."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from neuraldrive_gw.devtools.fake_catalog import InvalidModelName, canonical_model
from neuraldrive_gw.devtools.fake_frames import completion_text
from neuraldrive_gw.devtools.fake_ollama import (
    DEFAULT_MODELS, Fault, FakeOllama, RecordedRequest, start_fake)

CHAT = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x" * 40}]}
V1_CHAT = {**CHAT, "model": "qwen2.5:0.5b"}
MESSAGES = {"model": "llama3.2:1b", "max_tokens": 5,
            "messages": [{"role": "user", "content": "y" * 20}]}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> FakeOllama:
    return FakeOllama()


@pytest.fixture
async def client(aiohttp_client: Any, fake: FakeOllama) -> Any:
    return await aiohttp_client(fake.app)


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) for every SSE event in a body."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


async def post_text(client: Any, path: str, body: Any) -> tuple[int, str, str]:
    async with client.post(path, json=body) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


# --- pure helpers --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "llama3.2:1b", "LLAMA3.2:1B", "library/llama3.2:1b", "registry.ollama.ai/library/llama3.2:1b",
    "REGISTRY.OLLAMA.AI/Library/llama3.2:1b", " llama3.2:1b\n",
    "https://registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b:local", "llama3.2:1b: LOCAL"])
def test_canonical_model_spellings(name: str) -> None:
    assert canonical_model(name) == ("registry.ollama.ai/library/llama3.2:1b", False)


@pytest.mark.parametrize("name, expected", [
    ("llama3", ("registry.ollama.ai/library/llama3:latest", False)),
    ("gpt-oss:120b-cloud", ("registry.ollama.ai/library/gpt-oss:120b", True)),
    ("gpt-oss:120b:CLOUD", ("registry.ollama.ai/library/gpt-oss:120b", True)),
    ("hf.co/u/r:q4", ("hf.co/u/r:q4", False)),
])
def test_canonical_model_forms(name: str, expected: tuple[str, bool]) -> None:
    assert canonical_model(name) == expected


@pytest.mark.parametrize("name", ["", "a b", "x:cloud:local", "a/b/c/d", "bad@sha256"])
def test_canonical_model_rejects(name: str) -> None:
    with pytest.raises(InvalidModelName):
        canonical_model(name)


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Fault("reset", times=0)
    with pytest.raises(ValueError):
        Fault("status", status=42)


# --- simple native routes ------------------------------------------------------------------

async def test_root_and_version(client: Any) -> None:
    for method in ("GET", "HEAD"):
        async with client.request(method, "/") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert await resp.text() == ("Ollama is running" if method == "GET" else "")
        async with client.request(method, "/api/version") as resp:
            assert resp.status == 200
    async with client.get("/api/version") as resp:
        assert await resp.json() == {"version": "0.33.0"}


async def test_tags_lists_full_entries_with_a_cloud_stub(client: Any) -> None:
    async with client.get("/api/tags") as resp:
        models = (await resp.json())["models"]
    assert [m["name"] for m in models] == list(DEFAULT_MODELS)
    for m in models:
        assert set(m) >= {"name", "model", "modified_at", "size", "digest", "details"}
        assert set(m["details"]) >= {"format", "family", "families", "parameter_size",
                                     "quantization_level"}
    cloud = models[-1]
    assert cloud["remote_model"] == "gpt-oss:120b" and cloud["remote_host"].startswith("https://")


async def test_ps_lists_models_used_so_far(client: Any) -> None:
    async with client.get("/api/ps") as resp:
        assert await resp.json() == {"models": []}
    await post_text(client, "/api/chat", {**CHAT, "stream": False})
    async with client.get("/api/ps") as resp:
        (entry,) = (await resp.json())["models"]
    assert entry["name"] == "llama3.2:1b"
    assert set(entry) >= {"expires_at", "size_vram", "details", "digest"}


async def test_show_by_model_or_name(client: Any) -> None:
    for body in ({"model": "LLAMA3.2:1b"}, {"name": "library/llama3.2:1b"}):
        async with client.post("/api/show", json=body) as resp:
            shown = await resp.json()
        assert resp.status == 200
        assert {"modelfile", "parameters", "template", "details", "model_info",
                "capabilities"} <= set(shown)
        assert shown["capabilities"] == ["completion", "tools"]
    status, _, text = await post_text(client, "/api/show", {"model": "nope"})
    assert (status, json.loads(text)) == (404, {"error": "model 'nope' not found"})
    status, _, text = await post_text(client, "/api/show", {})
    assert (status, json.loads(text)) == (400, {"error": "model is required"})


# --- /api/chat and /api/generate ---------------------------------------------------------

async def test_chat_streams_ndjson_by_default(client: Any) -> None:
    status, ctype, text = await post_text(client, "/api/chat", CHAT)
    assert (status, ctype) == (200, "application/x-ndjson")
    frames = ndjson(text)
    assert len(frames) == 9
    assert all(f["done"] is False and f["message"]["role"] == "assistant" for f in frames[:-1])
    assert "".join(f["message"]["content"] for f in frames) == completion_text(8)
    final = frames[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"]["content"] == ""
    assert final["prompt_eval_count"] == 10 and final["eval_count"] == 8
    durations = {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration"}
    assert durations <= set(final)


async def test_chat_frames_are_separate_http_chunks(aiohttp_client: Any) -> None:
    fake = FakeOllama(tokens=3, pace={"llama3.2:1b": 0.01})
    client = await aiohttp_client(fake.app)
    chunks, current = [], b""
    async with client.post("/api/chat", json=CHAT) as resp:
        async for data, end_of_chunk in resp.content.iter_chunks():
            current += data
            if end_of_chunk:
                chunks.append(current)
                current = b""
    assert len(chunks) == 4 and all(c.count(b"\n") == 1 and c.endswith(b"\n") for c in chunks)


async def test_chat_stream_false_and_cap(client: Any) -> None:
    body = {**CHAT, "stream": False, "options": {"num_predict": 3}}
    status, ctype, text = await post_text(client, "/api/chat", body)
    reply = json.loads(text)
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert reply["message"]["content"] == completion_text(3)
    assert reply["eval_count"] == 3 and reply["done_reason"] == "length"
    _, _, text = await post_text(client, "/api/chat", {**CHAT, "options": {"num_predict": 4096}})
    final = ndjson(text)[-1]   # a cap above the model's natural length changes nothing
    assert final["eval_count"] == 8 and final["done_reason"] == "stop"


async def test_chat_load_and_unload(client: Any) -> None:
    _, ctype, text = await post_text(client, "/api/chat", {"model": "llama3.2:1b", "messages": []})
    reply = json.loads(text)
    assert ctype.startswith("application/json") and reply["done_reason"] == "load"
    _, _, text = await post_text(client, "/api/generate", {"model": "llama3.2:1b", "keep_alive": 0})
    assert json.loads(text)["done_reason"] == "unload"


async def test_generate_stream_has_context_and_counts(client: Any) -> None:
    body = {"model": "llama3.2:1b", "prompt": "abcdefgh"}
    _, _, text = await post_text(client, "/api/generate", body)
    frames = ndjson(text)
    assert "".join(f["response"] for f in frames) == completion_text(8)
    assert frames[-1]["prompt_eval_count"] == 2 and frames[-1]["eval_count"] == 8
    assert len(frames[-1]["context"]) == 10
    raw = {"model": "llama3.2:1b", "prompt": "abcd", "raw": True, "stream": False}
    _, _, text = await post_text(client, "/api/generate", raw)
    assert "context" not in json.loads(text)


@pytest.mark.parametrize("name", ["LLAMA3.2:1B", "library/llama3.2:1b",
                                  "registry.ollama.ai/library/llama3.2:1b"])
async def test_models_resolve_like_ollama(client: Any, name: str) -> None:
    status, _, text = await post_text(client, "/api/chat", {**CHAT, "model": name, "stream": False})
    assert status == 200 and json.loads(text)["model"] == name


async def test_unknown_model_errors_per_dialect(client: Any) -> None:
    status, _, text = await post_text(client, "/api/chat", {**CHAT, "model": "nope:1b"})
    assert (status, json.loads(text)) == (404, {"error": "model 'nope:1b' not found"})
    status, ctype, text = await post_text(client, "/v1/chat/completions", {**CHAT, "model": "nope"})
    assert (status, ctype) == (404, "application/json")
    assert json.loads(text) == {"error": {"message": "model 'nope' not found",
                                          "type": "not_found_error", "param": None, "code": None}}
    status, _, text = await post_text(client, "/v1/messages", {**MESSAGES, "model": "nope"})
    error = json.loads(text)
    assert status == 404 and error["type"] == "error"
    assert error["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}


async def test_embedding_model_cannot_chat(client: Any) -> None:
    body = {**CHAT, "model": "nomic-embed-text"}
    status, _, text = await post_text(client, "/api/chat", body)
    assert status == 400
    assert json.loads(text) == {"error": '"nomic-embed-text" does not support chat'}


# --- embeddings ------------------------------------------------------------------------------

async def test_embed_and_legacy_embeddings(client: Any) -> None:
    body = {"model": "nomic-embed-text", "input": ["abcdefgh", "abcd"]}
    _, _, text = await post_text(client, "/api/embed", body)
    reply = json.loads(text)
    assert len(reply["embeddings"]) == 2 and all(len(v) == 8 for v in reply["embeddings"])
    assert reply["prompt_eval_count"] == 3
    _, _, text = await post_text(client, "/api/embed", {"model": "nomic-embed-text", "input": ""})
    assert json.loads(text) == {"model": "nomic-embed-text", "embeddings": []}
    _, _, text = await post_text(client, "/api/embeddings", {"model": "nomic-embed-text",
                                                              "prompt": "abcd"})
    assert list(json.loads(text)) == ["embedding"]


async def test_v1_embeddings(client: Any) -> None:
    body = {"model": "nomic-embed-text", "input": "abcdefgh", "encoding_format": "base64"}
    _, _, text = await post_text(client, "/v1/embeddings", body)
    reply = json.loads(text)
    assert reply["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert len(base64.b64decode(reply["data"][0]["embedding"])) == 8 * 4
    status, _, _ = await post_text(client, "/v1/embeddings", {**body, "encoding_format": "hex"})
    assert status == 400


# --- OpenAI-compatible routes -------------------------------------------------------------

async def test_v1_chat_non_stream(client: Any) -> None:
    body = {**V1_CHAT, "max_tokens": 4}
    status, ctype, text = await post_text(client, "/v1/chat/completions", body)
    reply = json.loads(text)
    assert (status, ctype, reply["object"]) == (200, "application/json", "chat.completion")
    assert reply["choices"][0]["message"]["content"] == completion_text(4)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_v1_chat_stream(client: Any, include_usage: bool) -> None:
    body = {**V1_CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    status, ctype, text = await post_text(client, "/v1/chat/completions", body)
    assert (status, ctype) == (200, "text/event-stream")
    events = [data for _, data in sse(text)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(d) for d in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == completion_text(8)
    finish = chunks[len(content)]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 8,
                                       "total_tokens": 18}
    else:
        assert len(chunks) == 9 and all("usage" not in c for c in chunks)


async def test_v1_completions_stream_usage_on_every_chunk(client: Any) -> None:
    body = {"model": "llama3.2:1b", "prompt": "abcd", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    _, _, text = await post_text(client, "/v1/completions", body)
    events = [data for _, data in sse(text)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(d) for d in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["Hello", " from", ""]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert all(c["usage"] == zero for c in chunks[:3])
    assert chunks[3]["choices"] == []
    assert chunks[3]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    _, _, text = await post_text(client, "/v1/completions", {**body, "stream": False})
    assert json.loads(text)["usage"]["completion_tokens"] == 2


async def test_v1_models(client: Any) -> None:
    async with client.get("/v1/models") as resp:
        listing = await resp.json()
    assert listing["object"] == "list"
    assert listing["data"][0] == {"id": "llama3.2:1b", "object": "model",
                                  "created": listing["data"][0]["created"], "owned_by": "library"}
    async with client.get("/v1/models/LLAMA3.2:1b") as resp:
        assert (await resp.json())["id"] == "LLAMA3.2:1b"
    async with client.get("/v1/models/nope") as resp:
        assert resp.status == 404
    async with client.get("/v1/models/library/llama3.2:1b") as resp:  # gin :param has no "/"
        assert resp.status == 404 and await resp.text() == "404 page not found"


async def test_v1_responses(client: Any) -> None:
    body = {"model": "llama3.2:1b", "input": "abcdefgh", "max_output_tokens": 3}
    _, _, text = await post_text(client, "/v1/responses", body)
    reply = json.loads(text)
    assert reply["object"] == "response" and reply["status"] == "completed"
    assert reply["output"][0]["content"][0]["text"] == completion_text(3)
    assert reply["usage"]["input_tokens"] == 2 and reply["usage"]["output_tokens"] == 3
    _, ctype, text = await post_text(client, "/v1/responses", {**body, "stream": True})
    events = sse(text)
    assert ctype == "text/event-stream"
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert names.count("response.output_text.delta") == 3
    assert names[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    datas = [json.loads(d) for _, d in events]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert datas[-1]["response"]["usage"]["output_tokens"] == 3
    assert "[DONE]" not in text


async def test_v1_messages(client: Any) -> None:
    status, _, text = await post_text(client, "/v1/messages", MESSAGES)
    reply = json.loads(text)
    assert status == 200 and reply["type"] == "message"
    assert reply["content"] == [{"type": "text", "text": completion_text(5)}]
    assert reply["usage"] == {"input_tokens": 5, "output_tokens": 5}
    assert reply["stop_reason"] == "max_tokens"
    _, _, text = await post_text(client, "/v1/messages", {**MESSAGES, "stream": True})
    events = [(name, json.loads(data)) for name, data in sse(text)]
    names = [name for name, _ in events]
    assert names == (["message_start", "content_block_start"] + ["content_block_delta"] * 5
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert events[0][1]["message"]["usage"] == {"input_tokens": 6, "output_tokens": 0}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "Hello"}
    assert events[-2][1]["usage"] == {"input_tokens": 5, "output_tokens": 5}


@pytest.mark.parametrize("max_tokens", [None, 0, -1])
async def test_v1_messages_requires_max_tokens(client: Any, max_tokens: int | None) -> None:
    body = {k: v for k, v in MESSAGES.items() if k != "max_tokens"}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    status, _, text = await post_text(client, "/v1/messages", body)
    error = json.loads(text)
    assert status == 400 and error["type"] == "error"
    assert error["error"] == {"type": "invalid_request_error",
                              "message": "max_tokens is required and must be positive"}


# --- admin routes and routing ----------------------------------------------------------------

async def test_pull_streams_progress(client: Any) -> None:
    status, ctype, text = await post_text(client, "/api/pull", {"model": "llama3.2:3b"})
    frames = ndjson(text)
    assert (status, ctype) == (200, "application/x-ndjson")
    assert frames[0] == {"status": "pulling manifest"} and frames[-1] == {"status": "success"}
    assert any("completed" in f and "total" in f for f in frames)
    _, _, text = await post_text(client, "/api/pull", {"name": "x", "stream": False})
    assert json.loads(text) == {"status": "success"}


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/api/push", {"model": "u/x"}, 200),
    ("POST", "/api/create", {"model": "x", "from": "llama3.2:1b"}, 200),
    ("POST", "/api/copy", {"source": "llama3.2:1b", "destination": "x"}, 200),
    ("DELETE", "/api/delete", {"model": "llama3.2:1b"}, 200),
    ("HEAD", "/api/blobs/sha256:" + "a" * 64, None, 200),
    ("POST", "/api/blobs/sha256-" + "a" * 64, None, 201),
    ("HEAD", "/api/blobs/sha256:zz", None, 400),
    ("POST", "/api/me", {}, 200),
    ("POST", "/api/signout", None, 200),
    ("DELETE", "/api/user/keys/abc", None, 200),
    ("POST", "/api/experimental/web_search", {"query": "q"}, 200),
])
async def test_admin_routes_answer(client: Any, fake: FakeOllama, method: str, path: str,
                                   body: Any, status: int) -> None:
    async with client.request(method, path, json=body) as resp:
        assert resp.status == status
        await resp.read()
    assert fake.paths() == [path]


async def test_gin_style_routing_errors(client: Any) -> None:
    async with client.get("/api/nope") as resp:
        assert (resp.status, await resp.text()) == (404, "404 page not found")
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    async with client.post("/api/tags") as resp:
        assert (resp.status, await resp.text()) == (405, "405 method not allowed")
    async with client.post("/api/chat/?x=1", json=CHAT, allow_redirects=False) as resp:
        assert resp.status == 307 and resp.headers["Location"] == "/api/chat?x=1"
    async with client.get("/api/tags/", allow_redirects=False) as resp:
        assert resp.status == 301 and resp.headers["Location"] == "/api/tags"


async def test_percent_decoded_path_is_routed(client: Any, fake: FakeOllama) -> None:
    async with client.get("/api%2Ftags") as resp:   # gin routes the decoded path
        assert resp.status == 200
    async with client.get("/v1/models/library%2Fllama3.2:1b") as resp:  # so no "/" in :model
        assert resp.status == 404
    assert [(r.path, r.raw_path) for r in fake.requests] == [
        ("/api/tags", "/api%2Ftags"),
        ("/v1/models/library/llama3.2:1b", "/v1/models/library%2Fllama3.2:1b")]


# --- recording and the control API ---------------------------------------------------------

async def test_records_every_request(client: Any, fake: FakeOllama) -> None:
    raw = b'{"model":"llama3.2:1b","messages":[],"x":1}'
    headers = {"Authorization": "Bearer k", "Content-Type": "text/plain"}
    before = time.monotonic()
    async with client.post("/api/chat?q=1", data=raw, headers=headers) as resp:
        await resp.read()
    async with client.get("/nowhere", headers=[("X-Dup", "a"), ("X-Dup", "b")]) as resp:
        assert resp.status == 404
    async with client.get("/_fake/requests") as resp:
        assert resp.status == 200
    first, second = fake.requests
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path, first.raw_path) == ("POST", "/api/chat", "/api/chat?q=1")
    assert first.body == raw and first.json == json.loads(raw)
    assert first.headers["authorization"] == "Bearer k"
    assert first.headers["content-type"] == "text/plain"
    assert before <= first.at <= second.at
    assert second.headers["x-dup"] == "a, b"
    assert [v for k, v in second.raw_headers if k == "X-Dup"] == ["a", "b"]
    assert fake.paths() == ["/api/chat", "/nowhere"]


async def test_control_api(client: Any, fake: FakeOllama) -> None:
    await post_text(client, "/api/embed", {"model": "nomic-embed-text", "input": "hi"})
    async with client.get("/_fake/requests") as resp:
        (recorded,) = await resp.json()
    assert recorded["path"] == "/api/embed" and json.loads(recorded["body"])["input"] == "hi"
    assert recorded["headers"]["content-type"] == "application/json"
    async with client.delete("/_fake/requests") as resp:
        assert resp.status == 200
    assert fake.requests == []
    spec = {"kind": "status", "status": 503, "times": 1}
    async with client.post("/_fake/faults", json=spec) as resp:
        assert resp.status == 201
    async with client.get("/_fake/faults") as resp:
        assert [f["kind"] for f in await resp.json()] == ["status"]
    status, _, text = await post_text(client, "/api/chat", {**CHAT, "stream": False})
    assert status == 503 and "server busy" in json.loads(text)["error"]
    status, _, _ = await post_text(client, "/api/chat", {**CHAT, "stream": False})
    assert status == 200
    async with client.post("/_fake/faults", json={"kind": "nope"}) as resp:
        assert resp.status == 400
    async with client.post("/_fake/faults", json={"kind": "reset", "bogus": 1}) as resp:
        assert resp.status == 400
    async with client.post("/_fake/faults", json={"kind": "truncate"}) as resp:
        assert resp.status == 201
    async with client.delete("/_fake/faults") as resp:
        assert resp.status == 200
    async with client.get("/_fake/streams") as resp:
        assert await resp.json() == {"active_streams": 0, "disconnects": []}
    assert fake.paths() == ["/api/chat", "/api/chat"]


# --- faults -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, expected", [
    ("/api/chat", CHAT, {"error": "fake Ollama fault: HTTP 500"}),
    ("/v1/chat/completions", V1_CHAT, {"error": {
        "message": "fake Ollama fault: HTTP 500", "type": "api_error", "param": None,
        "code": None}}),
])
async def test_status_fault(client: Any, fake: FakeOllama, path: str, body: Any,
                            expected: Any) -> None:
    fake.add_fault(Fault("status"))
    status, _, text = await post_text(client, path, body)
    assert (status, json.loads(text)) == (500, expected)


async def test_status_fault_anthropic_envelope(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("status", status=529))
    status, _, text = await post_text(client, "/v1/messages", MESSAGES)
    assert status == 529 and json.loads(text)["error"]["type"] == "overloaded_error"


async def test_redirect_fault(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("redirect"))
    async with client.post("/api/generate", json=CHAT, allow_redirects=False) as resp:
        assert resp.status == 307 and resp.headers["Location"] == "/api/pull"


async def test_reset_fault_is_a_payload_error(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("reset", after_frames=2))
    lines = []
    async with client.post("/api/chat", json=CHAT) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                lines.append(line)
    assert len(lines) == 2 and all(json.loads(line)["done"] is False for line in lines)
    assert fake.disconnects == []


async def test_truncate_fault_ends_cleanly_without_final_frame(client: Any,
                                                               fake: FakeOllama) -> None:
    fake.add_fault(Fault("truncate", after_frames=3))
    _, _, text = await post_text(client, "/api/chat", CHAT)
    assert [f["done"] for f in ndjson(text)] == [False] * 3
    fake.clear_faults()
    fake.add_fault(Fault("truncate", after_frames=100, path="/v1/chat/completions"))
    _, _, text = await post_text(client, "/v1/chat/completions", {**V1_CHAT, "stream": True})
    chunks = [json.loads(d) for _, d in sse(text)]
    assert len(chunks) == 8 and all(c["choices"][0]["finish_reason"] is None for c in chunks)


TERMINAL = ('"done":true', '"finish_reason":"stop"', '"finish_reason":"length"', "[DONE]",
            "response.output_text.done", "response.completed", "content_block_stop",
            "message_delta", "message_stop", '"status":"success"')


@pytest.mark.parametrize("path, body", [
    ("/api/chat", CHAT),
    ("/api/generate", {"model": "llama3.2:1b", "prompt": "hi"}),
    ("/v1/chat/completions",
     {**V1_CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": "llama3.2:1b", "prompt": "hi", "stream": True}),
    ("/v1/responses", {"model": "llama3.2:1b", "input": "hi", "stream": True}),
    ("/v1/messages", {**MESSAGES, "stream": True}),
    ("/api/pull", {"model": "llama3.2:1b"}),
])
async def test_truncate_drops_every_terminal_frame(client: Any, fake: FakeOllama, path: str,
                                                   body: Any) -> None:
    fake.add_fault(Fault("truncate", after_frames=10_000, path=path))
    async with client.post(path, json=body) as resp:
        text = await resp.text()   # a clean end: no payload error
    assert resp.status == 200 and text
    assert not [marker for marker in TERMINAL if marker in text]
    fake.clear_faults()
    _, _, full = await post_text(client, path, body)
    assert [marker for marker in TERMINAL if marker in full]


async def test_reset_on_sse_route(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("reset", after_frames=3, path="/v1/messages"))
    async with client.post("/v1/messages", json={**MESSAGES, "stream": True}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_faults_on_non_streamed_replies(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("status", status=401, path="/api/tags", times=1))
    async with client.get("/api/tags") as resp:
        error = await resp.json()
    assert resp.status == 401 and error["error"] == "unauthorized" and "signin_url" in error
    fake.add_fault(Fault("oversized", after_frames=0, size=5000, times=1))
    _, _, text = await post_text(client, "/api/chat", {**CHAT, "stream": False})
    padding, reply = text.split("\n")
    assert len(padding) == 5000 and json.loads(reply)["done"] is True
    fake.add_fault(Fault("slow", delay_s=0.05, times=1))
    start = time.monotonic()
    status, _, text = await post_text(client, "/api/embed", {"model": "nomic-embed-text",
                                                             "input": "x"})
    assert status == 200 and time.monotonic() - start >= 0.05
    assert fake.active_streams == 0 and fake.active_faults() == []


@pytest.mark.parametrize("path, body", [
    ("/api/chat", CHAT),
    ("/v1/chat/completions", {**V1_CHAT, "stream": True}),
    ("/v1/messages", {**MESSAGES, "stream": True}),
])
async def test_garbage_fault(client: Any, fake: FakeOllama, path: str, body: Any) -> None:
    fake.add_fault(Fault("garbage", after_frames=1))
    _, _, text = await post_text(client, path, body)
    assert "this is not json" in text
    clean = text.replace("this is not json\n", "").replace("data: this is not json\n\n", "")
    if path == "/api/chat":
        assert text.splitlines()[1] == "this is not json"
        assert len(ndjson(clean)) == 9
    else:
        assert sse(text)[1] == (None, "this is not json")
        assert len(sse(clean)) == len(sse(text)) - 1


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"model": "llama3.2:1b", "prompt": "hi"}),
    ("/v1/responses", {"model": "llama3.2:1b", "input": "hi", "stream": True}),
])
async def test_oversized_fault(client: Any, fake: FakeOllama, path: str, body: Any) -> None:
    fake.add_fault(Fault("oversized", after_frames=2, size=100_000))
    async with client.post(path, json=body) as resp:
        raw = await resp.read()
    lines = raw.split(b"\n")
    big = max(lines, key=len)
    assert len(big) == 100_000 and lines.index(big) >= 2
    payload = big[len(b"data: "):] if big.startswith(b"data: ") else big
    assert isinstance(json.loads(payload), dict)


async def test_slow_fault_and_pace_delay_frames(aiohttp_client: Any) -> None:
    fake = FakeOllama(tokens=3, pace={"QWEN2.5:0.5b": 0.03})
    client = await aiohttp_client(fake.app)
    fake.add_fault(Fault("slow", delay_s=0.03, model="llama3.2:1b", times=1))
    for model in ("llama3.2:1b", "qwen2.5:0.5b"):
        start = time.monotonic()
        _, _, text = await post_text(client, "/api/chat", {**CHAT, "model": model})
        assert len(ndjson(text)) == 4
        assert time.monotonic() - start >= 0.09   # 3 delays at least (a lower bound only)


async def test_fault_filters_and_times(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("status", status=418, model="LIBRARY/QWEN2.5:0.5b", times=2))
    fake.add_fault(Fault("status", status=502, path="/api/tags", times=1))
    assert (await post_text(client, "/api/chat", {**CHAT, "stream": False}))[0] == 200
    assert (await post_text(client, "/api/chat", {**V1_CHAT, "stream": False}))[0] == 418
    assert (await post_text(client, "/v1/chat/completions", V1_CHAT))[0] == 418
    assert (await post_text(client, "/api/chat", {**V1_CHAT, "stream": False}))[0] == 200
    async with client.get("/api/version") as resp:  # not an inference path, not named
        assert resp.status == 200
    for expected in (502, 200):
        async with client.get("/api/tags") as resp:
            assert resp.status == expected


async def test_hang_fault_until_client_leaves(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("hang", after_frames=1))
    async with client.post("/api/chat", json=CHAT) as resp:
        assert json.loads(await resp.content.readline())["done"] is False
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 0.2)
        assert fake.active_streams == 1
        resp.close()
    at = await fake.wait_disconnect(5)
    assert fake.disconnects == [at] and fake.active_streams == 0


async def test_hang_before_headers_until_client_leaves(client: Any, fake: FakeOllama) -> None:
    fake.add_fault(Fault("hang_before_headers"))
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/messages", json=MESSAGES,
                          timeout=aiohttp.ClientTimeout(sock_read=0.2))
    await fake.wait_disconnect(5)
    assert fake.active_streams == 0 and fake.paths() == ["/v1/messages"]


# --- disconnects ------------------------------------------------------------------------------

async def test_client_closing_mid_stream_is_noticed(aiohttp_client: Any) -> None:
    fake = FakeOllama(tokens=1000, pace={"llama3.2:1b": 0.05})
    client = await aiohttp_client(fake.app)
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert (await resp.content.readline()).startswith(b"data: ")
        assert fake.active_streams == 1
        resp.close()
    at = await fake.wait_disconnect(5)
    assert at <= time.monotonic() and fake.active_streams == 0
    with pytest.raises(asyncio.TimeoutError):
        await fake.wait_disconnect(0.05)


# --- entry points -----------------------------------------------------------------------------

async def test_start_fake_serves_over_tcp() -> None:
    fake, runner, url = await start_fake(tokens=2)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/api/chat", json=CHAT) as resp:
                assert len(ndjson(await resp.text())) == 3
    finally:
        await runner.cleanup()
    assert fake.paths() == ["/api/chat"]


@pytest.mark.slow
async def test_module_entry_point_runs_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neuraldrive_gw.devtools.fake_ollama", "--port", "0",
        "--pace", "llama3.2:1b=1", "--tokens", "3", env=env, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/api/chat", json=CHAT) as resp:
                assert ndjson(await resp.text())[-1]["eval_count"] == 3
            async with session.get(url + "/_fake/requests") as resp:
                assert [r["path"] for r in await resp.json()] == ["/api/chat"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_app_is_a_plain_application() -> None:
    assert isinstance(FakeOllama().app, web.Application)
