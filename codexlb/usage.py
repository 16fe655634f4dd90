"""What each client key used, durably (SPEC S9): the ledger behind the keys' token limits,
``GET /v1/usage`` and ``codexlb usage``.

Every request a key makes adds to one bucket of ``key_usage``: its key, the minute it ended,
the account that served it and the model, with the tokens every response reported
(``input_tokens``, ``cached_tokens``, ``output_tokens``, ``reasoning_tokens``). Minute buckets
make a rolling window right to the minute: a bucket counts while any of its minute is inside
the window, and leaves it ``window + 60`` seconds after the minute began.

``UsageLedger.add`` costs the relay one dictionary update: buckets wait in memory and one
writer task commits them (an upsert that adds to the row) in one short transaction, a moment
after the first of them arrived, so that a burst of responses shares one write, as snapshots
share their group commit. Every read flushes first (under the same lock as the writer), so a
reader in this process sees every request that ended before it; other processes see them once
they are written, a fraction of a second later. A write is shielded from the cancellation of
the reader that started it, so a batch is written once or kept for the next, never both.
``close`` waits for the batch being written and writes what is left.

The window sums a key's limits need on every request are cached per key for
``WINDOW_CACHE_SECONDS`` (what this process adds goes into the cache at once), so that a key
with limits costs one query a second, not one per request, and other replicas' use is seen
within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb import db

log = logging.getLogger(__name__)

MINUTE = 60
FIVE_HOURS = 5 * 3600
WEEK = 7 * 86400
DAY = 86400
FLUSH_DELAY_SECONDS = 0.5
"""How long buckets gather after the first of a batch arrived, before they are written."""
WINDOW_CACHE_SECONDS = 1.0
"""How long the window sums of a key read from the database serve its requests."""

Grouping = Literal["key", "account", "model", "day"]
BucketKey = tuple[str, int, str, str]
"""``(client_key, minute, account, model)``."""


@dataclass(slots=True)
class Totals:
    """Requests and tokens, as ``GET /v1/usage`` and ``codexlb usage`` show them."""

    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def tokens(self) -> int:
        """What the token limits count: input plus output."""
        return self.input_tokens + self.output_tokens

    def add_tokens(self, usage: Mapping[str, Any]) -> int:
        """Add the tokens of a Responses ``usage`` object; returns the input plus output
        tokens added (what the limits count)."""
        get = usage.get
        input_tokens = get("input_tokens")
        if type(input_tokens) is not int or input_tokens < 0:
            input_tokens = 0
        output_tokens = get("output_tokens")
        if type(output_tokens) is not int or output_tokens < 0:
            output_tokens = 0
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        details = get("input_tokens_details")
        if type(details) is dict:
            self.cached_input_tokens += _count(details.get("cached_tokens"))
        details = get("output_tokens_details")
        if type(details) is dict:
            self.reasoning_tokens += _count(details.get("reasoning_tokens"))
        return input_tokens + output_tokens

    def merge(self, other: Totals) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }


@dataclass(slots=True)
class Windows:
    """A key's tokens in its rolling 5-hour and 7-day windows at ``at``."""

    at: float
    five_hours: int = 0
    week: int = 0
    fetched: float = field(default=0.0)


class UsageLedger:
    """The ``key_usage`` table, written in batches, read with the batches flushed."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Callable[[], float] = time.time,
        flush_delay: float = FLUSH_DELAY_SECONDS,
    ) -> None:
        self._engine = engine
        self.clock = clock
        """Epoch seconds; a test may replace it to move the windows on."""
        self._flush_delay = flush_delay
        self._pending: dict[BucketKey, Totals] = {}
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._windows: dict[str, Windows] = {}
        self.batches_written = 0

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name="usage-writer")

    async def close(self) -> None:
        """Stop the writer (after the batch it is writing, if any) and write what is left; a
        failure is logged, never raised: shutting down goes on."""
        writer, self._writer = self._writer, None
        async with self._lock:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            try:
                await self._flush_locked()
            except Exception as exc:
                log.error("key usage of %d buckets not written: %s", len(self._pending), exc)

    def add(
        self,
        client_key: str,
        account: str | None,
        model: str | None,
        usage: Mapping[str, Any] | None,
        *,
        requests: int = 1,
    ) -> None:
        """Count a request (``requests``) and the tokens of ``usage`` (a Responses ``usage``
        object) for the key, in the current minute. Never waits."""
        bucket = (client_key, int(self.clock()) // MINUTE * MINUTE, account or "", model or "")
        totals = self._pending.get(bucket)
        if totals is None:
            totals = self._pending[bucket] = Totals()
        totals.requests += requests
        if usage:
            added = totals.add_tokens(usage)
            if added and (windows := self._windows.get(client_key)) is not None:
                windows.five_hours += added
                windows.week += added
        if not self._arrived.is_set():
            self._arrived.set()

    async def flush(self) -> None:
        """Write every bucket added so far."""
        async with self._lock:
            await asyncio.shield(self._flush_locked())

    async def windows(self, client_key: str) -> Windows:
        """The key's tokens in its rolling windows, from a cache at most
        ``WINDOW_CACHE_SECONDS`` old (plus what this process added since)."""
        now = self.clock()
        cached = self._windows.get(client_key)
        if cached is not None and 0 <= now - cached.fetched < WINDOW_CACHE_SECONDS:
            return cached
        async with self._lock:
            await asyncio.shield(self._flush_locked())
            now = self.clock()
            start = window_start(now, WEEK)
            five = window_start(now, FIVE_HOURS)
            query = text(
                "SELECT COALESCE(SUM(CASE WHEN minute >= :five "
                "THEN input_tokens + output_tokens ELSE 0 END), 0), "
                "COALESCE(SUM(input_tokens + output_tokens), 0) "
                "FROM key_usage WHERE client_key = :key AND minute >= :start"
            )
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(query, {"five": five, "key": client_key, "start": start})
                ).one()
            fresh = Windows(at=now, five_hours=int(row[0]), week=int(row[1]), fetched=now)
            for (key, minute, _, _), totals in self._pending.items():  # added during the query
                if key == client_key:
                    fresh.week += totals.tokens
                    if minute >= five:
                        fresh.five_hours += totals.tokens
            self._windows[client_key] = fresh
            return fresh

    async def frees_at(self, client_key: str, window: int, limit: int) -> float | None:
        """When the key's tokens in the rolling ``window`` (seconds) fall below ``limit`` as
        its oldest minutes leave it, with no new use; ``None`` when they are below it now."""
        async with self._lock:
            await asyncio.shield(self._flush_locked())
            now = self.clock()
            query = text(
                "SELECT minute, SUM(input_tokens + output_tokens) FROM key_usage "
                "WHERE client_key = :key AND minute >= :start GROUP BY minute ORDER BY minute"
            )
            params = {"key": client_key, "start": window_start(now, window)}
            async with self._engine.connect() as conn:
                rows = [(int(m), int(t)) for m, t in await conn.execute(query, params)]
        return frees_at(rows, window, limit)

    async def oldest_minute(self, client_key: str, window: int) -> int | None:
        """The oldest minute with tokens in the key's rolling ``window``, if any."""
        async with self._lock:
            await asyncio.shield(self._flush_locked())
            query = text(
                "SELECT MIN(minute) FROM key_usage WHERE client_key = :key AND minute >= :start "
                "AND input_tokens + output_tokens > 0"
            )
            params = {"key": client_key, "start": window_start(self.clock(), window)}
            async with self._engine.connect() as conn:
                found = (await conn.execute(query, params)).scalar()
        return None if found is None else int(found)

    async def totals_since(self, client_key: str, starts: Mapping[str, float]) -> dict[str, Totals]:
        """The key's totals since each of ``starts`` (name → epoch seconds), in one query."""
        async with self._lock:
            await asyncio.shield(self._flush_locked())
            columns = []
            params: dict[str, Any] = {"key": client_key}
            for index, start in enumerate(starts.values()):
                params[f"s{index}"] = int(start // MINUTE) * MINUTE
                columns += [
                    f"COALESCE(SUM(CASE WHEN minute >= :s{index} THEN {name} ELSE 0 END), 0)"
                    for name in _COUNTERS
                ]
            params["oldest"] = min(params[f"s{index}"] for index in range(len(starts)))
            query = text(
                f"SELECT {', '.join(columns)} FROM key_usage "
                "WHERE client_key = :key AND minute >= :oldest"
            )
            async with self._engine.connect() as conn:
                row = (await conn.execute(query, params)).one()
        found: dict[str, Totals] = {}
        for index, name in enumerate(starts):
            values = [int(v) for v in row[index * len(_COUNTERS) : (index + 1) * len(_COUNTERS)]]
            found[name] = Totals(*values)
        return found

    async def report(self, since: float, by: Grouping) -> list[tuple[str, Totals]]:
        """Totals since ``since`` grouped ``by`` key, account, model or UTC day, largest
        token use first (days in order)."""
        group = {
            "key": "client_key",
            "account": "account",
            "model": "model",
            "day": f"(minute / {DAY})",
        }[by]
        sums = ", ".join(f"SUM({name})" for name in _COUNTERS)
        query = text(
            f"SELECT {group}, {sums} FROM key_usage WHERE minute >= :since GROUP BY {group}"
        )
        async with self._lock:
            await asyncio.shield(self._flush_locked())
            async with self._engine.connect() as conn:
                rows = list(await conn.execute(query, {"since": int(since // MINUTE) * MINUTE}))
        found = [(_group_name(row[0], by), Totals(*(int(v) for v in row[1:]))) for row in rows]
        if by == "day":
            return sorted(found)
        return sorted(found, key=lambda entry: (-entry[1].tokens, entry[0]))

    # -- writing ----------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._arrived.wait()
            await asyncio.sleep(self._flush_delay)
            try:
                await self.flush()
            except Exception as exc:  # kept in memory; the next batch tries again
                log.error("writing key usage failed, will try again: %s", exc)
                await asyncio.sleep(1.0)

    async def _flush_locked(self) -> None:
        self._arrived.clear()
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        rows = [
            {
                "client_key": key,
                "minute": minute,
                "account": account,
                "model": model,
                **totals.as_dict(),
            }
            for (key, minute, account, model), totals in batch.items()
        ]
        try:
            async with self._engine.begin() as conn:
                await conn.execute(_UPSERT, rows)
        except Exception:  # not written: kept for the next batch
            for bucket, totals in batch.items():  # back in front of what came since
                pending = self._pending.get(bucket)
                if pending is not None:
                    totals.merge(pending)
                self._pending[bucket] = totals
            self._arrived.set()
            raise
        self.batches_written += 1


def window_start(now: float, window: int) -> int:
    """The oldest minute bucket still (partly) inside the rolling ``window`` ending ``now``."""
    return int(now // MINUTE) * MINUTE - window


def frees_at(minutes: list[tuple[int, int]], window: int, limit: int) -> float | None:
    """When tokens per minute (oldest first, all inside the window) fall below ``limit`` as
    the oldest minutes leave the rolling ``window``; ``None`` if they already are below."""
    total = sum(tokens for _, tokens in minutes)
    if total < limit:
        return None
    for minute, tokens in minutes:
        total -= tokens
        if total < limit:
            return float(minute + window + MINUTE)
    return None  # unreachable: an empty window is below any limit


_COUNTERS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
_UPSERT = text(
    "INSERT INTO key_usage (client_key, minute, account, model, "
    + ", ".join(_COUNTERS)
    + ") VALUES (:client_key, :minute, :account, :model, "
    + ", ".join(f":{name}" for name in _COUNTERS)
    + ") ON CONFLICT (client_key, minute, account, model) DO UPDATE SET "
    + ", ".join(f"{name} = key_usage.{name} + excluded.{name}" for name in _COUNTERS)
)


def _group_name(value: Any, by: Grouping) -> str:
    if by == "day":
        return time.strftime("%Y-%m-%d", time.gmtime(int(value) * DAY))
    return str(value)


def _count(value: Any) -> int:
    """A token count as reported; anything but a non-negative integer counts as none."""
    return value if type(value) is int and value > 0 else 0


# -- ``codexlb usage`` ------------------------------------------------------------------------

SINCE_UNITS = {"m": MINUTE, "h": 3600, "d": DAY, "w": WEEK}


def parse_since(value: str) -> int:
    """``7d``, ``12h``, ``30m``, ``2w`` → seconds; raises ``ValueError`` otherwise."""
    number, unit = value[:-1], value[-1:]
    if unit not in SINCE_UNITS or not number.isdigit():
        raise ValueError(f"{value!r} is not a duration such as 30m, 12h, 7d or 2w")
    return int(number) * SINCE_UNITS[unit]


async def usage_report(database_url: str, since: int, by: Grouping) -> dict[str, Any]:
    """What ``codexlb usage --json`` prints: the totals of the last ``since`` seconds,
    grouped ``by``, straight from the database."""
    engine = db.create_engine(database_url)
    try:
        ledger = UsageLedger(engine)
        start = int(ledger.clock()) - since
        rows = await ledger.report(start, by)
    finally:
        await engine.dispose()
    return {
        "since": start,
        "by": by,
        "rows": [{by: name, **totals.as_dict()} for name, totals in rows],
    }


def render_report(report: Mapping[str, Any]) -> str:
    """``usage_report`` as a table."""
    by = str(report["by"])
    header: tuple[str, ...] = (by, "requests", "input", "cached", "output", "reasoning")
    lines = [header]
    for row in report["rows"]:
        lines.append(
            (
                str(row[by]) or "-",
                *(
                    f"{row[name]:,}"
                    for name in (
                        "requests",
                        "input_tokens",
                        "cached_input_tokens",
                        "output_tokens",
                        "reasoning_tokens",
                    )
                ),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report["since"]))
    text = [f"usage since {since}, by {by}"]
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        text.append("  ".join(cells))
    if not report["rows"]:
        text.append("(no usage recorded)")
    return "\n".join(text)
