"""Forwarding and streaming (SPEC §3 step 10, §6 shaping, §7): what Ollama sees, what the client gets."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import aiohttp
import pytest

from conftest import ALLOWED_MODEL, Gateway
from neuraldrive_gw.devtools.fake_ollama import Fault

MESSAGES = [{"role": "user", "content": "hello"}]


def last(gw: Gateway, path: str) -> dict:
    matching = [r for r in gw.fake.requests if r.path == path]
    assert matching, f"nothing reached {path}"
    return matching[-1]


async def post(http: aiohttp.ClientSession, gw: Gateway, path: str, body: dict,
               key: str | None = None) -> aiohttp.ClientResponse:
    return await http.post(gw.url + path, json=body, headers=gw.auth(key))


# -- what Ollama sees ----------------------------------------------------------------------


async def test_upstream_request_is_rebuilt_from_scratch(gw: Gateway, http: aiohttp.ClientSession) -> None:
    headers = {**gw.auth(), "Cookie": "session=1", "Origin": "http://evil.example",
               "X-Forwarded-For": "10.9.9.9", "X-Real-IP": "10.9.9.9", "Host": "evil.example"}
    async with http.post(gw.url + "/api/chat", json={"model": ALLOWED_MODEL, "messages": MESSAGES,
                                                      "stream": False}, headers=headers) as r:
        assert r.status == 200
    seen = last(gw, "/api/chat")
    names = {name.lower() for name in seen.headers}
    assert not names & {"authorization", "cookie", "origin", "x-forwarded-for", "x-real-ip"}
    host = {k.lower(): v for k, v in seen.headers.items()}["host"]
    assert host == gw.fake_host


async def test_options_are_clamped_injected_and_stripped(make_gateway, http) -> None:
    gw = await make_gateway(limits__num_predict_cap=100, limits__max_num_ctx=2048,
                            limits__max_keep_alive_s=60)
    body = {"model": ALLOWED_MODEL, "messages": MESSAGES, "keep_alive": -1, "shift": True,
            "_debug_render_only": True,
            "options": {"num_predict": 10 ** 6, "num_ctx": 10 ** 6, "num_gpu": 99, "main_gpu": 1,
                        "num_thread": 64, "num_batch": 4096, "use_mmap": False, "temperature": 0.5}}
    async with await post(http, gw, "/api/chat", body) as r:
        assert r.status == 200
        await r.read()
    forwarded = last(gw, "/api/chat").json
    assert forwarded["options"] == {"num_predict": 100, "num_ctx": 2048, "temperature": 0.5}
    assert forwarded["keep_alive"] == 60
    assert forwarded["stream"] is True          # the native default, made explicit
    assert "shift" not in forwarded and "_debug_render_only" not in forwarded


@pytest.mark.parametrize("path,field,extra", [
    ("/api/generate", None, {"prompt": "x"}),
    ("/v1/chat/completions", "max_tokens", {"messages": MESSAGES}),
    ("/v1/completions", "max_tokens", {"prompt": "x"}),
    ("/v1/responses", "max_output_tokens", {"input": "x"}),
    ("/v1/messages", "max_tokens", {"messages": MESSAGES}),
])
async def test_output_cap_injected_when_absent(gw: Gateway, http, path, field, extra) -> None:
    async with await post(http, gw, path, {"model": ALLOWED_MODEL, "stream": False, **extra}) as r:
        assert r.status == 200, await r.text()
    forwarded = last(gw, path).json
    value = forwarded["options"]["num_predict"] if field is None else forwarded[field]
    assert value == 4096


async def test_max_completion_tokens_becomes_max_tokens(gw: Gateway, http) -> None:
    async with await post(http, gw, "/v1/chat/completions",
                          {"model": ALLOWED_MODEL, "messages": MESSAGES,
                           "max_completion_tokens": 7}) as r:
        assert r.status == 200
        usage = (await r.json())["usage"]
    forwarded = last(gw, "/v1/chat/completions").json
    assert forwarded["max_tokens"] == 7 and "max_completion_tokens" not in forwarded
    assert usage["completion_tokens"] <= 7


async def test_include_usage_is_requested_upstream_and_hidden(gw: Gateway, http) -> None:
    async with await post(http, gw, "/v1/chat/completions",
                          {"model": ALLOWED_MODEL, "messages": MESSAGES, "stream": True}) as r:
        text = (await r.read()).decode()
    assert last(gw, "/v1/chat/completions").json["stream_options"] == {"include_usage": True}
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in e for e in events)


# -- streaming ----------------------------------------------------------------------------


async def test_stream_frames_arrive_before_the_upstream_finishes(gw: Gateway, http) -> None:
    """The upstream hangs after 3 frames: they must already be with the client (no buffering)."""
    gw.fake.add_fault(Fault("hang", after_frames=3, path="/api/chat"))
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES}) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [await asyncio.wait_for(r.content.readline(), 10) for _ in range(3)]
    assert [json.loads(line)["done"] for line in lines] == [False, False, False]
    await gw.fake.wait_disconnect(timeout=10)      # and leaving stopped the upstream stream


async def test_client_disconnect_closes_upstream_within_a_second(gw: Gateway, http) -> None:
    gw.fake.add_fault(Fault("hang", after_frames=2, path="/api/chat"))
    r = await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES})
    await asyncio.wait_for(r.content.readline(), 10)
    waiter = asyncio.ensure_future(gw.fake.wait_disconnect(timeout=10))
    hung_up = time.monotonic()
    r.close()
    noticed = await waiter
    assert noticed - hung_up < 1.0
    # Audited as the client's doing, not as an upstream failure (aiohttp ≥3.10's write
    # error is also a ClientError, which once made it look like one).
    assert gw.pipeline.audit is not None
    while not gw.pipeline.requests_by_status:     # until the handler has finished
        await asyncio.sleep(0.01)
    await gw.pipeline.audit.flush()
    conn = sqlite3.connect(gw.db_path)
    try:
        row = conn.execute("SELECT status, outcome, metering FROM audit ORDER BY id DESC "
                           "LIMIT 1").fetchone()
    finally:
        conn.close()
    assert row == (499, "client disconnected", "estimated")


async def test_client_disconnect_while_waiting_for_headers(gw: Gateway, http) -> None:
    """A model load sends nothing for minutes; a client leaving then must still stop Ollama."""
    gw.fake.add_fault(Fault("hang_before_headers", path="/api/chat"))
    task = asyncio.ensure_future(post(http, gw, "/api/chat",
                                      {"model": ALLOWED_MODEL, "messages": MESSAGES}))
    while gw.fake.active_streams == 0 and not any(r.path == "/api/chat" for r in gw.fake.requests):
        await asyncio.sleep(0.01)     # wait until the request reached the fake (bounded by the test timeout)
    waiter = asyncio.ensure_future(gw.fake.wait_disconnect(timeout=10))
    hung_up = time.monotonic()
    task.cancel()
    noticed = await waiter
    assert noticed - hung_up < 1.0


@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_broken_native_stream_ends_with_error_line(gw: Gateway, http, kind: str) -> None:
    gw.fake.add_fault(Fault(kind, after_frames=3, path="/api/chat"))
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES}) as r:
        assert r.status == 200
        lines = (await r.read()).splitlines()
    frames = [json.loads(line) for line in lines]
    assert not any(f.get("done") for f in frames)
    assert "error" in frames[-1] and "request id" in frames[-1]["error"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/responses", {"input": "x"}),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 32}),
])
async def test_broken_sse_stream_ends_with_error_event(gw: Gateway, http, path, body) -> None:
    gw.fake.add_fault(Fault("reset", after_frames=2, path=path))
    async with await post(http, gw, path, {"model": ALLOWED_MODEL, "stream": True, **body}) as r:
        text = (await r.read()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert "data: [DONE]" not in events
    data = json.loads(events[-1].split("data: ", 1)[1])
    assert "error" in data


async def test_long_lines_pass_the_relay(gw: Gateway, http) -> None:
    gw.fake.add_fault(Fault("oversized", after_frames=1, size=2 << 20, path="/api/chat"))
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES}) as r:
        lines = (await r.read()).splitlines()
    assert max(len(line) for line in lines) >= 2 << 20
    assert json.loads(lines[-1])["done"] is True


# -- upstream failures ---------------------------------------------------------------------


async def test_upstream_error_text_is_replaced(gw: Gateway, http) -> None:
    gw.fake.add_fault(Fault("status", status=500, path="/api/chat"))
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES}) as r:
        assert r.status == 502
        body = await r.json()
    assert body["error"].startswith("the model server returned an error")


async def test_upstream_redirect_is_not_followed(gw: Gateway, http) -> None:
    gw.fake.add_fault(Fault("redirect", path="/api/chat"))
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES}) as r:
        assert r.status == 502
    assert "/api/pull" not in gw.fake.paths()


async def test_discovery_failure_fails_closed_after_ttl(gw: Gateway, http) -> None:
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES,
                                                  "stream": False}) as r:
        assert r.status == 200
    gw.fake.add_fault(Fault("status", status=500, path="/api/tags"))
    gw.clock.advance(121)           # past discovery_ttl_s with no successful refresh
    async with await post(http, gw, "/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES,
                                                  "stream": False}) as r:
        assert r.status == 403
    async with http.get(gw.url + "/healthz") as r:
        assert r.status == 503 and (await r.json())["status"] == "degraded"


async def test_running_models_listing_is_filtered(gw: Gateway, http) -> None:
    for key, model in ((gw.keys.acme, ALLOWED_MODEL), (gw.keys.master, "qwen2.5:0.5b")):
        async with await post(http, gw, "/api/generate", {"model": model, "prompt": "x",
                                                          "stream": False}, key) as r:
            assert r.status == 200
    async with http.get(gw.url + "/api/ps", headers=gw.auth()) as r:
        assert r.status == 200
        names = [m["name"] for m in (await r.json())["models"]]
    async with http.get(gw.url + "/api/ps", headers=gw.auth(gw.keys.master)) as r:
        everything = [m["name"] for m in (await r.json())["models"]]
    assert names == [ALLOWED_MODEL]
    assert sorted(everything) == sorted([ALLOWED_MODEL, "qwen2.5:0.5b"])


SECRET = "llama runner process has terminated: /usr/share/ollama/.ollama/models/blobs/sha256-x"


@pytest.mark.parametrize("path,body", [
    ("/api/chat", {"messages": MESSAGES}),
    ("/api/generate", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
    ("/v1/responses", {"input": "x", "stream": True}),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 32, "stream": True}),
])
async def test_in_band_upstream_error_text_never_reaches_the_client(gw: Gateway, http, path,
                                                                     body) -> None:
    gw.fake.add_fault(Fault("error", after_frames=2, path=path, message=SECRET))
    async with await post(http, gw, path, {"model": ALLOWED_MODEL, **body}) as r:
        assert r.status == 200
        text = (await r.read()).decode()
    assert "runner" not in text and "/usr/share" not in text
    assert "the model server reported an error" in text
    frames = text.split("\n\n") if "data:" in text else text.splitlines()
    assert sum("the model server" in f for f in frames) == 1     # one error frame, not two


async def test_a_client_leaving_while_its_body_is_read_is_a_499_not_an_error(
        gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    host, port = gw.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.keys.acme}"
                 "\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\""
                 .encode())
    await writer.drain()
    while gw.pipeline.auth.verifier.verifications == 0:      # the body is being awaited
        await asyncio.sleep(0.01)
    writer.close()
    while 499 not in gw.pipeline.requests_by_status:
        await asyncio.sleep(0.01)
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()
    conn = sqlite3.connect(gw.db_path)
    try:
        row = conn.execute("SELECT status, outcome FROM audit").fetchone()
    finally:
        conn.close()
    assert row == (499, "client disconnected")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
