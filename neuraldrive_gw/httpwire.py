"""HTTP/1.1 response framing, as the upstream client reads it: pure parsing, no I/O.

`parse_head` reads a status line and headers and decides how the body is framed;
`ChunkDecoder` undoes chunked transfer coding as bytes arrive, in pieces of any size.
Both are strict: anything that is not valid framing raises UpstreamProtocolError, and the
connection it came from is never reused (upstream_http.py).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024            # status line + headers of one response
MAX_LINE_BYTES = 4 * 1024             # one chunk-size line or trailer line

# How a response body is framed
LENGTH, CHUNKED, UNTIL_CLOSE, EMPTY = range(4)

_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"
_NO_BODY_STATUS = frozenset({204, 304})
# ChunkDecoder states
_SIZE, _DATA, _DATA_END, _TRAILER, _FINISHED = range(5)


class UpstreamIOError(Exception):
    """The upstream refused, reset or closed the connection, or the response was cut short."""


class UpstreamProtocolError(UpstreamIOError):
    """The upstream sent something that is not valid HTTP/1.1 framing."""


@dataclass(slots=True)
class Head:
    """A parsed status line and headers. Header names are lower-case; a repeated header
    keeps its first value (the framing ones are checked for conflicts)."""

    status: int
    headers: dict[str, str]
    framing: int                     # LENGTH, CHUNKED, UNTIL_CLOSE or EMPTY
    length: int | None               # Content-Length, when that frames the body
    reusable: bool                   # the connection may carry another request after it


def parse_head(head: bytes, *, head_only: bool) -> Head:
    """Parse `head` (up to, not including, the blank line). `head_only`: the request was
    HEAD, so no body follows whatever the headers say."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 \
            or code.translate(None, _DIGITS) or rest[3:4] not in (b"", b" "):
        raise UpstreamProtocolError("malformed status line")
    status = int(code)
    if status == 101 or status < 100:
        raise UpstreamProtocolError(f"unexpected status {status}")
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            raise UpstreamProtocolError("malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t")
        if key == "content-length":
            lengths.add(text)
        headers.setdefault(key, text.decode("latin-1"))
    result = Head(status, headers, EMPTY, None, version == b"HTTP/1.1"
                  and "close" not in headers.get("connection", "").lower())
    if not (head_only or status in _NO_BODY_STATUS or status < 200):
        _body_framing(result, lengths)
    return result


def _body_framing(head: Head, lengths: set[bytes]) -> None:
    coding = head.headers.get("transfer-encoding")
    if coding is not None:
        if coding.strip().lower() != "chunked":
            raise UpstreamProtocolError("unsupported transfer-encoding")
        if lengths:
            head.reusable = False           # both framings: chunked wins, never reuse
        head.framing = CHUNKED
    elif lengths:
        if len(lengths) != 1:
            raise UpstreamProtocolError("conflicting content-length")
        text = next(iter(lengths))
        if not text or text.translate(None, _DIGITS) or len(text) > 15:
            raise UpstreamProtocolError("malformed content-length")
        head.framing, head.length = LENGTH, int(text)
    else:
        head.framing, head.reusable = UNTIL_CLOSE, False


class ChunkDecoder:
    """Chunked transfer coding, undone incrementally. `feed()` returns the payload bytes
    found in `data` (possibly none); `finished` once the last chunk and trailers are in;
    `trailing` if bytes followed them (the connection must then not be reused)."""

    __slots__ = ("_state", "_left", "_partial", "finished", "trailing")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0                    # bytes of the current chunk still to come
        self._partial = b""               # an incomplete chunk-size or trailer line
        self.finished = False
        self.trailing = False

    def feed(self, data: bytes) -> bytes:
        buf = self._partial + data if self._partial else data
        self._partial = b""
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    self._partial = buf[pos:]
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise UpstreamProtocolError("chunk not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _FINISHED:
                self.trailing = True
                break
            else:                               # _SIZE or _TRAILER: one CRLF-terminated line
                eol = buf.find(b"\r\n", pos, pos + MAX_LINE_BYTES + 2)
                if eol < 0:
                    if end - pos > MAX_LINE_BYTES:
                        raise UpstreamProtocolError("chunk line too long")
                    self._partial = buf[pos:]
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if state == _TRAILER:
                    if not line:
                        self._state = _FINISHED
                        self.finished = True
                    continue
                size = line.partition(b";")[0].strip(b" \t")
                if not size or len(size) > 15 or size.translate(None, _HEX):
                    raise UpstreamProtocolError("malformed chunk size")
                left = int(size, 16)
                if left and buf[pos + left:pos + left + 2] == b"\r\n":
                    out.append(buf[pos:pos + left])      # the whole chunk is here
                    pos += left + 2
                    continue
                self._left = left
                self._state = _DATA if left else _TRAILER
        return out[0] if len(out) == 1 else b"".join(out)
