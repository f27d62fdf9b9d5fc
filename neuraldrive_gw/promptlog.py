"""The prompt log (SPEC §10): what opted-in keys asked and were answered, redacted, expiring.

Off unless a key has `log_prompts` set (`keys create|set-limits --log-prompts`). For each
inference request of such a key the gateway keeps the request body it forwarded and the
answer text the client received (capture.py reconstructs it from any dialect, streamed or
not), each cut at `prompt_logging.max_chars`. Before anything is stored, both texts pass
the redaction step: built-in patterns replace API keys (`nd-…`) and e-mail addresses, then
the configured hook (`module:function`, str → str) runs. A hook that fails means the
entry is not stored: privacy fails closed. Rows expire after `retention_days` and are
deleted in small batches, so a large backlog never holds the write lock for long.

The prompt log must never slow down or fail a request: entries go through a bounded
queue to a background writer with its own connection; when the queue is full or the
database fails, entries are dropped and counted (and logged without their text).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import aiosqlite

from . import store

log = logging.getLogger(__name__)

_KEY = re.compile(r"nd-[A-Za-z0-9]{32}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
KEY_MARK, EMAIL_MARK = "nd-[redacted]", "[email]"
FLUSH_INTERVAL_S = 0.2
# Texts are captured this much beyond max_chars, redacted, and only then cut: longer than
# any pattern, so a key or address across the cut is still recognised and replaced.
REDACTION_MARGIN = 1024
_INSERT = ("INSERT INTO prompt_log (request_id, at, expires_at, key_id, tenant, route, model, "
           "status, request_text, response_text, truncated) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

Hook = Callable[[str], str]


class HookError(ValueError):
    """The configured redaction hook cannot be loaded."""


def load_hook(spec: str | None) -> Hook | None:
    """Import `module:function` once, at start-up; HookError says what is wrong."""
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HookError(f"prompt_logging.redact_hook: {spec!r} is not module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HookError(f"prompt_logging.redact_hook: cannot import {module_name}: "
                        f"{type(exc).__name__}: {exc}") from None
    hook = getattr(module, attr, None)
    if not callable(hook):
        raise HookError(f"prompt_logging.redact_hook: {spec} is not a callable")
    return hook  # type: ignore[no-any-return]


def redact_builtin(text: str) -> str:
    return _EMAIL.sub(EMAIL_MARK, _KEY.sub(KEY_MARK, text))


@dataclass(frozen=True, slots=True)
class PromptEntry:
    request_id: str
    at: float
    expires_at: float
    key_id: str
    tenant: str | None
    route: str
    model: str | None
    status: int
    request_text: str
    response_text: str
    truncated: bool


class PromptLog:
    """`await start()`, `submit()` from the pipeline, `await close()`; `purge()` deletes
    expired rows in batches (run every `purge_interval_s` by the app)."""

    def __init__(self, path: str, *, hook: Hook | None, max_chars: int = 32768,
                 max_queued: int = 1000, purge_batch: int = 1000):
        self._path = path
        self._hook = hook
        self._max_chars = max_chars
        self._max_queued = max_queued
        self._purge_batch = purge_batch
        self._queue: deque[PromptEntry] = deque()
        self._wake = asyncio.Event()
        self._conn: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0
        self.redaction_failures = 0
        self.purged = 0

    async def start(self) -> None:
        self._conn = await store.open_async(self._path)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Write what is queued (bounded by the caller's patience), then close."""
        if self._task is not None:
            self._wake.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._write()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def submit(self, entry: PromptEntry) -> None:
        """Never blocks and never raises: a full queue drops the entry and counts it."""
        if len(self._queue) >= self._max_queued:
            self.dropped += 1
            return
        self._queue.append(entry)
        self._wake.set()

    async def flush(self) -> None:
        """Write everything queued now (tests, shutdown)."""
        await self._write()

    async def purge(self, now: float) -> int:
        """Delete rows expired at `now`, `purge_batch` per transaction; returns how many."""
        if self._conn is None:
            return 0
        total = 0
        while True:
            async with asyncio.timeout(10):
                cursor = await self._conn.execute(
                    "DELETE FROM prompt_log WHERE id IN (SELECT id FROM prompt_log "
                    "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
                    (now, self._purge_batch))
            deleted = cursor.rowcount
            await cursor.close()
            total += max(deleted, 0)
            if deleted < self._purge_batch:
                break
            await asyncio.sleep(0)      # let requests in between batches
        self.purged += total
        return total

    # -- the writer ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_INTERVAL_S)     # gather a batch
            try:
                await self._write()
            except Exception as exc:     # the database failed: these entries are lost
                log.warning("prompt log write failed: %s", type(exc).__name__)

    async def _write(self) -> None:
        if not self._queue or self._conn is None:
            return
        batch = list(self._queue)
        self._queue.clear()
        # Redaction (regexes, the operator's hook) runs off the event loop.
        rows = await asyncio.to_thread(self._redact_all, batch)
        try:
            async with asyncio.timeout(10):
                await self._conn.executemany(_INSERT, rows)
        except Exception:
            self.dropped += len(rows)
            raise
        self.written += len(rows)

    def _redact_all(self, batch: list[PromptEntry]) -> list[tuple[object, ...]]:
        rows: list[tuple[object, ...]] = []
        for entry in batch:
            try:
                # Redact first, then cut: a key across the cut would otherwise leave a
                # piece too short for the patterns to recognise.
                request_text = self._redact(entry.request_text)
                response_text = self._redact(entry.response_text)
                cut = len(request_text) > self._max_chars or \
                    len(response_text) > self._max_chars
                clean = replace(entry, request_text=request_text[:self._max_chars],
                                response_text=response_text[:self._max_chars],
                                truncated=entry.truncated or cut)
            except Exception as exc:
                self.redaction_failures += 1
                log.warning("prompt log: redaction failed for request %s (%s); not stored",
                            entry.request_id, type(exc).__name__)
                continue
            rows.append((clean.request_id, clean.at, clean.expires_at, clean.key_id,
                         clean.tenant, clean.route, clean.model, clean.status,
                         clean.request_text, clean.response_text, int(clean.truncated)))
        return rows

    def _redact(self, text: str) -> str:
        text = redact_builtin(text)
        if self._hook is not None:
            result = self._hook(text)
            if not isinstance(result, str):
                raise TypeError("the redaction hook must return a str")
            text = result
        return text
