"""What the operator dashboard shows of the recent past (S10), kept in memory and bounded.

Fed where the facts arise: each request's log line (``logs.RequestRecord.emit``) and each
upstream attempt's outcome (``metrics.Metrics.attempt``). It holds

- the most recent requests, a ring of ``RECENT_REQUESTS``;
- the last hour, one slot per minute (``HOUR_MINUTES``): requests by outcome, a histogram of
  time to first byte (for its median), and attempts and failed attempts per account;
- per client key name, requests and tokens per UTC day over the last ``KEY_DAYS`` days.

Everything is keyed by names (client key names, account names), numbers and statuses: no
field a credential could reach. Memory is bounded by the ring, sixty slots, and the number of
names configured; a name beyond ``NAMES_CAP`` in one slot or table is counted under ``OTHER``.
Nothing survives a restart: durable usage belongs to the store.
"""

from __future__ import annotations

import bisect
import collections
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

RECENT_REQUESTS = 500
HOUR_MINUTES = 60
KEY_DAYS = 7
NAMES_CAP = 1024
OTHER = "(other)"

Outcome = Literal["ok", "client_error", "rate_limited", "server_error", "cancelled"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "client_error", "rate_limited", "server_error", "cancelled")

TTFB_BOUNDS = tuple(0.001 * 2 ** (i / 4) for i in range(4 * 17))
"""Upper bounds of the time-to-first-byte buckets, seconds: 1 ms to about 2 min, each a
fourth root of two wider than the last (a median read from them is within 10%)."""
TTFB_BOUNDS_MS = tuple(bound * 1000 for bound in TTFB_BOUNDS)


def outcome_of(status: int) -> Outcome:
    """The chart's word for a request's final status (0: the client left before an answer)."""
    if status == 0:
        return "cancelled"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "ok"


@dataclass(slots=True)
class FinishedRequest:
    """One request as the recent list shows it."""

    time: float
    """Wall clock, epoch seconds, at its end."""
    key: str
    """The client key's name; empty in open access."""
    account: str | None
    route: str
    transport: str
    attempts: int
    status: int
    ttfb_ms: float | None
    duration_ms: float
    input_tokens: int | None
    output_tokens: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "time": iso(self.time, milliseconds=True),
            "key": self.key,
            "account": self.account,
            "route": self.route,
            "transport": self.transport,
            "attempts": self.attempts,
            "status": self.status,
            "outcome": outcome_of(self.status),
            "ttfb_ms": self.ttfb_ms,
            "duration_ms": self.duration_ms,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass(slots=True)
class _Minute:
    minute: int
    outcomes: dict[str, int] = field(default_factory=dict)
    ttfb: list[int] = field(default_factory=lambda: [0] * (len(TTFB_BOUNDS) + 1))
    attempts: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class KeyDay:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, other: KeyDay) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens

    def as_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tokens": self.input_tokens + self.output_tokens,
        }


class Activity:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._recent: collections.deque[FinishedRequest] = collections.deque(maxlen=RECENT_REQUESTS)
        self._minutes: list[_Minute | None] = [None] * HOUR_MINUTES
        self._keys: dict[str, dict[int, KeyDay]] = {}

    # --- what happens ---------------------------------------------------------------------

    def request(self, finished: FinishedRequest) -> None:
        # Runs once per request on the event loop: kept to a few dictionary operations.
        self._recent.append(finished)
        when, status = finished.time, finished.status
        minute = int(when // 60)
        slot = self._minutes[minute % HOUR_MINUTES]
        if slot is None or slot.minute != minute:
            slot = self._minute(when)
        outcome = "ok" if 200 <= status < 300 else outcome_of(status)
        outcomes = slot.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if finished.ttfb_ms is not None:
            slot.ttfb[bisect.bisect_left(TTFB_BOUNDS_MS, finished.ttfb_ms)] += 1
        days = self._keys.get(finished.key)
        if days is None:
            name = finished.key if len(self._keys) < NAMES_CAP else OTHER
            days = self._keys.setdefault(name, {})
        today = int(when // 86400)
        day = days.get(today)
        if day is None:
            day = days[today] = KeyDay()
            for old in [d for d in days if d <= today - KEY_DAYS]:
                del days[old]
        day.requests += 1
        day.input_tokens += finished.input_tokens or 0
        day.output_tokens += finished.output_tokens or 0

    def attempt(self, account: str, outcome: str) -> None:
        """One upstream attempt on ``account`` and its outcome (``metrics.Metrics.attempt``)."""
        when = self.clock()
        minute = int(when // 60)
        slot = self._minutes[minute % HOUR_MINUTES]
        if slot is None or slot.minute != minute:
            slot = self._minute(when)
        if account not in slot.attempts and len(slot.attempts) >= NAMES_CAP:
            account = OTHER
        attempts = slot.attempts
        attempts[account] = attempts.get(account, 0) + 1
        if outcome != "ok":
            slot.failed[account] = slot.failed.get(account, 0) + 1

    # --- what the dashboard reads -----------------------------------------------------------

    def recent(
        self,
        *,
        key: str | None = None,
        account: str | None = None,
        status: str | None = None,
        limit: int = RECENT_REQUESTS,
    ) -> list[FinishedRequest]:
        """The most recent requests, newest first, that match every filter given. ``status``
        is a code (``429``), a class (``4xx``) or an outcome (``rate_limited``)."""
        matches = _status_filter(status)
        found: list[FinishedRequest] = []
        for finished in reversed(self._recent):
            if len(found) >= limit:
                break
            if key is not None and finished.key != key:
                continue
            if account is not None and finished.account != account:
                continue
            if matches(finished.status):
                found.append(finished)
        return found

    def recent_names(self) -> dict[str, list[str]]:
        """The keys, accounts and statuses in the recent list: the choices of its filters."""
        keys = sorted({f.key for f in self._recent})
        accounts = sorted({f.account for f in self._recent if f.account is not None})
        statuses = sorted({str(f.status) for f in self._recent})
        return {"keys": keys, "accounts": accounts, "statuses": statuses}

    def hour(self) -> list[dict[str, Any]]:
        """The last hour, a minute per entry, oldest first: requests by outcome and the
        median time to first byte (``null`` in a minute without a first byte)."""
        now = int(self.clock() // 60)
        minutes: list[dict[str, Any]] = []
        for minute in range(now - HOUR_MINUTES + 1, now + 1):
            slot = self._slot(minute)
            entry: dict[str, Any] = {"start": iso(minute * 60)}
            for outcome in OUTCOMES:
                entry[outcome] = slot.outcomes.get(outcome, 0) if slot else 0
            entry["ttfb_p50_ms"] = _median_ms(slot.ttfb) if slot else None
            minutes.append(entry)
        return minutes

    def account_hour(self) -> dict[str, tuple[int, int]]:
        """Per account: upstream attempts and failed attempts over the last hour."""
        attempts: collections.Counter[str] = collections.Counter()
        failed: collections.Counter[str] = collections.Counter()
        for slot in self._hour_slots():
            attempts.update(slot.attempts)
            failed.update(slot.failed)
        return {name: (count, failed[name]) for name, count in attempts.items()}

    def key_usage(self, names: Iterable[str]) -> dict[str, dict[str, dict[str, int]]]:
        """Per key name (``names`` and any seen): requests and tokens today (UTC) and over
        the last seven days, today included."""
        today = _day(self.clock())
        usage: dict[str, dict[str, dict[str, int]]] = {}
        for name in dict.fromkeys([*names, *self._keys]):
            days: Mapping[int, KeyDay] = self._keys.get(name, {})
            week = KeyDay()
            for day, counts in days.items():
                if day > today - KEY_DAYS:
                    week.add(counts)
            usage[name] = {
                "today": days.get(today, KeyDay()).as_json(),
                "week": week.as_json(),
            }
        return usage

    # --- helpers ----------------------------------------------------------------------------

    def _minute(self, when: float) -> _Minute:
        minute = int(when // 60)
        index = minute % HOUR_MINUTES
        slot = self._minutes[index]
        if slot is None or slot.minute != minute:
            slot = self._minutes[index] = _Minute(minute)
        return slot

    def _slot(self, minute: int) -> _Minute | None:
        slot = self._minutes[minute % HOUR_MINUTES]
        return slot if slot is not None and slot.minute == minute else None

    def _hour_slots(self) -> list[_Minute]:
        now = int(self.clock() // 60)
        return [
            slot
            for slot in self._minutes
            if slot is not None and now - HOUR_MINUTES < slot.minute <= now
        ]


def _status_filter(status: str | None) -> Callable[[int], bool]:
    if not status:
        return lambda _: True
    status = status.strip().lower()
    if status.isdigit():
        code = int(status)
        return lambda s: s == code
    if len(status) == 3 and status[0].isdigit() and status[1:] == "xx":
        hundreds = int(status[0])
        return lambda s: s // 100 == hundreds
    if status == "error":
        return lambda s: outcome_of(s) != "ok"
    return lambda s: outcome_of(s) == status


def _median_ms(counts: list[int]) -> float | None:
    total = sum(counts)
    if not total:
        return None
    half = (total + 1) / 2
    seen = 0
    index = 0
    while seen + counts[index] < half:
        seen += counts[index]
        index += 1
    if index >= len(TTFB_BOUNDS):
        return round(TTFB_BOUNDS[-1] * 1000, 1)
    upper = TTFB_BOUNDS[index]
    lower = TTFB_BOUNDS[index - 1] if index else upper / 2**0.25
    return round(math.sqrt(lower * upper) * 1000, 1)


def _day(when: float) -> int:
    return int(when // 86400)


def iso(epoch: float, *, milliseconds: bool = False) -> str:
    spec = "milliseconds" if milliseconds else "seconds"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec=spec).replace("+00:00", "Z")
