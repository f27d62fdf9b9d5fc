"""Writing the fake Ollama's replies frame by frame, breaking them, and noticing lost clients.

One `write()` per frame, so every NDJSON line or SSE event leaves in its own HTTP chunk.
A client that goes away is noticed by a failed write, by the transport closing (looked
at before every frame, and every `POLL_S` while paced or held), or, on aiohttp < 3.9, by
the handler being cancelled; `StreamWatch` records it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from .fake_frames import Reply

POLL_S = 0.02          # how often paced or held streams look for a vanished client


class ClientGone(Exception):
    """The client closed the connection while its reply was being written."""


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class StreamWatch:
    """Counts replies in progress and records the clients that left before the end."""

    def __init__(self) -> None:
        self.active = 0
        self.disconnects: list[float] = []
        self.closing = False          # set on app shutdown: held streams let go
        self._waiters: set[asyncio.Event] = set()
        self._seen = 0

    def note_disconnect(self) -> None:
        if self.closing:
            return
        self.disconnects.append(time.monotonic())
        for event in self._waiters:
            event.set()

    async def next_disconnect(self, timeout: float) -> float:
        """The time of the oldest disconnect not yet returned; TimeoutError after `timeout`."""
        async def wait() -> float:
            while self._seen >= len(self.disconnects):
                event = asyncio.Event()
                self._waiters.add(event)
                try:
                    await event.wait()
                finally:
                    self._waiters.discard(event)
            self._seen += 1
            return self.disconnects[self._seen - 1]

        self._seen = min(self._seen, len(self.disconnects))
        return await asyncio.wait_for(wait(), timeout)

    async def watch(self, wait: Callable[[], Awaitable[None]]) -> None:
        """Run `wait()` counted as an active stream, recording a client that goes away."""
        self.active += 1
        try:
            await wait()
        except (ClientGone, ConnectionError):
            self.note_disconnect()
        except asyncio.CancelledError:   # aiohttp < 3.9 cancels handlers of lost clients
            self.note_disconnect()
            raise
        finally:
            self.active -= 1

    async def pause(self, request: web.BaseRequest, seconds: float) -> None:
        """Sleep, but raise ClientGone as soon as the client is seen to have left."""
        deadline = time.monotonic() + seconds
        while True:
            if client_gone(request):
                raise ClientGone
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, POLL_S))

    async def hold(self, request: web.BaseRequest) -> None:
        """Write nothing until the client leaves (ClientGone) or the server shuts down."""
        while not self.closing:
            await self.pause(request, POLL_S)
        if request.transport is not None:
            request.transport.abort()


class FrameFault(Protocol):
    """The parts of a `Fault` the writer needs."""

    @property
    def kind(self) -> str: ...
    @property
    def after_frames(self) -> int: ...
    @property
    def delay_s(self) -> float: ...
    @property
    def size(self) -> int: ...
    @property
    def message(self) -> str: ...


def _headers(reply: Reply) -> dict[str, str]:
    headers = dict(reply.headers)
    if reply.content_type:
        headers["Content-Type"] = reply.content_type
    return headers


def plain(reply: Reply) -> web.Response:
    """The whole reply in one body with a Content-Length."""
    body = b"".join(data for data, _ in reply.frames)
    return web.Response(status=reply.status, body=body, headers=_headers(reply))


async def write_reply(request: web.Request, reply: Reply, fault: FrameFault | None,
                      pace: float, watch: StreamWatch) -> web.StreamResponse:
    """Send `reply`, `pace` seconds between frames, broken as `fault` says."""
    if not reply.streaming and (fault is None or fault.kind == "slow"):
        if fault is not None:
            delay = fault.delay_s
            await watch.watch(lambda: watch.pause(request, delay))
        return plain(reply)
    resp = web.StreamResponse(status=reply.status, headers=_headers(reply))

    async def stream() -> None:
        await resp.prepare(request)
        if await _frames(request, resp, reply, fault, pace, watch):
            await resp.write_eof()

    await watch.watch(stream)
    return resp


async def _frames(request: web.Request, resp: web.StreamResponse, reply: Reply,
                  fault: FrameFault | None, pace: float, watch: StreamWatch) -> bool:
    """Write the frames; False if the connection was dropped (by the fault or the client)."""
    kind = fault.kind if fault is not None else None
    fired, written = kind in (None, "slow"), 0
    frames = iter(reply.frames)
    while True:
        frame = next(frames, None)
        if fault is not None and not fired and written == fault.after_frames:
            fired = True
            if kind == "truncate":
                return True
            if kind == "reset":
                if request.transport is not None:
                    request.transport.abort()
                return False
            if kind == "hang":
                await watch.hold(request)
                return False
            if kind == "error":
                await resp.write(reply.error(fault.message))
                return True
            if kind == "garbage":
                await resp.write(reply.garbage)
            else:
                await resp.write(reply.oversized(fault.size))
        if frame is None:
            return True
        data, final = frame
        if kind == "truncate" and final:
            return True
        delay = fault.delay_s if fault is not None and kind == "slow" else (
            pace if written else 0.0)
        if delay > 0:
            await watch.pause(request, delay)
        elif client_gone(request):
            raise ClientGone
        await resp.write(data)
        written += 1
