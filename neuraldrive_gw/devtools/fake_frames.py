"""Reply bodies and stream frames of the fake Ollama, one builder per API dialect.

Pure functions, no I/O. Every reply is a sequence of frames, `(bytes, final)`: one NDJSON
line or one SSE event per frame, written (and so flushed) separately by the server. `final`
marks the terminal frames (the `done:true` line, the finish/usage chunks and `[DONE]`, the
`*.done`/`response.completed` events, `content_block_stop`/`message_delta`/`message_stop`);
the `truncate` fault stops before the first of them. Frame shapes were read from Ollama's
`server/routes.go`, `api/types.go`, `middleware/openai.go`, `openai/openai.go`,
`openai/responses.go` and `anthropic/anthropic.go` (NOTES-ollama-api §2, §4).
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

Frame = tuple[bytes, bool]

JSON_UTF8 = "application/json; charset=utf-8"   # gin's c.JSON (native routes)
JSON = "application/json"                       # the /v1 and /v1/messages writers
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"
GARBAGE = "this is not json"

_WORDS = ("Hello", " from", " the", " fake", " Ollama", " server", ".", " It", " streams",
          " one", " token", " per", " frame", ".")


def token(i: int) -> str:
    """The i-th completion token the fake "generates" (deterministic)."""
    return _WORDS[i % len(_WORDS)]


def completion_text(n: int) -> str:
    """The whole completion of n tokens, as a non-streamed reply carries it."""
    return "".join(token(i) for i in range(n))


def prompt_token_count(text: str) -> int:
    """The fake tokenizer: max(1, len(text) // 4)."""
    return max(1, len(text) // 4)


def dumps(obj: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON like Go's encoding/json (UTF-8 kept, no spaces)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


@dataclass
class Reply:
    """What a handler answers; the server writes it, applying pace and faults."""

    frames: Iterable[Frame]
    status: int = 200
    content_type: str = JSON_UTF8
    streaming: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    garbage: bytes = (GARBAGE + "\n").encode()
    # an in-band error frame carrying the given message (the `error` fault)
    error: Callable[[str], bytes] = field(
        default_factory=lambda: lambda m: (dumps({"error": m}) + "\n").encode())
    # builds a valid frame whose longest line is exactly n bytes (the `oversized` fault)
    oversized: Callable[[int], bytes] = field(default_factory=lambda: _padding_line)


def _fit(template: Callable[[str], str], n: int) -> str:
    """template(padding) with padding sized so the result is n characters (if possible)."""
    return template("x" * max(0, n - len(template(""))))


def _padding_line(n: int) -> bytes:
    return _fit(lambda p: dumps({"padding": p}), n).encode() + b"\n"


def json_reply(obj: Any, status: int = 200, *, content_type: str = JSON_UTF8,
               newline: bool = False) -> Reply:
    body = dumps(obj) + ("\n" if newline else "")
    return Reply([(body.encode(), True)], status=status, content_type=content_type)


def text_reply(text: str, status: int = 200, content_type: str = TEXT,
               headers: Mapping[str, str] | None = None) -> Reply:
    return Reply([(text.encode(), True)], status=status, content_type=content_type,
                 headers=headers or {})


def native_error(status: int, message: str, **extra: Any) -> Reply:
    return json_reply({"error": message, **extra}, status)


def openai_error(status: int, message: str) -> Reply:
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": etype, "param": None, "code": None}}
    return json_reply(body, status, content_type=JSON, newline=True)


def anthropic_error(status: int, message: str) -> Reply:
    etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
             529: "overloaded_error"}.get(status, "api_error")
    body = {"type": "error", "error": {"type": etype, "message": message},
            "request_id": "req_" + secrets.token_hex(12)}
    return json_reply(body, status, content_type=JSON, newline=True)


@dataclass(frozen=True)
class Gen:
    """One fake generation: the echoed model name and the token counts."""

    model: str
    n: int                 # completion tokens (eval_count)
    prompt: int            # prompt tokens (prompt_eval_count)
    capped: bool           # the request's output cap cut the completion short

    @property
    def done_reason(self) -> str:
        return "length" if self.capped else "stop"

    def metrics(self) -> dict[str, int]:
        load, prompt_ns, eval_ns = 1_000_000, self.prompt * 100_000, self.n * 1_000_000
        return {"total_duration": load + prompt_ns + eval_ns, "load_duration": load,
                "prompt_eval_count": self.prompt, "prompt_eval_duration": prompt_ns,
                "eval_count": self.n, "eval_duration": eval_ns}


# --- native /api/chat and /api/generate -------------------------------------------------

def _ndjson(objs: Iterable[tuple[dict[str, Any], bool]]) -> Iterator[Frame]:
    for obj, final in objs:
        yield (dumps(obj) + "\n").encode(), final


def native_chat(gen: Gen, stream: bool) -> Reply:
    def frame(content: str) -> dict[str, Any]:
        return {"model": gen.model, "created_at": now_rfc3339(),
                "message": {"role": "assistant", "content": content}, "done": False}

    def final(content: str) -> dict[str, Any]:
        return {**frame(content), "done": True, "done_reason": gen.done_reason, **gen.metrics()}

    if not stream:
        return json_reply(final(completion_text(gen.n)))

    def frames() -> Iterator[tuple[dict[str, Any], bool]]:
        for i in range(gen.n):
            yield frame(token(i)), False
        yield final(""), True

    return Reply(_ndjson(frames()), content_type=NDJSON, streaming=True,
                 oversized=lambda n: _fit(lambda p: dumps(frame(p)), n).encode() + b"\n")


def native_generate(gen: Gen, stream: bool, with_context: bool) -> Reply:
    def frame(text: str) -> dict[str, Any]:
        return {"model": gen.model, "created_at": now_rfc3339(), "response": text, "done": False}

    def final(text: str) -> dict[str, Any]:
        obj = {**frame(text), "done": True, "done_reason": gen.done_reason}
        if with_context:
            obj["context"] = list(range(1, gen.prompt + gen.n + 1))
        return {**obj, **gen.metrics()}

    if not stream:
        return json_reply(final(completion_text(gen.n)))

    def frames() -> Iterator[tuple[dict[str, Any], bool]]:
        for i in range(gen.n):
            yield frame(token(i)), False
        yield final(""), True

    return Reply(_ndjson(frames()), content_type=NDJSON, streaming=True,
                 oversized=lambda n: _fit(lambda p: dumps(frame(p)), n).encode() + b"\n")


def native_load(model: str, *, generate: bool, unload: bool) -> Reply:
    """The single object answering an empty prompt / empty messages (even when streaming)."""
    obj: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    obj.update({"response": ""} if generate else {"message": {"role": "assistant", "content": ""}})
    obj.update(done=True, done_reason="unload" if unload else "load")
    return json_reply(obj)


def progress(steps: Iterable[dict[str, Any]], stream: bool) -> Reply:
    """Pull/push/create progress: NDJSON by default, else the last status as one object."""
    items = list(steps)
    if not stream:
        return json_reply(items[-1])
    marked = [(obj, i == len(items) - 1) for i, obj in enumerate(items)]
    return Reply(_ndjson(marked), content_type=NDJSON, streaming=True,
                 oversized=lambda n: _fit(lambda p: dumps({"status": p}), n).encode() + b"\n")


# --- SSE dialects ---------------------------------------------------------------------------

def _data(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def _event(name: str, obj: Any, *, sort_keys: bool = False) -> bytes:
    return f"event: {name}\ndata: {dumps(obj, sort_keys=sort_keys)}\n\n".encode()


def _sse_reply(frames: Iterator[Frame], pad: Callable[[str], str], *, event: str | None = None,
               headers: Mapping[str, str] | None = None) -> Reply:
    prefix = f"event: {event}\n" if event else ""
    return Reply(frames, content_type=SSE, streaming=True, headers=headers or {},
                 garbage=f"data: {GARBAGE}\n\n".encode(),
                 error=lambda m: _event("error", {"type": "error",
                                                  "error": {"type": "api_error", "message": m}}),
                 oversized=lambda n: (prefix + _fit(pad, n) + "\n\n").encode())


def openai_chat(gen: Gen, stream: bool, include_usage: bool) -> Reply:
    cid, created = f"chatcmpl-{random.randrange(999)}", int(time.time())
    usage = {"prompt_tokens": gen.prompt, "completion_tokens": gen.n,
             "total_tokens": gen.prompt + gen.n}
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": gen.model,
            "system_fingerprint": "fp_ollama"}
    if not stream:
        body = {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": completion_text(gen.n)},
             "finish_reason": gen.done_reason}], "usage": usage}
        return json_reply(body, content_type=JSON, newline=True)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def frames() -> Iterator[Frame]:
        for i in range(gen.n):
            delta = {"role": "assistant", "content": token(i)} if i == 0 else {"content": token(i)}
            yield _data(chunk(delta)), False
        if gen.n == 0:  # ChatWriter still opens with a role chunk
            yield _data(chunk({"role": "assistant", "content": ""})), False
        yield _data(chunk({}, gen.done_reason)), True
        if include_usage:
            yield _data({**head, "choices": [], "usage": usage}), True
        yield b"data: [DONE]\n\n", True

    return _sse_reply(frames(), lambda p: "data: " + dumps(chunk({"content": p})))


def openai_completion(gen: Gen, stream: bool, include_usage: bool) -> Reply:
    cid, created = f"cmpl-{random.randrange(999)}", int(time.time())
    usage = {"prompt_tokens": gen.prompt, "completion_tokens": gen.n,
             "total_tokens": gen.prompt + gen.n}

    def chunk(text: str, finish: str | None, choices: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created,
            "choices": [{"text": text, "index": 0, "finish_reason": finish}] if choices else [],
            "model": gen.model, "system_fingerprint": "fp_ollama"}
        if include_usage:  # Ollama puts a zero usage on every chunk (OpenAI sends null)
            obj["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return obj

    if not stream:
        body = {**chunk(completion_text(gen.n), gen.done_reason), "usage": usage}
        return json_reply(body, content_type=JSON, newline=True)

    def frames() -> Iterator[Frame]:
        for i in range(gen.n):
            yield _data(chunk(token(i), None)), False
        yield _data(chunk("", gen.done_reason)), True
        if include_usage:
            yield _data({**chunk("", None, choices=False), "usage": usage}), True
        yield b"data: [DONE]\n\n", True

    return _sse_reply(frames(), lambda p: "data: " + dumps(chunk(p, None)))


def responses(gen: Gen, stream: bool, request: Mapping[str, Any]) -> Reply:
    """/v1/responses: ToResponse (non-stream) or ResponsesStreamConverter's events."""
    rid, item = f"resp_{random.randrange(999999)}", f"msg_{random.randrange(999999)}"
    usage = {"input_tokens": gen.prompt, "output_tokens": gen.n,
             "total_tokens": gen.prompt + gen.n, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    text = completion_text(gen.n)

    def part(t: str) -> dict[str, Any]:
        return {"type": "output_text", "text": t, "annotations": [], "logprobs": []}

    done_item = {"id": item, "type": "message", "status": "completed", "role": "assistant",
                 "content": [part(text)]}
    instructions = request.get("instructions") or None
    temperature, top_p = request.get("temperature"), request.get("top_p")

    def response(status: str, output: list[Any], use: Any, completed: int | None) -> dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": int(time.time()),
                "completed_at": completed, "status": status, "incomplete_details": None,
                "model": gen.model, "previous_response_id": None, "instructions": instructions,
                "output": output, "error": None, "tools": request.get("tools") or [],
                "tool_choice": "auto", "truncation": request.get("truncation") or "disabled",
                "parallel_tool_calls": True, "text": {"format": {"type": "text"}},
                "top_p": 1.0 if top_p is None else top_p, "presence_penalty": 0,
                "frequency_penalty": 0, "top_logprobs": 0,
                "temperature": 1.0 if temperature is None else temperature, "reasoning": None,
                "usage": use, "max_output_tokens": request.get("max_output_tokens"),
                "max_tool_calls": None, "store": False,
                "background": bool(request.get("background")), "service_tier": "default",
                "metadata": {}, "safety_identifier": None, "prompt_cache_key": None}

    if not stream:
        return json_reply(response("completed", [done_item], usage, int(time.time())),
                          content_type=JSON, newline=True)
    seq = iter(range(1 << 62))

    def event(name: str, data: dict[str, Any]) -> bytes:
        # Go marshals these as maps, so keys come out sorted
        return _event(name, {**data, "type": name, "sequence_number": next(seq)}, sort_keys=True)

    where = {"item_id": item, "output_index": 0, "content_index": 0}

    def frames() -> Iterator[Frame]:
        for name in ("response.created", "response.in_progress"):
            yield event(name, {"response": response("in_progress", [], None, None)}), False
        if gen.n:
            yield event("response.output_item.added", {"output_index": 0, "item": {
                "id": item, "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}}), False
            yield event("response.content_part.added", {**where, "part": part("")}), False
        for i in range(gen.n):
            yield event("response.output_text.delta",
                        {**where, "delta": token(i), "logprobs": []}), False
        if gen.n:
            yield event("response.output_text.done", {**where, "text": text, "logprobs": []}), True
            yield event("response.content_part.done", {**where, "part": part(text)}), True
            yield event("response.output_item.done", {"output_index": 0, "item": done_item}), True
        output = [done_item] if gen.n else []
        yield event("response.completed", {
            "response": response("completed", output, usage, int(time.time()))}), True

    pad_event = {**where, "delta": "", "logprobs": [], "type": "response.output_text.delta",
                 "sequence_number": 0}
    return _sse_reply(frames(),
                      lambda p: "data: " + dumps({**pad_event, "delta": p}, sort_keys=True),
                      event="response.output_text.delta", headers={"Cache-Control": "no-cache"})


def anthropic_messages(gen: Gen, stream: bool, estimated_input: int) -> Reply:
    """/v1/messages: ToMessagesResponse (non-stream) or StreamConverter's events."""
    mid = "msg_" + secrets.token_hex(12)
    stop_reason = {"stop": "end_turn", "length": "max_tokens"}[gen.done_reason]
    if not stream:
        body = {"id": mid, "type": "message", "role": "assistant", "model": gen.model,
                "content": [{"type": "text", "text": completion_text(gen.n)}] if gen.n else [],
                "stop_reason": stop_reason,
                "usage": {"input_tokens": gen.prompt, "output_tokens": gen.n}}
        return json_reply(body, content_type=JSON, newline=True)

    def delta(text: str) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}

    def frames() -> Iterator[Frame]:
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": gen.model, "content": [],
            "usage": {"input_tokens": estimated_input, "output_tokens": 0}}}), False
        if gen.n:
            yield _event("content_block_start", {
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}), False
        for i in range(gen.n):
            yield _event("content_block_delta", delta(token(i))), False
        if gen.n:
            yield _event("content_block_stop", {"type": "content_block_stop", "index": 0}), True
        yield _event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason},
            "usage": {"input_tokens": gen.prompt, "output_tokens": gen.n}}), True
        yield _event("message_stop", {"type": "message_stop"}), True

    return _sse_reply(frames(), lambda p: "data: " + dumps(delta(p)), event="content_block_delta",
                      headers={"Cache-Control": "no-cache"})
