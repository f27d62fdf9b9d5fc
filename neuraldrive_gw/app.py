"""create_app(): the one composition root. The daemon, the demo and every test call it.

There are no middlewares: the whole pipeline is one handler (pipeline.py) behind a single
catch-all route, because routing must be decided on the raw target by our own table, not
by aiohttp's router. Resources live in cleanup contexts, started in dependency order and
stopped in reverse: key store → audit log and budgets → prompt log → master key → upstream
session → discovery → client watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from . import keys, store
from .appkeys import PIPELINE
from .audit import AuditWriter
from .spend import spend_in_periods
from .auth import Authenticator, KeyVerifier, MasterKey
from .clock import Clock, SystemClock
from .config import Config
from .keystore import KeyStoreWatcher
from .pipeline import Pipeline
from .policy import Catalog, ModelPolicy
from .promptlog import PromptLog, load_hook
from .proxy import ClientWatch, Upstream
from .quotas.admission import Admission
from .quotas.budgets import BudgetLedger, period_key
from .quotas.fairqueue import FairQueue

log = logging.getLogger(__name__)

# Options for the aiohttp server (AppRunner/TestServer) that runs a create_app() app.
# auto_decompress off: aiohttp would otherwise gunzip bodies itself (Ollama never does) and
# refuse encodings it lacks a codec for with its own 400; the gateway answers every
# Content-Encoding but identity with 415 before reading a byte (intake.py).
# lingering_time: after refusing a request whose body we did not read (401, 413, ...),
# aiohttp drains the rest before closing so the client sees the answer, not a reset; one
# second bounds what a huge declared body can cost us (the default is 10 s).
SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False, "lingering_time": 1.0}

AUTH_POLL_S = 0.25           # CLI changes take effect within 1 s (SPEC §2)
MASTER_KEY_POLL_S = 1.0      # master key rotation within 2 s
DISCOVERY_RETRY_S = 2.0      # while Ollama is unreachable


async def _no_continue(request: web.Request) -> None:
    """Do not let aiohttp answer `Expect: 100-continue` before we have checked the request."""
    return None


def create_app(config: Config, *, clock: Clock | None = None,
               verify: Callable[[str, str], bool] = keys.verify_key) -> web.Application:
    clock = clock or SystemClock()
    master = MasterKey(config.paths.master_key_file)
    verifier = KeyVerifier(monotonic=clock.monotonic, wall=clock.time, verify=verify)
    catalog = Catalog(ttl_s=config.upstream.discovery_ttl_s, monotonic=clock.monotonic)
    ledger = BudgetLedger()
    admission = Admission(config, clock, FairQueue(config.upstream.max_parallel), ledger)
    pipeline = Pipeline(config, auth=Authenticator(master, verifier),
                        policy=ModelPolicy(catalog, allow_cloud_models=config.allow_cloud_models),
                        watch=ClientWatch(), admission=admission, monotonic=clock.monotonic,
                        wall=clock.time)

    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app[PIPELINE] = pipeline
    app.router.add_route("*", "/{tail:.*}", pipeline.handle, expect_handler=_no_continue)
    # Runs before the listener stops waiting for handlers and before any resource closes.
    app.on_shutdown.append(lambda _app: pipeline.watch.drain(pipeline.config.shutdown_grace_s))
    app.cleanup_ctx.extend([
        _key_store(config, verifier),
        _accounting(config, pipeline, ledger, clock),
        _prompt_log(config, pipeline, clock),
        _master_key(master),
        _upstream(config, pipeline),
        _discovery(config, pipeline, catalog),
        _background(pipeline.watch.run),
    ])
    return app


# -- lifecycles ------------------------------------------------------------------------------

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _background(factory: Callable[[], Coroutine[Any, Any, None]]) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(factory())
        yield
        await _cancel(task)
    return ctx


def _key_store(config: Config, verifier: KeyVerifier) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Checks existence and schema (and migrates an older one) off the loop; a missing
        # or newer database fails start-up here, before anything listens.
        conn_sync = await asyncio.to_thread(store.open_db, config.paths.database)
        conn_sync.close()
        watcher = KeyStoreWatcher(config.paths.database, verifier, poll_s=AUTH_POLL_S)
        try:
            await watcher.load()
            task = asyncio.get_running_loop().create_task(watcher.run())
            yield
            await _cancel(task)
        finally:
            await watcher.close()
            verifier.close()
    return ctx


def _accounting(config: Config, pipeline: Pipeline, ledger: BudgetLedger,
                clock: Clock) -> CleanupCtx:
    """The audit writer, and budget spend rebuilt from the audit log (SPEC §8, §10).

    Stopped after the upstream session and the shutdown drain, so every request's row is
    submitted before the final flush.
    """
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        now = clock.time()
        conn = await store.open_async(config.paths.database)
        try:
            periods = ("day", "month")
            spent = await spend_in_periods(conn, [_period_start(p, now) for p in periods])
            rows = [((kind, name), period_key(period, now), tokens)
                    for kind, name, totals in spent
                    for period, tokens in zip(periods, totals) if tokens]
        finally:
            await conn.close()
        ledger.load(rows)
        writer = AuditWriter(config.paths.database, busy_timeout=config.audit.busy_timeout_s,
                             max_queued=config.audit.max_queued)
        await writer.start()
        pipeline.audit = writer
        yield
        pipeline.audit = None
        await writer.close()
    return ctx


def _prompt_log(config: Config, pipeline: Pipeline, clock: Clock) -> CleanupCtx:
    """The prompt log's writer and its purge of expired rows (SPEC §10). A redaction hook
    that cannot be loaded fails start-up: logging unredacted prompts is not an option."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = config.prompt_logging
        prompts = PromptLog(config.paths.database, hook=load_hook(settings.redact_hook),
                            max_chars=settings.max_chars, max_queued=settings.max_queued,
                            purge_batch=settings.purge_batch)
        await prompts.start()

        async def purge() -> None:
            while True:
                try:
                    deleted = await prompts.purge(clock.time())
                    if deleted:
                        log.info("prompt log: %d expired entries deleted", deleted)
                except Exception as exc:
                    log.warning("prompt log purge failed: %s", type(exc).__name__)
                await asyncio.sleep(pipeline.config.prompt_logging.purge_interval_s)

        task = asyncio.get_running_loop().create_task(purge())
        pipeline.prompts = prompts
        yield
        pipeline.prompts = None
        await _cancel(task)
        await prompts.close()
    return ctx


def _period_start(period: str, now: float) -> float:
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return start.timestamp()


def _master_key(master: MasterKey) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await master.refresh()

        async def poll() -> None:
            while True:
                await asyncio.sleep(MASTER_KEY_POLL_S)
                try:
                    await master.refresh()
                except Exception:
                    log.exception("master key refresh failed")

        task = asyncio.get_running_loop().create_task(poll())
        yield
        await _cancel(task)
    return ctx


def _upstream(config: Config, pipeline: Pipeline) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pipeline.upstream = Upstream.configured(config.upstream)
        yield
        upstream, pipeline.upstream = pipeline.upstream, None
        if upstream is not None:
            await upstream.close()
    return ctx


def _discovery(config: Config, pipeline: Pipeline, catalog: Catalog) -> CleanupCtx:
    async def discover() -> None:
        ok = True
        while True:
            upstream = pipeline.upstream
            try:
                if upstream is None:
                    raise RuntimeError("no upstream session")
                began = time.perf_counter()
                catalog.update(json.loads(await upstream.fetch_json_bytes("/api/tags")))
                catalog.latency_ms = round((time.perf_counter() - began) * 1000, 3)
                if not ok:
                    log.info("model discovery succeeded again (%d models)",
                             len(catalog.installed()))
                ok = True
            except Exception as exc:
                catalog.fail(f"{type(exc).__name__}")
                if ok:
                    log.warning("model discovery failed (%s); retrying", type(exc).__name__)
                ok = False
            interval = pipeline.config.upstream.discovery_interval_s    # reloadable
            await asyncio.sleep(interval if ok else min(DISCOVERY_RETRY_S, interval))
    return _background(discover)
