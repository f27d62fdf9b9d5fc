"""Stream meters and body usage, fed realistic Ollama streams chunked every possible way.

Frame shapes follow Ollama's `api/types.go`, `middleware/openai.go`, `openai/openai.go`,
`openai/responses.go` and `anthropic/anthropic.go` (NOTES-ollama-api §2). Every stream is
fed split at every byte boundary and in 1-, 2- and 7-byte chunks: what reaches the client,
the usage and `complete` must not depend on how the network cut it. The error frames are
then read back with the real client libraries (skipped where they are not installed).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from neuraldrive_gw.framing import EventSplitter, LineSplitter, Oversized
from neuraldrive_gw.metering import (MessagesMeter, NdjsonMeter, OpenAIChunkMeter,
                                     ResponsesMeter, StreamMeter, StreamProtocolError, Usage,
                                     meter_for, usage_from_body)


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def ndjson(*objs: Any) -> bytes:
    return b"".join(go_json(o) + b"\n" for o in objs)


def sse(*events: tuple[str | None, Any]) -> bytes:
    """`event:`/`data:` events as Ollama's writers format them."""
    out = b""
    for name, data in events:
        if name is not None:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else go_json(data)) + b"\n\n"
    return out


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


# --- native NDJSON (api/types.go ChatResponse, GenerateResponse, Metrics) --------------------

T = "2026-08-21T10:00:00.123456789Z"
METRICS = {"total_duration": 5_000_000, "load_duration": 1_000_000, "prompt_eval_count": 26,
           "prompt_eval_duration": 2_000_000, "eval_count": 298, "eval_duration": 3_000_000}


def chat_frame(content: str) -> dict[str, Any]:
    return {"model": "llama3.2:1b", "created_at": T,
            "message": {"role": "assistant", "content": content}, "done": False}


def chat_final(**metrics: int) -> dict[str, Any]:
    return {**chat_frame(""), "done": True, "done_reason": "stop", **metrics}


def gen_frame(text: str) -> dict[str, Any]:
    return {"model": "llama3.2:1b", "created_at": T, "response": text, "done": False}


def gen_final(context: list[int], **metrics: int) -> dict[str, Any]:
    return {**gen_frame(""), "done": True, "done_reason": "stop", "context": context, **metrics}


CHAT = ndjson(chat_frame("Hel"), chat_frame("lo"), chat_frame(" é✓"), chat_final(**METRICS))
NO_PROMPT = {k: v for k, v in METRICS.items() if not k.startswith("prompt_eval")}
LOAD = go_json({"model": "llama3.2:1b", "created_at": T,
                "message": {"role": "assistant", "content": ""},
                "done_reason": "load", "done": True}) + b"\n"
GARBAGE = (b"this is not json\n"
           b'{"done": true, oops}\n'
           b"[1, 2, 3]\n"
           b'"done" true\n'
           b"\xff\xfe\x00 binary\n"
           b"\n"
           + go_json(chat_frame('"done": true')) + b"\n"
           + go_json({**chat_frame(""), "message": {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "f",
                                                   "arguments": {"done": True}}}]}}) + b"\n")
INBAND_ERROR = go_json({"error": "an error was encountered while running the model: CUDA error"})

# --- /v1/chat/completions and /v1/completions (middleware/openai.go, openai/openai.go) -------


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-412", "object": "chat.completion.chunk", "created": 1787000000,
            "model": "llama3.2:1b", "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


V1_USAGE = {"prompt_tokens": 26, "completion_tokens": 298, "total_tokens": 324}
USAGE_CHUNK = {**chat_chunk({}, "stop"), "choices": [], "usage": V1_USAGE}
CHAT_CHUNKS = [(None, chat_chunk({"role": "assistant", "content": "Hel"})),
               (None, chat_chunk({"role": "assistant", "content": "lo é✓ <b>"})),
               (None, chat_chunk({"role": "assistant", "content": ""}, "stop"))]
DONE = (None, b"[DONE]")
V1_CHAT = sse(*CHAT_CHUNKS, (None, USAGE_CHUNK), DONE)
V1_CHAT_STRIPPED = sse(*CHAT_CHUNKS, DONE)
V1_CHAT_NO_USAGE = V1_CHAT_STRIPPED


def cmpl_chunk(text: str, finish: str | None = None, usage: dict[str, int] | None = None
               ) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": "cmpl-77", "object": "text_completion", "created": 1787000000,
                             "choices": [{"text": text, "index": 0, "finish_reason": finish}],
                             "model": "llama3.2:1b", "system_fingerprint": "fp_ollama"}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
CMPL_TEXTS = [("Once", None), (" upon", None), (" a time <&>", None), ("", "stop")]
V1_CMPL = sse(*((None, cmpl_chunk(t, f, ZERO)) for t, f in CMPL_TEXTS),
              (None, {**cmpl_chunk("", "stop", V1_USAGE), "choices": []}), DONE)
V1_CMPL_STRIPPED = sse(*((None, cmpl_chunk(t, f)) for t, f in CMPL_TEXTS), DONE)
# Not Go's formatting: the member is removed by re-serialising the event.
SPACED = b'data: {"choices": [{"text": "\\u00e9<"}], "usage": {"prompt_tokens": 0}, "x": 1}\n\n'
SPACED_STRIPPED = b'data: {"choices":[{"text":"\xc3\xa9<"}],"x":1}\n\n'

# --- /v1/responses (openai/responses.go: Go maps marshal with sorted keys) -------------------


def response_obj(status: str, usage: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {"background": None, "created_at": 1787000000, "error": None, "id": "resp_1",
            "model": "llama3.2:1b", "object": "response", "output": [], "status": status,
            "usage": usage, **extra}


def resp_event(name: str, seq: int, **data: Any) -> tuple[str, dict[str, Any]]:
    return name, {**data, "sequence_number": seq, "type": name}


R_USAGE = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
           "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0},
           "total_tokens": 30}
RESP_HEAD = [resp_event("response.created", 0, response=response_obj("in_progress", None)),
             resp_event("response.in_progress", 1, response=response_obj("in_progress", None)),
             resp_event("response.output_item.added", 2, item={"id": "msg_1", "type": "message"},
                        output_index=0),
             resp_event("response.output_text.delta", 3, delta="Hi", item_id="msg_1",
                        output_index=0, content_index=0),
             resp_event("response.output_text.delta", 4, delta=" there", item_id="msg_1",
                        output_index=0, content_index=0),
             resp_event("response.output_text.done", 5, text="Hi there", item_id="msg_1")]
RESPONSES = sse(*RESP_HEAD, resp_event("response.completed", 6,
                                       response=response_obj("completed", R_USAGE)))
RESPONSES_FAILED = sse(*RESP_HEAD, resp_event(
    "response.failed", 6, response=response_obj("failed", None,
                                                error={"code": "server_error",
                                                       "message": "web search failed"})))
RESPONSES_INCOMPLETE = sse(*RESP_HEAD, resp_event(
    "response.incomplete", 6, response=response_obj("incomplete", R_USAGE)))
RESPONSES_ERROR = sse(*RESP_HEAD[:3], ("error", {"type": "error", "code": "server_error",
                                                 "message": "model crashed", "param": None,
                                                 "sequence_number": 3}))

# --- /v1/messages (anthropic/anthropic.go) ----------------------------------------------------


def msg_start(input_tokens: int) -> tuple[str, dict[str, Any]]:
    return "message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "llama3.2:1b",
        "content": [], "usage": {"input_tokens": input_tokens, "output_tokens": 0}}}


MSG_BODY = [("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hi"}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": " there é"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0})]
MSG_STOP = ("message_stop", {"type": "message_stop"})


def msg_delta(usage: dict[str, int]) -> tuple[str, dict[str, Any]]:
    return "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                             "usage": usage}


MESSAGES = sse(msg_start(12), *MSG_BODY, msg_delta({"input_tokens": 15, "output_tokens": 7}),
               MSG_STOP)
MESSAGES_NO_INPUT = sse(msg_start(12), *MSG_BODY, msg_delta({"output_tokens": 7}), MSG_STOP)
MESSAGES_ERROR = sse(msg_start(12), *MSG_BODY[:3], ("error", {
    "type": "error", "error": {"type": "overloaded_error", "message": "runner died"}}))


# --- the harness ------------------------------------------------------------------------------

def chunkings(data: bytes, sizes: tuple[int, ...] = (1, 2, 7)) -> Iterator[list[bytes]]:
    """Whole, in fixed-size chunks, and split in two at every byte boundary."""
    yield [data]
    for size in sizes:
        yield [data[i:i + size] for i in range(0, len(data), size)]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def relay(meter: StreamMeter, chunks: list[bytes]) -> bytes:
    return b"".join(meter.feed(chunk) for chunk in chunks) + meter.finish()


@dataclass(frozen=True)
class Case:
    id: str
    route: str
    stream: bytes
    complete: bool
    usage: Usage | None
    strip: bool = False
    out: bytes | None = None            # what the client gets; None: the stream unchanged
    error: str | None = None            # a substring of upstream_error


CASES = [
    Case("chat", "api_chat", CHAT, True, Usage(26, 298)),
    Case("chat-crlf", "api_chat", crlf(CHAT), True, Usage(26, 298)),
    Case("chat-cached-prompt", "api_chat", ndjson(chat_frame("a"), chat_final(**NO_PROMPT)),
         True, Usage(0, 298)),
    Case("chat-no-counts", "api_chat", ndjson(chat_frame("a"), chat_final()), True, Usage(0, 0)),
    Case("chat-load", "api_chat", LOAD, True, Usage(0, 0)),
    Case("chat-garbage", "api_chat", ndjson(chat_frame("a")) + GARBAGE
         + ndjson(chat_final(**METRICS)), True, Usage(26, 298)),
    Case("chat-inband-error", "api_chat", ndjson(chat_frame("a")) + INBAND_ERROR + b"\n",
         False, None, error="CUDA error"),
    Case("chat-truncated", "api_chat", CHAT[:-40], False, None),
    Case("chat-last-line-unterminated", "api_chat", CHAT[:-1], True, Usage(26, 298)),
    Case("generate", "api_generate",
         ndjson(gen_frame("Hi"), gen_frame("!"), gen_final(list(range(1, 40)), **METRICS)),
         True, Usage(26, 298)),
    Case("v1-chat-usage-kept", "v1_chat", V1_CHAT, True, Usage(26, 298)),
    Case("v1-chat-no-usage", "v1_chat", V1_CHAT_NO_USAGE, True, None),
    Case("v1-chat-strip", "v1_chat", V1_CHAT, True, Usage(26, 298), strip=True,
         out=V1_CHAT_STRIPPED),
    Case("v1-chat-strip-crlf", "v1_chat", crlf(V1_CHAT), True, Usage(26, 298), strip=True,
         out=crlf(V1_CHAT_STRIPPED)),
    Case("v1-chat-strip-truncated", "v1_chat", V1_CHAT[:-14], False, Usage(26, 298),
         strip=True, out=V1_CHAT_STRIPPED[:-14]),
    Case("v1-chat-error-data", "v1_chat",
         sse(CHAT_CHUNKS[0], (None, {"error": {"message": "upstream boom", "type": "api_error",
                                               "param": None, "code": None}})),
         False, None, error="upstream boom"),
    Case("v1-chat-comments", "v1_chat", b": keep-alive\n\n" + V1_CHAT, True, Usage(26, 298),
         strip=True, out=b": keep-alive\n\n" + V1_CHAT_STRIPPED),
    Case("v1-cmpl-usage-kept", "v1_completions", V1_CMPL, True, Usage(26, 298)),
    Case("v1-cmpl-strip", "v1_completions", V1_CMPL, True, Usage(26, 298), strip=True,
         out=V1_CMPL_STRIPPED),
    Case("v1-cmpl-strip-crlf", "v1_completions", crlf(V1_CMPL), True, Usage(26, 298),
         strip=True, out=crlf(V1_CMPL_STRIPPED)),
    Case("v1-cmpl-strip-reserialised", "v1_completions", SPACED + sse(DONE), True, None,
         strip=True, out=SPACED_STRIPPED + sse(DONE)),
    # Cut before the real usage chunk: the per-chunk zeros are no final count.
    Case("v1-cmpl-truncated", "v1_completions", V1_CMPL[:V1_CMPL.index(b'"choices":[]') - 40],
         False, None),
    Case("responses", "v1_responses", RESPONSES, True, Usage(10, 20)),
    Case("responses-crlf", "v1_responses", crlf(RESPONSES), True, Usage(10, 20)),
    Case("responses-truncated", "v1_responses", sse(*RESP_HEAD), False, None),
    Case("responses-failed", "v1_responses", RESPONSES_FAILED, True, None,
         error="web search failed"),
    Case("responses-incomplete", "v1_responses", RESPONSES_INCOMPLETE, True, Usage(10, 20)),
    Case("responses-error-event", "v1_responses", RESPONSES_ERROR, False, None,
         error="model crashed"),
    Case("messages", "v1_messages", MESSAGES, True, Usage(15, 7)),
    Case("messages-crlf", "v1_messages", crlf(MESSAGES), True, Usage(15, 7)),
    Case("messages-delta-without-input", "v1_messages", MESSAGES_NO_INPUT, True, Usage(12, 7)),
    Case("messages-truncated", "v1_messages", sse(msg_start(12), *MSG_BODY), False, Usage(12, 0)),
    Case("messages-error-event", "v1_messages", MESSAGES_ERROR, False, Usage(12, 0),
         error="runner died"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_stream_metering_independent_of_chunking(case: Case) -> None:
    expected = case.stream if case.out is None else case.out
    for chunks in chunkings(case.stream):
        meter = meter_for(case.route, strip_usage=case.strip)
        assert relay(meter, chunks) == expected, [len(c) for c in chunks]
        assert meter.complete is case.complete, [len(c) for c in chunks]
        assert meter.usage == case.usage, [len(c) for c in chunks]
        if case.error is None:
            assert meter.upstream_error is None
        else:
            assert meter.upstream_error is not None and case.error in meter.upstream_error


@pytest.mark.parametrize("case", [c for c in CASES if not c.strip], ids=lambda c: c.id)
def test_pass_through_returns_each_chunk_unchanged(case: Case) -> None:
    meter = meter_for(case.route, strip_usage=False)
    for i in range(0, len(case.stream), 5):
        chunk = case.stream[i:i + 5]
        assert meter.feed(chunk) is chunk
    assert meter.finish() == b""


def test_filtering_holds_back_only_the_incomplete_event() -> None:
    meter = meter_for("v1_chat", strip_usage=True)
    first = sse(CHAT_CHUNKS[0])
    assert meter.feed(first + b"data: {") == first
    assert meter.feed(b'"x":1}\n') == b""
    assert meter.feed(b"\n") == b'data: {"x":1}\n\n'


# --- long lines and events --------------------------------------------------------------------

def big_chunkings(data: bytes, cuts: list[int]) -> Iterator[list[bytes]]:
    yield [data]
    for size in (4096, 65537, 1 << 20):
        yield [data[i:i + size] for i in range(0, len(data), size)]
    for cut in cuts:
        for i in range(max(1, cut - 3), min(len(data), cut + 4)):
            yield [data[:i], data[i:]]


def test_two_mib_content_line_passes_and_is_not_parsed() -> None:
    big = go_json(chat_frame("x" * (2 << 20))) + b"\n"
    stream = ndjson(chat_frame("a")) + big + ndjson(chat_final(**METRICS))
    start = stream.index(big)
    for chunks in big_chunkings(stream, [start, start + len(big)]):
        meter = NdjsonMeter()
        assert relay(meter, chunks) == stream
        assert meter.complete and meter.usage == Usage(26, 298)


def test_oversized_final_frame_is_read_from_its_head_and_tail() -> None:
    # /api/generate's final frame carries `context`: > 1 MiB for a ~150k-token context.
    final = go_json(gen_final(list(range(100_000, 400_000)), **METRICS)) + b"\n"
    assert len(final) > 2 << 20
    stream = ndjson(gen_frame("Hi")) + final
    for chunks in big_chunkings(stream, [len(stream) - 100, len(stream) - 1]):
        meter = NdjsonMeter()
        assert relay(meter, chunks) == stream
        assert meter.complete and meter.usage == Usage(26, 298)
    # Cut before its end, it is no final frame.
    meter = NdjsonMeter()
    assert relay(meter, [stream[:-50]]) == stream[:-50]
    assert not meter.complete and meter.usage is None


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_small_line_limit(size: int) -> None:
    final = go_json(gen_final(list(range(500)), **METRICS)) + b"\n"
    stream = ndjson(gen_frame("x" * 3000)) + final + b'{"error":"late"}\n'
    meter = NdjsonMeter(max_line=256)
    chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
    assert relay(meter, chunks) == stream
    assert meter.complete and meter.usage == Usage(26, 298) and meter.upstream_error == "late"


def test_oversized_sse_event_passes_through_but_cannot_be_filtered() -> None:
    big = sse((None, chat_chunk({"content": "y" * 5000})))
    stream = sse(CHAT_CHUNKS[0]) + big + V1_CHAT
    meter = OpenAIChunkMeter(max_event=1024)
    assert relay(meter, [stream[i:i + 100] for i in range(0, len(stream), 100)]) == stream
    assert meter.complete and meter.usage == Usage(26, 298)

    meter = OpenAIChunkMeter(strip_usage=True, max_event=1024)
    sent = meter.feed(stream[:len(sse(CHAT_CHUNKS[0])) + 700])
    assert sent == sse(CHAT_CHUNKS[0])
    with pytest.raises(StreamProtocolError):
        meter.feed(stream[len(sent) + 700:len(sent) + 1400])
    assert isinstance(StreamProtocolError(), ValueError)     # the proxy catches ValueError


def test_oversized_responses_terminal_event_still_ends_the_stream() -> None:
    output = [{"type": "message", "content": [{"type": "output_text", "text": "z" * 5000}]}]
    stream = sse(*RESP_HEAD, resp_event("response.completed", 6,
                                        response=response_obj("completed", R_USAGE,
                                                               output=output)))
    meter = ResponsesMeter(max_event=1024)
    assert relay(meter, [stream[i:i + 64] for i in range(0, len(stream), 64)]) == stream
    assert meter.complete and meter.usage is None       # counts beyond the limit: estimated


@pytest.mark.parametrize("splitter", [LineSplitter(16, keep_head=4, keep_tail=4),
                                      EventSplitter(16, keep_head=4)], ids=["lines", "events"])
def test_splitter_memory_is_bounded(splitter: LineSplitter | EventSplitter) -> None:
    for _ in range(1000):
        assert splitter.feed(b"a" * 1000) == []
        assert len(splitter.partial()) <= 16
    records = splitter.feed(b"\n\nnext")
    assert isinstance(records[0], Oversized) and records[0].head == b"aaaa"
    assert splitter.rest() == b"next"


def test_splitters_match_a_reference_split() -> None:
    """Random streams of line-end soup, randomly chunked, against a regex split."""
    rnd = random.Random(7)
    pieces = [b"a", b"\n", b"\r", b"\r\n", b"\n\n", b"data: x", b"\r\n\r\n", b"\n\r\n"]
    blank_line = re.compile(rb"\n\r?\n")
    for _ in range(3000):
        stream = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40)))
        limit = rnd.choice([4, 8, 1000])
        events = EventSplitter(limit, keep_head=3)
        lines = LineSplitter(limit, keep_head=3, keep_tail=3)
        got_events: list[object] = []
        got_lines: list[object] = []
        i = 0
        while i < len(stream):
            n = rnd.randint(1, 6)
            got_events += events.feed(stream[i:i + n])
            got_lines += lines.feed(stream[i:i + n])
            i += n
        want_events, pos = [], 0
        while m := blank_line.search(stream, pos):
            content = stream[pos:m.start() + 1]
            event = stream[pos:m.end()]
            want_events.append(Oversized(event[:3], b"") if len(content) > limit else event)
            pos = m.end()
        assert got_events == want_events, stream
        rest = stream[pos:]
        assert events.rest() == ((Oversized(rest[:3], b"") if len(rest) > limit + 2 else rest)
                                 if rest else None), stream
        *want_lines, rest = stream.split(b"\n")
        assert got_lines == [Oversized(x[:3], x[-3:]) if len(x) > limit else x
                             for x in want_lines], stream
        assert lines.rest() == ((Oversized(rest[:3], rest[-3:]) if len(rest) > limit else rest)
                                if rest else None), stream


# --- error frames -------------------------------------------------------------------------------

M = "the model server stopped before the answer was complete (request id: r-1)"
OPENAI_ERR = {"error": {"message": M, "type": "api_error", "param": None,
                        "code": "upstream_error"}}
RESPONSES_ERR = {"type": "error", "code": "upstream_error", "message": M, "param": None,
                 **OPENAI_ERR}
ANTHROPIC_ERR = {"type": "error", "error": {"type": "api_error", "message": M}}


def openai_frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def named_frame(obj: Any) -> bytes:
    return b"event: error\ndata: " + json.dumps(obj).encode() + b"\n\n"


NDJSON_FRAME = json.dumps({"error": M}).encode() + b"\n"
FRAME_CASES = [
    # route, strip, bytes fed, expected error frame
    ("api_chat", False, b"", NDJSON_FRAME),
    ("api_chat", False, ndjson(chat_frame("a")), NDJSON_FRAME),
    ("api_chat", False, ndjson(chat_frame("a")) + b'{"mod', b"\n" + NDJSON_FRAME),
    ("api_generate", False, b'{"model":"x","response":"a\\r', b"\n" + NDJSON_FRAME),
    ("v1_chat", False, b"", openai_frame(OPENAI_ERR)),
    ("v1_chat", False, sse(CHAT_CHUNKS[0]), openai_frame(OPENAI_ERR)),
    ("v1_chat", False, b'data: {"id":"chat', b"\n\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, sse(CHAT_CHUNKS[0])[:-1], b"\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, crlf(sse(CHAT_CHUNKS[0]))[:-1], b"\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, crlf(sse(CHAT_CHUNKS[0]))[:-2], b"\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, crlf(sse(CHAT_CHUNKS[0]))[:-3], b"\n\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", True, b'data: {"id":"chat', openai_frame(OPENAI_ERR)),    # held back
    ("v1_completions", False, b"data: [DO", b"\n\n" + openai_frame(OPENAI_ERR)),
    ("v1_responses", False, b"", named_frame(RESPONSES_ERR)),
    ("v1_responses", False, sse(RESP_HEAD[0]), named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b"event: response.output_te", b"\n" + named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b"event: response.output_text.delta\n", named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b'event: x\ndata: {"a"', b"\n\n" + named_frame(RESPONSES_ERR)),
    ("v1_messages", False, sse(msg_start(1)), named_frame(ANTHROPIC_ERR)),
    ("v1_messages", False, b"event: content_block_delta\ndata: {}",
     b"\n\n" + named_frame(ANTHROPIC_ERR)),
    ("v1_messages", False, b"event: ping", b"\n" + named_frame(ANTHROPIC_ERR)),
]


@pytest.mark.parametrize("route,strip,fed,frame", FRAME_CASES)
def test_error_frame_bytes(route: str, strip: bool, fed: bytes, frame: bytes) -> None:
    meter = meter_for(route, strip_usage=strip)
    meter.feed(fed)
    assert meter.error_frame(M) == frame


def test_error_frame_after_filtered_flush_at_eof() -> None:
    meter = meter_for("v1_chat", strip_usage=True)
    assert meter.feed(b"event: x\ndata: {") == b""
    assert meter.finish() == b"event: x\ndata: {"
    assert meter.error_frame(M) == b"\n\n" + openai_frame(OPENAI_ERR)


# --- the error frames as the real clients read them ----------------------------------------------

def prefixes(stream: bytes) -> Iterator[bytes]:
    """What the client may have received when the upstream broke: every prefix."""
    for i in range(len(stream) + 1):
        yield stream[:i]


def ollama_lines(body: bytes) -> Iterator[dict[str, Any]]:
    """ollama/_client.py `_stream`: json.loads per line, raise on an `error` member."""
    ollama = pytest.importorskip("ollama")
    for line in body.decode().splitlines():
        part = json.loads(line)
        if err := part.get("error"):
            raise ollama.ResponseError(err)
        yield part


def test_ndjson_error_frame_makes_ollama_python_raise() -> None:
    ollama = pytest.importorskip("ollama")
    for sent in prefixes(CHAT[:-10]):
        meter = NdjsonMeter()
        body = meter.feed(sent) + meter.finish() + meter.error_frame(M)
        if not sent or sent.endswith(b"\n"):
            with pytest.raises(ollama.ResponseError, match=r"request id: r-1"):
                list(ollama_lines(body))
        else:       # the cut line is garbage to the client: it fails there, never quietly
            with pytest.raises((ollama.ResponseError, ValueError)):
                list(ollama_lines(body))


def test_ndjson_error_frame_through_the_real_ollama_client() -> None:
    ollama = pytest.importorskip("ollama")
    httpx = pytest.importorskip("httpx")
    meter = NdjsonMeter()
    body = meter.feed(ndjson(chat_frame("Hel"), chat_frame("lo"))) + meter.error_frame(M)
    reply = httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})
    client = ollama.Client(host="http://gw", transport=httpx.MockTransport(lambda _: reply))
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert caught.value.error == M


def openai_events(body: bytes) -> list[Any]:
    """openai/_streaming.py Stream.__stream__ over its SSEDecoder: stop at [DONE], raise
    APIError for a data object with an `error` member."""
    streaming = pytest.importorskip("openai._streaming")
    out = []
    for sse_event in streaming.SSEDecoder().iter_bytes(iter([body])):
        if sse_event.data.startswith("[DONE]"):
            break
        data = sse_event.json()
        if isinstance(data, dict) and data.get("error"):
            error = data["error"]
            raise RuntimeError(error.get("message") if isinstance(error, dict) else error)
        out.append(data)
    return out


def anthropic_events(body: bytes) -> list[Any]:
    """anthropic/_streaming.py Stream.__stream__: skip ping and unnamed events, raise on
    `event: error` (its data need not parse)."""
    streaming = pytest.importorskip("anthropic._streaming")
    out = []
    for sse_event in streaming.SSEDecoder().iter_bytes(iter([body])):
        if sse_event.event in ("ping", None):
            continue
        if sse_event.event == "error":
            raise RuntimeError(sse_event.data)
        if sse_event.data:
            out.append(sse_event.json())
    return out


SSE_CLIENT_CASES = [("v1_chat", V1_CHAT, openai_events),
                    ("v1_completions", V1_CMPL, openai_events),
                    ("v1_responses", RESPONSES, openai_events),
                    ("v1_messages", MESSAGES, anthropic_events)]


@pytest.mark.parametrize("route,stream,read", SSE_CLIENT_CASES,
                         ids=[c[0] for c in SSE_CLIENT_CASES])
@pytest.mark.parametrize("strip", [False, True], ids=["pass", "strip"])
def test_sse_error_frame_makes_the_client_raise_at_every_cut(
        route: str, stream: bytes, read: Callable[[bytes], list[Any]], strip: bool) -> None:
    stream = stream[:stream.rindex(b"event:" if b"event:" in stream else b"data: [DONE]")]
    clean = 0
    for sent in prefixes(stream):
        for eof in (False, True):      # a reset (no finish()) or a premature clean EOF
            meter = meter_for(route, strip_usage=strip)
            body = meter.feed(sent) + (meter.finish() if eof else b"") + meter.error_frame(M)
            with pytest.raises(Exception) as caught:    # never a quiet end
                read(body)
            if M in str(caught.value):
                clean += not eof
            else:
                # Only a data field the client already holds in part can spoil our error:
                # it fails to parse that instead (still an exception, not a quiet end).
                open_event = sent.replace(b"\r\n", b"\n").rsplit(b"\n\n", 1)[-1]
                assert b"data" in open_event, sent
    # Filtering holds back incomplete events: after a reset the client reads our error.
    if strip and route in ("v1_chat", "v1_completions"):
        assert clean == len(stream) + 1


def openai_client_body(body: bytes) -> Any:
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")
    reply = httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
    http = httpx2.Client(transport=httpx2.MockTransport(lambda _: reply))
    return openai.OpenAI(base_url="http://gw/v1", api_key="k", http_client=http, max_retries=0)


def test_error_frames_through_the_real_openai_client() -> None:
    openai = pytest.importorskip("openai")
    meter = meter_for("v1_chat", strip_usage=False)
    client = openai_client_body(meter.feed(sse(*CHAT_CHUNKS[:2])[:-1]) + meter.error_frame(M))
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
    assert caught.value.message == M and caught.value.body == OPENAI_ERR["error"]

    meter = meter_for("v1_responses", strip_usage=False)
    client = openai_client_body(meter.feed(sse(*RESP_HEAD[:4]) + b"event: resp")
                                + meter.error_frame(M))
    with pytest.raises(openai.APIError) as caught:
        list(client.responses.create(model="m", input="hi", stream=True))
    assert caught.value.message == M


def test_stripped_stream_reads_cleanly_in_the_real_openai_client() -> None:
    meter = meter_for("v1_completions", strip_usage=True)
    client = openai_client_body(relay(meter, [V1_CMPL]))
    chunks = list(client.completions.create(model="m", prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Once upon a time <&>"
    assert all(c.usage is None for c in chunks)


def test_error_frame_through_the_real_anthropic_client() -> None:
    anthropic = pytest.importorskip("anthropic")
    httpx2 = pytest.importorskip("httpx2")
    meter = meter_for("v1_messages", strip_usage=False)
    body = meter.feed(sse(msg_start(3), *MSG_BODY[:3]) + b"event: content_bl") \
        + meter.error_frame(M)
    reply = httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
    http = httpx2.Client(transport=httpx2.MockTransport(lambda _: reply))
    client = anthropic.Anthropic(base_url="http://gw", api_key="k", http_client=http,
                                 max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        list(client.messages.create(model="m", max_tokens=5, stream=True,
                                    messages=[{"role": "user", "content": "hi"}]))
    assert caught.value.body == ANTHROPIC_ERR


# --- meter_for and non-streaming bodies -----------------------------------------------------------

def test_meter_for_routes() -> None:
    for route, cls in [("api_chat", NdjsonMeter), ("api_generate", NdjsonMeter),
                       ("v1_chat", OpenAIChunkMeter), ("v1_completions", OpenAIChunkMeter),
                       ("v1_responses", ResponsesMeter), ("v1_messages", MessagesMeter)]:
        assert type(meter_for(route, strip_usage=False)) is cls
    for route in ("api_embed", "api_embeddings", "api_show", "v1_embeddings", "nope"):
        with pytest.raises(ValueError):
            meter_for(route, strip_usage=False)


def test_usage_total() -> None:
    assert Usage(3, 4).total == 7


EMBEDDINGS = [[0.0123456789 * i for i in range(768)] for _ in range(2)]
BIG_EMBEDDINGS = [[-0.0123456789] * 1024] * 120     # ~2 MiB of JSON
BODY_CASES = [
    ("api_chat", go_json(chat_final(**METRICS)), Usage(26, 298)),
    ("api_chat", go_json(chat_final(eval_count=5)), Usage(0, 5)),
    ("api_chat", go_json({"error": "model 'x' not found"}), None),
    ("api_generate", go_json(gen_final([1, 2, 3], **METRICS)), Usage(26, 298)),
    ("api_generate", go_json(gen_final(list(range(400_000)), **METRICS)), Usage(26, 298)),
    ("api_embed", go_json({"model": "e", "embeddings": EMBEDDINGS, "total_duration": 1,
                           "load_duration": 1, "prompt_eval_count": 9}), Usage(9, 0)),
    ("api_embed", go_json({"model": "e", "embeddings": BIG_EMBEDDINGS, "total_duration": 1,
                           "load_duration": 1, "prompt_eval_count": 700}), Usage(700, 0)),
    ("api_embed", go_json({"model": "e", "embeddings": []}), Usage(0, 0)),
    ("api_embeddings", go_json({"embedding": EMBEDDINGS[0]}), None),
    ("api_show", go_json({"modelfile": "FROM x", "details": {}}), None),
    ("v1_chat", go_json({"id": "c", "object": "chat.completion", "choices": [],
                         "usage": V1_USAGE}), Usage(26, 298)),
    ("v1_chat", go_json({"error": {"message": "m", "type": "api_error", "param": None,
                                   "code": None}}), None),
    ("v1_completions", go_json({"id": "c", "choices": [], "usage": V1_USAGE}), Usage(26, 298)),
    ("v1_embeddings", go_json({"object": "list", "data": [{"object": "embedding", "embedding":
                                                           EMBEDDINGS[0], "index": 0}],
                               "model": "e", "usage": {"prompt_tokens": 4, "total_tokens": 4}}),
     Usage(4, 0)),
    ("v1_embeddings", go_json({"object": "list", "data": [
        {"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(BIG_EMBEDDINGS)],
        "model": "e", "usage": {"prompt_tokens": 640, "total_tokens": 640}}), Usage(640, 0)),
    ("v1_responses", go_json(response_obj("completed", R_USAGE)), Usage(10, 20)),
    ("v1_messages", go_json({"id": "msg", "type": "message", "content": [],
                             "usage": {"input_tokens": 5, "output_tokens": 6}}), Usage(5, 6)),
    ("v1_messages", go_json({"type": "error", "error": {"type": "api_error", "message": "m"}}),
     None),
    # Counts that are not non-negative ints are absent.
    ("api_chat", go_json(chat_final(prompt_eval_count=-3, eval_count=7)), Usage(0, 7)),
    ("v1_chat", go_json({"usage": {"prompt_tokens": True, "completion_tokens": 2.5}}),
     Usage(0, 0)),
    ("v1_chat", go_json({"usage": {"prompt_tokens": "3", "completion_tokens": 4}}), Usage(0, 4)),
    ("v1_chat", go_json({"choices": []}), None),
    ("v1_chat", b"not json", None),
    ("v1_chat", b"[1,2]", None),
    ("v1_chat", b"", None),
    ("v1_chat", b"[" * 100_000, None),
    ("api_chat", b"\xff\xfe", None),
    ("unknown_route", go_json({"usage": V1_USAGE}), None),
]


@pytest.mark.parametrize("route,body,usage", BODY_CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BODY_CASES)])
def test_usage_from_body(route: str, body: bytes, usage: Usage | None) -> None:
    assert usage_from_body(route, body) == usage


def test_big_body_with_unexpected_tail_falls_back_to_a_full_parse() -> None:
    body = go_json({"usage": {"prompt_tokens": 1, "completion_tokens": 2},
                    "padding": ["p" * 100] * 30_000})
    assert len(body) > 2 << 20
    assert usage_from_body("v1_chat", body) == Usage(1, 2)
