"""Bounded splitting of relayed streams into NDJSON lines and SSE events, and reading them
without ever raising: SSE fields, upstream error frames and their text, JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Oversized:
    """A record longer than the splitter's limit: only its first and last bytes were kept."""

    head: bytes
    tail: bytes


Record = bytes | Oversized


class LineSplitter:
    """Cuts a byte stream into NDJSON lines (without their `\\n`), holding at most `limit`
    bytes of an unfinished one.

    feed() returns the lines the chunk completes, as bytes. A line longer than `limit` comes
    back (once it ends) as an Oversized with its first `keep_head` and last `keep_tail`
    bytes, so the memory held per stream stays bounded whatever upstream sends.
    """

    __slots__ = ("limit", "keep_head", "keep_tail", "_buf", "_scan", "_head", "_tail")

    def __init__(self, limit: int, *, keep_head: int = 64 * 1024, keep_tail: int = 0):
        self.limit = limit
        self.keep_head = keep_head
        self.keep_tail = keep_tail
        self._buf = bytearray()         # the unfinished line (emptied once it is oversized)
        self._scan = 0                  # where the newline search resumes in _buf
        self._head: bytes | None = None     # set while the unfinished line is oversized
        self._tail = bytearray()

    def partial(self) -> bytes:
        """The start of the unfinished line (at most `keep_head` bytes if oversized)."""
        return self._head if self._head is not None else bytes(self._buf)

    def feed(self, chunk: bytes) -> list[Record]:
        out: list[Record] = []
        start = 0
        if self._head is not None:
            end = chunk.find(b"\n")
            if end < 0:
                self._keep_tail(chunk)
                return out
            self._keep_tail(chunk[:end])
            out.append(self._oversized())
            start = end + 1
        elif self._buf:
            held = len(self._buf)
            self._buf += chunk
            end = self._buf.find(b"\n", self._scan)
            if end < 0:
                self._scan = len(self._buf)
                self._bound()
                return out
            out.append(self._record(self._buf, 0, end))
            self._buf.clear()
            self._scan = 0
            start = end + 1 - held
        while (end := chunk.find(b"\n", start)) >= 0:
            out.append(self._record(chunk, start, end))
            start = end + 1
        if start < len(chunk):
            self._buf += memoryview(chunk)[start:]
            self._scan = len(self._buf)
            self._bound()
        return out

    def _record(self, data: bytes | bytearray, start: int, end: int) -> Record:
        if end - start > self.limit:
            return Oversized(bytes(data[start:start + self.keep_head]),
                             bytes(data[max(start, end - self.keep_tail):end])
                             if self.keep_tail else b"")
        return bytes(data[start:end])

    def _bound(self) -> None:
        if len(self._buf) > self.limit:
            self._head = bytes(self._buf[:self.keep_head])
            self._keep_tail(self._buf)
            self._buf = bytearray()
            self._scan = 0

    def _keep_tail(self, data: bytes | bytearray) -> None:
        if self.keep_tail and data:
            self._tail += data
            # Trim lazily: amortised O(1) per byte however small the chunks.
            if len(self._tail) > 2 * self.keep_tail:
                del self._tail[:len(self._tail) - self.keep_tail]

    def rest(self) -> Record | None:
        """Take the unfinished line (at upstream EOF); None if there is none."""
        rec: Record | None = None
        if self._head is not None:
            rec = self._oversized()
        elif self._buf:
            rec = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return rec

    def _oversized(self) -> Oversized:
        """Hand out the oversized line seen so far and forget it."""
        assert self._head is not None
        rec = Oversized(self._head, bytes(self._tail[len(self._tail) - self.keep_tail:]))
        self._head = None
        self._tail.clear()
        return rec


ERROR_LINE_HOLD = 16    # line bytes held back at most to tell an error line
_WS = b" \t\r"


def error_line(data: bytes, start: int = 0) -> bool | None:
    """Whether the NDJSON line at data[start:] is an error object: `{"error"` (Ollama's
    shape), whitespace allowed around the brace within its first ERROR_LINE_HOLD bytes.
    None while data ends too early to tell; a line that ends first is no error line.
    """
    if data.startswith(b'{"', start) and len(data) - start >= 8:    # Ollama's lines
        return data.startswith(b'{"error"', start)
    end = min(len(data), start + ERROR_LINE_HOLD)
    newline = data.find(b"\n", start, end)
    if newline >= 0:
        end = newline
    i = start
    while i < end and data[i] in _WS:
        i += 1
    if i < end:
        if data[i] != 0x7B:     # "{"
            return False
        i += 1
        while i < end and data[i] in _WS:
            i += 1
        n = min(end - i, 7)
        if data[i:i + n] != b'"error"'[:n]:
            return False
        if n == 7:
            return True
    # All of it could still start an error line: wait for more, unless the line is over.
    return None if newline < 0 and end - start < ERROR_LINE_HOLD else False


@dataclass(frozen=True, slots=True)
class Spill:
    """A piece of an SSE event too long to hold back, relayed as it comes."""

    data: bytes
    head: bytes         # the event's first bytes (at most keep_head), to judge it by
    first: bool         # the piece that starts the event: all of it so far
    last: bool          # the piece that ends it, blank line included


def _event_end(data: bytes | bytearray, start: int) -> int:
    """Where the SSE event at data[start:] ends, after its blank line (`\\n\\n`,
    `\\r\\n\\r\\n`, `\\n\\r\\n`); -1 if it doesn't end within data."""
    lf = data.find(b"\n\n", start)
    # A CRLF blank line can only matter if it comes before the first LF-LF.
    crlf = data.find(b"\n\r\n", start, lf + 2 if lf >= 0 else len(data))
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 3
    return lf + 2 if lf >= 0 else -1


class EventSplitter:
    """Cuts a relayed SSE stream into whole events (each with its blank line), holding
    back the unfinished one while it is at most `limit` bytes (plus two of a blank line).

    feed() returns, in stream order, each event the chunk completes as bytes, and an event
    too long to hold as Spill pieces: all of it once it outgrows the limit (or at once when
    it arrives whole), then each chunk's part of it up to its end. Joined, they are the
    input less the event held back: nothing is lost and memory stays bounded.
    Bare-CR line ends are not recognised (Ollama writes LF).
    """

    __slots__ = ("limit", "keep_head", "_buf", "_scan", "_spilling", "_prev")

    def __init__(self, limit: int, *, keep_head: int = 64 * 1024):
        self.limit = limit
        self.keep_head = keep_head
        self._buf = bytearray()         # the unfinished event, held back
        self._scan = 0                  # where the blank-line search resumes in _buf
        self._spilling: bytes | None = None     # the head of the event being spilled
        self._prev = b""                # its last two bytes: a blank line may straddle

    @property
    def idle(self) -> bool:
        """Nothing held back: the next byte starts a new event."""
        return not self._buf and self._spilling is None

    def feed(self, chunk: bytes) -> list[bytes | Spill]:
        out: list[bytes | Spill] = []
        start = 0
        if self._spilling is not None:
            data = self._prev + chunk
            end = _event_end(data, 0)
            if end < 0:
                self._prev = data[-2:]
                if chunk:
                    out.append(Spill(chunk, self._spilling, False, False))
                return out
            start = end - len(self._prev)
            out.append(Spill(chunk[:start], self._spilling, False, True))
            self._spilling = None
            self._prev = b""
        elif self._buf:
            held = len(self._buf)
            self._buf += chunk
            end = _event_end(self._buf, self._scan)
            if end < 0:
                self._hold(out)
                return out
            out.append(self._event(bytes(self._buf[:end])))
            self._buf.clear()
            self._scan = 0
            start = end - held
        while (end := _event_end(chunk, start)) >= 0:
            out.append(self._event(chunk[start:end]))
            start = end
        if start < len(chunk):
            self._buf += memoryview(chunk)[start:]
            self._hold(out)
        return out

    def _event(self, event: bytes) -> bytes | Spill:
        if len(event) > self.limit + 2:
            return Spill(event, event[:self.keep_head], True, True)
        return event

    def _hold(self, out: list[bytes | Spill]) -> None:
        if len(self._buf) > self.limit + 2:
            data = bytes(self._buf)
            self._spilling = data[:self.keep_head]
            self._prev = data[-2:]
            out.append(Spill(data, self._spilling, True, False))
            self._buf.clear()
            self._scan = 0
        else:
            # The buffer may already end with the start of the blank line.
            self._scan = max(0, len(self._buf) - 2)

    def rest(self) -> bytes:
        """Take the unfinished event held back (at upstream EOF); b"" if there is none."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return rest


def sse_fields(record: bytes) -> tuple[str | None, bytes]:
    """The `event` name and the joined `data` of one SSE event (WHATWG field rules)."""
    name: str | None = None
    data: list[bytes] = []
    for line in record.splitlines():
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return name, b"\n".join(data)


def event_name(event: bytes) -> bytes | None:
    """The `event:` field of an SSE event (or its head), read cheaply if it comes first."""
    if event.startswith(b"event:"):
        end = event.find(b"\n")
        return event[6:end if end >= 0 else len(event)].strip()
    if b"\nevent:" in event or b"\revent:" in event:
        name = sse_fields(event)[0]
        return name.encode() if name is not None else None
    return None


def record_head(record: Record) -> bytes:
    """A record's bytes, or an Oversized one's head."""
    return record.head if isinstance(record, Oversized) else record


def event_error_text(event: Record) -> str:
    """The upstream text of an SSE error event, for the logs."""
    data = sse_fields(record_head(event))[1]
    obj = loads(data) if isinstance(event, bytes) else None
    if obj is None:
        return data.decode("utf-8", "replace")[:ERROR_TEXT] or "error"
    return error_text(obj)


def replace_data(record: bytes, data: bytes) -> bytes:
    """The same SSE event with its data field(s) replaced by one `data:` line."""
    nl = b"\r\n" if record.endswith(b"\r\n") else b"\n"
    lines: list[bytes] = []
    placed = False
    for line in record.splitlines():
        if not line:
            continue
        if line == b"data" or line.startswith(b"data:"):
            if not placed:
                lines.append(b"data: " + data)
                placed = True
            continue
        lines.append(line)
    return nl.join(lines) + nl + nl


class TailTracker:
    """Remembers the last bytes sent to the client, to close a partial line or event."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = b""

    def sent(self, data: bytes) -> None:
        if data:
            self.last = data[-4:] if len(data) >= 4 else (self.last + data)[-4:]

    def line_closer(self) -> bytes:
        """What ends a partially sent line: nothing if the client is at a line start."""
        return b"\n" if self.last and not self.last.endswith(b"\n") else b""

    def event_closer(self) -> bytes:
        """What ends a partially sent SSE event, so the next bytes start a new event."""
        last = self.last
        if not last:
            return b""
        prefix = b""
        if last.endswith(b"\r"):       # a CR the client will pair with our LF
            prefix, last = b"\n", last + b"\n"
        if last.endswith((b"\n\n", b"\n\r\n")):
            return prefix
        if last.endswith(b"\n"):
            return prefix + b"\n"
        return prefix + b"\n\n"


# Reading JSON records without ever raising on what upstream sends.

ERROR_TEXT = 500        # upstream error text kept for the logs


def error_text(value: object) -> str:
    """A short text for the logs from an upstream error value or error object."""
    if isinstance(value, dict):
        inner = value.get("error")
        if isinstance(inner, (dict, str)) and inner:
            value = inner
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        value = value["message"]
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:ERROR_TEXT] or "error"


def loads(data: bytes) -> Any:
    """The parsed JSON, or None when it isn't valid JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):    # RecursionError: absurdly deep nesting
        return None


_DECODER = json.JSONDecoder()       # stateless; raw_decode walks the head of a long line


def head_members(head: bytes) -> dict[str, Any]:
    """The top-level members of a JSON object that are complete within its first bytes."""
    text = head.decode("utf-8", "replace")
    found: dict[str, Any] = {}
    pos = _skip_ws(text, 0)
    if text[pos:pos + 1] != "{":
        return found
    try:
        while True:
            pos = _skip_ws(text, pos + 1)
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not isinstance(key, str) or text[pos:pos + 1] != ":":
                return found
            value, pos = _DECODER.raw_decode(text, _skip_ws(text, pos + 1))
            pos = _skip_ws(text, pos)
            # Only a delimiter proves the value wasn't cut short (a number, say).
            if text[pos:pos + 1] not in (",", "}"):
                return found
            found[key] = value
            if text[pos] == "}":
                return found
    except (ValueError, RecursionError):
        return found


def _skip_ws(text: str, pos: int) -> int:
    while text[pos:pos + 1] in (" ", "\t", "\r", "\n"):
        pos += 1
    return pos


def tail_members(tail: bytes) -> dict[str, Any]:
    """The top-level members of a JSON object that follow its last large value.

    Tries `{` + the text after each `,"` in the tail, leftmost first. A start inside a
    nested value leaves unbalanced closers and one at the end of a string puts the quotes
    out of step, so the first that parses is a run of top-level members up to the end.
    """
    pos = tail.find(b',"')
    for _ in range(16):
        if pos < 0:
            break
        obj = loads(b"{" + tail[pos + 1:])
        if isinstance(obj, dict):
            return obj
        pos = tail.find(b',"', pos + 2)
    return {}
