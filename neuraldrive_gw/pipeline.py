"""The request pipeline (SPEC §3), one request at a time, in order.

    1 request id → 2 canonical target and route → 3 per-IP auth-failure limiter
    → 4 authenticate → 5 endpoint policy
    → 6 body (size, time, strict JSON) → 7 model policy → 8 shaping → 9 admission
    (concurrency, fair queue, buckets, budgets) → 10 forward/relay → 11 settle, release,
    audit row

Every refusal is a GatewayError rendered in the route's dialect; every response carries X-Request-ID,
and every authenticated one the x-ratelimit-* headers computed at admission.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial

from aiohttp import web

from . import clientip
from .audit import AuditWriter
from .auth import Authenticator
from .body import BodyError, ShapedRequest, ShapeLimits, parse_json_body, serialise, shape_request
from .capture import TextCapture
from .config import Config
from .errors import (BadRequest, EndpointBlocked, GatewayError, TooManyCredentials,
                     Unauthorized, Unavailable, dialect_for_path, error_response)
from .intake import read_body
from .logsink import AccessLog
from .metering import meter_for
from .policy import ModelPolicy
from .principals import Principal
from .quotas.admission import Admission, Ticket
from .quotas.authfailures import AuthFailureLimiter
from .promptlog import REDACTION_MARGIN, PromptEntry, PromptLog
from .proxy import ClientWatch, Outcome, Upstream, check_status, relay_buffered, relay_stream
from .upstream_http import Response as UpstreamResponse
from .routes import MODEL_PREFIX, Route, canonical_path, resolve

log = logging.getLogger(__name__)
access_log = AccessLog()

_STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
_CLOSE_AFTER = frozenset({408, 413, 415, 499})   # the unread body: the connection is done
_USAGE_STRIPPABLE = frozenset({"v1_chat", "v1_completions"})


class _RandomPool:
    """os.urandom read 4 KiB at a time: one getrandom() per 256 request ids, not one each."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._data = b""
        self._at = 0

    def take16(self) -> bytes:
        if self._at + 16 > len(self._data):
            self._data, self._at = os.urandom(self._size), 0
        self._at += 16
        return self._data[self._at - 16:self._at]


_random = _RandomPool()


def new_request_id() -> str:
    """A random UUID4 (SPEC §3 step 1), spelt as str(uuid.uuid4()) spells it."""
    h = _random.take16().hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _cancel_reason(request: web.BaseRequest) -> str:
    """Why a handler was cancelled: its client hung up (ClientWatch, or aiohttp itself),
    or the daemon is stopping and the grace ran out."""
    transport = request.transport
    return "client disconnected" if transport is None or transport.is_closing() \
        else "cancelled"


class Pipeline:
    """Holds the request-path components and handles every request of the app."""

    def __init__(self, config: Config, *, auth: Authenticator, policy: ModelPolicy,
                 watch: ClientWatch, admission: Admission, monotonic: Callable[[], float],
                 wall: Callable[[], float] = time.time):
        self.auth = auth
        self.policy = policy
        self.watch = watch
        self.admission = admission
        self.audit: AuditWriter | None = None      # set by the app's accounting lifecycle
        self.prompts: PromptLog | None = None      # set by the app's prompt log lifecycle
        self.wall = wall
        self.upstream: Upstream | None = None        # set by the app's upstream lifecycle
        self.monotonic = monotonic
        self.auth_failures = AuthFailureLimiter(config.limits.auth_failures_per_ip_per_min,
                                                monotonic)
        self._adopt(config)
        self.requests_by_status: dict[int, int] = {}

    def _adopt(self, config: Config) -> None:
        self.config = config
        self.limits = ShapeLimits(num_predict_cap=config.limits.num_predict_cap,
                                  max_num_ctx=config.limits.max_num_ctx,
                                  max_keep_alive_s=config.limits.max_keep_alive_s)
        self.trusted = clientip.TrustedProxies(config.trusted_proxies)

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded config (reload.py decides which sections may change). Requests
        already running finish with the settings they started with."""
        self._adopt(config)
        self.auth_failures.reconfigure(config.limits.auth_failures_per_ip_per_min)
        self.policy.allow_cloud_models = config.allow_cloud_models
        self.policy.catalog.ttl_s = config.upstream.discovery_ttl_s
        self.admission.reconfigure(config)
        if self.upstream is not None:
            self.upstream = self.upstream.reconfigure(config.upstream)

    # -- entry point -----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = new_request_id()
        started = self.monotonic()
        arrived = self.wall()
        raw_path = request.raw_path.split("?", 1)[0]
        dialect = dialect_for_path(raw_path)
        client = self._client_ip(request)
        info: dict[str, object] = {"client": client}
        response: web.StreamResponse | None = None
        try:
            response = await self._process(request, request_id, info)
        except GatewayError as error:
            response = error_response(error, dialect, request_id)
            if error.status in _CLOSE_AFTER:
                response.force_close()
            info.setdefault("reason", error.reason)
        except asyncio.CancelledError:
            info.setdefault("reason", _cancel_reason(request))   # nobody sees an answer
            raise
        except Exception:
            log.exception("request %s failed", request_id)
            response = error_response(GatewayError(), dialect, request_id)
        finally:
            status = response.status if response is not None else 499
            # Relayed answers were built with these headers; refusals and health get them here.
            if response is not None and not response.prepared and \
                    "X-Request-ID" not in response.headers:
                response.headers["X-Request-ID"] = request_id
                rate_headers = info.get("rate_headers")
                if isinstance(rate_headers, dict):
                    for name, value in rate_headers.items():
                        response.headers.setdefault(name, value)
            self.requests_by_status[status] = self.requests_by_status.get(status, 0) + 1
            duration_ms = (self.monotonic() - started) * 1000
            access_log.line(
                "rid=%s ip=%s method=%s path=%s status=%d key=%s model=%s stream=%s "
                "outcome=%s ms=%.1f", request_id, client, request.method,
                info.get("path", "-"), status, info.get("key", "-"), info.get("model", "-"),
                info.get("stream", "-"), info.get("reason", "ok"), duration_ms)
            self._audit(request_id, arrived, client, request.method, status, info,
                        duration_ms, started)
            if "prompt" in info:
                self._log_prompt(request_id, arrived, status, info)
        return response

    def _log_prompt(self, request_id: str, arrived: float, status: int,
                    info: dict[str, object]) -> None:
        """Hand an opted-in key's request and answer to the prompt log (never blocks)."""
        outcome, prompt = info.get("outcome"), info["prompt"]
        capture = outcome.capture if isinstance(outcome, Outcome) else None
        if self.prompts is None or not isinstance(prompt, bytes):
            return
        settings = self.config.prompt_logging
        text = prompt.decode("utf-8", "replace")
        self.prompts.submit(PromptEntry(
            request_id=request_id, at=arrived,
            expires_at=arrived + settings.retention_days * 86400, key_id=str(info["key"]),
            tenant=str(info["tenant"]) if info.get("tenant") else None,
            route=str(info.get("path", "-")),
            model=str(info["model"]) if "model" in info else None, status=status,
            request_text=text[:settings.max_chars + REDACTION_MARGIN],  # cut after redaction
            response_text=capture.text if capture is not None else "",
            truncated=bool(capture and capture.truncated)))

    def _audit(self, request_id: str, arrived: float, client: str, method: str, status: int,
               info: dict[str, object], duration_ms: float, started: float) -> None:
        """Hand one row to the audit writer (never blocks; the writer batches)."""
        if self.audit is None:
            return
        outcome = info.get("outcome")
        first = outcome.first_byte_at if isinstance(outcome, Outcome) else None
        tokens = info.get("tokens")
        prompt, completion = tokens if isinstance(tokens, tuple) else (0, 0)
        # AuditRecord's fields in CONTENT order (auditchain.py), without the object.
        self.audit.submit_fields((
            request_id, arrived, info.get("key"), info.get("tenant") or None, client, method,
            info.get("path", "-"), info.get("model"), status, info.get("reason", "ok"),
            bool(info.get("stream", False)), prompt, completion, info.get("metering", "none"),
            outcome.bytes_out if isinstance(outcome, Outcome) else 0,
            None if first is None else (first - started) * 1000, duration_ms))

    def _client_ip(self, request: web.BaseRequest) -> str:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        host = peer[0] if isinstance(peer, tuple) else None
        headers = request.headers
        forwarded = headers.getall("X-Forwarded-For") if "X-Forwarded-For" in headers else ()
        return clientip.client_ip(host, forwarded, self.trusted)

    # -- the steps ---------------------------------------------------------------------------

    async def _process(self, request: web.BaseRequest, request_id: str,
                       info: dict[str, object]) -> web.StreamResponse:
        path = canonical_path(request.raw_path)
        info["path"] = path
        target = resolve(request.method, path)
        route = target.route
        if route is not None and route.public:
            return self._health(route)
        client = str(info["client"])
        self.auth_failures.check(client)      # before any key work
        # A request about to wait for Argon2 counts as a failure at once, refunded if the
        # key verifies: otherwise requests arriving during a verification all pass the
        # check above, and one address gets `limit + concurrency` verifications.
        counted: list[bool] = []
        try:
            principal = self.auth.known(request.headers)     # the usual case: no await
            if principal is None:
                def count_in_advance() -> None:
                    self.auth_failures.failed(client)
                    counted.append(True)
                principal = await self.auth.authenticate(request.headers, count_in_advance)
        except (Unauthorized, TooManyCredentials):
            if not counted:
                self.auth_failures.failed(client)
            raise
        if counted:
            self.auth_failures.refund(client)
        info["key"] = principal.key_id
        info["tenant"] = principal.tenant
        if route is None:
            raise EndpointBlocked()
        body: bytes | None = None
        shaped: ShapedRequest | None = None
        upstream_path = path
        if route.body:
            shaped = await self._shape(request, route, principal, info)
            body = serialise(shaped.body)
        elif route.path_model and target.model is not None:
            upstream_path = MODEL_PREFIX + self.policy.resolve(principal, target.model)
        estimate = 0
        if route.inference:
            if self.audit is None or not self.audit.healthy:
                # Fail closed: usage that cannot be recorded cannot be charged (SPEC §8).
                raise Unavailable("usage cannot be recorded right now")
            # An upper bound (a token is at least a byte), so reservations cannot be
            # overspent by concurrent requests; the difference is refunded at settlement.
            estimate = len(body or b"") + (shaped.output_cap if shaped is not None else 0)
        # From here a client hang-up cancels the handler (ClientWatch): while it waits in
        # the fair queue, and while it streams. aiohttp 3.8 would not tell us otherwise.
        watched = self.watch.add(request)
        outcome = info["outcome"] = Outcome()
        if route.inference and principal.record is not None and principal.record.log_prompts:
            info["prompt"] = body or b""
            outcome.capture = TextCapture(
                route.name, self.config.prompt_logging.max_chars + REDACTION_MARGIN)
        try:
            ticket = await self.admission.admit(principal, route.inference, estimate)
            info["rate_headers"] = ticket.headers
            try:
                return await self._forward(request, request_id, route, upstream_path, body,
                                           shaped, principal, info, outcome, ticket.headers)
            finally:
                if route.inference:
                    self._settle(ticket, outcome, body, shaped, info)
                ticket.release()
        except asyncio.CancelledError:
            # A hang-up, or a shutdown whose grace ran out: the audit row must not say "ok".
            outcome.error = outcome.error or _cancel_reason(request)
            outcome.client_gone = outcome.error == "client disconnected"
            info["reason"] = outcome.error
            raise
        finally:
            self.watch.discard(watched)

    @staticmethod
    def _settle(ticket: Ticket, outcome: Outcome, body: bytes | None,
                shaped: ShapedRequest | None, info: dict[str, object]) -> None:
        """Charge what the request really used (SPEC §7): exact counts when the answer
        carried final ones, else an estimate, marked as such."""
        if outcome.upstream_status is None:
            return                    # never reached Ollama: nothing to charge
        usage = outcome.usage
        if usage is not None and outcome.complete:
            prompt, completion, quality = usage.prompt_tokens, usage.completion_tokens, "exact"
        else:
            cap = shaped.output_cap if shaped is not None else 0
            prompt = usage.prompt_tokens if usage is not None else len(body or b"") // 4
            completion = usage.completion_tokens if usage is not None and \
                usage.completion_tokens else min(cap, outcome.bytes_out // 16)
            quality = "estimated"
        ticket.settle(prompt, completion, estimated=quality == "estimated")
        info["tokens"] = (prompt, completion)
        info["metering"] = quality

    async def _shape(self, request: web.BaseRequest, route: Route, principal: Principal,
                     info: dict[str, object]) -> ShapedRequest:
        raw = await read_body(request, max_bytes=self.config.limits.max_body_bytes,
                              timeout_s=self.config.limits.body_timeout_s)
        try:
            shaped = shape_request(route.name, parse_json_body(raw), self.limits)
        except BodyError as exc:
            raise BadRequest(str(exc)) from None
        if shaped.model is None:
            raise BadRequest("model is required")
        installed = self.policy.resolve(principal, shaped.model)
        info["model"] = installed
        info["stream"] = shaped.stream
        # Ollama resolves `model` before `name`; forward exactly one, spelt as installed.
        shaped.body["model"] = installed
        shaped.body.pop("name", None)
        return shaped

    async def _forward(self, request: web.BaseRequest, request_id: str, route: Route,
                       upstream_path: str, body: bytes | None, shaped: ShapedRequest | None,
                       principal: Principal, info: dict[str, object], outcome: Outcome,
                       extra: dict[str, str]) -> web.StreamResponse:
        upstream = self.upstream
        if upstream is None:
            raise Unavailable("the gateway is starting")
        resp: UpstreamResponse | None = None
        try:
            resp = await upstream.open(request.method, upstream_path, body)
            outcome.upstream_status = resp.status
            check_status(resp, model_route=route.body or route.path_model)
            content_type = resp.headers.get("content-type", "")
            if route.streams and content_type.startswith(_STREAM_TYPES):
                strip = (shaped is not None and shaped.stream and not shaped.client_wants_usage
                         and route.name in _USAGE_STRIPPABLE)
                meter = meter_for(route.name, strip_usage=strip)
                return await relay_stream(request, resp, meter, request_id, outcome, extra,
                                          self.monotonic)
            transform = None
            if route.listing is not None and request.method == "GET":
                transform = partial(self.policy.filter_listing, route.listing, principal)
            return await relay_buffered(request, resp, route.name, request_id, outcome,
                                        extra, transform)
        finally:
            if outcome.error:
                info["reason"] = outcome.error
            if resp is not None:
                # A finished answer returns the connection to the pool; anything else
                # closes it, which is how Ollama learns to stop generating.
                if outcome.complete:
                    resp.release()
                else:
                    resp.close()

    def _health(self, route: Route) -> web.Response:
        if route.name == "health":
            return web.Response(text="ok")
        # Names only, no internals (SPEC §4); the status socket says why.
        checks = {"upstream": self.policy.catalog.fresh(),
                  "key_store": self.auth.verifier.is_fresh(),
                  "audit_log": self.audit is not None and self.audit.healthy}
        ok = all(checks.values())
        return web.Response(status=200 if ok else 503, content_type="application/json",
                            text=json.dumps({"status": "ok" if ok else "degraded",
                                             "checks": checks}))
