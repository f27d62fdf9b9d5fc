"""The status socket (SPEC §11): read-only HTTP on a Unix socket for the TUI and operators.

`GET /status` is one JSON document (every field is described in docs/status.md) and
`GET /metrics` the same facts in the Prometheus text format. Nothing else is served, and
nothing secret is ever in either: no key, hash, prompt, or upstream error text — key ids,
tenant names, model names, counts and short reasons only.

The socket is created by the daemon before READY=1, mode 0660 (group `neuraldrive-api`
reads it), and removed at stop; a stale socket left by a crash is replaced, but a path that
is not a socket is never touched.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import __version__
from .pipeline import Pipeline

SOCKET_MODE = 0o660
STATUS_PATHS = ("/status", "/metrics")


class SocketPathError(Exception):
    """The status socket path is taken by something that is not a socket."""


def current_problems(pipeline: Pipeline) -> list[str]:
    """Why the gateway is degraded (empty: ready). Cheap: the daemon asks every second."""
    catalog = pipeline.policy.catalog
    problems = []
    if not catalog.fresh():
        problems.append("upstream unreachable: no successful model discovery"
                        if catalog.refreshed_at is None else "upstream discovery stale")
    if not pipeline.auth.verifier.is_fresh():
        problems.append("key store unreadable")
    if pipeline.audit is None or not pipeline.audit.healthy:
        problems.append("usage cannot be recorded (audit log)")
    return problems


def snapshot(pipeline: Pipeline, started: float, now: float | None = None) -> dict[str, Any]:
    """Everything /status reports, as plain data."""
    now = time.monotonic() if now is None else now
    catalog = pipeline.policy.catalog
    verifier = pipeline.auth.verifier
    master = pipeline.auth.master.state
    audit = pipeline.audit.snapshot() if pipeline.audit is not None else None
    admission = pipeline.admission.snapshot()
    queue = admission["queue"]
    assert isinstance(queue, dict)
    problems = current_problems(pipeline)
    prompts = pipeline.prompts
    return {
        "version": __version__,
        "uptime_s": round(now - started, 3),
        "state": "degraded" if problems else "ready",
        "problems": problems,
        "upstream": {
            "url": pipeline.config.upstream.url,
            "reachable": catalog.fresh(),
            "latency_ms": catalog.latency_ms,
            "last_discovery_s_ago": None if catalog.refreshed_at is None
            else round(catalog.age(), 3),
            "last_error": catalog.last_error,
        },
        "models": sorted(catalog.installed().values()),
        "database": {
            "path": pipeline.config.paths.database,
            "key_store_fresh": verifier.is_fresh(),
            "auth_revision": verifier.snapshot.revision,
            "keys_loaded": len(verifier.snapshot.keys),
            "audit": audit,
            "prompt_log": None if prompts is None else {
                "written": prompts.written, "dropped": prompts.dropped,
                "redaction_failures": prompts.redaction_failures, "purged": prompts.purged},
        },
        "master_key": {"enabled": master.token is not None, "problem": master.problem},
        "requests": {
            "in_flight": pipeline.watch.in_flight,
            "queued": queue["queued"],
            "model_slots": {"max": queue["max_parallel"], "in_use": queue["in_flight"]},
            "by_status": {str(code): n for code, n in sorted(pipeline.requests_by_status.items())},
        },
        "keys": _per_key(admission),
        "tenants": _per_tenant(admission),
        "auth": {"argon2_verifications": verifier.verifications,
                 "failure_limited_addresses": pipeline.auth_failures.tracked,
                 "refused_for_failures": pipeline.auth_failures.refused},
        "admission": admission["counters"],
    }


def _per_key(admission: dict[str, Any]) -> dict[str, dict[str, Any]]:
    buckets = admission["buckets"]
    queued = admission["queue"]["queued_by_key"]
    names = (set(admission["in_flight_by_key"]) | set(queued) | set(buckets["key_requests"])
             | set(buckets["key_tokens"]))
    budgets = {b["name"]: b for b in admission["budgets"] if b["scope"] == "key"}
    return {name: {"in_flight": admission["in_flight_by_key"].get(name, 0),
                   "queued": queued.get(name, 0),
                   "requests_bucket": buckets["key_requests"].get(name),
                   "tokens_bucket": buckets["key_tokens"].get(name),
                   "budget": _budget(budgets.get(name))}
            for name in sorted(names)}


def _per_tenant(admission: dict[str, Any]) -> dict[str, dict[str, Any]]:
    buckets = admission["buckets"]["tenant_tokens"]
    queued = admission["queue"]["queued_by_tenant"]
    names = set(admission["in_flight_by_tenant"]) | set(buckets) | set(queued)
    names.discard("")                       # the master key's own line in the queue
    budgets = {b["name"]: b for b in admission["budgets"] if b["scope"] == "tenant"}
    return {name: {"in_flight": admission["in_flight_by_tenant"].get(name, 0),
                   "queued": queued.get(name, 0), "tokens_bucket": buckets.get(name),
                   "budget": _budget(budgets.get(name))}
            for name in sorted(names)}


def _budget(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"budget": row["budget"], "period": row["period"], "left": row["left"]}


# -- Prometheus text -------------------------------------------------------------------------


def metrics(data: dict[str, Any]) -> str:
    """The /status facts as Prometheus text exposition (version 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{label_text}}} {_number(value)}" if label_text
                       else f"{name} {_number(value)}")

    up = data["upstream"]
    requests = data["requests"]
    audit = data["database"]["audit"] or {}
    family("neuraldrive_gw_up", "gauge", "1 when ready, 0 when degraded.",
           [({}, data["state"] == "ready")])
    family("neuraldrive_gw_uptime_seconds", "gauge", "Seconds since start.",
           [({}, data["uptime_s"])])
    family("neuraldrive_gw_upstream_reachable", "gauge", "1 when model discovery is fresh.",
           [({}, up["reachable"])])
    if up["latency_ms"] is not None:
        family("neuraldrive_gw_upstream_latency_seconds", "gauge",
               "Duration of the last successful model discovery.",
               [({}, up["latency_ms"] / 1000)])
    family("neuraldrive_gw_models", "gauge", "Installed models seen by discovery.",
           [({}, len(data["models"]))])
    family("neuraldrive_gw_requests_in_flight", "gauge", "Requests being answered.",
           [({}, requests["in_flight"])])
    family("neuraldrive_gw_requests_queued", "gauge", "Requests waiting for a model slot.",
           [({}, requests["queued"])])
    family("neuraldrive_gw_model_slots_in_use", "gauge", "Model slots taken.",
           [({}, requests["model_slots"]["in_use"])])
    family("neuraldrive_gw_requests_total", "counter", "Answered requests by HTTP status.",
           [({"status": code}, n) for code, n in requests["by_status"].items()])
    family("neuraldrive_gw_key_in_flight", "gauge", "Requests in flight per key id.",
           [({"key": k}, v["in_flight"]) for k, v in data["keys"].items()])
    family("neuraldrive_gw_key_queued", "gauge", "Requests queued per key id.",
           [({"key": k}, v["queued"]) for k, v in data["keys"].items()])
    family("neuraldrive_gw_key_budget_left_tokens", "gauge", "Token budget left per key id.",
           [({"key": k}, v["budget"]["left"]) for k, v in data["keys"].items()
            if v["budget"] is not None])
    family("neuraldrive_gw_key_store_fresh", "gauge", "1 when the key database is readable.",
           [({}, data["database"]["key_store_fresh"])])
    family("neuraldrive_gw_audit_healthy", "gauge", "1 when usage can be recorded.",
           [({}, bool(audit.get("healthy")))])
    family("neuraldrive_gw_audit_queued_rows", "gauge", "Audit rows waiting to be written.",
           [({}, audit.get("queued", 0))])
    family("neuraldrive_gw_audit_written_rows_total", "counter", "Audit rows written.",
           [({}, audit.get("written", 0))])
    family("neuraldrive_gw_audit_dropped_rows_total", "counter",
           "Audit rows without tokens dropped while the log could not be written.",
           [({}, audit.get("dropped", 0))])
    family("neuraldrive_gw_master_key_enabled", "gauge", "1 when the master key is usable.",
           [({}, data["master_key"]["enabled"])])
    family("neuraldrive_gw_argon2_verifications_total", "counter",
           "Argon2 key verifications run (each key pays one).",
           [({}, data["auth"]["argon2_verifications"])])
    family("neuraldrive_gw_auth_failure_refusals_total", "counter",
           "Requests refused by the per-address authentication-failure limit.",
           [({}, data["auth"]["refused_for_failures"])])
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(float(value)) if isinstance(value, float) else str(value)


# -- the app and its socket ------------------------------------------------------------------------


def create_status_app(pipeline: Pipeline, *,
                      monotonic: Callable[[], float] = time.monotonic) -> web.Application:
    started = monotonic()

    async def handle(request: web.Request) -> web.Response:
        if request.path not in STATUS_PATHS:
            return web.json_response({"error": "not found"}, status=404)
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": "method not allowed"}, status=405,
                                     headers={"Allow": "GET, HEAD"})
        data = snapshot(pipeline, started, monotonic())
        if request.path == "/metrics":
            return web.Response(body=metrics(data).encode(), headers={
                "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        return web.json_response(data)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def prepare_socket_path(path: str) -> None:
    """Make `path` free for a new socket: remove a stale socket, refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(f"status socket path {path} exists and is not a socket")
    os.unlink(path)


def finish_socket(path: str) -> None:
    os.chmod(path, SOCKET_MODE)


def remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
