"""Process lifecycle of `neuraldrive-gw serve`: runner, listener, signals, sd_notify."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import web

from .app import SERVER_OPTIONS, create_app
from .config import Config

log = logging.getLogger(__name__)


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
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")


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


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, non-zero when start-up fails."""
    notifier = Notifier()
    try:
        runner = await start(create_app(config), config.listen.host, config.listen.port,
                             config.shutdown_grace_s)
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        return 1
    log.info("listening on http://%s:%d, upstream %s", config.listen.host, config.listen.port,
             config.upstream.url)
    notifier.notify(f"READY=1\nSTATUS=serving on {config.listen.host}:{config.listen.port}")
    await wait_for_stop_signal()
    notifier.notify("STOPPING=1")
    log.info("stopping")
    await runner.cleanup()
    return 0
