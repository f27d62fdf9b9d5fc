"""Every route through the official clients, as users call them (ollama, openai, anthropic).

Errors must arrive as each client's own exception types, with the status the client maps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import ALLOWED_MODEL, EMBED_MODEL, OTHER_MODEL, Gateway

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MESSAGES = [{"role": "user", "content": "Say hello"}]


_open: list[Any] = []


@pytest.fixture(autouse=True)
async def close_clients(gw: Gateway) -> AsyncIterator[None]:
    """Every client a test makes is closed afterwards, before the servers stop (depending
    on `gw` orders this teardown first; unclosed sockets would fail the suite)."""
    yield
    while _open:
        client = _open.pop()
        if isinstance(client, ollama.AsyncClient):
            await client._client.aclose()
        else:
            await client.close()


def ollama_client(gw: Gateway, key: str | None = None) -> "ollama.AsyncClient":
    _open.append(ollama.AsyncClient(host=gw.url, headers=gw.auth(key)))
    return _open[-1]


def openai_client(gw: Gateway, key: str | None = None) -> "openai.AsyncOpenAI":
    _open.append(openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key or gw.keys.acme,
                                    max_retries=0))
    return _open[-1]


def anthropic_client(gw: Gateway, key: str | None = None) -> "anthropic.AsyncAnthropic":
    _open.append(anthropic.AsyncAnthropic(base_url=gw.url, api_key=key or gw.keys.acme,
                                          max_retries=0))
    return _open[-1]


# -- ollama ------------------------------------------------------------------------------


async def test_ollama_chat(gw: Gateway) -> None:
    reply = await ollama_client(gw).chat(model=ALLOWED_MODEL, messages=MESSAGES)
    assert reply.message.content
    assert reply.done and reply.eval_count and reply.eval_count > 0


async def test_ollama_chat_stream(gw: Gateway) -> None:
    parts = [part async for part in await ollama_client(gw).chat(
        model=ALLOWED_MODEL, messages=MESSAGES, stream=True)]
    assert len(parts) > 2 and parts[-1].done and not parts[0].done
    assert "".join(p.message.content for p in parts)


async def test_ollama_generate_both_ways(gw: Gateway) -> None:
    client = ollama_client(gw)
    reply = await client.generate(model=ALLOWED_MODEL, prompt="Why is the sky blue?")
    assert reply.response and reply.done
    parts = [p async for p in await client.generate(model=ALLOWED_MODEL, prompt="x", stream=True)]
    assert parts[-1].done and parts[-1].prompt_eval_count


async def test_ollama_embed_list_show(gw: Gateway) -> None:
    client = ollama_client(gw)
    embedded = await client.embed(model=EMBED_MODEL, input=["a", "b"])
    assert len(embedded.embeddings) == 2
    listed = await client.list()
    assert sorted(m.model for m in listed.models) == sorted([ALLOWED_MODEL, EMBED_MODEL])
    shown = await client.show(ALLOWED_MODEL)
    assert shown.details is not None


async def test_ollama_errors_are_response_errors(gw: Gateway) -> None:
    with pytest.raises(ollama.ResponseError) as denied:
        await ollama_client(gw).chat(model=OTHER_MODEL, messages=MESSAGES)
    assert denied.value.status_code == 403
    assert "not available" in denied.value.error
    with pytest.raises(ollama.ResponseError) as unauthorised:
        await ollama_client(gw, key="nd-" + "x" * 32).list()
    assert unauthorised.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as blocked:
        await ollama_client(gw).pull(ALLOWED_MODEL)
    assert blocked.value.status_code == 403


async def test_ollama_master_key_sees_every_local_model(gw: Gateway) -> None:
    listed = await ollama_client(gw, key=gw.keys.master).list()
    names = sorted(m.model for m in listed.models)
    assert names == sorted([ALLOWED_MODEL, OTHER_MODEL, EMBED_MODEL])   # no cloud stub


# -- openai ------------------------------------------------------------------------------


async def test_openai_chat_both_ways(gw: Gateway) -> None:
    client = openai_client(gw)
    reply = await client.chat.completions.create(model=ALLOWED_MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens
    stream = await client.chat.completions.create(model=ALLOWED_MODEL, messages=MESSAGES,
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asked Ollama for usage; the client did not, so it must not see it.
    assert all(chunk.usage is None for chunk in chunks)


async def test_openai_stream_usage_when_asked(gw: Gateway) -> None:
    stream = await openai_client(gw).chat.completions.create(
        model=ALLOWED_MODEL, messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.total_tokens > 0


async def test_openai_completions_both_ways(gw: Gateway) -> None:
    client = openai_client(gw)
    reply = await client.completions.create(model=ALLOWED_MODEL, prompt="Once upon")
    assert reply.choices[0].text
    chunks = [c async for c in await client.completions.create(
        model=ALLOWED_MODEL, prompt="Once upon", stream=True)]
    assert chunks and all(getattr(c, "usage", None) is None for c in chunks)


async def test_openai_embeddings_and_models(gw: Gateway) -> None:
    client = openai_client(gw)
    embedded = await client.embeddings.create(model=EMBED_MODEL, input="hello")
    assert embedded.data[0].embedding
    models = [m.id async for m in client.models.list()]
    assert sorted(models) == sorted([ALLOWED_MODEL, EMBED_MODEL])
    model = await client.models.retrieve(ALLOWED_MODEL)
    assert model.id


async def test_openai_responses_both_ways(gw: Gateway) -> None:
    client = openai_client(gw)
    reply = await client.responses.create(model=ALLOWED_MODEL, input="Say hi")
    assert reply.output_text and reply.usage and reply.usage.output_tokens > 0
    events = [e async for e in await client.responses.create(
        model=ALLOWED_MODEL, input="Say hi", stream=True)]
    assert events[-1].type == "response.completed"


async def test_openai_errors_are_its_own_types(gw: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await openai_client(gw).chat.completions.create(model=OTHER_MODEL, messages=MESSAGES)
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.AuthenticationError):
        await openai_client(gw, key="nd-" + "x" * 32).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        await openai_client(gw).models.retrieve(OTHER_MODEL)
    with pytest.raises(openai.BadRequestError):
        await openai_client(gw).chat.completions.create(model=ALLOWED_MODEL, messages=MESSAGES,
                                                        extra_body={"MODEL": OTHER_MODEL})


# -- anthropic ---------------------------------------------------------------------------


async def test_anthropic_messages_both_ways(gw: Gateway) -> None:
    client = anthropic_client(gw)
    reply = await client.messages.create(model=ALLOWED_MODEL, max_tokens=32, messages=MESSAGES)
    assert reply.content[0].text and reply.usage.output_tokens > 0
    async with client.messages.stream(model=ALLOWED_MODEL, max_tokens=32,
                                      messages=MESSAGES) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text and final.usage.output_tokens > 0


async def test_anthropic_errors_are_its_own_types(gw: Gateway) -> None:
    with pytest.raises(anthropic.PermissionDeniedError):
        await anthropic_client(gw).messages.create(model=OTHER_MODEL, max_tokens=8,
                                                   messages=MESSAGES)
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic_client(gw, key="nd-" + "x" * 32).messages.create(
            model=ALLOWED_MODEL, max_tokens=8, messages=MESSAGES)
