"""A fake Ollama for tests and demos: a real aiohttp app that records requests and breaks on demand.

`FakeOllama(...).app` serves Ollama's native, OpenAI-compatible and Anthropic-compatible
routes with realistic frames (see `fake_frames`), records every request it receives, and
applies `Fault`s to its replies. A control API under `/_fake/` (never recorded) exposes the
same for subprocess use, and `python -m neuraldrive_gw.devtools.fake_ollama` runs it.

Routing mimics gin as Ollama configures it: the percent-decoded path is matched exactly,
a known path with a trailing slash redirects (301 for GET, 307 otherwise), a known path
with another method gets `405 method not allowed`, and anything else `404 page not found`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from aiohttp import web

from . import fake_frames as ff
from .fake_catalog import Catalogue, InvalidModelName, canonical_model, same_model
from .fake_control import control
from .fake_handlers import Call, Handler, OllamaHandlers
from .fake_streams import StreamWatch, plain, write_reply

DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest", "gpt-oss:120b-cloud")
INFERENCE_PATHS = frozenset({
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/v1/chat/completions",
    "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"})
FaultKind = Literal["slow", "reset", "hang", "hang_before_headers", "status", "garbage", "error",
                    "oversized", "redirect", "truncate"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass
class RecordedRequest:
    """One request as the fake received it.

    `headers` has lower-cased names, repeated headers joined with ", "; `raw_headers` keeps
    every (name, value) pair as sent. `json` is the parsed body, or None if it is not JSON.
    """

    method: str
    path: str                  # percent-decoded, without the query string
    raw_path: str              # as sent, with the query string
    headers: dict[str, str]
    body: bytes
    json: Any | None
    at: float                  # time.monotonic() on arrival
    raw_headers: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "raw_path": self.raw_path,
                "headers": self.headers, "body": self.body.decode("utf-8", "replace"),
                "json": self.json, "at": self.at}


@dataclass
class Fault:
    """How the next matching replies go wrong.

    A fault matches a request to `path` (default: any inference path) for `model`
    (default: any). The first matching fault wins and is used up after `times` matches.
    Frames are NDJSON lines or SSE events; a non-streamed reply is a single final frame.

    status               reply `status` with Ollama's error body for the route's dialect
    redirect             307 to /api/pull
    hang_before_headers  send nothing until the client leaves
    slow                 sleep `delay_s` before every frame (a non-streamed reply: once)
    reset                after `after_frames` frames abort the TCP connection
    hang                 after `after_frames` frames write nothing until the client leaves
    truncate             after `after_frames` frames, or at the first final frame (done:true,
                         finish/usage chunk, [DONE], response.*.done/completed,
                         content_block_stop/message_delta/message_stop), end cleanly
    garbage              after `after_frames` frames write `this is not json` (as an SSE
                         `data:` line on SSE routes), then carry on
    oversized            after `after_frames` frames write one valid frame whose longest
                         line (NDJSON line or SSE `data:` line) is `size` bytes, then carry on
    error                after `after_frames` frames write an in-band error carrying
                         `message` (NDJSON `{"error": ...}` line, SSE `event: error`), then
                         end cleanly, as Ollama does when a runner dies mid-generation

    A reset/hang/garbage/oversized fault whose `after_frames` exceeds the reply's frame
    count never fires (its `times` is still used up). Non-streamed replies hit by a frame
    fault other than `slow` are sent chunked so the fault can act mid-body.
    """

    kind: FaultKind
    after_frames: int = 2      # reset/garbage/oversized/truncate/hang: normal frames first
    delay_s: float = 0.05      # slow: sleep before every frame
    status: int = 500          # status: the HTTP status of the error reply
    size: int = 1 << 20        # oversized: length of the oversized line, without its newline
    path: str | None = None    # only this exact path (None = any inference path)
    model: str | None = None   # only requests for this model (resolved like Ollama does)
    times: int | None = None   # apply this many times, then drop (None = until cleared)
    message: str = "llama runner process has terminated"   # error: the in-band error text

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.after_frames < 0 or self.delay_s < 0 or self.size < 1:
            raise ValueError("after_frames and delay_s must be >= 0, size >= 1")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be None or >= 1")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")


def _parse_json(raw: bytes) -> Any | None:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


class FakeOllama:
    """The fake server's state and its aiohttp app (`self.app`).

    `models` are the installed models, in `/api/tags` order. Every generation is `tokens`
    tokens long unless the request's output cap (`options.num_predict`, `max_tokens`,
    `max_output_tokens`) is smaller: then it stops at the cap with done_reason "length"
    (finish_reason "length", stop_reason "max_tokens"). Prompt token counts are
    max(1, len(prompt text) // 4). `pace` maps model names (any spelling Ollama accepts)
    to seconds between stream frames.
    """

    def __init__(self, models: Sequence[str] = DEFAULT_MODELS, *, tokens: int = 8,
                 pace: Mapping[str, float] | None = None) -> None:
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        self.handlers = OllamaHandlers(Catalogue(tuple(models)), tokens)
        self.requests: list[RecordedRequest] = []
        self._pace = dict(pace or {})
        self._faults: list[tuple[Fault, list[int | None]]] = []   # (fault, [times left])
        self._routes = self.handlers.routes()
        self._watch = StreamWatch()
        # 1 GiB: blob uploads and base64 images must reach the recorder intact
        self.app = web.Application(client_max_size=1 << 30)
        self.app.router.add_route("*", "/{tail:.*}", self._entry)
        self.app.on_shutdown.append(self._on_shutdown)

    # --- public helpers --------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Append a fault; the first matching fault wins, so add specific ones first."""
        self._faults.append((fault, [fault.times]))

    def clear_faults(self) -> None:
        self._faults.clear()

    def active_faults(self) -> list[Fault]:
        """The faults still in force, in match order, with `times` = applications left."""
        return [dataclasses.replace(f, times=left[0]) for f, left in self._faults]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    @property
    def active_streams(self) -> int:
        """Replies being streamed, held or delayed right now."""
        return self._watch.active

    @property
    def disconnects(self) -> list[float]:
        """Monotonic times at which a client was found gone before its reply ended."""
        return self._watch.disconnects

    async def wait_disconnect(self, timeout: float) -> float:
        """The time of the next disconnect not yet returned by this method.

        Each recorded disconnect is returned once, in order, so one that happened just
        before the call is not missed. Raises TimeoutError after `timeout` seconds.
        """
        return await self._watch.next_disconnect(timeout)

    # --- request pipeline ----------------------------------------------------------------

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await control(self, request)
        arrived = time.monotonic()
        raw = await request.read()
        body = _parse_json(raw)
        self.requests.append(RecordedRequest(
            method=request.method, path=request.path, raw_path=request.raw_path,
            headers={k.lower(): ", ".join(request.headers.getall(k))
                     for k in dict.fromkeys(request.headers.keys())},
            body=raw, json=body, at=arrived,
            raw_headers=tuple((k.decode("latin-1"), v.decode("latin-1"))
                              for k, v in request.raw_headers)))
        routed = self._route(request)
        if isinstance(routed, ff.Reply):
            return plain(routed)
        handler, param = routed
        model = param if param and request.path.startswith("/v1/models/") else None
        if model is None and isinstance(body, dict):
            named = body.get("model") or body.get("name")
            model = named if isinstance(named, str) else None
        fault = self._take_fault(request.path, model)
        if fault is not None and fault.kind == "status":
            return plain(self._status_reply(request.path, fault.status, model))
        if fault is not None and fault.kind == "redirect":
            return plain(ff.Reply([(b"", True)], status=307, content_type="",
                                   headers={"Location": "/api/pull"}))
        if fault is not None and fault.kind == "hang_before_headers":
            await self._watch.watch(lambda: self._watch.hold(request))
            return web.Response(status=499)   # nobody is listening; aiohttp drops it quietly
        reply = handler(Call(request.method, request.path, raw, body, param))
        return await write_reply(request, reply, fault, self._pace_for(model), self._watch)

    def _match(self, method: str, path: str) -> tuple[Handler, str] | None:
        handler = self._routes.get((method, path))
        if handler is not None:
            return handler, ""
        head, sep, param = path.rpartition("/")
        handler = self._routes.get((method, head + sep))
        if handler is not None and param and head + sep != "/":
            return handler, param
        return None

    def _route(self, request: web.Request) -> tuple[Handler, str] | ff.Reply:
        method, path = request.method, request.path
        hit = self._match(method, path)
        if hit is not None:
            return hit
        if len(path) > 1 and path.endswith("/") and self._match(method, path[:-1]):
            query = request.query_string
            location = path[:-1] + (f"?{query}" if query else "")
            code = 301 if method == "GET" else 307
            if method != "GET":
                return ff.Reply([(b"", True)], status=code, content_type="",
                                headers={"Location": location})
            text = f'<a href="{location}">Moved Permanently</a>.\n\n'
            return ff.text_reply(text, code, "text/html; charset=utf-8", {"Location": location})
        if any(self._match(m, path) for m in _METHODS if m != method):
            return ff.text_reply("405 method not allowed", 405)
        return ff.text_reply("404 page not found", 404)

    def _take_fault(self, path: str, model: str | None) -> Fault | None:
        for i, (fault, left) in enumerate(self._faults):
            if fault.path is None and path not in INFERENCE_PATHS:
                continue
            if fault.path is not None and fault.path != path:
                continue
            if fault.model is not None and (model is None or not same_model(fault.model, model)):
                continue
            if left[0] is not None:
                left[0] -= 1
                if left[0] <= 0:
                    del self._faults[i]
            return fault
        return None

    def _pace_for(self, model: str | None) -> float:
        if model is None:
            return 0.0
        return next((s for name, s in self._pace.items() if same_model(name, model)), 0.0)

    @staticmethod
    def _status_reply(path: str, status: int, model: str | None) -> ff.Reply:
        message = {
            404: f"model '{model or ''}' not found",
            499: "request canceled",
            503: "server busy, please try again.  maximum pending requests exceeded",
        }.get(status, f"fake Ollama fault: HTTP {status}")
        if path.startswith("/v1/messages"):
            return ff.anthropic_error(status, message)
        if path.startswith("/v1/"):
            return ff.openai_error(status, message)
        if status == 401:
            return ff.native_error(401, "unauthorized",
                                   signin_url="https://ollama.com/connect?name=fake&key=fake")
        return ff.native_error(status, message)

    async def _on_shutdown(self, app: web.Application) -> None:
        self._watch.closing = True


async def start_fake(host: str = "127.0.0.1", port: int = 0, **kw: Any
                     ) -> tuple[FakeOllama, web.AppRunner, str]:
    """Start a FakeOllama on host:port (0 = any free port); returns (fake, runner, base URL).

    Stop it with `await runner.cleanup()`.
    """
    fake = FakeOllama(**kw)
    runner = web.AppRunner(fake.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return fake, runner, f"http://{shown}:{bound}"


def _pace_arg(text: str) -> tuple[str, float]:
    name, sep, ms = text.rpartition("=")
    try:
        if not sep or not name.strip():
            raise ValueError(text)
        canonical_model(name)
        return name.strip(), float(ms) / 1000.0
    except (ValueError, InvalidModelName):
        raise argparse.ArgumentTypeError("expected MODEL=MS, e.g. qwen2.5:0.5b=10") from None


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m neuraldrive_gw.devtools.fake_ollama",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    ap.add_argument("--model", action="append", dest="models", metavar="NAME",
                    help="an installed model (repeatable; default: %s)" % ", ".join(DEFAULT_MODELS))
    ap.add_argument("--tokens", type=_count, default=8,
                    help="completion tokens per generation (fewer if the request caps output)")
    ap.add_argument("--pace", type=_pace_arg, action="append", default=[], metavar="MODEL=MS",
                    help="milliseconds between stream frames for MODEL (repeatable)")
    return ap


async def _serve(args: argparse.Namespace) -> None:
    fake, runner, url = await start_fake(args.host, args.port, models=args.models or DEFAULT_MODELS,
                                         tokens=args.tokens, pace=dict(args.pace))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
