"""The log handler of ``codexlb`` commands: request lines batched, warnings at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys

import pytest

from codexlb.logs import (
    FLUSH_SECONDS,
    TEXT_FORMAT,
    BatchedStreamHandler,
    Formatter,
    JsonFormatter,
    TextFormatter,
    _direct_handler,
)


class CountingStream(io.StringIO):
    """Remembers what has been flushed, as a file on disk would show it."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""
        self.flushes = asyncio.Queue[str]()

    def flush(self) -> None:
        self.flushed = self.getvalue()
        self.flushes.put_nowait(self.flushed)


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def make_logger(stream: CountingStream) -> logging.Logger:
    logger = logging.getLogger(f"test_logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    return logger


async def test_info_lines_are_flushed_together_within_the_flush_interval() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    logger.info("one")
    logger.info("two")
    assert stream.flushed == ""
    assert stream.getvalue() == "INFO one\nINFO two\n"
    started = loop_time()
    flushed = await asyncio.wait_for(stream.flushes.get(), FLUSH_SECONDS * 10)
    assert flushed == "INFO one\nINFO two\n"
    assert loop_time() - started <= FLUSH_SECONDS * 2  # about one interval, not at exit


async def test_a_warning_flushes_everything_at_once() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    logger.info("request")
    logger.warning("trouble")
    assert stream.flushed == "INFO request\nWARNING trouble\n"


def test_without_an_event_loop_every_line_is_flushed() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    logger.info("starting")
    assert stream.flushed == "INFO starting\n"


async def test_lines_from_another_thread_are_flushed_at_once() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    await asyncio.to_thread(logger.info, "from a worker thread")
    assert stream.flushed == "INFO from a worker thread\n"


def test_the_text_formatter_writes_what_the_standard_one_would() -> None:
    standard = logging.Formatter(TEXT_FORMAT)
    ours = TextFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    records = [
        logging.LogRecord("codexlb.requests", logging.INFO, "", 0, "a=%s b=%s", (1, "-"), None),
        logging.LogRecord("codexlb.app", logging.ERROR, "", 0, "failed", None, failure),
        logging.LogRecord("codexlb", logging.WARNING, "", 0, "x", None, None, sinfo="Stack:\n  f"),
    ]
    for record in records:
        expected = standard.format(record)
        record.exc_text = None
        assert ours.format(record) == expected
    assert "ValueError: boom" in ours.format(records[1])


def test_the_formatter_writes_the_standard_time_stamp() -> None:
    standard = logging.Formatter("%(asctime)s %(message)s")
    ours = Formatter("%(asctime)s %(message)s")
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.25, 1_700_000_000.5):
        record = logging.LogRecord("x", logging.INFO, "", 0, "hello", None, None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)


STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_a_request_line_written_directly_is_the_line_a_record_makes(
    formatter: TextFormatter | JsonFormatter,
) -> None:
    """``write_request_line`` skips the ``LogRecord``: the same line comes out, time aside."""
    fields = {"request_id": "lb-1", "key": None, "status": 200, "ttfb_ms": 1.5}
    message = "request_id=lb-1 key=- status=200 ttfb_ms=1.5"
    lines: list[str] = []
    for skip_record in (False, True):
        stream = CountingStream()
        handler = BatchedStreamHandler(stream)
        handler.setFormatter(formatter)
        if skip_record:
            handler.write_request_line(message, fields)
        else:
            record = logging.LogRecord("codexlb.requests", logging.INFO, "", 0, message, None, None)
            record.fields = fields
            handler.handle(record)
        lines.append(stream.flushed)
    if isinstance(formatter, JsonFormatter):
        by_record, direct = (json.loads(line) for line in lines)
        assert STAMP.fullmatch(by_record.pop("time"))
        assert STAMP.fullmatch(direct.pop("time"))
        expected = {"level": "INFO", "logger": "codexlb.requests", "message": message, **fields}
        assert by_record == direct == expected
    else:
        timeless = [STAMP.sub("<time>", line, count=1) for line in lines]
        assert timeless == [f"<time> INFO codexlb.requests: {message}\n"] * 2


def test_request_lines_skip_the_record_only_where_nothing_else_would_see_one() -> None:
    logger = logging.getLogger("codexlb.requests")
    saved = logger.handlers[:], logger.propagate
    handler = BatchedStreamHandler(CountingStream())
    try:
        logger.handlers[:] = [handler]
        logger.propagate = False
        assert _direct_handler() is handler
        handler.addFilter(lambda record: True)
        assert _direct_handler() is None  # a filter sees records
        handler.filters.clear()
        logger.propagate = True
        assert _direct_handler() is None  # so do the root's handlers (pytest's, say)
        logger.propagate = False
        logger.handlers.append(logging.NullHandler())
        assert _direct_handler() is None
    finally:
        logger.handlers[:], logger.propagate = saved
