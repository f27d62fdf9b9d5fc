"""The daemon's stderr logging (logsink.py): batched INFO lines, warnings at once, order kept."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from neuraldrive_gw import logsink


def _record(level: int, message: str, name: str = "neuraldrive_gw.test") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def _handler(max_lines: int = 256) -> tuple[logsink.BatchingStreamHandler, io.StringIO]:
    stream = io.StringIO()
    handler = logsink.BatchingStreamHandler(stream, max_lines=max_lines)
    handler.setFormatter(logging.Formatter(logsink.FORMAT))
    return handler, stream


def test_info_lines_wait_for_a_flush_and_a_warning_writes_everything_in_order() -> None:
    handler, stream = _handler()
    handler.handle(_record(logging.INFO, "one"))
    handler.append("INFO neuraldrive_gw.access: two")
    assert stream.getvalue() == ""
    handler.handle(_record(logging.WARNING, "three"))
    assert stream.getvalue() == ("INFO neuraldrive_gw.test: one\nINFO neuraldrive_gw.access: two\n"
                                 "WARNING neuraldrive_gw.test: three\n")
    handler.handle(_record(logging.INFO, "four"))
    handler.flush()
    assert stream.getvalue().endswith("INFO neuraldrive_gw.test: four\n")


def test_a_full_batch_is_written_without_waiting_for_the_timer() -> None:
    handler, stream = _handler(max_lines=3)
    for n in range(3):
        handler.append(f"line {n}")
    assert stream.getvalue() == "line 0\nline 1\nline 2\n"


@pytest.fixture
def daemon_logging() -> Iterator[io.StringIO]:
    """logsink.setup() as the daemon calls it, undone afterwards (it rewires the root logger)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logsink._sink, logging._srcfile,
             logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    stream = io.StringIO()
    logsink.setup("info", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        (logsink._sink, logging._srcfile, logging.logThreads, logging.logProcesses,
         logging.logMultiprocessing) = saved[2:]


def test_the_access_line_in_the_daemon_reads_as_the_logging_module_would_write_it(
        daemon_logging: io.StringIO) -> None:
    access = logsink.AccessLog()
    access.line("rid=%s status=%d ms=%.1f", "abc", 200, 1.25)
    logging.getLogger("neuraldrive_gw.access").info("rid=%s status=%d ms=%.1f", "abc", 200, 1.25)
    assert daemon_logging.getvalue() == ""
    logsink.flush()
    first, second = daemon_logging.getvalue().splitlines()
    assert first == second == "INFO neuraldrive_gw.access: rid=abc status=200 ms=1.2"
