"""Logging for codexlb's commands: text or JSON lines on stderr.

Request lines (one per request, SPEC S6) are the bulk of a busy server's output. They are
written through a buffer that is flushed at most ``FLUSH_SECONDS`` later, like nginx's
``access_log ... buffer= flush=``: one write for many lines instead of one per request.
Warnings and errors, and lines logged where no event loop runs, are flushed at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from codexlb.activity import FinishedRequest
from codexlb.config import Config

if TYPE_CHECKING:
    from codexlb.metrics import Metrics

requests_log = logging.getLogger("codexlb.requests")

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
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        """``asctime`` of a record created at ``created``, ``msecs`` into its second."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        msec_format = self.default_msec_format
        return self._stamp if msec_format is None else msec_format % (self._stamp, msecs)


class TextFormatter(Formatter):
    """``<date> <time>,<ms> <LEVEL> <logger>: <message>``, put together directly rather than
    through a format string (the same text as ``TEXT_FORMAT`` gives the standard formatter).

    ``line`` (here and in ``JsonFormatter``) formats a line from its facts, with no
    ``LogRecord``: how a request line written straight to the handler is made too
    (``BatchedStreamHandler.write_request_line``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(
            self.formatTime(record), record.levelname, record.name, record.getMessage(), None
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line

    def line(
        self, stamp: str, level: str, name: str, message: str, fields: dict[str, Any] | None
    ) -> str:
        return f"{stamp} {level} {name}: {message}"


class JsonFormatter(Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        entry = self._entry(
            self.formatTime(record),
            record.levelname,
            record.name,
            record.getMessage(),
            fields if isinstance(fields, dict) else None,  # a request line's facts
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)

    def line(
        self, stamp: str, level: str, name: str, message: str, fields: dict[str, Any] | None
    ) -> str:
        return json.dumps(self._entry(stamp, level, name, message, fields))

    @staticmethod
    def _entry(
        stamp: str, level: str, name: str, message: str, fields: dict[str, Any] | None
    ) -> dict[str, Any]:
        entry = {"time": stamp, "level": level, "logger": name, "message": message}
        if fields is not None:
            entry.update(fields)  # as fields of their own
        return entry


def _msecs(created: float) -> float:
    """The milliseconds into its second of a record created at ``created`` (as ``LogRecord``)."""
    return int((created - int(created)) * 1000) + 0.0


class BatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that flushes INFO and below on a timer of the running event loop."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under the handler's lock (``Handler.handle``).
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._write(line, record.levelno >= logging.WARNING, record)

    def write_request_line(self, message: str, fields: dict[str, Any]) -> None:
        """An INFO line of ``codexlb.requests``, written as ``emit`` would write its record but
        with none made: the line's facts go straight to the formatter (``Formatter.line``)."""
        formatter = self.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter)  # ``setup_logging``'s
        self.acquire()
        try:
            now = time.time()
            stamp = formatter.stamp(now, _msecs(now))
            line = formatter.line(stamp, "INFO", requests_log.name, message, fields)
            self._write(line, False, None)
        finally:
            self.release()

    def _write(self, line: str, at_once: bool, record: logging.LogRecord | None) -> None:
        """Write ``line`` under the handler's lock: flushed at once, or within
        ``FLUSH_SECONDS`` where an event loop runs; a failure is the handler's to report, for
        ``record`` (a request line has none: one is made for the report)."""
        try:
            self.stream.write(line + self.terminator)
        except Exception:
            self.handleError(
                record or logging.makeLogRecord({"name": requests_log.name, "msg": line})
            )
            return
        if at_once or not self._flush_soon():
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
    # Request lines go to the same handler, straight (``RequestRecord.emit``).
    requests_log.handlers[:] = [handler]
    requests_log.propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # These log statement parameters at DEBUG: conversation content and stored tokens.
    for noisy in ("aiosqlite", "sqlalchemy.engine", "asyncpg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_REQUEST_LINE = " ".join(
    f"{name}=%s"
    for name in (
        "request_id",
        "key",
        "account",
        "route",
        "transport",
        "attempts",
        "status",
        "ttfb_ms",
        "duration_ms",
        "input_tokens",
        "output_tokens",
    )
)


@dataclass(slots=True)
class RequestRecord:
    """The facts of one request's log line (SPEC S6)."""

    transport: str
    client_key: str
    request_id: str
    route: str = "responses"
    started: float = field(default_factory=time.perf_counter)
    account: str | None = None
    attempts: int = 0
    status: int = 0
    first_byte: float | None = None
    usage: Mapping[str, Any] | None = None
    failed_with: int | None = None
    """The status of the failure a response ended in after its transport answered 200 (a
    streamed ``response.failed`` or ``error``): what the log line and metrics show."""

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()

    def emit(self, metrics: Metrics) -> None:
        """The request's log line and metrics."""
        usage = self.usage or {}
        duration = time.perf_counter() - self.started
        first_byte = self.first_byte - self.started if self.first_byte else None
        status = self.failed_with or self.status
        metrics.request(self.route, self.transport, status, first_byte, duration)
        ttfb_ms = round(first_byte * 1000, 1) if first_byte is not None else None
        duration_ms = round(duration * 1000, 1)
        input_tokens, output_tokens = _count(usage, "input_tokens"), _count(usage, "output_tokens")
        metrics.activity.request(
            FinishedRequest(
                metrics.activity.clock(),
                self.client_key,
                self.account,
                self.route,
                self.transport,
                self.attempts,
                status,
                ttfb_ms,
                duration_ms,
                input_tokens,
                output_tokens,
            )
        )
        if not requests_log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": self.request_id,
            "key": self.client_key or None,
            "account": self.account,
            "route": self.route,
            "transport": self.transport,
            "attempts": self.attempts,
            "status": status,
            "ttfb_ms": ttfb_ms,
            "duration_ms": duration_ms,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        values = ["-" if value is None else value for value in fields.values()]
        handler = _direct_handler()
        if handler is None:
            requests_log.info(_REQUEST_LINE, *values, extra={"fields": fields})
        else:
            handler.write_request_line(_REQUEST_LINE % tuple(values), fields)


def _direct_handler() -> BatchedStreamHandler | None:
    """The handler a request line may be written to without a ``LogRecord``: the only one it
    reaches, one of ``setup_logging``'s, with no filter on the way. (A record costs more than
    the rest of the line's work: some 7% of codexlb's instructions per relayed request.)"""
    handlers = requests_log.handlers
    if len(handlers) != 1 or requests_log.propagate or requests_log.filters:
        return None
    handler = handlers[0]
    if type(handler) is not BatchedStreamHandler or handler.filters or handler.level:
        return None
    return handler


def _count(usage: Mapping[str, Any], name: str) -> int | None:
    """A token count of the upstream's usage, if it is one (the upstream's JSON decides)."""
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Throttled:
    """A log line for an event a client can repeat thousands of times a second (a malformed
    request, a connection over the cap): at most one line per ``interval`` seconds, each
    saying how many times the event happened since the previous one."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._count = 0
        self._next = 0.0

    def __call__(self, message: str, *args: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval
        count, self._count = self._count, 0
        self._logger.log(self._level, f"{message} (%d since the last such line)", *args, count)


_REQUEST_IDS = itertools.count(1)
_PROCESS_TAG = secrets.token_hex(4)
CLIENT_ID_CHARS = 64
"""The longest part of a client's ``x-client-request-id`` kept in a request id."""
_CLIENT_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{CLIENT_ID_CHARS}}}")
_NOT_CLIENT_ID = re.compile(r"[^A-Za-z0-9._:-]")


def new_request_id(headers: Mapping[str, str]) -> str:
    """The id of one request's log line, unique to this process's run.

    With the client's ``x-client-request-id`` it is that id, a dot and a sequence number:
    Codex sends one id for every turn on a WebSocket and for each retry of a turn, so its id
    alone would not tell those lines apart (and as a prefix it still finds them all). The
    client's id is cut to ``CLIENT_ID_CHARS`` and any character outside a safe set (spaces, line
    breaks, control and non-ASCII characters) becomes ``_``: it cannot forge a log line.
    """
    number = next(_REQUEST_IDS)
    client_id = headers.get("x-client-request-id")
    if not client_id:
        return f"lb-{_PROCESS_TAG}-{number}"
    if _CLIENT_ID.fullmatch(client_id) is None:
        client_id = _NOT_CLIENT_ID.sub("_", client_id[:CLIENT_ID_CHARS])
    return f"{client_id}.{number}"
