"""Bounded splitting of relayed streams into NDJSON lines and SSE events, and JSON reading."""

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


class _Splitter:
    """Cuts a byte stream into records, holding at most `limit` bytes of an unfinished one
    (plus the start of its terminator).

    feed() returns the records the chunk completes, as bytes. A record longer than `limit`
    comes back (once it ends) as an Oversized with its first `keep_head` and last
    `keep_tail` bytes, so the memory held per stream stays bounded whatever upstream sends.
    """

    __slots__ = ("limit", "keep_head", "keep_tail", "_buf", "_scan", "_head", "_tail")
    overlap = 0                     # terminator bytes that may sit in the previous chunk
    with_terminator = False         # records keep their terminator (SSE: forwarded as is)

    def __init__(self, limit: int, *, keep_head: int = 64 * 1024, keep_tail: int = 0):
        self.limit = limit
        self.keep_head = keep_head
        self.keep_tail = keep_tail
        self._buf = bytearray()         # the unfinished record (oversized: its last bytes)
        self._scan = 0                  # where the terminator search resumes in _buf
        self._head: bytes | None = None     # set while the unfinished record is oversized
        self._tail = bytearray()

    def _find(self, data: bytes | bytearray, start: int) -> tuple[int, int]:
        """(end of the record's content, start of the next record), or (-1, -1)."""
        raise NotImplementedError

    def partial(self) -> bytes:
        """The start of the unfinished record (at most `keep_head` bytes if oversized)."""
        return self._head if self._head is not None else bytes(self._buf)

    @property
    def overflowing(self) -> bool:
        """The unfinished record has outgrown the limit (only its head is kept)."""
        return self._head is not None

    def feed(self, chunk: bytes) -> list[Record]:
        out: list[Record] = []
        start = 0
        if self._head is not None:
            held = len(self._buf)
            data = bytes(self._buf) + chunk
            end, nxt = self._find(data, 0)
            if end < 0:
                self._keep_tail(chunk)
                self._buf = bytearray(data[len(data) - self.overlap:] if self.overlap else b"")
                return out
            self._keep_tail(chunk[:max(0, end - held)])
            out.append(self._oversized())
            self._buf.clear()
            start = nxt - held
        elif self._buf:
            held = len(self._buf)
            self._buf += chunk
            end, nxt = self._find(self._buf, self._scan)
            if end < 0:
                self._scan = max(0, len(self._buf) - self.overlap)
                self._bound()
                return out
            out.append(self._record(self._buf, 0, end, nxt))
            self._buf.clear()
            self._scan = 0
            start = nxt - held
        while True:
            end, nxt = self._find(chunk, start)
            if end < 0:
                break
            out.append(self._record(chunk, start, end, nxt))
            start = nxt
        if start < len(chunk):
            self._buf += memoryview(chunk)[start:]
            self._scan = max(0, len(self._buf) - self.overlap)
            self._bound()
        return out

    def _record(self, data: bytes | bytearray, start: int, end: int, nxt: int) -> Record:
        if end - start > self.limit:
            return Oversized(bytes(data[start:start + self.keep_head]),
                             bytes(data[max(start, end - self.keep_tail):end])
                             if self.keep_tail else b"")
        return bytes(data[start:nxt if self.with_terminator else end])

    def _bound(self) -> None:
        # The buffer may already hold the start of the terminator that ends the record.
        if len(self._buf) > self.limit + self.overlap:
            self._head = bytes(self._buf[:self.keep_head])
            self._keep_tail(self._buf)
            # Keep just enough to see a terminator that straddles into the next chunk.
            self._buf = bytearray(self._buf[len(self._buf) - self.overlap:]
                                  if self.overlap else b"")
            self._scan = 0

    def _keep_tail(self, data: bytes | bytearray) -> None:
        if self.keep_tail and data:
            self._tail += data
            # Trim lazily: amortised O(1) per byte however small the chunks.
            if len(self._tail) > 2 * self.keep_tail:
                del self._tail[:len(self._tail) - self.keep_tail]

    def rest(self) -> Record | None:
        """Take the unfinished record (at upstream EOF); None if there is none."""
        rec: Record | None = None
        if self._head is not None:
            rec = self._oversized()
        elif self._buf:
            rec = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return rec

    def _oversized(self) -> Oversized:
        """Hand out the oversized record seen so far and forget it."""
        assert self._head is not None
        rec = Oversized(self._head, bytes(self._tail[len(self._tail) - self.keep_tail:]))
        self._head = None
        self._tail.clear()
        return rec


class LineSplitter(_Splitter):
    """NDJSON lines, without their `\\n`."""

    __slots__ = ()

    def _find(self, data: bytes | bytearray, start: int) -> tuple[int, int]:
        end = data.find(b"\n", start)
        return (end, end + 1) if end >= 0 else (-1, -1)


class EventSplitter(_Splitter):
    """SSE events, each with its terminating blank line (`\\n\\n`, `\\r\\n\\r\\n`, `\\n\\r\\n`).

    Bare-CR line ends are not recognised (Ollama writes LF).
    """

    __slots__ = ()
    overlap = 2
    with_terminator = True

    def _find(self, data: bytes | bytearray, start: int) -> tuple[int, int]:
        lf = data.find(b"\n\n", start)
        # A CRLF blank line can only matter if it comes before the first LF-LF.
        crlf = data.find(b"\n\r\n", start, lf + 2 if lf >= 0 else len(data))
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return crlf + 1, crlf + 3
        if lf >= 0:
            return lf + 1, lf + 2
        return -1, -1


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
