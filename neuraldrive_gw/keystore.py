"""Keeps the daemon's in-memory key snapshot in step with the database (SPEC §2).

The CLI is another process: every tenant or key change bumps `meta.auth_revision` in the
same transaction. The watcher polls that counter every `poll_s` and reloads the whole
snapshot when it moved, so a revocation takes effect within a second. A poll that fails
leaves the verifier's freshness to run out, and requests then fail closed (503).

The watcher owns its connection and reopens it after any failure, and when the file under
it was removed, replaced or truncated (dbfile.py): a connection to an unlinked inode would
go on reading the old keys forever, and one to a restored backup must be a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiosqlite

from . import store
from .auth import KeyVerifier
from .dbfile import FileIdentity
from .store import StoreError

log = logging.getLogger(__name__)


class KeyStoreWatcher:
    """`await load()` once at start (errors propagate: start-up fails), then `await run()`
    as a task; `await close()` at the end."""

    def __init__(self, path: str, verifier: KeyVerifier, *, poll_s: float):
        self.path = path
        self.verifier = verifier
        self.poll_s = poll_s
        self.healthy = True
        self.last_error: str | None = None
        self._conn: aiosqlite.Connection | None = None
        self._file = FileIdentity(path)

    async def load(self) -> None:
        conn = await self._connection()
        self.verifier.install(await store.load_auth_snapshot(conn))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception as exc:     # any failure: keep polling; staleness fails closed
                await self._disconnect()
                self.last_error = str(exc) or type(exc).__name__
                if self.healthy:
                    log.warning("key store unreadable: %s", self.last_error)
                self.healthy = False

    async def poll(self) -> None:
        """One check: reload the snapshot if the revision moved, else mark it fresh."""
        conn = await self._connection()
        # asyncio.timeout, not wait_for: wait_for runs the call in an inner task, and a
        # shutdown cancelling it mid-query could hang on 3.11 (seen in tests); this way
        # cancellation reaches the aiosqlite await directly.
        async with asyncio.timeout(2.0):
            revision = await store.auth_revision(conn)
        if revision != self.verifier.snapshot.revision:
            async with asyncio.timeout(10.0):
                self.verifier.install(await store.load_auth_snapshot(conn))
            log.info("key store reloaded (revision %d, %d keys)", revision,
                     len(self.verifier.snapshot.keys))
        else:
            self.verifier.mark_fresh()
        if not self.healthy:
            log.warning("key store readable again")
        self.healthy, self.last_error = True, None

    async def close(self) -> None:
        await self._disconnect()

    async def _connection(self) -> aiosqlite.Connection:
        if self._conn is not None:
            fault = self._file.fault()
            if fault is None:
                return self._conn
            await self._disconnect()
            raise StoreError(fault)
        conn = await store.open_async(self.path)
        try:
            self._file.remember()
        except OSError as exc:
            await conn.close()
            raise StoreError(f"cannot stat database {self.path}: {exc.strerror}") from None
        self._conn = conn
        return conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):    # the file may be gone or damaged
                await conn.close()
