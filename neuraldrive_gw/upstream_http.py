"""A small HTTP/1.1 client for the one upstream: Ollama, on loopback or a local network.

aiohttp's ClientSession cost about 115 µs of CPU per request on aiohttp 3.14 and about
250 µs on Debian's 3.8.4, against about 30 µs for a plain protocol doing the same exchange
(docs/performance.md): more than a whole bare pass-through proxy spends on everything else.
The gateway only ever talks to one origin, with requests it builds itself, so it needs
very little of a general client: keep-alive connections to one host, one request at a
time per connection, Content-Length, chunked and read-until-close bodies, a connect
timeout, a read timeout (the longest silence between two reads), flow control, and
closing a connection to make Ollama stop generating.

It is strict about what it accepts (the parsing is in httpwire.py): a malformed status
line, header, chunk size or body length fails the response with UpstreamProtocolError,
and the connection is never reused.
Nothing here follows redirects, decompresses, or reads proxy settings from the
environment.
"""

from __future__ import annotations

import asyncio
import collections
from urllib.parse import urlsplit

from .httpwire import (CHUNKED, EMPTY, LENGTH, MAX_HEAD_BYTES, UNTIL_CLOSE, ChunkDecoder,
                       UpstreamIOError, UpstreamProtocolError, parse_head)

__all__ = ["Response", "UpstreamClient", "UpstreamIOError", "UpstreamProtocolError",
           "UpstreamReadTimeout", "parse_base_url"]

MAX_CONNECTIONS = 256
MAX_IDLE = 64                         # idle keep-alive connections kept for reuse
IDLE_S = 15.0                         # an idle connection older than this is not reused
HIGH_WATER = 256 * 1024               # buffered body bytes: stop reading from the socket
LOW_WATER = 64 * 1024                 # ... and start again below this

# Response states
_HEAD, _BODY, _DONE, _FAILED = range(4)


class UpstreamReadTimeout(TimeoutError):
    """The upstream was silent for longer than the read timeout."""


class Response:
    """One upstream response: status and headers first, then the body as it arrives.

    Header names are lower-case; a repeated header keeps its first value (the gateway
    reads only content-type, content-length, transfer-encoding and connection, and the
    framing ones are checked for conflicts).
    """

    def __init__(self, conn: _Connection, method: str, read_timeout_s: float):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length: int | None = None
        self._conn = conn
        self._loop = conn.loop
        self._head_only = method == "HEAD"
        self._read_timeout_s = read_timeout_s
        self._state = _HEAD
        self._head = b""
        self._framing = EMPTY
        self._left = 0                       # body bytes still to come (Content-Length)
        self._chunks_in: ChunkDecoder | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._reusable = True
        self._head_waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = self._loop.time()
        self._finished = False               # released or closed

    # -- the consumer's side -----------------------------------------------------------

    @property
    def complete(self) -> bool:
        """The whole body has arrived (a released connection can then be reused)."""
        return self._state == _DONE

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived (de-chunked), or b"" at its end.

        Raises UpstreamIOError when the body was cut short or malformed and
        UpstreamReadTimeout after too long a silence; bytes that arrived before the
        failure are returned first.
        """
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= LOW_WATER:
            self._paused = False
            self._last_read = self._loop.time()     # our own pause was not the upstream's silence
            self._conn.resume_reading()
        return chunk

    async def read(self, limit: int) -> bytes:
        """The whole body; UpstreamIOError if it would exceed `limit` bytes."""
        if self.content_length is not None and self.content_length > limit:
            raise UpstreamIOError("response body too large")
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                raise UpstreamIOError("response body too large")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with the response: a complete one hands its connection back for reuse,
        anything else closes it (which is how Ollama learns to stop generating)."""
        if self._finished:
            return
        if self._state == _DONE and self._reusable:
            self._finish()
            self._conn.client._reuse(self._conn)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection, whatever the state of the response."""
        if self._finished:
            return
        if self._state in (_HEAD, _BODY):
            self._fail(UpstreamIOError("response closed by the gateway"))
        self._finish()
        self._conn.client._discard(self._conn)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def _finish(self) -> None:
        self._finished = True

    # -- the connection's side ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            if self._state == _HEAD:
                data = self._feed_head(data)
                if self._state != _BODY or not data:
                    return
            if self._state == _BODY:
                self._feed_body(data)
            elif self._state == _DONE:
                self._reusable = False         # bytes after the end of the response
        except UpstreamProtocolError as exc:
            self._reusable = False
            self._fail(exc)

    def eof(self) -> None:
        """The upstream closed its side of the connection."""
        self._reusable = False
        if self._state == _BODY and self._framing == UNTIL_CLOSE:
            self._done()
        elif self._state in (_HEAD, _BODY):
            self._fail(UpstreamIOError("the upstream closed the connection mid-response"))

    def lost(self, exc: BaseException | None) -> None:
        self._reusable = False
        if self._state in (_HEAD, _BODY):
            if self._state == _BODY and self._framing == UNTIL_CLOSE and exc is None:
                self._done()
            else:
                reason = type(exc).__name__ if exc is not None else "closed"
                self._fail(UpstreamIOError(f"connection lost ({reason})"))

    def _feed_head(self, data: bytes) -> bytes:
        """Accumulate the status line and headers; returns the bytes after them."""
        head = self._head + data if self._head else data
        while True:
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError("response head too large")
                self._head = head
                return b""
            if end > MAX_HEAD_BYTES:
                raise UpstreamProtocolError("response head too large")
            rest = head[end + 4:]
            parsed = parse_head(head[:end], head_only=self._head_only)
            if 100 <= parsed.status < 200:     # an interim response: the real one follows
                head = rest
                continue
            self._head = b""
            self.status, self.headers = parsed.status, parsed.headers
            self._framing, self._reusable = parsed.framing, parsed.reusable and self._reusable
            if parsed.length is not None:          # framed by Content-Length
                self._left = self.content_length = parsed.length
            elif parsed.framing == CHUNKED:
                self._chunks_in = ChunkDecoder()
            self._state = _BODY
            if not self._head_waiter.done():
                self._head_waiter.set_result(None)
            if self._framing == EMPTY or (self._framing == LENGTH and self._left == 0):
                self._done()
                if rest:
                    self._reusable = False
                return b""
            return rest

    def _feed_body(self, data: bytes) -> None:
        decoder = self._chunks_in
        if decoder is not None:
            self._push(decoder.feed(data))
            if decoder.finished:
                self._reusable = self._reusable and not decoder.trailing
                self._done()
            return
        if self._framing == LENGTH:
            if len(data) >= self._left:
                if len(data) > self._left:
                    self._reusable = False      # more than announced: never reuse
                    data = data[:self._left]
                self._left = 0
                self._push(data)
                self._done()
                return
            self._left -= len(data)
        self._push(data)

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if not self._paused and self._buffered > HIGH_WATER:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _done(self) -> None:
        self._state = _DONE
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._state in (_DONE, _FAILED):
            return
        self._state = _FAILED
        self._error = exc
        if not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
            self._head_waiter.exception()       # retrieved: no "never retrieved" warning
        self._wake()
        self._conn.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def check_timeout(self, now: float) -> None:
        """Fail the response if the upstream has been silent for longer than the read
        timeout (the client's sweep asks); a pause of our own is not its silence."""
        if self._state not in (_HEAD, _BODY) or self._paused or \
                now - self._last_read < self._read_timeout_s:
            return
        self._reusable = False
        self._fail(UpstreamReadTimeout("upstream read timeout"))


class _Connection(asyncio.Protocol):
    """One TCP connection to the upstream; feeds the response being read, if any."""

    def __init__(self, client: UpstreamClient):
        self.client = client
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:                 # unsolicited bytes on an idle connection
            self.abort()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        self.closed = True
        if self.response is not None:
            self.response.eof()
        return False                          # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.lost(exc)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamClient:
    """Keep-alive connections to one upstream host, at most MAX_CONNECTIONS at once."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float,
                 read_timeout_s: float, max_connections: int = MAX_CONNECTIONS):
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._shut = False                    # close(): nothing left to sweep
        host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._head_suffix = f" HTTP/1.1\r\nHost: {host_header}\r\nAccept-Encoding: identity\r\n"
        self._closed = False

    @property
    def active(self) -> int:
        """Connections carrying a request now."""
        return len(self._busy)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def configure(self, *, connect_timeout_s: float, read_timeout_s: float) -> None:
        """New timeouts (a reload); requests already running keep theirs."""
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    async def request(self, method: str, target: str, body: bytes | None = None,
                      content_type: str = "application/json") -> Response:
        """Send one request and wait for the response's status and headers.

        The body, if any, is sent with Content-Length. The caller must release() or close()
        the response (or use it as an async context manager).
        """
        if not _valid_target(method, target):
            raise UpstreamProtocolError("invalid request line")
        if self._closed:
            raise UpstreamIOError("client closed")
        head = method + " " + target + self._head_suffix
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        payload = (head + "\r\n").encode("ascii") + (body or b"")
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn = self._pick() or await self._connect()
            self._busy.add(conn)
            response = conn.response = Response(conn, method, self.read_timeout_s)
            if self._sweeper is None:
                self._arm_sweep()
            assert conn.transport is not None
            conn.transport.write(payload)
            await response._head_waiter
            return response
        except BaseException:
            if conn is not None:
                if conn.response is not None:
                    conn.response._finish()
                self._discard(conn)
            else:
                self._slots.release()
            raise

    async def get_bytes(self, target: str, limit: int) -> bytes:
        """GET a small document; UpstreamIOError unless the status is 200."""
        response = await self.request("GET", target)
        async with response:
            if response.status != 200:
                raise UpstreamIOError(f"status {response.status}")
            return await response.read(limit)

    def retire(self) -> None:
        """Stop reusing connections: idle ones close now, busy ones when their response
        is done (the upstream moved; requests already running finish where they are)."""
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = self._shut = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._idle + list(self._busy):
            conn.abort()
        self._idle.clear()

    def _arm_sweep(self) -> None:
        # A timeout is noticed within an eighth of itself (at most a second) after it
        # passes. One timer per client, not one per response: arming and cancelling a
        # timer for every request cost more than the sweep does.
        every = min(max(self.read_timeout_s / 8, 0.005), 1.0)
        self._sweeper = self.loop.call_later(every, self._sweep)

    def _sweep(self) -> None:
        """The read timeout of every response being read; runs while any is."""
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self._busy):
            if conn.response is not None:
                conn.response.check_timeout(now)
        if self._busy and not self._shut:       # a retired client still reads its answers
            self._arm_sweep()

    def _pick(self) -> _Connection | None:
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _Connection:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
        # that arrives as the connection fails, and the cancelled task then runs on.
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise UpstreamIOError("connect timeout") from None
        except OSError as exc:
            raise UpstreamIOError(f"connect failed ({type(exc).__name__})") from None
        return conn

    def _reuse(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.response = None
        self._slots.release()
        if conn.closed or self._closed or len(self._idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        if conn in self._busy:
            self._busy.discard(conn)
            self._slots.release()
        conn.response = None
        conn.abort()


def _valid_target(method: str, target: str) -> bool:
    """A request line we built must not be able to smuggle anything: ASCII, no spaces or
    control characters (model names come from the upstream's own listing)."""
    return method.isalpha() and method.isascii() and target.startswith("/") \
        and target.isascii() and target.isprintable() and " " not in target


def parse_base_url(url: str) -> tuple[str, int]:
    """Host and port of an `http://HOST:PORT` base URL (config has validated its shape)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"unsupported upstream URL {url!r}")
    return parts.hostname, parts.port or 80
