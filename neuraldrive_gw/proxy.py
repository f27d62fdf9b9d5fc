"""Forwarding to Ollama and relaying its answer back unbuffered (SPEC §3 step 10, §7).

The upstream request is built from scratch: only the canonical path, the re-serialised
body, `Host` set to the upstream's own host:port and a JSON content type. No client header
is ever copied (no credentials, cookies, Origin, forwarding headers). Redirects are never
followed. Upstream error text never reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from .capture import TextCapture
from .config import UpstreamConfig
from .errors import (GatewayError, ModelNotAllowed, UpstreamFailed, UpstreamRejected,
                     Unavailable, UpstreamTimeout)
from .metering import StreamMeter, Usage, usage_from_body
from .upstream_http import Response as UpstreamResponse
from .upstream_http import (UpstreamClient, UpstreamIOError, UpstreamReadTimeout,
                            parse_base_url)

log = logging.getLogger(__name__)

MAX_BUFFERED_BODY = 64 * 1024 * 1024     # non-streaming answers (/api/show verbose, embeddings)
_PASS_CONTENT_TYPES = ("application/json", "application/x-ndjson", "text/event-stream",
                       "text/plain")


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for metering and the audit seam (filled in as we go)."""

    upstream_status: int | None = None
    usage: Usage | None = None
    complete: bool = False          # streams: a terminal frame arrived
    client_gone: bool = False
    error: str | None = None        # internal reason (logs/audit only, never the client)
    bytes_out: int = 0
    first_byte_at: float | None = None
    capture: TextCapture | None = None   # the prompt log's copy of the answer text, if on


class ClientWatch:
    """Notices clients that hung up while we wait on Ollama, and cancels their handler.

    aiohttp (3.8 and, by default, later) does not cancel a handler when its client goes
    away, so a request stuck in a model load would keep Ollama generating for nobody. One
    task polls every watched transport; cancelling the handler task closes the upstream
    connection, which makes Ollama abort the generation.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self._watched: dict[asyncio.Task[object], web.BaseRequest] = {}

    def add(self, request: web.BaseRequest) -> asyncio.Task[object] | None:
        task = asyncio.current_task()
        if task is not None:
            self._watched[task] = request
        return task

    def discard(self, task: asyncio.Task[object] | None) -> None:
        if task is not None:
            self._watched.pop(task, None)

    @property
    def in_flight(self) -> int:
        return len(self._watched)

    async def drain(self, grace_s: float) -> None:
        """On shutdown: let in-flight requests finish for up to `grace_s`, then cancel them.

        Cancelling closes their upstream connections (Ollama stops generating) and runs
        every `finally`, instead of leaving handlers to die with the event loop.
        """
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._watched and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(min(0.05, grace_s))
        tasks = list(self._watched)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for task, request in list(self._watched.items()):
                transport = request.transport
                if transport is None or transport.is_closing():
                    del self._watched[task]
                    task.cancel()


class Upstream:
    """The connections to Ollama (upstream_http), and the request logic around them."""

    def __init__(self, client: UpstreamClient):
        self.client = client

    @classmethod
    def configured(cls, config: UpstreamConfig) -> Upstream:
        """A client for the configured upstream (connections open on demand; call it
        from the running event loop)."""
        host, port = parse_base_url(config.url)
        return cls(UpstreamClient(host, port, connect_timeout_s=config.connect_timeout_s,
                                  read_timeout_s=config.read_timeout_s))

    def reconfigure(self, config: UpstreamConfig) -> Upstream:
        """The upstream for a reloaded config: this one with new timeouts, or a new one
        when the URL changed (this one then closes its connections as they come free)."""
        host, port = parse_base_url(config.url)
        if (host, port) == (self.client.host, self.client.port):
            self.client.configure(connect_timeout_s=config.connect_timeout_s,
                                  read_timeout_s=config.read_timeout_s)
            return self
        self.client.retire()
        return Upstream(UpstreamClient(host, port, connect_timeout_s=config.connect_timeout_s,
                                       read_timeout_s=config.read_timeout_s))

    async def close(self) -> None:
        await self.client.close()

    async def open(self, method: str, path: str, body: bytes | None) -> UpstreamResponse:
        """Send the request; map connection failures to 502 and timeouts to 504."""
        try:
            return await self.client.request(method, path, body)
        except UpstreamReadTimeout:
            raise UpstreamTimeout() from None
        except UpstreamIOError as exc:
            log.warning("upstream request failed: %s", exc)
            raise UpstreamFailed("the model server is unavailable") from None

    async def fetch_json_bytes(self, path: str) -> bytes:
        """GET a small JSON document (discovery); raises on any failure."""
        return await self.client.get_bytes(path, MAX_BUFFERED_BODY)


def check_status(resp: UpstreamResponse, *, model_route: bool) -> None:
    """Turn an upstream non-2xx status into a sanitised GatewayError."""
    status = resp.status
    if 200 <= status < 300:
        return
    error: GatewayError
    if 300 <= status < 400:
        error = UpstreamFailed()
    elif status == 404 and model_route:
        # Ollama lost the model since discovery: same answer as "not allowed".
        error = ModelNotAllowed()
    elif status in (429, 503):
        error = Unavailable("the model server is busy; try again later")
    elif status in (401, 403, 404) or status >= 500:
        error = UpstreamFailed()
    else:
        error = UpstreamRejected()
    raise error


def response_headers(resp: UpstreamResponse, request_id: str,
                     extra: Mapping[str, str]) -> dict[str, str]:
    content_type = resp.headers.get("content-type", "application/json")
    if not content_type.startswith(_PASS_CONTENT_TYPES):
        content_type = "application/octet-stream"
    return {**extra, "Content-Type": content_type, "X-Request-ID": request_id}


async def read_body(resp: UpstreamResponse) -> bytes:
    """Read a non-streaming upstream body, bounded; truncation or reset → 502."""
    try:
        return await resp.read(MAX_BUFFERED_BODY)
    except UpstreamReadTimeout:
        raise UpstreamTimeout() from None
    except UpstreamIOError as exc:
        log.warning("upstream answer unreadable: %s", exc)
        raise UpstreamFailed() from None


async def relay_buffered(request: web.BaseRequest, resp: UpstreamResponse, route: str,
                         request_id: str, outcome: Outcome, extra: Mapping[str, str],
                         transform: Callable[[bytes], bytes] | None = None) -> web.Response:
    """Relay a non-streaming answer (after metering it and, for listings, filtering it)."""
    body = await read_body(resp)
    outcome.usage = usage_from_body(route, body)
    outcome.complete = True
    if outcome.capture is not None:
        outcome.capture.body(body)
    if transform is not None:
        try:
            body = transform(body)
        except ValueError:
            raise UpstreamFailed("the model server sent an unexpected answer") from None
    outcome.bytes_out = len(body)
    if request.method == "HEAD":
        body = b""
    return web.Response(status=resp.status, body=body,
                        headers=response_headers(resp, request_id, extra))


async def relay_stream(request: web.BaseRequest, resp: UpstreamResponse, meter: StreamMeter,
                       request_id: str, outcome: Outcome, extra: Mapping[str, str],
                       monotonic: Callable[[], float]) -> web.StreamResponse:
    """Relay a stream chunk by chunk as it arrives; end a broken one with an error frame."""
    headers = response_headers(resp, request_id, extra)
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    out = web.StreamResponse(status=resp.status, headers=headers)
    try:
        await out.prepare(request)
        try:
            while chunk := await resp.read_chunk():
                data = meter.feed(chunk)
                if data:
                    if outcome.first_byte_at is None:
                        outcome.first_byte_at = monotonic()
                    await out.write(data)
                    outcome.bytes_out += len(data)
                    if outcome.capture is not None:
                        outcome.capture.feed(data)
            tail = meter.finish()
            if tail:
                await out.write(tail)
                outcome.bytes_out += len(tail)
            if meter.errored:
                outcome.error = f"upstream reported an error: {meter.upstream_error}"
            elif not meter.complete:
                outcome.error = "upstream ended the stream without a final frame"
        except UpstreamReadTimeout:
            outcome.error = "upstream read timeout"
        except UpstreamIOError as exc:         # reset, truncated or malformed body, ...
            outcome.error = f"upstream stream broken: {exc}"
        except ValueError as exc:              # the meter refused an unbounded event
            outcome.error = f"upstream protocol error ({exc})"
        outcome.complete = meter.complete and outcome.error is None
        outcome.usage = meter.usage
        if outcome.error is not None:
            log.warning("stream %s broken: %s", request_id, outcome.error)
        if outcome.error is not None and not meter.errored:
            # (An in-band upstream error was already replaced by the meter's own frame.)
            await out.write(meter.error_frame(
                f"the model server stopped before the answer was complete (request id: {request_id})"))
        await out.write_eof()
    except ConnectionResetError:
        # The client went away: before the headers, mid-stream, or at the end. (aiohttp
        # ≥3.10 raises ClientConnectionResetError, a ConnectionResetError too; the
        # upstream's failures are UpstreamIOError, so the two cannot be confused.)
        outcome.client_gone = True
        outcome.usage = outcome.usage or meter.usage
        outcome.error = outcome.error or "client disconnected"
    return out
