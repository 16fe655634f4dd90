"""The pool as a client sees it (SPEC S13): one view of the accounts a client key may use,
and the three shapes Codex reads it in.

A client (Codex's status line, ``account/rateLimits/read``) should see the headroom it really
has, not the usage of whichever account served its last response. ``view`` computes it from
plain values, one ``AccountUsage`` per account the key may use:

- ``used_percent`` of a window is the mean, rounded to an integer, over the *available*
  accounts that reported that window (available: enabled, credentials usable, not rate
  limited; an account that never reported a window tells nothing about it and is left out);
- ``reset_at`` is the soonest moment that would raise the pool's headroom: the soonest reset
  of an available account's window that has some usage, or the return of a rate-limited
  account, whichever comes first;
- credits are summed: the pool has credits if any account has, is unlimited if any account is,
  and its balance is the sum of the balances reported;
- with no account available the pool's windows are at 100% and ``limit_reached`` holds.

The shapes: ``headers`` (the ``x-codex-*`` rate-limit headers of an HTTP answer or a WebSocket
101), ``rate_limits_event`` (the WebSocket ``codex.rate_limits`` event) and ``usage_payload``
(the ``/wham/usage`` answer). ``RATE_LIMIT_HEADERS`` names the upstream headers they replace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WINDOWS = ("primary", "secondary")
DEFAULT_WINDOW_MINUTES = {"primary": 300, "secondary": 7 * 24 * 60}
"""What ``usage_payload`` says of a window no account reported (Codex requires all fields)."""
DEFAULT_PLAN_TYPE = "pro"

RATE_LIMIT_HEADERS = frozenset(
    {
        *(
            f"x-codex-{window}-{field}"
            for window in WINDOWS
            for field in ("used-percent", "window-minutes", "reset-at")
        ),
        "x-codex-primary-over-secondary-limit-percent",
        "x-codex-limit-name",
        "x-codex-credits-has-credits",
        "x-codex-credits-unlimited",
        "x-codex-credits-balance",
    }
)
"""The upstream's headers for the default (``codex``) limit family and credits: they describe
one account, and the client gets the pool's (``headers``) instead."""


@dataclass(frozen=True, slots=True)
class Window:
    """One usage window of one account, as last reported."""

    used_percent: float
    window_minutes: int | None = None
    resets_at: float = 0.0
    """Epoch seconds; 0 when unknown."""


@dataclass(frozen=True, slots=True)
class Credits:
    has_credits: bool
    unlimited: bool
    balance: float | None = None


@dataclass(frozen=True, slots=True)
class AccountUsage:
    """What the view needs of one account."""

    available: bool
    """Enabled, credentials usable, not rate limited: it can take the key's work."""
    primary: Window | None = None
    secondary: Window | None = None
    credits: Credits | None = None
    recovers_at: float = 0.0
    """For an account that is not available: when it is expected back (0 unknown)."""

    def window(self, name: str) -> Window | None:
        return self.primary if name == "primary" else self.secondary


@dataclass(frozen=True, slots=True)
class PoolWindow:
    used_percent: int
    window_minutes: int | None
    reset_at: int | None


@dataclass(frozen=True, slots=True)
class PoolView:
    primary: PoolWindow | None
    secondary: PoolWindow | None
    credits: Credits | None
    limit_reached: bool

    def window(self, name: str) -> PoolWindow | None:
        return self.primary if name == "primary" else self.secondary


def view(accounts: Sequence[AccountUsage], now: float) -> PoolView:
    """The pool's view from its accounts (see the module docstring for the rules)."""
    available = [a for a in accounts if a.available]
    returns = [a.recovers_at for a in accounts if not a.available and a.recovers_at > now]
    windows = {name: _window(name, accounts, available, returns, now) for name in WINDOWS}
    return PoolView(
        windows["primary"], windows["secondary"], _credits(accounts), limit_reached=not available
    )


def _window(
    name: str,
    accounts: Sequence[AccountUsage],
    available: Sequence[AccountUsage],
    returns: Sequence[float],
    now: float,
) -> PoolWindow | None:
    known = [w for a in accounts if (w := a.window(name)) is not None]
    minutes = max((w.window_minutes for w in known if w.window_minutes), default=None)
    soonest_return = min(returns, default=None)
    if not available:
        if not known and soonest_return is None:
            return None
        return PoolWindow(100, minutes, _epoch(soonest_return))
    reporting = [w for a in available if (w := a.window(name)) is not None]
    if not reporting:
        return None
    used = sum(w.used_percent for w in reporting) / len(reporting)
    resets = [w.resets_at for w in reporting if w.used_percent > 0 and w.resets_at > now]
    if soonest_return is not None:
        resets.append(soonest_return)
    return PoolWindow(_integer(used), minutes, _epoch(min(resets, default=None)))


def _credits(accounts: Sequence[AccountUsage]) -> Credits | None:
    reported = [a.credits for a in accounts if a.credits is not None]
    if not reported:
        return None
    balances = [c.balance for c in reported if c.balance is not None]
    return Credits(
        has_credits=any(c.has_credits for c in reported),
        unlimited=any(c.unlimited for c in reported),
        balance=sum(balances) if balances else None,
    )


def _integer(percent: float) -> int:
    """Codex requires an integer percentage: rounded half up, within 0-100."""
    return min(max(math.floor(percent + 0.5), 0), 100)


def _epoch(value: float | None) -> int | None:
    return None if value is None else math.ceil(value)


def _balance(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


# -- the shapes Codex reads ----------------------------------------------------------------


def headers(pool: PoolView) -> dict[str, str]:
    """The ``x-codex-*`` rate-limit headers for ``pool`` (PROTOCOL §2)."""
    result: dict[str, str] = {}
    for name in WINDOWS:
        window = pool.window(name)
        if window is None:
            continue
        result[f"x-codex-{name}-used-percent"] = str(window.used_percent)
        if window.window_minutes is not None:
            result[f"x-codex-{name}-window-minutes"] = str(window.window_minutes)
        if window.reset_at is not None:
            result[f"x-codex-{name}-reset-at"] = str(window.reset_at)
    credits = pool.credits
    if credits is not None:
        result["x-codex-credits-has-credits"] = _flag(credits.has_credits)
        result["x-codex-credits-unlimited"] = _flag(credits.unlimited)
        if credits.balance is not None:
            result["x-codex-credits-balance"] = _balance(credits.balance)
    return result


def rate_limits_event(pool: PoolView, plan_type: Any = None) -> dict[str, Any]:
    """The ``codex.rate_limits`` WebSocket event for ``pool``; ``plan_type`` as the upstream
    sent it."""
    limits: dict[str, Any] = {}
    for name in WINDOWS:
        window = pool.window(name)
        limits[name] = (
            None
            if window is None
            else {
                "used_percent": window.used_percent,
                "window_minutes": window.window_minutes,
                "reset_at": window.reset_at,
            }
        )
    return {
        "type": "codex.rate_limits",
        "plan_type": plan_type,
        "rate_limits": limits,
        "credits": _credits_object(pool.credits),
    }


def usage_payload(
    pool: PoolView, now: float, *, plan_type: str = DEFAULT_PLAN_TYPE
) -> dict[str, Any]:
    """The ``GET /wham/usage`` answer in the schema Codex 0.169.0 parses (PROTOCOL §7): every
    required field present, percentages as integers."""
    rate_limit: dict[str, Any] = {
        "allowed": not pool.limit_reached,
        "limit_reached": pool.limit_reached,
    }
    for name in WINDOWS:
        window = pool.window(name)
        minutes = DEFAULT_WINDOW_MINUTES[name]
        used, reset_at = 0, None
        if window is not None:
            used = window.used_percent
            minutes = window.window_minutes or minutes
            reset_at = window.reset_at
        if reset_at is None or reset_at < now:
            reset_at = math.ceil(now) + minutes * 60
        rate_limit[f"{name}_window"] = {
            "used_percent": used,
            "limit_window_seconds": minutes * 60,
            "reset_after_seconds": max(reset_at - math.ceil(now), 0),
            "reset_at": reset_at,
        }
    credits = _credits_object(pool.credits) or {
        "has_credits": False,
        "unlimited": False,
        "balance": "0",
    }
    return {"plan_type": plan_type, "rate_limit": rate_limit, "credits": credits}


def _credits_object(credits: Credits | None) -> dict[str, Any] | None:
    if credits is None:
        return None
    return {
        "has_credits": credits.has_credits,
        "unlimited": credits.unlimited,
        "balance": None if credits.balance is None else _balance(credits.balance),
    }


def _flag(value: bool) -> str:
    return "true" if value else "false"


def key_windows(usage: Mapping[str, Any]) -> PoolView | None:
    """A client key's own token windows (SPEC S9 ``tokens_per_5h`` as the primary window,
    ``tokens_per_week`` as the secondary), from its ``GET /v1/usage`` body; ``None`` for a key
    with neither limit."""
    windows = usage.get("windows") or {}

    def window(name: str, minutes: int) -> PoolWindow | None:
        found = windows.get(name) or {}
        limit, tokens = found.get("limit"), found.get("tokens") or 0
        if not limit:
            return None
        used = min(100, math.ceil(100 * tokens / limit))
        resets = found.get("resets_at")
        return PoolWindow(used, minutes, int(resets) if resets else None)

    primary, secondary = window("5h", 300), window("week", 7 * 24 * 60)
    if primary is None and secondary is None:
        return None
    full = any(w is not None and w.used_percent >= 100 for w in (primary, secondary))
    return PoolView(primary, secondary, None, limit_reached=full)


def tighter(pool: PoolView, key: PoolView) -> PoolView:
    """``pool`` with a client key's own windows folded in: per window the fuller of the two
    (with its reset), since the key may use no more than either allows."""

    def window(name: str) -> PoolWindow | None:
        ours, theirs = pool.window(name), key.window(name)
        if ours is None or theirs is None:
            return ours or theirs
        return theirs if theirs.used_percent > ours.used_percent else ours

    return PoolView(
        window("primary"),
        window("secondary"),
        pool.credits,
        limit_reached=pool.limit_reached or key.limit_reached,
    )
