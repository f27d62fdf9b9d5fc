"""Token metering per API dialect, and the filters every relayed stream chunk passes through."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .framing import (EventSplitter, LineSplitter, Oversized, Record, TailTracker,
                      head_members, loads, replace_data, sse_fields, tail_members)

MAX_PARSED_LINE = 1 << 20     # NDJSON: a longer line is parsed from its head and tail only
MAX_HELD_EVENT = 8 << 20      # SSE: the largest event held back for filtering, or parsed aside
MAX_PARSED_BODY = 1 << 20     # non-streaming: a larger body is first read from its tail
_KEEP = 64 * 1024             # head/tail kept of an oversized line or body
_ERROR_TEXT = 500             # upstream error text kept for the audit


class StreamProtocolError(ValueError):
    """Upstream sent a stream the gateway cannot relay safely (an SSE event too large to hold)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer (prompt = input, completion = output)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---------------------------------------------------------------------------------------------
# JSON helpers: never raise on what upstream sends.

def _count(value: object) -> int | None:
    """A token count: a non-negative int (bools excluded), else None."""
    return value if type(value) is int and value >= 0 else None


def _usage(obj: object, prompt_key: str, completion_key: str | None) -> Usage | None:
    """Usage from a dict's count fields, absent or invalid counts being 0; None if no dict."""
    if not isinstance(obj, dict):
        return None
    completion = _count(obj.get(completion_key)) if completion_key else 0
    return Usage(_count(obj.get(prompt_key)) or 0, completion or 0)


def _error_text(value: object) -> str:
    """A short text for the audit from an upstream error value or error event object."""
    if isinstance(value, dict):
        inner = value.get("error")
        if isinstance(inner, (dict, str)) and inner:
            value = inner
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        value = value["message"]
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_ERROR_TEXT] or "error"


# ---------------------------------------------------------------------------------------------
# Stream meters


class StreamMeter(ABC):
    """Watches one streamed response as it is relayed; pick the class with meter_for().

    The proxy calls feed() with every upstream chunk and sends what it returns, finish() at
    upstream EOF, and error_frame() when the stream broke or ended without `complete`.
    Meters never raise on content, only StreamProtocolError when a filter would have to hold
    unbounded data. Upstream error text goes to `upstream_error` (the audit), never into the
    frames the gateway writes itself.
    """

    def __init__(self) -> None:
        self.complete = False                   # a terminal frame was seen
        self.usage: Usage | None = None         # counts, once known
        self.upstream_error: str | None = None  # an in-band upstream error, for the audit
        self._sent = TailTracker()

    @abstractmethod
    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client now (b"" while an event is held back for filtering)."""

    @abstractmethod
    def finish(self) -> bytes:
        """Upstream EOF: the bytes still held back, to send before ending the response."""

    @abstractmethod
    def error_frame(self, message: str) -> bytes:
        """A final error frame in the route's dialect, led by whatever ends a partial
        line or event already sent, so that the client's library raises `message`."""


class NdjsonMeter(StreamMeter):
    """`/api/chat`, `/api/generate`: chunks pass unchanged; lines are parsed aside.

    Terminal: a line with top-level `"done": true`; usage is its `prompt_eval_count` and
    `eval_count`, absent = 0 (Ollama omits zero counts). Lines longer than `max_line` are
    judged from their first and last 64 KiB (a final `/api/generate` frame carries the whole
    `context` array, and its counts come after it).
    """

    def __init__(self, *, max_line: int = MAX_PARSED_LINE):
        super().__init__()
        self._lines = LineSplitter(max_line, keep_head=_KEEP, keep_tail=_KEEP)

    def feed(self, chunk: bytes) -> bytes:
        if chunk:
            for line in self._lines.feed(chunk):
                self._observe(line)
            self._sent.sent(chunk)
        return chunk

    def finish(self) -> bytes:
        # ollama-python (httpx iter_lines) also reads a last line that lacks its "\n".
        line = self._lines.rest()
        if line is not None:
            self._observe(line)
        return b""

    def error_frame(self, message: str) -> bytes:
        # ollama-python json.loads every line and raises ResponseError on an "error" member.
        return self._sent.line_closer() + json.dumps({"error": message}).encode() + b"\n"

    def _observe(self, line: Record) -> None:
        if isinstance(line, bytes):
            # Cheap pre-checks: only final and error lines are worth a json.loads.
            if b'"error"' not in line and not (b'"done"' in line and b"true" in line):
                return
            obj = loads(line)
            if not isinstance(obj, dict):
                return
            counts = obj
        else:
            if b'"done"' not in line.head and b'"error"' not in line.head:
                return
            counts = tail_members(line.tail)
            obj = {**head_members(line.head), **counts}
            if not counts and not obj.get("error"):
                return      # nothing proves the line ends as a whole object
        error = obj.get("error")
        if error:
            self.upstream_error = _error_text(error)
        elif obj.get("done") is True:
            self.complete = True
            # Ollama omits zero counts, but past a head/tail cut absence proves nothing.
            known = counts is obj or "prompt_eval_count" in counts or "eval_count" in counts
            self.usage = _usage(counts, "prompt_eval_count", "eval_count") if known else None


class _SseMeter(StreamMeter):
    """SSE routes: chunks pass unchanged and complete events are parsed aside, unless the
    meter filters, in which case each event is held until its blank line and then relayed
    (transformed only where the filter says so)."""

    def __init__(self, *, filtering: bool = False, max_event: int = MAX_HELD_EVENT):
        super().__init__()
        self._filtering = filtering
        self._events = EventSplitter(max_event, keep_head=_KEEP)
        self._open_event = b""      # filtering: the unterminated event flushed at EOF

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        events = self._events.feed(chunk)
        if not self._filtering:
            for event in events:
                self._observe(event)
            out = chunk
        else:
            parts: list[bytes] = []
            for event in events:
                if isinstance(event, Oversized):
                    raise StreamProtocolError("SSE event exceeds the size limit")
                self._observe(event)
                parts.append(self._filter(event))
            if self._events.overflowing:
                raise StreamProtocolError("SSE event exceeds the size limit")
            out = b"".join(parts)
        self._sent.sent(out)
        return out

    def finish(self) -> bytes:
        # An event cut off by EOF is not dispatched by SSE clients, so it isn't metered;
        # when filtering, its bytes still go out as upstream sent them (filtered).
        if not self._filtering:
            return b""
        rest = self._events.rest()
        out = self._filter(rest) if isinstance(rest, bytes) else b""
        self._open_event = out
        self._sent.sent(out)
        return out

    def _filter(self, event: bytes) -> bytes:
        return event

    def _closer(self) -> bytes:
        """What to send before our error event, given the client may hold a partial event.

        A partial event with a data field is closed: the client dispatches it on its own
        (a cut data line then fails to parse there, an error too), and lenient clients that
        skip unparsable events still reach ours. One with no data yet (cut in its `event:`
        line, say) only gets its line ended: our `event:` and `data:` fields complete it.
        """
        closer = self._sent.event_closer()
        if closer:
            sent = self._open_event if self._filtering else self._events.partial()
            if not any(line.partition(b":")[0] == b"data" for line in sent.splitlines()):
                return self._sent.line_closer()
        return closer

    @abstractmethod
    def _observe(self, event: Record) -> None:
        """Meter one complete event."""

    def _error_event(self, event: Record) -> None:
        """Record an error event (`event: error`, or data with an `error` member)."""
        data = sse_fields(event)[1] if isinstance(event, bytes) else b""
        obj = loads(data)
        if obj is None:
            self.upstream_error = data.decode("utf-8", "replace")[:_ERROR_TEXT] or "error"
        elif isinstance(obj, dict) and "error" in obj and not obj["error"]:
            return      # `"error": null` is no error
        else:
            self.upstream_error = _error_text(obj)


def _head(event: Record) -> bytes:
    return event.head if isinstance(event, Oversized) else event


def _event_name(event: Record) -> bytes | None:
    """The `event:` field of an SSE event, read cheaply when it is the first line."""
    head = _head(event)
    if head.startswith(b"event:"):
        end = head.find(b"\n")
        return head[6:end if end >= 0 else len(head)].strip()
    if b"\nevent:" in head or b"\revent:" in head:
        name = sse_fields(head)[0]
        return name.encode() if name is not None else None
    return None


_OPENAI_ERROR = {"type": "api_error", "param": None, "code": "upstream_error"}
# Ollama's per-chunk usage under include_usage on /v1/completions: Go writes it last.
_ZERO_USAGE = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'


class OpenAIChunkMeter(_SseMeter):
    """`/v1/chat/completions`, `/v1/completions`: `data:` events, terminal `data: [DONE]`.

    Usage is the `usage` of a chunk with no choices. With strip_usage (the gateway asked
    for usage, the client did not) that chunk is dropped and the `usage` member removed from
    every other chunk (Ollama adds zeros to each `/v1/completions` chunk); other events are
    forwarded byte for byte.
    """

    def __init__(self, *, strip_usage: bool = False, max_event: int = MAX_HELD_EVENT):
        super().__init__(filtering=strip_usage, max_event=max_event)

    def error_frame(self, message: str) -> bytes:
        # openai-python raises APIError for any data object with an "error" member.
        frame = json.dumps({"error": {"message": message, **_OPENAI_ERROR}}).encode()
        return self._closer() + b"data: " + frame + b"\n\n"

    def _observe(self, event: Record) -> None:
        if isinstance(event, Oversized):
            return      # only content chunks get that large, never [DONE] or usage
        if b"[DONE]" in event and sse_fields(event)[1].strip() == b"[DONE]":
            self.complete = True
            return
        usage = b'"usage"' in event and (b"[]" in event or b'"choices"' not in event)
        if not usage and b'"error"' not in event and b"event:" not in event:
            return
        name, data = sse_fields(event)
        obj = loads(data)
        if name == "error" or isinstance(obj, dict) and obj.get("error"):
            self._error_event(event)
        elif usage and isinstance(obj, dict) and not obj.get("choices"):
            counts = _usage(obj.get("usage"), "prompt_tokens", "completion_tokens")
            self.usage = counts or self.usage

    def _filter(self, event: bytes) -> bytes:
        if b'"usage"' not in event:
            return event
        at = event.rfind(_ZERO_USAGE)
        if at >= 0 and b'"choices":[]' not in event:
            after = event[at + len(_ZERO_USAGE):]
            if after[:1] == b"}" and not after[1:].strip(b"\r\n"):
                return event[:at] + after       # Ollama's own bytes, minus the member
        obj = loads(sse_fields(event)[1])
        if not isinstance(obj, dict) or "usage" not in obj:
            return event
        if not obj.get("choices"):
            return b""          # the usage-only chunk the client did not ask for
        del obj["usage"]
        try:
            data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:      # a lone surrogate escape: keep it escaped
            data = json.dumps(obj, separators=(",", ":")).encode()
        return replace_data(event, data)


class ResponsesMeter(_SseMeter):
    """`/v1/responses`: named events, terminal `response.completed` (or `.failed`,
    `.incomplete`) whose `response.usage` has `input_tokens`/`output_tokens`; no [DONE]."""

    _TERMINAL = frozenset({b"response.completed", b"response.failed", b"response.incomplete"})

    def error_frame(self, message: str) -> bytes:
        # openai-python raises APIError when an event's data has an "error" member; the
        # top-level code/message keep it a valid Responses `error` event for other readers.
        frame = json.dumps({"type": "error", "code": "upstream_error", "message": message,
                            "param": None, "error": {"message": message, **_OPENAI_ERROR}})
        return self._closer() + b"event: error\ndata: " + frame.encode() + b"\n\n"

    def _observe(self, event: Record) -> None:
        name = _event_name(event)
        if name in self._TERMINAL:
            self.complete = True
            obj = loads(sse_fields(event)[1]) if isinstance(event, bytes) else None
            response = obj.get("response") if isinstance(obj, dict) else None
            if not isinstance(response, dict):
                response = {}
            self.usage = _usage(response.get("usage"), "input_tokens", "output_tokens")
            if name == b"response.failed":
                self.upstream_error = _error_text(response.get("error") or "response.failed")
        elif name == b"error" or name is None and b'"error"' in _head(event):
            self._error_event(event)


class MessagesMeter(_SseMeter):
    """`/v1/messages`: Anthropic events, terminal `message_stop`. Usage: `message_start`
    gives the (possibly estimated) input count, `message_delta` the final counts."""

    def error_frame(self, message: str) -> bytes:
        # The anthropic SDK raises on an `event: error` event (data events without a name
        # are skipped by it).
        frame = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return self._closer() + b"event: error\ndata: " + frame.encode() + b"\n\n"

    def _observe(self, event: Record) -> None:
        name = _event_name(event)
        if name == b"message_stop":
            self.complete = True
        elif name == b"message_start" or name == b"message_delta":
            if isinstance(event, Oversized):
                return
            obj = loads(sse_fields(event)[1])
            if not isinstance(obj, dict):
                return
            if name == b"message_start":
                message = obj.get("message")
                usage = message.get("usage") if isinstance(message, dict) else None
            else:
                usage = obj.get("usage")
            if isinstance(usage, dict):
                # Later counts win; a field missing from message_delta keeps the earlier one.
                old = self.usage or Usage(0, 0)
                prompt = _count(usage.get("input_tokens"))
                completion = _count(usage.get("output_tokens"))
                self.usage = Usage(old.prompt_tokens if prompt is None else prompt,
                                   old.completion_tokens if completion is None else completion)
        elif name == b"error":
            self._error_event(event)


def meter_for(route: str, *, strip_usage: bool) -> StreamMeter:
    """The meter for a streamed answer on `route`; strip_usage matters for v1_chat and
    v1_completions only. ValueError for routes that never stream."""
    if route in ("api_chat", "api_generate"):
        return NdjsonMeter()
    if route in ("v1_chat", "v1_completions"):
        return OpenAIChunkMeter(strip_usage=strip_usage)
    if route == "v1_responses":
        return ResponsesMeter()
    if route == "v1_messages":
        return MessagesMeter()
    raise ValueError(f"route {route!r} has no streaming format")


# ---------------------------------------------------------------------------------------------
# Non-streaming answers

# route → (where the counts are, prompt field, completion field)
_BODY_USAGE: dict[str, tuple[str | None, str, str | None]] = {
    "api_chat": (None, "prompt_eval_count", "eval_count"),
    "api_generate": (None, "prompt_eval_count", "eval_count"),
    "api_embed": (None, "prompt_eval_count", None),
    "v1_chat": ("usage", "prompt_tokens", "completion_tokens"),
    "v1_completions": ("usage", "prompt_tokens", "completion_tokens"),
    "v1_embeddings": ("usage", "prompt_tokens", None),
    "v1_responses": ("usage", "input_tokens", "output_tokens"),
    "v1_messages": ("usage", "input_tokens", "output_tokens"),
}


def usage_from_body(route: str, body: bytes) -> Usage | None:
    """Usage of a non-streaming answer; None when the route's answers carry no counts
    (`/api/embeddings`, `/api/show`, ...), for error bodies, and when the body isn't a
    JSON object. Counts that aren't non-negative ints count as absent (0).

    Bodies over 1 MiB (embedding batches, a `context` array) are not parsed whole if their
    counts can be read from the members after the last large value (Ollama writes them
    last): a multi-megabyte json.loads would stall the event loop.
    """
    where = _BODY_USAGE.get(route)
    if where is None:
        return None
    container, prompt_key, completion_key = where
    obj: Any = None
    if len(body) > MAX_PARSED_BODY:
        obj = tail_members(body[-_KEEP:])
        if (container or prompt_key) not in obj:
            obj = None
    if obj is None:
        obj = loads(body)
    if not isinstance(obj, dict) or obj.get("error"):
        return None
    return _usage(obj.get(container) if container else obj, prompt_key, completion_key)
