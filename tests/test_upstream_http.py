"""The upstream HTTP/1.1 client (upstream_http.py) against a scripted server on 127.0.0.1.

The server is a real asyncio TCP server that answers each request with bytes a test
chose, so every framing case (Content-Length, chunked, read-until-close, interim 1xx,
HEAD) and every malformed or cut-short answer is produced on a real socket. The
gateway-level behaviour (502/504, error frames, audit rows) is tested through HTTP in
test_proxy_faults and test_quotas_http; this file pins the client's own contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from neuraldrive_gw import upstream_http
from neuraldrive_gw.upstream_http import (UpstreamClient, UpstreamIOError, UpstreamProtocolError,
                                          UpstreamReadTimeout)

Script = Callable[[bytes], "list[bytes] | None"]     # request head → what to send (None: hang)


@dataclass
class Scripted:
    """A TCP server that answers every request with the bytes `script` returns for it."""

    script: Script
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_after: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                parts = self.script(head)
                if parts is None:
                    await reader.read()           # hang until the client closes
                    return
                for part in parts:
                    writer.write(part)
                    await writer.drain()
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Scripted]]:
    servers: list[tuple[asyncio.base_events.Server, Scripted]] = []

    async def start(script: Script, **kw: object) -> Scripted:
        state = Scripted(script, **kw)  # type: ignore[arg-type]
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        state.port = server.sockets[0].getsockname()[1]
        servers.append((server, state))
        return state

    yield start
    for server, state in servers:
        server.close()
        for writer in state.writers:
            writer.close()
        await server.wait_closed()


def _client(port: int, read_timeout_s: float = 5.0) -> UpstreamClient:
    return UpstreamClient("127.0.0.1", port, connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


def _ok(body: bytes, extra: bytes = b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body)]


def _chunked(*pieces: bytes) -> list[bytes]:
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"]
    out += [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces]
    return out + [b"0\r\n\r\n"]


async def _body(client: UpstreamClient, method: str = "POST", body: bytes | None = b"{}") -> bytes:
    async with await client.request(method, "/api/chat", body) as resp:
        return await resp.read(1 << 20)


async def test_request_is_built_from_scratch_and_connections_are_reused(scripted) -> None:
    server = await scripted(lambda head: _ok(b'{"a":1}'))
    client = _client(server.port)
    for _ in range(3):
        assert await _body(client) == b'{"a":1}'
    assert server.connections == 1 and client.idle == 1 and client.active == 0
    assert server.requests[0] == (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                  b"Accept-Encoding: identity\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 2\r\n\r\n{}" % server.port)
    await client.close()


async def test_chunked_body_arrives_piece_by_piece(scripted) -> None:
    server = await scripted(lambda head: _chunked(b'{"n":1}\n', b'{"n":2}\n', b'{"done":true}\n'))
    client = _client(server.port)
    resp = await client.request("POST", "/api/chat", b"{}")
    got = []
    while chunk := await resp.read_chunk():
        got.append(chunk)
    assert b"".join(got) == b'{"n":1}\n{"n":2}\n{"done":true}\n'
    assert resp.complete
    resp.release()
    assert client.idle == 1
    await client.close()


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_every_split_point_of_the_bytes_gives_the_same_body(framing: str) -> None:
    """Feed a response in two pieces at every possible boundary (head, chunk-size lines,
    CRLFs, trailers): the body and the end are always found the same way."""
    body = b'{"message":"hi"}\n{"done":true}\n'
    raw = b"".join(_ok(body) if framing == "length" else
                   [*_chunked(body[:10], body[10:])[:-1], b"0\r\nX-Trailer: 1\r\n\r\n"])
    for cut in range(1, len(raw)):
        conn = _FakeConnection()
        resp = upstream_http.Response(conn, "POST", 60)  # type: ignore[arg-type]
        resp.feed(raw[:cut])
        resp.feed(raw[cut:])
        assert resp.complete, cut
        assert b"".join(resp._chunks) == body, cut
        assert resp._reusable and not conn.aborted, cut
        resp._finish()


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 5000,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\n Folded: header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad name : x\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n",
], ids=lambda raw: raw[:60].decode("latin-1").replace("\r\n", "|"))
async def test_malformed_answers_fail_and_the_connection_is_dropped(raw: bytes) -> None:
    conn = _FakeConnection()
    resp = upstream_http.Response(conn, "POST", 60)  # type: ignore[arg-type]
    resp.feed(raw)
    assert isinstance(resp._error, UpstreamProtocolError)
    assert conn.aborted and not resp.complete
    resp._finish()


async def test_truncated_bodies_fail_after_the_bytes_that_did_arrive(scripted) -> None:
    answers = iter([
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Le"],
    ])
    server = await scripted(lambda head: next(answers), close_after=True)
    client = _client(server.port)
    for expected in (b"hello", b"hello"):
        resp = await client.request("POST", "/api/chat", b"{}")
        assert await resp.read_chunk() == expected
        with pytest.raises(UpstreamIOError):
            await resp.read_chunk()
        resp.release()
    with pytest.raises(UpstreamIOError):
        await client.request("POST", "/api/chat", b"{}")
    assert client.active == 0 and client.idle == 0
    await client.close()


async def test_a_body_until_close_ends_at_eof_and_is_not_reused(scripted) -> None:
    server = await scripted(lambda head: [b"HTTP/1.1 200 OK\r\n\r\nall of it"], close_after=True)
    client = _client(server.port)
    assert await _body(client) == b"all of it"
    assert client.idle == 0
    await client.close()


async def test_head_and_interim_answers_have_no_body(scripted) -> None:
    answers = iter([
        [b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"],                    # HEAD
        [b"HTTP/1.1 100 Continue\r\n\r\n", *_ok(b"after 100")],
        [b"HTTP/1.1 204 No Content\r\n\r\n"],
    ])
    server = await scripted(lambda head: next(answers))
    client = _client(server.port)
    resp = await client.request("HEAD", "/api/version")
    assert resp.status == 200 and await resp.read(100) == b""
    resp.release()
    assert await _body(client) == b"after 100"
    resp = await client.request("GET", "/api/ps")
    assert resp.status == 204 and await resp.read(100) == b""
    resp.release()
    assert server.connections == 1
    await client.close()


async def test_connection_close_is_honoured(scripted) -> None:
    server = await scripted(lambda head: _ok(b"x", b"Connection: close\r\n"), close_after=True)
    client = _client(server.port)
    assert await _body(client) == b"x"
    assert await _body(client) == b"x"
    assert server.connections == 2 and client.idle == 0
    await client.close()


async def test_closing_an_unfinished_response_closes_its_connection() -> None:
    """How Ollama learns that nobody wants the rest of the answer."""
    closed = asyncio.Event()

    async def answer_then_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await reader.read()                      # until the client closes
        closed.set()

    writers: list[asyncio.StreamWriter] = []
    tcp = await asyncio.start_server(answer_then_hang, "127.0.0.1", 0)
    client = _client(tcp.sockets[0].getsockname()[1])
    resp = await client.request("GET", "/api/tags")
    assert await resp.read_chunk() == b"hello"
    resp.release()                               # not complete: closes
    await asyncio.wait_for(closed.wait(), 5)
    assert client.active == 0 and client.idle == 0
    tcp.close()
    for writer in writers:
        writer.close()
    await client.close()


async def test_silence_longer_than_the_read_timeout_fails(scripted) -> None:
    server = await scripted(lambda head: None)
    client = _client(server.port, read_timeout_s=0.05)
    with pytest.raises(UpstreamReadTimeout):
        await client.request("POST", "/api/chat", b"{}")
    await asyncio.wait_for(server.closed.wait(), 5)
    assert client.active == 0
    await client.close()


async def test_a_body_that_stalls_times_out_even_after_the_client_is_retired(scripted) -> None:
    """The read timeout covers the body too, and a response still being read when the
    upstream moved (retire) keeps it."""
    server = await scripted(lambda head: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    client = _client(server.port, read_timeout_s=0.05)
    response = await client.request("POST", "/api/chat", b"{}")
    assert await response.read_chunk() == b"abc"
    client.retire()
    with pytest.raises(UpstreamReadTimeout):
        async with asyncio.timeout(5):          # a plain TimeoutError would not match
            await response.read_chunk()
    response.close()
    assert client.active == 0
    await client.close()


async def test_a_cancelled_request_closes_its_connection(scripted) -> None:
    server = await scripted(lambda head: None)
    client = _client(server.port)
    task = asyncio.ensure_future(client.request("POST", "/api/chat", b"{}"))
    while not server.requests:
        await asyncio.sleep(0)       # let the request reach the server (no timing involved)
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.closed.wait(), 5)
    assert client.active == 0 and client.idle == 0
    await client.close()


async def test_refused_connection_is_an_io_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = _client(port)
    with pytest.raises(UpstreamIOError):
        await client.request("GET", "/api/tags")
    assert client.active == 0
    await client.close()


@pytest.mark.parametrize("target", ["/api/show x", "/api/x\r\nHost: evil", "api/tags",
                                    "/api/ünïcode", "/api/\x00"])
async def test_a_request_line_cannot_be_smuggled(scripted, target: str) -> None:
    server = await scripted(lambda head: _ok(b"x"))
    client = _client(server.port)
    with pytest.raises(UpstreamProtocolError):
        await client.request("GET", target)
    assert server.requests == [] and client.active == 0
    await client.close()


async def test_flow_control_pauses_and_resumes_reading() -> None:
    conn = _FakeConnection()
    resp = upstream_http.Response(conn, "POST", 60)  # type: ignore[arg-type]
    resp.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 1000
    for _ in range(upstream_http.HIGH_WATER // 1000 + 1):
        resp.feed(b"%x\r\n%s\r\n" % (len(piece), piece))
    assert conn.paused
    while conn.paused:
        assert await resp.read_chunk() == piece
    assert resp._buffered <= upstream_http.LOW_WATER
    resp._finish()


class _FakeConnection:
    """Stands in for a _Connection when bytes are fed to a Response directly."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.aborted = False
        self.paused = False
        self.client = None

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

