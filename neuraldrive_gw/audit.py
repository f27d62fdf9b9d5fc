"""The daemon's audit writer: one row per request, group-committed, hash-chained (SPEC §10).

The request path calls `AuditWriter.submit(record)`: synchronous, O(1), never blocks and
never fails for storage reasons. One background task writes what is queued: it lets
the rows of the next GATHER_S (25 ms) join, then writes them in one BEGIN IMMEDIATE
transaction, run whole in its own aiosqlite connection's thread (never on the loop). So
under load one commit carries about a hundred rows, and a row reaches SQLite within
about 25 ms plus a commit (SPEC: 50 ms). A `kill -9` loses only the rows not yet
committed: those of the batch in flight and those queued behind it.

When writes fail (locked past the busy timeout, disk full, read-only, file removed,
replaced or truncated) rows stay queued and are retried with backoff; `healthy` is False
from the first failure until a batch commits again, and whenever more than `max_queued`
rows wait. The gateway then refuses metered requests (503), so nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
from collections import deque
from typing import Any

import aiosqlite

from . import store
from .auditbatch import Appended, CommitFailed, Pending, append, busy
from .auditchain import CONTENT, AuditRecord, content_json, row_values
from .dbfile import FileIdentity
from .store import StoreError

log = logging.getLogger(__name__)

# How long a batch waits for more rows before its transaction starts. Every transaction
# costs a thread round trip, a WAL sync and the chain's tail lookup; at a few thousand
# requests a second this turns one transaction per row into one per hundred or so, and a
# row still reaches SQLite well within SPEC's 50 ms. (Measured in docs/performance.md.)
GATHER_S = 0.025

__all__ = ["AuditRecord", "AuditWriter"]


_PROMPT_TOKENS = CONTENT.index("prompt_tokens")
_COMPLETION_TOKENS = CONTENT.index("completion_tokens")


class AuditWriter:
    """Group-commits audit rows in the background: `await start()` … `await close()`.

    `path` must be an existing database at the current schema (the writer never creates or
    migrates one). It keeps its own connection: its transactions must not interleave with
    other users of a shared one. `busy_timeout`: how long a batch waits for a lock held
    elsewhere before it counts as failed; `batch_size`: rows per transaction at most;
    failed batches are retried after `retry_min_s`, doubling up to `retry_max_s`, or at
    once when someone calls flush().
    """

    def __init__(self, path: str, *, busy_timeout: float = 2.0, max_queued: int = 10_000,
                 batch_size: int = 500, retry_min_s: float = 0.05,
                 retry_max_s: float = 1.0, gather_s: float = GATHER_S) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._max_queued = max_queued
        # Above this, rows without tokens (refusals, listings) are dropped and counted.
        # Rows with tokens are always kept: they come only from metered requests, which
        # are not admitted while the writer is unhealthy, so they are bounded by the
        # requests in flight when it turned unhealthy. Budgets depend on them.
        self._hard_limit = 2 * max_queued
        self._batch_size = batch_size
        self._gather_s = gather_s
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._queue: deque[Pending] = deque()
        self._conn: aiosqlite.Connection | None = None
        self._file = FileIdentity(path)                  # the file the connection uses
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()          # rows arrived, or closing
        self._retry_now = asyncio.Event()     # flush()/close(): skip the backoff
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._accepted = 0
        self._written = 0
        self._dropped = 0
        self._failures = 0
        self._batches = 0
        self._failing = False
        self._closing = False
        self._closed = False
        self._last_error: str | None = None
        self._head: tuple[int, str] | None = None
        # (id, hash, rows) of a batch whose COMMIT raised: it may have committed anyway.
        self._attempt: tuple[int, str, int] | None = None
        self._writing = 0

    # -- what the gateway and the status socket read --------------------------------------

    @property
    def healthy(self) -> bool:
        """Running, the last write succeeded, and fewer than `max_queued` rows wait."""
        return (self._task is not None and not self._task.done() and not self._failing
                and len(self._queue) < self._max_queued)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def written(self) -> int:
        return self._written

    @property
    def writing(self) -> int:
        """Rows in the batch being written now (still counted in `queued`)."""
        return self._writing

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def failures(self) -> int:
        """Batches that failed (each is retried)."""
        return self._failures

    @property
    def batches(self) -> int:
        """Transactions committed."""
        return self._batches

    @property
    def last_error(self) -> str | None:
        """Why the last attempt failed; None once a batch has committed after it."""
        return self._last_error

    @property
    def head(self) -> tuple[int, str] | None:
        """(id, hash) of the last row written, or of the chain's start before any."""
        return self._head

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the status socket."""
        return {"healthy": self.healthy, "queued": self.queued, "written": self.written,
                "dropped": self.dropped, "failures": self.failures,
                "last_error": self.last_error,
                "head_id": None if self._head is None else self._head[0]}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, read the chain's head, start writing. Raises StoreError."""
        if self._task is not None:
            raise RuntimeError("audit writer already started")
        self._conn = await self._open()
        try:
            self._head = await _tail(self._conn)
        except BaseException as exc:
            await self._disconnect()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database {self._path}: {exc}") from None
            raise
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")
        self._task.add_done_callback(self._stopped)

    async def close(self, timeout: float | None = 10.0) -> None:
        """Write everything queued (SIGTERM path), then close. After `timeout` seconds of
        failing writes, give up: the rows still queued are lost, and logged as such."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._retry_now.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        self._closed = True
        if self._queue:
            log.error("audit writer closed with %d rows unwritten (%s)", len(self._queue),
                      self._last_error)
        self._release_waiters(StoreError(f"audit writer closed with {len(self._queue)} "
                                         "rows unwritten"))
        await self._disconnect()

    # -- the request path ------------------------------------------------------------------

    def submit(self, record: AuditRecord) -> None:
        """Queue one row. O(1), never blocks, never raises for storage reasons (a malformed
        record raises ValueError). Past the hard limit, or after close(), rows without
        tokens are dropped and counted in `dropped`."""
        self._enqueue(record.values())

    def submit_fields(self, fields: tuple[Any, ...]) -> None:
        """submit() for a record's fields as one tuple in CONTENT order (the request path:
        no record object per request)."""
        self._enqueue(row_values(fields))

    def _enqueue(self, values: tuple[Any, ...]) -> None:
        charged = values[_PROMPT_TOKENS] + values[_COMPLETION_TOKENS] > 0
        if self._closed or (not charged and len(self._queue) >= self._hard_limit):
            if not self._dropped or self._dropped % 1000 == 0:
                log.error("audit row dropped (%s): %d so far",
                          "writer closed" if self._closed else "backlog full", self._dropped + 1)
            self._dropped += 1
            return
        self._queue.append((values, content_json(values)))
        self._accepted += 1
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every row submitted before this call is committed (retrying a failing
        write at once). Raises StoreError if the writer closes first."""
        target = self._accepted
        if self._written >= target:
            return
        if self._closed or self._task is None or self._task.done():
            raise StoreError(f"audit writer is not running; {len(self._queue)} rows unwritten")
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._retry_now.set()
        self._wake.set()
        await future

    # -- the writer task -------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._retry_min_s
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self._batch_size and not self._closing \
                    and not self._retry_now.is_set():
                # Group commit: let the rows of the next few milliseconds join this
                # transaction (well inside the 50 ms promise); a flush() cuts it short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._gather_s):
                        await self._retry_now.wait()
            self._retry_now.clear()          # a flush() from now on retries at once
            try:
                await self._write_batch()
            except Exception as exc:
                self._failed(exc)
                if not busy(exc):
                    # Disk full, read-only, I/O error, damaged file: start afresh from
                    # the file on disk. Only a lock held elsewhere keeps the connection.
                    await self._disconnect()
                try:
                    async with asyncio.timeout(delay):
                        await self._retry_now.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, self._retry_max_s)
            else:
                delay = self._retry_min_s

    async def _write_batch(self) -> None:
        conn = await self._connection()
        count = min(len(self._queue), self._batch_size)
        batch = list(itertools.islice(self._queue, count))
        self._writing = count
        try:
            await self._transaction(conn, batch)
        finally:
            self._writing = 0

    async def _transaction(self, conn: aiosqlite.Connection, batch: list[Pending]) -> None:
        """One BEGIN IMMEDIATE … COMMIT for the batch, run whole in the connection's thread:
        one thread round trip per batch instead of four (each one a pair of context
        switches on the gateway's core). aiosqlite has no public call for "run this
        function on the connection"; `_execute` is the one its own methods use, the same
        in 0.17 (Debian 12) and 0.22."""
        attempt, self._attempt = self._attempt, None
        try:
            result: Appended = await conn._execute(  # type: ignore[no-untyped-call]
                append, conn._conn, batch, attempt, self._head)
        except CommitFailed as exc:
            # COMMIT raised: the rows may be on disk anyway; the next batch checks.
            self._attempt = exc.attempt
            await self._rollback(conn)
            raise exc.error from None
        except BaseException:
            await self._rollback(conn)
            raise
        if result.moved is not None:
            log.warning("audit chain continues from row %d of the database, not from "
                        "row %s last seen", result.moved[0], self._head and self._head[0])
        self._committed(result.rows, result.head)

    def _committed(self, count: int, head: tuple[int, str]) -> None:
        for _ in range(count):
            self._queue.popleft()
        self._written += count
        self._batches += 1
        self._head = head
        if self._failing:
            log.warning("audit log writable again; %d rows waiting", len(self._queue))
        self._failing = False
        self._last_error = None
        self._release_waiters(None)

    def _failed(self, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        if not self._failing or message != self._last_error:
            log.error("audit write failed, %d rows waiting: %s", len(self._queue), message)
        self._failures += 1
        self._failing = True
        self._last_error = message

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a storage fault: stay unhealthy (the task is done) and say why.
            log.error("audit writer stopped", exc_info=task.exception())
            self._last_error = f"writer stopped: {task.exception()!r}"
            self._release_waiters(StoreError("audit writer stopped"))

    def _release_waiters(self, error: Exception | None) -> None:
        waiting = []
        for target, future in self._waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            elif self._written >= target:
                future.set_result(None)
            else:
                waiting.append((target, future))
        self._waiters = waiting

    # -- the connection --------------------------------------------------------------------

    async def _open(self) -> aiosqlite.Connection:
        conn = await store.open_async(self._path, timeout=self._busy_timeout)
        try:
            self._file.remember()
        except OSError as exc:
            await conn.close()
            raise StoreError(f"cannot stat database {self._path}: {exc.strerror}") from None
        return conn

    async def _connection(self) -> aiosqlite.Connection:
        """The open connection, or a new one after a fault; StoreError if it cannot be used."""
        if self._conn is not None:
            fault = self._file.fault()
            if fault is None:
                return self._conn
            await self._disconnect()
            raise StoreError(fault)
        conn = await self._open()
        try:
            # Reopened after a fault: read the file from disk, not from a page cache.
            async with conn.execute("PRAGMA quick_check") as cursor:
                result = await cursor.fetchone()
            if result is None or result[0] != "ok":
                raise StoreError(f"database {self._path} is damaged: "
                                 f"{result[0] if result else 'no result'}")
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database {self._path}: {exc}") from None
            raise
        self._conn = conn
        return conn

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        try:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
        except sqlite3.Error:
            await self._disconnect()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:     # the file may be gone or damaged: nothing to save
                log.warning("closing the audit connection failed: %s", exc)


async def _tail(conn: aiosqlite.Connection) -> tuple[int, str]:
    """(id, hash) of the last row, or the anchor's when the table is empty."""
    async with conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    if row is None:
        async with conn.execute("SELECT last_id, last_hash FROM audit_anchor") as cur:
            row = await cur.fetchone()
    if row is None:
        raise StoreError("the audit anchor row is missing")
    return int(row[0]), str(row[1])
