"""The prompt log (SPEC §10; promptlog.py, capture.py): opt-in, redaction, retention."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import ALLOWED_MODEL, Gateway, GatewayFactory, cli_runner, run_cli
from neuraldrive_gw import keys as keyfmt
from neuraldrive_gw.app import create_app
from neuraldrive_gw.capture import TextCapture
from neuraldrive_gw.cli.keys import keys
from neuraldrive_gw.cli.prompts import prompts
from neuraldrive_gw.promptlog import HookError, load_hook, redact_builtin

SECRET_KEY = "nd-" + "S3cr3t" * 5 + "xy"


def test_builtin_redaction_hides_keys_and_addresses() -> None:
    text = f"use {SECRET_KEY} and mail ops.team+gw@example.co.uk, not nd-short"
    assert redact_builtin(text) == "use nd-[redacted] and mail [email], not nd-short"


@pytest.mark.parametrize("spec, message", [
    ("redaction_hooks", "not module:function"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("redaction_hooks:missing", "is not a callable"),
    ("redaction_hooks:not_callable", "is not a callable"),
])
def test_a_hook_that_cannot_be_loaded_is_refused(spec: str, message: str) -> None:
    with pytest.raises(HookError, match=message):
        load_hook(spec)


@pytest.mark.parametrize("route, frames, text", [
    ("api_chat", [{"message": {"content": "Hel"}}, {"message": {"content": "lo"}},
                  {"done": True}], "Hello"),
    ("api_generate", [{"response": "Hi"}, {"response": " there"}], "Hi there"),
    ("v1_chat", [{"choices": [{"delta": {"content": "a"}}]},
                 {"choices": [{"delta": {"content": "b"}}]}], "ab"),
    ("v1_completions", [{"choices": [{"text": "xy"}]}], "xy"),
    ("v1_responses", [{"type": "response.output_text.delta", "delta": "r1"},
                      {"type": "response.completed", "response": {}}], "r1"),
    ("v1_messages", [{"type": "content_block_delta",
                      "delta": {"type": "text_delta", "text": "m"}},
                     {"type": "message_delta", "usage": {}}], "m"),
])
@pytest.mark.parametrize("sse", [False, True])
def test_capture_reconstructs_streamed_text_in_any_chunking(
        route: str, frames: list[dict[str, Any]], text: str, sse: bool) -> None:
    wire = b"".join((b"data: " if sse else b"") + json.dumps(f).encode() + b"\n" +
                    (b"\n" if sse else b"") for f in frames)
    for size in (1, 7, len(wire)):
        capture = TextCapture(route, 1000)
        for i in range(0, len(wire), size):
            capture.feed(wire[i:i + size])
        assert capture.text == text


@pytest.mark.parametrize("route, body, text", [
    ("v1_chat", {"choices": [{"message": {"content": "whole"}}]}, "whole"),
    ("v1_responses", {"output": [{"content": [{"type": "output_text", "text": "o"}]}]}, "o"),
    ("v1_messages", {"content": [{"type": "text", "text": "t"}]}, "t"),
    ("api_embed", {"embeddings": [[0.1]]}, ""),
])
def test_capture_of_buffered_answers(route: str, body: dict[str, Any], text: str) -> None:
    capture = TextCapture(route, 100)
    capture.body(json.dumps(body).encode())
    assert capture.text == text


def test_capture_is_cut_at_max_chars() -> None:
    capture = TextCapture("api_generate", 5)
    capture.feed(b'{"response": "abc"}\n{"response": "defg"}\n{"response": "h"}\n')
    assert (capture.text, capture.truncated) == ("abcde", True)


# -- through the gateway ------------------------------------------------------------------------


def rows(gw: Gateway) -> list[sqlite3.Row]:
    conn = sqlite3.connect(gw.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM prompt_log ORDER BY id").fetchall()
    finally:
        conn.close()


async def opt_in(gw: Gateway, key: str) -> str:
    key_id = keyfmt.key_id(key) or ""
    await run_cli(gw, keys, "set-limits", key_id, "--log-prompts")
    return key_id


async def flushed(gw: Gateway) -> None:
    assert gw.pipeline.prompts is not None
    await gw.pipeline.prompts.flush()


async def test_only_opted_in_keys_are_logged(gw: Gateway, http: aiohttp.ClientSession) -> None:
    body = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "first"}]}
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
        await r.read()
    await flushed(gw)
    assert rows(gw) == []
    key_id = await opt_in(gw, gw.keys.acme)
    body["messages"][0]["content"] = f"the key is {SECRET_KEY}, mail me at a@b.example"
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
        received = "".join(json.loads(line)["message"]["content"]
                           for line in (await r.read()).splitlines() if line.strip())
        request_id = r.headers["X-Request-ID"]
    await flushed(gw)
    [row] = rows(gw)
    assert (row["request_id"], row["key_id"], row["tenant"], row["route"], row["model"],
            row["status"]) == (request_id, key_id, "acme", "/api/chat", ALLOWED_MODEL, 200)
    assert row["response_text"] == received and received
    assert "nd-[redacted]" in row["request_text"] and "[email]" in row["request_text"]
    assert SECRET_KEY not in row["request_text"] and "a@b.example" not in row["request_text"]
    assert row["expires_at"] == pytest.approx(row["at"] + 7 * 86400)
    # The operator reads it with the CLI; the key itself never appears anywhere.
    shown = cli_runner().invoke(prompts, ["tail", "--db", gw.db_path, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)[0]["request_id"] == request_id
    assert SECRET_KEY not in shown.stdout


async def test_openai_and_anthropic_answers_are_reconstructed(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    openai = pytest.importorskip("openai")
    await opt_in(gw, gw.keys.acme)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.keys.acme)
    completion = await client.chat.completions.create(
        model=ALLOWED_MODEL, messages=[{"role": "user", "content": "hello"}])
    await client.close()
    body = {"model": ALLOWED_MODEL, "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "hey"}]}
    async with http.post(gw.url + "/v1/messages", json=body,
                         headers={"x-api-key": gw.keys.acme}) as r:
        sse = (await r.read()).decode()
    streamed = "".join(json.loads(line[5:])["delta"]["text"] for line in sse.splitlines()
                       if line.startswith("data:") and '"text_delta"' in line)
    await flushed(gw)
    chat, messages = rows(gw)
    assert chat["response_text"] == completion.choices[0].message.content
    assert messages["response_text"] == streamed and streamed


async def test_a_configured_hook_is_applied_and_a_failing_one_stores_nothing(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(prompt_logging__redact_hook="redaction_hooks:hide_secret_words")
    await opt_in(gw, gw.keys.acme)
    body = {"model": ALLOWED_MODEL, "stream": False,
            "messages": [{"role": "user", "content": "the password is swordfish"}]}
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
        assert r.status == 200
    await flushed(gw)
    [row] = rows(gw)
    assert "the password is [secret]" in row["request_text"]
    assert gw.pipeline.prompts is not None
    gw.pipeline.prompts._hook = load_hook("redaction_hooks:explode")
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
        assert r.status == 200                     # the request itself is unaffected
    await flushed(gw)
    assert len(rows(gw)) == 1 and gw.pipeline.prompts.redaction_failures == 1


async def test_a_hook_that_cannot_be_imported_stops_the_start(gw: Gateway) -> None:
    config = gw.pipeline.config
    bad = dataclasses.replace(config, prompt_logging=dataclasses.replace(
        config.prompt_logging, redact_hook="no_such_module_xyz:f"))
    runner = web.AppRunner(create_app(bad))
    with pytest.raises(HookError):
        await runner.setup()
    await runner.cleanup()


async def test_expired_entries_are_purged_in_batches(gw: Gateway,
                                                     http: aiohttp.ClientSession) -> None:
    await opt_in(gw, gw.keys.acme)
    body = {"model": ALLOWED_MODEL, "stream": False,
            "messages": [{"role": "user", "content": "x"}]}
    for _ in range(5):
        async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
            await r.read()
    await flushed(gw)
    log = gw.pipeline.prompts
    assert log is not None and len(rows(gw)) == 5
    log._purge_batch = 2
    assert await log.purge(gw.clock.time()) == 0           # nothing has expired yet
    assert await log.purge(gw.clock.time() + 7 * 86400 + 1) == 5      # 2 + 2 + 1
    assert rows(gw) == []


async def test_logging_never_delays_or_fails_requests_when_its_queue_is_full(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(prompt_logging__max_queued=2)
    await opt_in(gw, gw.keys.acme)
    body = {"model": ALLOWED_MODEL, "stream": False,
            "messages": [{"role": "user", "content": "x"}]}
    statuses = await asyncio.gather(*(http.post(gw.url + "/api/chat", json=body,
                                                headers=gw.auth()) for _ in range(4)))
    assert [r.status for r in statuses] == [200] * 4
    for r in statuses:
        r.release()
    await flushed(gw)
    assert gw.pipeline.prompts is not None
    assert len(rows(gw)) + gw.pipeline.prompts.dropped == 4


async def test_a_key_across_the_length_cut_is_still_redacted(
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(prompt_logging__max_chars=200)
    await opt_in(gw, gw.keys.acme)
    # The stored request is the forwarded JSON: make the key start 10 characters before
    # the 200-character cut.
    prefix = f'{{"model":"{ALLOWED_MODEL}","stream":false,"messages":[{{"role":"user",' \
             '"content":"'
    filler = "x" * (190 - len(prefix) - 1)
    body = {"model": ALLOWED_MODEL, "stream": False,
            "messages": [{"role": "user", "content": f"{filler} {SECRET_KEY} tail"}]}
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
        assert r.status == 200
    await flushed(gw)
    [row] = rows(gw)
    assert row["request_text"].startswith(prefix + filler + " nd-[redacted]"[:10])
    assert len(row["request_text"]) == 200 and row["truncated"] == 1
    assert SECRET_KEY[3:10] not in row["request_text"]


def test_check_config_refuses_a_hook_that_cannot_be_loaded(tmp_path: Any) -> None:
    from neuraldrive_gw.cli.serve import check_config
    config = tmp_path / "gw.yaml"
    config.write_text("prompt_logging:\n  redact_hook: no_such_module_xyz:f\n")
    result = cli_runner().invoke(check_config, ["--config", str(config)])
    assert result.exit_code == 2 and "cannot import no_such_module_xyz" in result.stderr
