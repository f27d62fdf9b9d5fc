"""stderr logging for the daemon: one line per record, written in batches.

SPEC §11 asks for one structured line per request on stderr (journald). Through the
logging module's StreamHandler that line cost a `write` system call and a flush per
request, about 10 µs of CPU on the request path (docs/performance.md). This handler
formats each record at once but writes INFO and DEBUG lines in batches: when
`max_lines` are waiting, when the daemon's event loop calls `flush()` (every
FLUSH_EVERY_S), and at exit (logging.shutdown flushes every handler). A WARNING or worse
is written at once, after what was waiting, so the order of lines is kept and nothing
that explains a crash waits in memory. A `kill -9` can lose at most FLUSH_EVERY_S of
access lines; the audit log, not stderr, is the durable record of requests.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FLUSH_EVERY_S = 0.1
FORMAT = "%(levelname)s %(name)s: %(message)s"


_sink: BatchingStreamHandler | None = None     # the daemon's handler, once setup() ran


class BatchingStreamHandler(logging.Handler):
    """A StreamHandler that holds INFO/DEBUG lines briefly and writes them together."""

    def __init__(self, stream: TextIO | None = None, max_lines: int = 256):
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.max_lines = max_lines
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if record.levelno >= logging.WARNING or len(self._lines) >= self.max_lines:
            self.flush()

    def append(self, line: str) -> None:
        """A line already formatted (AccessLog): batched like any INFO record. Under the
        handler's lock, as emit() is: a thread's warning may be flushing the batch."""
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            self._lines.append(line)
            if len(self._lines) >= self.max_lines:
                self.flush()

    def flush(self) -> None:
        # The handler's lock: emit() and flush() may come from the loop and from threads.
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            if not self._lines:
                return
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass               # stderr gone (journald restarted, closed): nothing to do


def setup(level: str, stream: TextIO | None = None) -> BatchingStreamHandler:
    """Route every log record to one batching handler on stderr; returns it for flushing."""
    # The logging HOWTO's "Optimization" settings: the format uses none of these, and
    # finding the caller walks the stack on every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    global _sink
    _sink = handler
    return handler


def flush() -> None:
    """Write what the daemon's handler holds (its event loop calls this every
    FLUSH_EVERY_S; logging.shutdown() does it at exit)."""
    if _sink is not None:
        _sink.flush()


class AccessLog:
    """The one line per request (SPEC §11), logger `neuraldrive_gw.access`, level INFO.

    In the daemon the line goes straight into the batch, formatted as the handler would
    format it: a LogRecord per request cost more than the rest of this module. Anywhere
    else (tests, embedding), or when someone attached handlers or filters to the logger,
    it is an ordinary logging call, so those see every line.
    """

    NAME = "neuraldrive_gw.access"

    def __init__(self) -> None:
        self.logger = logging.getLogger(self.NAME)
        self._prefix = f"INFO {self.NAME}: "

    def line(self, message: str, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        sink = _sink
        if sink is not None and not logger.handlers and not logger.filters \
                and logger.propagate:
            sink.append(self._prefix + message % args)
        else:
            logger.info(message, *args)
