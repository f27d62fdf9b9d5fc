"""Process lifecycle of `neuraldrive-gw serve`: listeners, signals, sd_notify and watchdog."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import logsink, reload, status
from .app import SERVER_OPTIONS, create_app
from .appkeys import pipeline_of
from .config import Config, ConfigError

log = logging.getLogger(__name__)

STATUS_EVERY_S = 1.0


class Notifier:
    """sd_notify without surprises: a no-op outside systemd, never raises into the loop."""

    def __init__(self) -> None:
        self._notifier: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify  # type: ignore[import-untyped]  # no stubs; Debian's 0.3.1 no-ops without NOTIFY_SOCKET
            self._notifier = sdnotify.SystemdNotifier()

    def notify(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)


def setup_logging(level: str) -> None:
    """stderr, one line per record, INFO lines written in batches (logsink.py)."""
    logsink.setup(level, sys.stderr)


async def _flush_logs() -> None:
    """Write the batched log lines every FLUSH_EVERY_S (a quiet daemon holds none back)."""
    while True:
        await asyncio.sleep(logsink.FLUSH_EVERY_S)
        logsink.flush()


def _runner_and_site_kwargs(grace_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """aiohttp 3.8 takes shutdown_timeout on the site, 3.9+ on the runner (and warns)."""
    if "shutdown_timeout" in inspect.signature(web.AppRunner.__init__).parameters:
        return {"shutdown_timeout": grace_s}, {}
    return {}, {"shutdown_timeout": grace_s}


async def start(app: web.Application, host: str, port: int, grace_s: float) -> web.AppRunner:
    """Start `app` on host:port (runs the app's start-up contexts first); raises on failure."""
    runner_kw, site_kw = _runner_and_site_kwargs(grace_s)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **SERVER_OPTIONS,
                           **runner_kw)
    try:
        await runner.setup()
        # The pipeline routes on the raw target itself; the app's catch-all route adds a
        # router lookup and a dispatch per request (~12 µs, docs/performance.md). The
        # listener calls the handler directly; create_app's route stays for test servers.
        assert runner.server is not None
        runner.server.request_handler = pipeline_of(app).handle
        await web.TCPSite(runner, host, port, **site_kw).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


class Reloader:
    """SIGHUP: re-read the config and the master key (SPEC §11). An invalid config is
    refused as a whole and the running one kept; either way systemd hears RELOADING=1 and
    then READY=1. Reloads run one at a time, in the order the signals came."""

    def __init__(self, app: web.Application, load: Callable[[], Config], notifier: Notifier):
        self._pipeline = pipeline_of(app)
        self._load = load
        self._notifier = notifier
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    def install(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._signalled)

    def _signalled(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """True when the new config was applied, False when it was refused."""
        async with self._lock:
            # MONOTONIC_USEC: systemd ≥ 253 matches RELOADING=1 to the reload it asked for.
            self._notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                config = await asyncio.to_thread(self._load)
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays: %s", exc)
                applied = False
            else:
                kept = reload.apply(self._pipeline, config)
                logging.getLogger().setLevel(config.log_level.upper())
                log.info("configuration reloaded%s", f" (restart needed for: {', '.join(kept)})"
                         if kept else "")
                applied = True
            await self._pipeline.auth.master.refresh()
            self._notifier.notify("READY=1")
            return applied


async def start_status(app: web.Application, path: str) -> web.AppRunner:
    """The status socket (status.py) next to the gateway; raises if it cannot be made."""
    status.prepare_socket_path(path)
    runner = web.AppRunner(status.create_status_app(pipeline_of(app)), access_log=None,
                           handle_signals=False)
    try:
        await runner.setup()
        await web.UnixSite(runner, path).start()
        status.finish_socket(path)
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def status_line(app: web.Application) -> str:
    """What `systemctl status` shows: one line an operator can act on. Built every second
    from a few counters, not from the full /status snapshot (which walks every key's
    buckets and budgets: with thousands of keys, a pause the requests felt)."""
    pipeline = pipeline_of(app)
    problems = status.current_problems(pipeline)
    parts = ["serving" if not problems else "degraded: " + "; ".join(problems)]
    parts.append(f"{pipeline.watch.in_flight} in flight")
    queued = pipeline.admission.queue.queued
    if queued:
        parts.append(f"{queued} queued")
    if pipeline.auth.master.state.token is None:
        parts.append("master key disabled")
    return "; ".join(parts)


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC when systemd asks this process for pings, else None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2 / 1_000_000


async def _keepalive(app: web.Application, notifier: Notifier, every: float | None) -> None:
    """WATCHDOG=1 from the event loop itself (a blocked loop stops the pings, and systemd
    restarts us), and STATUS= whenever the one-line summary changes (checked each second)."""
    last = ""
    next_status = 0.0
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() >= next_status:
            line = status_line(app)
            if line != last:
                notifier.notify(f"STATUS={line}")
                last = line
            next_status = loop.time() + STATUS_EVERY_S
        if every is not None:
            notifier.notify("WATCHDOG=1")
        await asyncio.sleep(min(every or STATUS_EVERY_S, STATUS_EVERY_S))


async def serve(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, non-zero when start-up fails.
    `load` re-reads the configuration on SIGHUP (None: SIGHUP only re-reads the master key).

    READY=1 is sent once the config, master key, database, TCP listener and status socket
    are up — not waiting for Ollama, whose absence the gateway reports instead."""
    notifier = Notifier()
    app = create_app(config)
    try:
        runner = await start(app, config.listen.host, config.listen.port,
                             config.shutdown_grace_s)
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        return 1
    try:
        status_runner = await start_status(app, config.paths.status_socket)
    except Exception as exc:
        log.error("start-up failed: status socket %s: %s", config.paths.status_socket, exc)
        await runner.cleanup()
        return 1
    log.info("listening on http://%s:%d, upstream %s, status socket %s", config.listen.host,
             config.listen.port, config.upstream.url, config.paths.status_socket)
    Reloader(app, load or (lambda: pipeline_of(app).config), notifier).install()
    notifier.notify(f"READY=1\nSTATUS={status_line(app)}")
    loop = asyncio.get_running_loop()
    keepalive = loop.create_task(_keepalive(app, notifier, watchdog_interval()))
    flusher = loop.create_task(_flush_logs())
    await wait_for_stop_signal()
    notifier.notify("STOPPING=1")
    log.info("stopping")
    await runner.cleanup()          # drains streams, then flushes the audit log
    keepalive.cancel()
    flusher.cancel()
    await status_runner.cleanup()
    status.remove_socket(config.paths.status_socket)
    return 0
