"""Stream meters and body usage, fed realistic Ollama streams chunked every possible way.

Frame shapes follow Ollama's `api/types.go`, `middleware/openai.go`, `openai/openai.go`,
`openai/responses.go` and `anthropic/anthropic.go` (NOTES-ollama-api §2). Every stream is
fed split at every byte boundary and in 1-, 2- and 7-byte chunks: what reaches the client,
the usage and `complete` must not depend on how the network cut it. Upstream's in-band
error frames must never reach the client: ours replace them. The error frames are then read
back with the real client libraries (skipped where they are not installed).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from neuraldrive_gw.framing import (ERROR_LINE_HOLD, EventSplitter, LineSplitter, Oversized,
                                    Spill, error_line)
from neuraldrive_gw.metering import (UPSTREAM_ERROR_MESSAGE, MessagesMeter, NdjsonMeter,
                                     OpenAIChunkMeter, ResponsesMeter, StreamMeter,
                                     StreamProtocolError, Usage, meter_for, usage_from_body)


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


def replacement(route: str) -> bytes:
    """The frame a meter sends in place of an upstream error, at a frame boundary."""
    return meter_for(route, strip_usage=False).error_frame(UPSTREAM_ERROR_MESSAGE)


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
    errored: bool = False               # the meter replaced an upstream error frame


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
         False, None, error="CUDA error", errored=True,
         out=ndjson(chat_frame("a")) + replacement("api_chat")),
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
         False, None, error="upstream boom", errored=True,
         out=sse(CHAT_CHUNKS[0]) + replacement("v1_chat")),
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
    Case("responses-failed", "v1_responses", RESPONSES_FAILED, False, None,
         error="web search failed", errored=True,
         out=sse(*RESP_HEAD) + replacement("v1_responses")),
    Case("responses-failed-without-error", "v1_responses", sse(*RESP_HEAD, resp_event(
        "response.failed", 6, response=response_obj("failed", R_USAGE))), True, Usage(10, 20),
        error="response.failed"),
    # Cut by EOF: a client drops the event anyway, and this one might hold error text.
    Case("responses-cut-terminal", "v1_responses", RESPONSES[:-30], False, None,
         out=sse(*RESP_HEAD)),
    Case("responses-incomplete", "v1_responses", RESPONSES_INCOMPLETE, True, Usage(10, 20)),
    Case("responses-error-event", "v1_responses", RESPONSES_ERROR, False, None,
         error="model crashed", errored=True,
         out=sse(*RESP_HEAD[:3]) + replacement("v1_responses")),
    Case("messages", "v1_messages", MESSAGES, True, Usage(15, 7)),
    Case("messages-crlf", "v1_messages", crlf(MESSAGES), True, Usage(15, 7)),
    Case("messages-delta-without-input", "v1_messages", MESSAGES_NO_INPUT, True, Usage(12, 7)),
    Case("messages-truncated", "v1_messages", sse(msg_start(12), *MSG_BODY), False, Usage(12, 0)),
    Case("messages-error-event", "v1_messages", MESSAGES_ERROR, False, Usage(12, 0),
         error="runner died", errored=True,
         out=sse(msg_start(12), *MSG_BODY[:3]) + replacement("v1_messages")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_stream_metering_independent_of_chunking(case: Case) -> None:
    expected = case.stream if case.out is None else case.out
    for chunks in chunkings(case.stream):
        meter = meter_for(case.route, strip_usage=case.strip)
        assert relay(meter, chunks) == expected, [len(c) for c in chunks]
        assert meter.complete is case.complete, [len(c) for c in chunks]
        assert meter.usage == case.usage, [len(c) for c in chunks]
        assert meter.errored is case.errored
        if case.error is None:
            assert meter.upstream_error is None
        else:
            assert meter.upstream_error is not None and case.error in meter.upstream_error


NDJSON_FRAME_RE = re.compile(rb"[^\n]*\n|[^\n]+\Z")
SSE_FRAME_RE = re.compile(rb"(?s).*?\n\r?\n|.+\Z")


@pytest.mark.parametrize("case", [c for c in CASES if not c.strip and not c.errored],
                         ids=lambda c: c.id)
def test_whole_frames_pass_at_once_unchanged(case: Case) -> None:
    """Ollama flushes whole lines and events: each goes out when it comes, as it came."""
    ndjson_route = case.route.startswith("api_")
    frames = (NDJSON_FRAME_RE if ndjson_route else SSE_FRAME_RE).findall(case.stream)
    assert b"".join(frames) == case.stream
    meter = meter_for(case.route, strip_usage=False)
    out = b""
    for frame in frames:
        sent = meter.feed(frame)
        if re.search(rb"\n\Z" if ndjson_route else rb"\n\r?\n\Z", frame):
            assert sent is frame
        out += sent
    assert out + meter.finish() == (case.stream if case.out is None else case.out)


@pytest.mark.parametrize("size", [1, 2, 5, 7])
def test_ndjson_holds_back_only_a_line_head(size: int) -> None:
    stream = CHAT + GARBAGE + b"  \t {\n" + b" " * 30 + b"x\n"
    meter = NdjsonMeter()
    fed = out = b""
    for i in range(0, len(stream), size):
        fed += stream[i:i + size]
        out += meter.feed(stream[i:i + size])
        held = fed[len(out):]
        assert fed.startswith(out) and len(held) <= ERROR_LINE_HOLD
        assert not held or not out or out.endswith(b"\n")      # a line start
    assert out + meter.finish() == stream
    assert not meter.errored and meter.upstream_error is None


@pytest.mark.parametrize("line,start,verdict", [
    (b"", 0, None), (b"{", 0, None), (b'{"err', 0, None), (b'{"error', 0, None),
    (b'{"error"', 0, True), (b'{"error":"x"}\n', 0, True), (b'{ "error"', 0, True),
    (b'\t{ \r"error" :', 0, True), (b"  {  \"err", 0, None), (b" " * 8 + b'{"error"', 0, True),
    (b'{"errors":[]}', 0, False), (b'{"model":"x"}', 0, False),
    (b'{"done":true,"error":"x"}', 0, False),
    (b'{"err\n{"error"', 0, False), (b"{\n", 0, False), (b"\r\n", 0, False), (b"[", 0, False),
    (b'"error"', 0, False), (b" " * 16, 0, False), (b" " * 9 + b'{"error"', 0, False),
    (b'{"a":1}\n{"error":"x"}', 8, True), (b'{"a":1}\n{"er', 8, None),
])
def test_error_line_heads(line: bytes, start: int, verdict: bool | None) -> None:
    assert error_line(line, start) is verdict


def test_filtering_holds_back_only_the_incomplete_event() -> None:
    meter = meter_for("v1_chat", strip_usage=True)
    first = sse(CHAT_CHUNKS[0])
    assert meter.feed(first + b"data: {") == first
    assert meter.feed(b'"x":1}\n') == b""
    assert meter.feed(b"\n") == b'data: {"x":1}\n\n'


# --- in-band upstream errors: replaced, never relayed -------------------------------------------

# What Ollama writes when the runner dies mid-stream: its text names internal paths.
SECRET = ("llama runner process has terminated: error loading model /usr/share/ollama/"
          ".ollama/models/blobs/sha256-6a0746a1ec1aef3e7ec53868f220ff6e")
NATIVE_ERROR = go_json({"error": SECRET}) + b"\n"
V1_ERROR = sse((None, {"error": {"message": SECRET, "type": "api_error", "param": None,
                                 "code": None}}))
NAMED_ERROR = sse(("error", {"type": "error", "code": "server_error", "message": SECRET,
                             "param": None, "sequence_number": 4}))
ANTHROPIC_UPSTREAM_ERROR = sse(("error", {"type": "error", "error": {"type": "api_error",
                                                                     "message": SECRET}}))


@dataclass(frozen=True)
class Inband:
    id: str
    route: str
    before: bytes       # relayed as the meter relays it on its own
    error: bytes        # upstream's error frame: replaced by ours
    after: bytes        # dropped
    strip: bool = False


CMPL_ZERO = sse((None, cmpl_chunk("Once", None, ZERO)))
INBAND = [
    Inband("chat", "api_chat", ndjson(chat_frame("Hel"), chat_frame("lo")), NATIVE_ERROR,
           ndjson(chat_final(**METRICS))),
    Inband("chat-first-line", "api_chat", b"", NATIVE_ERROR, ndjson(chat_final(**METRICS))),
    Inband("chat-spaced", "api_chat", ndjson(chat_frame("a")),
           b'{ \t"error" : "' + SECRET.encode() + b'"}\n', ndjson(chat_final())),
    Inband("chat-crlf", "api_chat", crlf(ndjson(chat_frame("a"))), crlf(NATIVE_ERROR),
           crlf(ndjson(chat_final()))),
    Inband("chat-error-at-eof", "api_chat", ndjson(chat_frame("a")), NATIVE_ERROR[:-1], b""),
    Inband("generate", "api_generate", ndjson(gen_frame("Hi")), NATIVE_ERROR,
           ndjson(gen_final([1, 2], **METRICS))),
    Inband("v1-chat", "v1_chat", sse(*CHAT_CHUNKS[:2]), V1_ERROR,
           sse(CHAT_CHUNKS[2], (None, USAGE_CHUNK), DONE)),
    Inband("v1-chat-strip", "v1_chat", sse(*CHAT_CHUNKS[:2]), V1_ERROR,
           sse(CHAT_CHUNKS[2], (None, USAGE_CHUNK), DONE), strip=True),
    Inband("v1-chat-named", "v1_chat", sse(CHAT_CHUNKS[0]), sse(("error", {"message": SECRET})),
           sse(DONE)),
    Inband("v1-chat-crlf", "v1_chat", crlf(sse(CHAT_CHUNKS[0])), crlf(V1_ERROR), crlf(sse(DONE))),
    Inband("v1-cmpl", "v1_completions", CMPL_ZERO, V1_ERROR, sse(DONE)),
    Inband("v1-cmpl-strip", "v1_completions", CMPL_ZERO, V1_ERROR, sse(DONE), strip=True),
    Inband("v1-cmpl-error-member-last", "v1_completions", CMPL_ZERO,
           sse((None, {"id": "cmpl-77", "choices": [], "error": {"message": SECRET}})),
           sse(DONE)),
    Inband("responses-error", "v1_responses", sse(*RESP_HEAD[:4]), NAMED_ERROR,
           sse(*RESP_HEAD[4:], resp_event("response.completed", 6,
                                          response=response_obj("completed", R_USAGE)))),
    Inband("responses-failed", "v1_responses", sse(*RESP_HEAD), sse(resp_event(
        "response.failed", 6, response=response_obj("failed", R_USAGE, error={
            "code": "server_error", "message": SECRET}))), b": trailing comment\n\n"),
    Inband("responses-error-at-eof", "v1_responses", sse(*RESP_HEAD[:4]), NAMED_ERROR[:-1], b""),
    Inband("messages", "v1_messages", sse(msg_start(12), *MSG_BODY[:3]),
           ANTHROPIC_UPSTREAM_ERROR, sse(*MSG_BODY[3:], msg_delta({"output_tokens": 7}),
                                         MSG_STOP)),
    Inband("messages-crlf", "v1_messages", crlf(sse(msg_start(12))),
           crlf(ANTHROPIC_UPSTREAM_ERROR), crlf(sse(MSG_STOP))),
]


def inband_stream(case: Inband) -> bytes:
    return case.before + case.error + case.after


@pytest.mark.parametrize("case", INBAND, ids=lambda c: c.id)
def test_inband_error_is_replaced_and_the_rest_dropped(case: Inband) -> None:
    alone = meter_for(case.route, strip_usage=case.strip)
    expected = relay(alone, [case.before]) + replacement(case.route)
    assert UPSTREAM_ERROR_MESSAGE.encode() in expected
    for chunks in chunkings(inband_stream(case), (1, 7)):
        meter = meter_for(case.route, strip_usage=case.strip)
        out = relay(meter, chunks)
        assert out == expected, [len(c) for c in chunks]
        assert b"/usr/share/ollama" not in out
        assert meter.errored and not meter.complete, [len(c) for c in chunks]
        assert meter.upstream_error == SECRET, [len(c) for c in chunks]
        # Over: nothing more goes out, and the proxy appends no second error frame.
        assert meter.feed(case.after + b"\n\n") == meter.finish() == meter.error_frame(M) == b""


def test_ndjson_error_line_text_is_read_within_bounds() -> None:
    long_error = go_json({"error": SECRET + " " + "z" * 10_000}) + b"\n"
    stream = ndjson(chat_frame("a")) + long_error + ndjson(chat_final())
    for size in (1, 100, len(stream)):
        meter = NdjsonMeter()
        out = relay(meter, [stream[i:i + size] for i in range(0, len(stream), size)])
        assert out == ndjson(chat_frame("a")) + replacement("api_chat")
        assert meter.upstream_error is not None and meter.upstream_error.startswith(SECRET)
        assert len(meter.upstream_error) <= 500


def test_oversized_error_event_is_replaced_too() -> None:
    for error in (ANTHROPIC_UPSTREAM_ERROR, sse((None, {"error": {"message": SECRET}}))):
        big = error.replace(SECRET.encode(), SECRET.encode() + b" " + b"z" * 5000)
        stream = sse(msg_start(1)) + big + sse(MSG_STOP)
        meter = MessagesMeter(max_event=1024)
        out = relay(meter, [stream[i:i + 100] for i in range(0, len(stream), 100)])
        assert out == sse(msg_start(1)) + replacement("v1_messages")
        assert meter.errored and meter.upstream_error and SECRET in meter.upstream_error


WORDY = 'error: the "error" was {"error": 1}, "error" — no error'
TOOL_CALL = {**chat_frame(""), "message": {"role": "assistant", "content": "", "tool_calls": [
    {"function": {"name": "report", "arguments": {"error": "disk full"}}}]}}
HARMLESS = [
    ("api_chat", ndjson(chat_frame(WORDY), TOOL_CALL, chat_final(**METRICS))),
    ("api_chat", b'{"errors":["x"],"done":false}\n{"err":1}\n' + ndjson(chat_final())),
    ("api_generate", ndjson(gen_frame(WORDY), gen_frame("error"), gen_final([1], **METRICS))),
    ("v1_chat", sse((None, chat_chunk({"content": WORDY})),
                    (None, {**chat_chunk({}), "error": None}), DONE)),     # null is no error
    ("v1_completions", sse((None, cmpl_chunk(WORDY)), DONE)),
    ("v1_responses", sse(*RESP_HEAD[:3], resp_event(
        "response.output_text.delta", 3, delta=WORDY, item_id="msg_1", output_index=0,
        content_index=0), resp_event("response.completed", 4,
                                     response=response_obj("completed", R_USAGE)))),
    ("v1_messages", sse(msg_start(1), ("content_block_delta", {
        "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": WORDY}}),
        msg_delta({"output_tokens": 2}), MSG_STOP)),
]


@pytest.mark.parametrize("route,stream", HARMLESS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(HARMLESS)])
def test_content_mentioning_error_passes_unchanged(route: str, stream: bytes) -> None:
    for chunks in chunkings(stream, (1, 7)):
        meter = meter_for(route, strip_usage=False)
        assert relay(meter, chunks) == stream, [len(c) for c in chunks]
        assert meter.complete and not meter.errored and meter.upstream_error is None


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
    stream = ndjson(gen_frame("x" * 3000)) + final
    meter = NdjsonMeter(max_line=256)
    late = b'{"error":"late"}\n' + ndjson(gen_frame("more"))
    chunks = [(stream + late)[i:i + size] for i in range(0, len(stream + late), size)]
    assert relay(meter, chunks) == stream + replacement("api_generate")
    assert meter.usage == Usage(26, 298) and meter.upstream_error == "late"
    assert meter.errored and not meter.complete     # the client saw an error after all


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


def test_line_splitter_memory_is_bounded() -> None:
    splitter = LineSplitter(16, keep_head=4, keep_tail=4)
    for _ in range(1000):
        assert splitter.feed(b"a" * 1000) == []
        assert len(splitter.partial()) <= 16
    records = splitter.feed(b"\n\nnext")
    assert records == [Oversized(b"aaaa", b"aaaa"), b""]
    assert splitter.rest() == b"next"


def test_event_splitter_spills_what_it_cannot_hold() -> None:
    splitter = EventSplitter(16, keep_head=4)
    pieces: list[bytes | Spill] = []
    for _ in range(1000):
        pieces += splitter.feed(b"a" * 1000)
    assert pieces[0] == Spill(b"a" * 1000, b"aaaa", True, False)
    assert all(p == Spill(b"a" * 1000, b"aaaa", False, False) for p in pieces[1:])
    assert splitter.feed(b"\n\nnext") == [Spill(b"\n\n", b"aaaa", False, True)]
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
        got_events: list[bytes | Spill] = []
        got_lines: list[object] = []
        i = 0
        while i < len(stream):
            n = rnd.randint(1, 6)
            got_events += events.feed(stream[i:i + n])
            got_lines += lines.feed(stream[i:i + n])
            i += n
            out = b"".join(e if isinstance(e, bytes) else e.data for e in got_events)
            assert stream.startswith(out), stream
            assert min(i, len(stream)) - len(out) <= limit + 2, stream
        want_events, pos = [], 0
        while m := blank_line.search(stream, pos):
            want_events.append(stream[pos:m.end()])
            pos = m.end()
        # Whole events are held no longer than limit + 2; spilled pieces regroup into events.
        regrouped: list[bytes] = []
        spilled: bytes | None = None
        for e in got_events:
            if isinstance(e, bytes):
                assert spilled is None and len(e) <= limit + 2, stream
                regrouped.append(e)
                continue
            assert e.first is (spilled is None), stream
            spilled = (spilled or b"") + e.data
            assert e.head == spilled[:3] and len(spilled) > limit + 2, stream
            if e.last:
                regrouped.append(spilled)
                spilled = None
        assert regrouped == want_events, stream
        assert (spilled or b"") + events.rest() == stream[pos:], stream
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
    # route, strip, bytes fed, EOF (finish() called), expected error frame
    ("api_chat", False, b"", False, NDJSON_FRAME),
    ("api_chat", False, ndjson(chat_frame("a")), False, NDJSON_FRAME),
    ("api_chat", False, ndjson(chat_frame("a")) + b'{ "er', False, NDJSON_FRAME),   # held
    ("api_chat", False, ndjson(chat_frame("a")) + b'{ "er', True, b"\n" + NDJSON_FRAME),
    ("api_chat", False, ndjson(chat_frame("a")) + b'{"model"', False, b"\n" + NDJSON_FRAME),
    ("api_generate", False, b'{"model":"x","response":"a\\r', False, b"\n" + NDJSON_FRAME),
    ("v1_chat", False, b"", False, openai_frame(OPENAI_ERR)),
    ("v1_chat", False, sse(CHAT_CHUNKS[0]), False, openai_frame(OPENAI_ERR)),
    ("v1_chat", False, b'data: {"id":"chat', False, openai_frame(OPENAI_ERR)),    # held
    ("v1_chat", False, b'data: {"id":"chat', True, b"\n\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, sse(CHAT_CHUNKS[0])[:-1], True, b"\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, crlf(sse(CHAT_CHUNKS[0]))[:-1], True, b"\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, crlf(sse(CHAT_CHUNKS[0]))[:-2], True, b"\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", False, crlf(sse(CHAT_CHUNKS[0]))[:-3], True,
     b"\n\n" + openai_frame(OPENAI_ERR)),
    ("v1_chat", True, b'data: {"id":"chat', False, openai_frame(OPENAI_ERR)),
    ("v1_completions", False, b"data: [DO", True, b"\n\n" + openai_frame(OPENAI_ERR)),
    ("v1_responses", False, b"", False, named_frame(RESPONSES_ERR)),
    ("v1_responses", False, sse(RESP_HEAD[0]), False, named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b"event: response.output_te", False, named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b"event: response.output_te", True,
     b"\n" + named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b"event: response.output_text.delta\n", True,
     named_frame(RESPONSES_ERR)),
    ("v1_responses", False, b'event: x\ndata: {"a"', True, b"\n\n" + named_frame(RESPONSES_ERR)),
    ("v1_messages", False, sse(msg_start(1)), False, named_frame(ANTHROPIC_ERR)),
    ("v1_messages", False, b"event: content_block_delta\ndata: {}", True,
     b"\n\n" + named_frame(ANTHROPIC_ERR)),
    ("v1_messages", False, b"event: ping", True, b"\n" + named_frame(ANTHROPIC_ERR)),
]


@pytest.mark.parametrize("route,strip,fed,eof,frame", FRAME_CASES)
def test_error_frame_bytes(route: str, strip: bool, fed: bytes, eof: bool, frame: bytes) -> None:
    meter = meter_for(route, strip_usage=strip)
    meter.feed(fed)
    if eof:
        meter.finish()
    assert not meter.errored
    assert meter.error_frame(M) == frame
    assert meter.errored and not meter.complete
    assert meter.error_frame(M) == b"" and meter.feed(b"data: x\n\n") == meter.finish() == b""


def test_error_frame_ends_a_spilled_event() -> None:
    big = sse((None, chat_chunk({"content": "y" * 5000})))
    meter = OpenAIChunkMeter(max_event=1024)
    assert meter.feed(big[:3000]) == big[:3000]
    assert meter.error_frame(M) == b"\n\n" + openai_frame(OPENAI_ERR)
    meter = OpenAIChunkMeter(max_event=1024)
    assert relay(meter, [big[:3000], big[3000:]]) == big
    assert meter.error_frame(M) == openai_frame(OPENAI_ERR)


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
    # Incomplete events are held back: after a reset the client reads our error.
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


@pytest.mark.parametrize("case", [c for c in INBAND if c.route.startswith("api_")],
                         ids=lambda c: c.id)
def test_replaced_error_makes_ollama_python_raise(case: Inband) -> None:
    ollama = pytest.importorskip("ollama")
    body = relay(meter_for(case.route, strip_usage=False), [inband_stream(case)])
    with pytest.raises(ollama.ResponseError) as caught:
        list(ollama_lines(body))
    assert caught.value.error == UPSTREAM_ERROR_MESSAGE


@pytest.mark.parametrize("case", [c for c in INBAND if c.route.startswith("v1_")],
                         ids=lambda c: c.id)
def test_replaced_error_makes_the_sdk_stream_raise(case: Inband) -> None:
    read = anthropic_events if case.route == "v1_messages" else openai_events
    body = relay(meter_for(case.route, strip_usage=case.strip), [inband_stream(case)])
    with pytest.raises(RuntimeError) as caught:
        read(body)
    assert UPSTREAM_ERROR_MESSAGE in str(caught.value) and SECRET not in str(caught.value)


def test_replaced_errors_through_the_real_clients() -> None:
    ollama = pytest.importorskip("ollama")
    httpx = pytest.importorskip("httpx")
    body = relay(NdjsonMeter(), [ndjson(chat_frame("Hel")) + NATIVE_ERROR + ndjson(chat_final())])
    reply = httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})
    client = ollama.Client(host="http://gw", transport=httpx.MockTransport(lambda _: reply))
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert caught.value.error == UPSTREAM_ERROR_MESSAGE

    openai = pytest.importorskip("openai")
    body = relay(meter_for("v1_chat", strip_usage=True),
                 [sse(*CHAT_CHUNKS[:2]) + V1_ERROR + sse(DONE)])
    with pytest.raises(openai.APIError) as api_error:
        list(openai_client_body(body).chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert api_error.value.message == UPSTREAM_ERROR_MESSAGE
    assert api_error.value.body["message"] == UPSTREAM_ERROR_MESSAGE

    failed = [c for c in INBAND if c.id == "responses-failed"][0]
    body = relay(meter_for("v1_responses", strip_usage=False), [inband_stream(failed)])
    with pytest.raises(openai.APIError) as api_error:
        list(openai_client_body(body).responses.create(model="m", input="hi", stream=True))
    assert api_error.value.message == UPSTREAM_ERROR_MESSAGE


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
