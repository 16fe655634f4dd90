"""Logging for codexlb's commands: text or JSON lines on stderr.

Request lines (one per request, SPEC S6) are the bulk of a busy server's output. They are
written through a buffer that is flushed at most ``FLUSH_SECONDS`` later, like nginx's
``access_log ... buffer= flush=``: one write for many lines instead of one per request.
Warnings and errors, and lines logged where no event loop runs, are flushed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

from codexlb.config import Config

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_SECONDS = 0.1
"""Longest time an INFO line waits in the buffer."""
BUFFER_BYTES = 64 * 1024


class Formatter(logging.Formatter):
    """The standard formatter, with the date and time formatted once per second."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        msec_format = self.default_msec_format
        return self._stamp if msec_format is None else msec_format % (self._stamp, record.msecs)


class TextFormatter(Formatter):
    """``<date> <time>,<ms> <LEVEL> <logger>: <message>``, put together directly rather than
    through a format string (the same text as ``TEXT_FORMAT`` gives the standard formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)  # a request line: its facts as fields of their own
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class BatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that flushes INFO and below on a timer of the running event loop."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under the handler's lock (``Handler.handle``).
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or not self._flush_soon():
            self.flush()

    def _flush_soon(self) -> bool:
        """Make sure a flush is due within ``FLUSH_SECONDS``; ``False`` when no event loop
        runs in this thread to do it."""
        if self._flush_timer is not None:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._flush_timer = loop.call_later(FLUSH_SECONDS, self._flush_due)
        return True

    def _flush_due(self) -> None:
        self.acquire()
        try:
            self._flush_timer = None
            self.flush()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
        finally:
            self.release()
        super().close()


def setup_logging(config: Config) -> None:
    """Log to stderr in the configured format and level, for the rest of the process."""
    stream = open(  # noqa: SIM115 - lives as long as the process; stderr itself stays open
        sys.stderr.fileno(),
        "w",
        buffering=BUFFER_BYTES,
        encoding="utf-8",
        errors="backslashreplace",
        closefd=False,
    )
    handler = BatchedStreamHandler(stream)
    if config.logging.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    # The switches of the logging HOWTO's "Optimization" section, for facts no format here
    # shows: the caller's file and line (a frame walk per record), thread and process.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.logging.level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # These log statement parameters at DEBUG: conversation content and stored tokens.
    for noisy in ("aiosqlite", "sqlalchemy.engine", "asyncpg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
