"""Token metering of relayed streams per API dialect, and the filters every chunk passes
through: upstream error frames replaced by ours, and usage the client did not ask for removed."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

from .framing import (EventSplitter, LineSplitter, Oversized, Record, Spill, TailTracker,
                      error_line, error_text, event_error_text, event_name, head_members, loads,
                      record_head, replace_data, sse_fields, tail_members)
# Usage and usage_from_body are re-exported: the proxy reads them here.
from .usage import Usage as Usage, token_count, usage_from_body as usage_from_body, usage_in

MAX_PARSED_LINE = 1 << 20     # NDJSON: a longer line is parsed from its head and tail only
MAX_HELD_EVENT = 8 << 20      # SSE: the largest event held back whole (and parsed)
_KEEP = 64 * 1024             # head/tail kept of an oversized line or event
_ERROR_LINE = 4096            # bytes of an upstream NDJSON error line read for the logs
UPSTREAM_ERROR_MESSAGE = "the model server reported an error"


class StreamProtocolError(ValueError):
    """Upstream sent a stream the gateway cannot relay safely (an SSE event too large to filter)."""


class StreamMeter(ABC):
    """Watches one streamed response as it is relayed; pick the class with meter_for().

    The proxy calls feed() with every upstream chunk and sends what it returns, finish() at
    upstream EOF, and error_frame() when the stream broke or ended without `complete` —
    but never once `errored` is set: the client then already has its final error frame.
    Meters never raise on content, only StreamProtocolError when a filter would have to
    hold unbounded data.

    Upstream error text never reaches the client (it can name internal paths): an in-band
    error frame is replaced by the route's own error frame with UPSTREAM_ERROR_MESSAGE, its
    text goes to `upstream_error` (internal logs only), and nothing upstream sends after it
    is relayed. Such a stream sets `errored` and never `complete`.
    """

    def __init__(self) -> None:
        self.complete = False                   # a terminal frame was seen (never if errored)
        self.usage: Usage | None = None         # counts, once known
        self.upstream_error: str | None = None  # an in-band upstream error, for the logs only
        self.errored = False                    # the meter wrote the final error frame
        self._sent = TailTracker()

    @abstractmethod
    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client now (b"" while held back, and once errored)."""

    @abstractmethod
    def finish(self) -> bytes:
        """Upstream EOF: the bytes still held back, to send before ending the response."""

    def error_frame(self, message: str) -> bytes:
        """A final error frame in the route's dialect, led by whatever ends a partial
        line or event already sent, so that the client's library raises `message`.
        Sets `errored`; b"" when it was already set (the client has its error frame)."""
        if self.errored:
            return b""
        self.errored = True
        frame = self._error_frame(message)
        self._sent.sent(frame)
        return frame

    @abstractmethod
    def _error_frame(self, message: str) -> bytes:
        """The bytes of error_frame()."""

    def _replace(self, error: str) -> bytes:
        """Our error frame in place of an upstream one, which ends the stream."""
        self.upstream_error = error
        self.complete = False
        return self.error_frame(UPSTREAM_ERROR_MESSAGE)


class NdjsonMeter(StreamMeter):
    """`/api/chat`, `/api/generate`: chunks pass on as they come, except the first bytes of
    each line (ERROR_LINE_HOLD at most), held until they show whether it is the error line
    `{"error":"..."}` Ollama writes when generation fails after the 200. Lines are parsed
    aside. An error line is only caught by its first member: Ollama writes no other.

    Terminal: a line with top-level `"done": true`; usage is its `prompt_eval_count` and
    `eval_count`, absent = 0 (Ollama omits zero counts). Lines longer than `max_line` are
    judged from their first and last 64 KiB (a final `/api/generate` frame carries the whole
    `context` array, and its counts come after it).
    """

    def __init__(self, *, max_line: int = MAX_PARSED_LINE):
        super().__init__()
        self._lines = LineSplitter(max_line, keep_head=_KEEP, keep_tail=_KEEP)
        self._held = b""            # the start of a line not judged yet (not sent)
        self._in_line = False       # in a line judged no error line: it passes as it comes
        self._error_line: bytearray | None = None   # the upstream error line, while read

    def feed(self, chunk: bytes) -> bytes:
        if self.errored:
            if self._error_line is not None:
                self._read_error(chunk)
            return b""
        data = self._held + chunk if self._held else chunk
        self._held = b""
        start = 0
        if self._in_line:
            start = data.find(b"\n") + 1
            if not start:
                return self._send(data)
            self._in_line = False
        while start < len(data):        # at a line start
            verdict = error_line(data, start)
            if verdict is None:
                self._held = data[start:]
                return self._send(data[:start])
            if verdict:
                sent = self._send(data[:start])
                frame = self._replace("error")
                self._error_line = bytearray()
                self._read_error(data[start:])
                return sent + frame
            start = data.find(b"\n", start) + 1
            if not start:
                self._in_line = True
                break
        return self._send(data)

    def finish(self) -> bytes:
        self._error_line = None
        if self.errored:
            return b""
        out = self._send(self._held)    # a line start that EOF proved no error line
        self._held = b""
        # ollama-python (httpx iter_lines) also reads a last line that lacks its "\n".
        line = self._lines.rest()
        if line is not None:
            self._observe(line)
        return out

    def _error_frame(self, message: str) -> bytes:
        # ollama-python json.loads every line and raises ResponseError on an "error" member.
        return self._sent.line_closer() + json.dumps({"error": message}).encode() + b"\n"

    def _send(self, data: bytes) -> bytes:
        if data:
            for line in self._lines.feed(data):
                self._observe(line)
            self._sent.sent(data)
        return data

    def _read_error(self, data: bytes) -> None:
        """Read the upstream error line (its first _ERROR_LINE bytes) for the logs."""
        assert self._error_line is not None
        end = data.find(b"\n")
        line = self._error_line
        line += data[:end if end >= 0 else len(data)][:_ERROR_LINE - len(line)]
        obj = loads(bytes(line))    # else cut short: the text after `{"error":`
        self.upstream_error = error_text(obj if isinstance(obj, dict) else line.decode(
            "utf-8", "replace").partition(":")[2].lstrip(' \t"'))
        if end >= 0:
            self._error_line = None

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
            # Not its first member, so it went out: record it at least.
            self.upstream_error = error_text(error)
        elif obj.get("done") is True:
            self.complete = True
            # Ollama omits zero counts, but past a head/tail cut absence proves nothing.
            known = counts is obj or "prompt_eval_count" in counts or "eval_count" in counts
            self.usage = usage_in(counts, "prompt_eval_count", "eval_count") if known else None


class _SseMeter(StreamMeter):
    """SSE routes: each event is relayed when its blank line arrives (Ollama writes whole
    events), so that error events can be replaced, and parsed aside; a filtering meter
    may also change it. An event longer than `max_event` is relayed as it comes unless its
    head shows an error event; a filtering meter refuses it instead."""

    def __init__(self, *, filtering: bool = False, max_event: int = MAX_HELD_EVENT):
        super().__init__()
        self._filtering = filtering
        self._events = EventSplitter(max_event, keep_head=_KEEP)
        self._open_event = b""      # what the client has of an event not ended yet

    def feed(self, chunk: bytes) -> bytes:
        if self.errored or not chunk:
            return b""
        parts: list[bytes] = []
        error: str | None = None
        for event in self._events.feed(chunk):
            if isinstance(event, Spill):
                if self._filtering:
                    raise StreamProtocolError("SSE event exceeds the size limit")
                head = Oversized(event.head, b"")
                if event.first and (error := self._error_of(head)) is not None:
                    break
                self._open_event = b"" if event.last else event.head
                if event.last:
                    self._observe(head)
                parts.append(event.data)
            else:
                self._observe(event)
                if b"error" in event and (error := self._error_of(event)) is not None:
                    break
                parts.append(self._filter(event) if self._filtering else event)
        out = b"".join(parts)
        self._sent.sent(out)
        if error is not None:
            out += self._replace(error)
        return out

    def finish(self) -> bytes:
        # An event cut off by EOF is not dispatched by SSE clients, so it isn't metered;
        # its bytes still go out as upstream sent them (filtered), unless it may be an error.
        rest = b"" if self.errored else self._events.rest()
        if not rest:
            return b""
        if event_name(rest) == b"error" or error_line(sse_fields(rest)[1]):
            return self._replace(event_error_text(rest))
        if b'"error"' in rest:
            return b""      # it could hold upstream error text; the stream is broken anyway
        out = self._filter(rest) if self._filtering else rest
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
        if closer and not any(line.partition(b":")[0] == b"data"
                              for line in self._open_event.splitlines()):
            return self._sent.line_closer()
        return closer

    @abstractmethod
    def _observe(self, event: Record) -> None:
        """Meter one complete event (or an Oversized one, from its head)."""

    def _error_of(self, event: Record) -> str | None:
        """The upstream text if `event` is an error event: named `error`, or with data that
        is an object with a non-empty `error` member (or mentions one and is no JSON; an
        Oversized one: starts with it)."""
        head = record_head(event)
        if b"error" not in head:
            return None
        if event_name(head) != b"error":
            if b'"error"' not in head:
                return None
            data = sse_fields(head)[1]
            if isinstance(event, bytes):
                obj = loads(data)
                if obj is not None and not (isinstance(obj, dict) and obj.get("error")):
                    return None
            elif not error_line(data) and not head_members(data).get("error"):
                return None
        return event_error_text(event)


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

    def feed(self, chunk: bytes) -> bytes:
        # Most chunks are whole content events: nothing held back, none an error, the
        # usage chunk or [DONE]. Those pass as they are, without being cut into events.
        if (chunk.endswith(b"\n\n") and self._events.idle and len(chunk) <= self._events.limit
                and b"error" not in chunk and b'"usage"' not in chunk
                and b"[DONE]" not in chunk and not self.errored):
            self._sent.sent(chunk)
            return chunk
        return super().feed(chunk)

    def _error_frame(self, message: str) -> bytes:
        # openai-python raises APIError for any data object with an "error" member.
        frame = json.dumps({"error": {"message": message, **_OPENAI_ERROR}}).encode()
        return self._closer() + b"data: " + frame + b"\n\n"

    def _observe(self, event: Record) -> None:
        if isinstance(event, Oversized):
            return      # only content chunks get that large, never [DONE] or usage
        if b"[DONE]" in event and sse_fields(event)[1].strip() == b"[DONE]":
            self.complete = True
        elif b'"usage"' in event and (b"[]" in event or b'"choices"' not in event):
            obj = loads(sse_fields(event)[1])
            if isinstance(obj, dict) and not obj.get("choices"):
                counts = usage_in(obj.get("usage"), "prompt_tokens", "completion_tokens")
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
    `.incomplete`) whose `response.usage` has `input_tokens`/`output_tokens`; no [DONE].
    A `response.failed` with an error is an error event too (replaced, not complete)."""

    _TERMINAL = frozenset({b"response.completed", b"response.failed", b"response.incomplete"})

    def _error_frame(self, message: str) -> bytes:
        # openai-python raises APIError when an event's data has an "error" member; the
        # top-level code/message keep it a valid Responses `error` event for other readers.
        frame = json.dumps({"type": "error", "code": "upstream_error", "message": message,
                            "param": None, "error": {"message": message, **_OPENAI_ERROR}})
        return self._closer() + b"event: error\ndata: " + frame.encode() + b"\n\n"

    def _observe(self, event: Record) -> None:
        name = event_name(record_head(event))
        if name in self._TERMINAL:
            self.complete = True
            response = self._response(event)
            self.usage = usage_in(response.get("usage"), "input_tokens", "output_tokens")
            if name == b"response.failed":
                self.upstream_error = error_text(response.get("error") or "response.failed")

    def _error_of(self, event: Record) -> str | None:
        head = record_head(event)
        if b"error" in head and event_name(head) == b"response.failed":
            if isinstance(event, Oversized):
                return "response.failed"        # too long to read: taken as an error
            error = self._response(event).get("error")
            return error_text(error) if error else None
        return super()._error_of(event)

    @staticmethod
    def _response(event: Record) -> dict[str, Any]:
        obj = loads(sse_fields(event)[1]) if isinstance(event, bytes) else None
        response = obj.get("response") if isinstance(obj, dict) else None
        return response if isinstance(response, dict) else {}


class MessagesMeter(_SseMeter):
    """`/v1/messages`: Anthropic events, terminal `message_stop`. Usage: `message_start`
    gives the (possibly estimated) input count, `message_delta` the final counts."""

    def _error_frame(self, message: str) -> bytes:
        # The anthropic SDK raises on an `event: error` event (data events without a name
        # are skipped by it).
        frame = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return self._closer() + b"event: error\ndata: " + frame.encode() + b"\n\n"

    def _observe(self, event: Record) -> None:
        name = event_name(record_head(event))
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
                prompt = token_count(usage.get("input_tokens"))
                completion = token_count(usage.get("output_tokens"))
                self.usage = Usage(old.prompt_tokens if prompt is None else prompt,
                                   old.completion_tokens if completion is None else completion)


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
