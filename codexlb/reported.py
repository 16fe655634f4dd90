"""The numbers the upstream reports about an account, made safe to act on.

Usage percentages and reset times arrive in response headers (HTTP answers and WebSocket
handshakes), in ``codex.rate_limits`` events, and in error bodies and events (``resets_at``,
``resets_in_seconds``, ``Retry-After``). Every one of them is read here and nowhere else, so
that no value the upstream sends can wedge routing or break the status view:

- a value that is not a finite number (``nan``, ``inf``, text) is ignored, as if absent;
- a percentage is clamped to 0-100;
- a reset time or delay is clamped to ``HORIZON_SECONDS`` from now: an account is never
  taken out for longer than that on the upstream's word (it is asked again afterwards).
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from typing import Any

from codexlb.pool_view import Credits

HORIZON_SECONDS = 7 * 24 * 3600.0
"""The farthest reset time believed: a usage window is at most a week long."""

USAGE_WINDOWS = ("primary", "secondary")
USAGE_HEADERS = (
    *(
        f"x-codex-{name}-{field}"
        for name in USAGE_WINDOWS
        for field in ("used-percent", "reset-at", "window-minutes")
    ),
    "x-codex-credits-has-credits",
    "x-codex-credits-unlimited",
    "x-codex-credits-balance",
)
"""Every header the pool learns usage from (``Pool.observe_headers``)."""
_WINDOW_HEADERS = tuple(
    (name, f"x-codex-{name}-used-percent", f"x-codex-{name}-reset-at") for name in USAGE_WINDOWS
)


def number(value: Any) -> float | None:
    """``value`` as a finite float (a number, or text holding one), else ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def percent(value: Any) -> float | None:
    """A usage percentage, clamped to 0-100; ``None`` when it is not a finite number."""
    result = number(value)
    return None if result is None else min(max(result, 0.0), 100.0)


def epoch(value: Any, now: float) -> float | None:
    """A reset time in epoch seconds, at most ``HORIZON_SECONDS`` ahead of ``now``; ``None``
    when it is not a finite number."""
    result = number(value)
    return None if result is None else min(max(result, 0.0), now + HORIZON_SECONDS)


def delay(value: Any) -> float | None:
    """A delay in seconds, clamped to 0-``HORIZON_SECONDS``; ``None`` when not finite."""
    result = number(value)
    return None if result is None else min(max(result, 0.0), HORIZON_SECONDS)


def usage_window(used: Any, resets_at: Any, now: float) -> tuple[float, float] | None:
    """One usage window as ``(used_percent, resets_at)`` (0 for an unknown reset time), or
    ``None`` when the percentage is missing or not a number: nothing is learned then."""
    used_percent = percent(used)
    if used_percent is None:
        return None
    return used_percent, epoch(resets_at, now) or 0.0


def header_windows(headers: Mapping[str, str], now: float) -> dict[str, tuple[float, float]]:
    """The usage windows the ``x-codex-{primary,secondary}-*`` headers report."""
    windows: dict[str, tuple[float, float]] = {}
    for name, used, resets_at in _WINDOW_HEADERS:
        window = usage_window(headers.get(used), headers.get(resets_at), now)
        if window is not None:
            windows[name] = window
    return windows


def event_windows(event: Mapping[str, Any], now: float) -> dict[str, tuple[float, float]]:
    """The usage windows a ``codex.rate_limits`` event reports."""
    limits = event.get("rate_limits")
    windows: dict[str, tuple[float, float]] = {}
    if not isinstance(limits, Mapping):
        return windows
    for name in USAGE_WINDOWS:
        values = limits.get(name)
        if isinstance(values, Mapping):
            window = usage_window(values.get("used_percent"), values.get("reset_at"), now)
            if window is not None:
                windows[name] = window
    return windows


def rate_limit_reset(
    headers: Mapping[str, str], error: Mapping[str, Any] | None, now: float
) -> float | None:
    """When a rate-limited account may be tried again, from whatever the upstream said: the
    error's ``resets_at`` or ``resets_in_seconds``, ``Retry-After`` (seconds or an HTTP date),
    else the reset time of a usage window at 100%. Never past the horizon."""
    if error is not None:
        resets_at = epoch(error.get("resets_at"), now)
        if resets_at is not None and resets_at > now:
            return resets_at
        resets_in = delay(error.get("resets_in_seconds"))
        if resets_in is not None and resets_in > 0:
            return now + resets_in
    retry_after = headers.get("retry-after")
    if retry_after:
        seconds = delay(retry_after)
        if seconds is not None:
            return now + seconds
        if not _numeric(retry_after):  # a date; "inf" or "nan" is no date
            try:
                return epoch(email.utils.parsedate_to_datetime(retry_after).timestamp(), now)
            except (TypeError, ValueError, OverflowError, IndexError):
                pass
    known = [
        resets_at
        for used, resets_at in header_windows(headers, now).values()
        if used >= 100.0 and resets_at > now
    ]
    return max(known) if known else None


def _numeric(text: str) -> bool:
    """Whether ``text`` looks like a number (``nan``, ``inf`` included): not an HTTP date."""
    try:
        float(text)
    except ValueError:
        return False
    return True


MAX_WINDOW_MINUTES = 366 * 24 * 60


def window_minutes(value: Any) -> int | None:
    """A window's length in minutes: a positive whole number up to a year, else ``None``."""
    result = number(value)
    if result is None or result < 1:
        return None
    return int(min(result, MAX_WINDOW_MINUTES))


def header_window_minutes(headers: Mapping[str, str]) -> dict[str, int]:
    """The window lengths the ``x-codex-{primary,secondary}-window-minutes`` headers report."""
    minutes: dict[str, int] = {}
    for name in USAGE_WINDOWS:
        value = window_minutes(headers.get(f"x-codex-{name}-window-minutes"))
        if value is not None:
            minutes[name] = value
    return minutes


def event_window_minutes(event: Mapping[str, Any]) -> dict[str, int]:
    """The window lengths a ``codex.rate_limits`` event reports."""
    limits = event.get("rate_limits")
    minutes: dict[str, int] = {}
    if isinstance(limits, Mapping):
        for name in USAGE_WINDOWS:
            values = limits.get(name)
            if isinstance(values, Mapping):
                value = window_minutes(values.get("window_minutes"))
                if value is not None:
                    minutes[name] = value
    return minutes


def header_credits(headers: Mapping[str, str]) -> Credits | None:
    """The credits the ``x-codex-credits-*`` headers report (both flags are required)."""
    has_credits = _flag(headers.get("x-codex-credits-has-credits"))
    unlimited = _flag(headers.get("x-codex-credits-unlimited"))
    if has_credits is None or unlimited is None:
        return None
    return Credits(has_credits, unlimited, _balance(headers.get("x-codex-credits-balance")))


def event_credits(event: Mapping[str, Any]) -> Credits | None:
    """The credits a ``codex.rate_limits`` event reports."""
    credits = event.get("credits")
    if not isinstance(credits, Mapping):
        return None
    has_credits, unlimited = credits.get("has_credits"), credits.get("unlimited")
    if not isinstance(has_credits, bool) or not isinstance(unlimited, bool):
        return None
    return Credits(has_credits, unlimited, _balance(credits.get("balance")))


def _flag(value: Any) -> bool | None:
    if not isinstance(value, str):
        return None
    lower = value.strip().lower()
    if lower in ("true", "1"):
        return True
    if lower in ("false", "0"):
        return False
    return None


MAX_BALANCE = 1e12


def _balance(value: Any) -> float | None:
    """A credit balance: a finite, non-negative number below ``MAX_BALANCE``."""
    result = number(value)
    return None if result is None else min(max(result, 0.0), MAX_BALANCE)
