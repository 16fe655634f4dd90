"""The pool as a client sees it (SPEC S13): the pure view, table-tested, and its shapes."""

from __future__ import annotations

from typing import Any

import pytest

from codexlb.pool_view import (
    AccountUsage,
    Credits,
    PoolView,
    PoolWindow,
    Window,
    headers,
    key_windows,
    rate_limits_event,
    tighter,
    usage_payload,
    view,
)

NOW = 1_800_000_000.0
H = 3600.0


def used(percent: float, resets_in: float = H, minutes: int | None = 300) -> Window:
    return Window(percent, minutes, NOW + resets_in)


@pytest.mark.parametrize(
    ("accounts", "primary", "limit_reached"),
    [
        # The mean of the available accounts, as an integer.
        (
            [AccountUsage(True, used(20)), AccountUsage(True, used(60))],
            PoolWindow(40, 300, int(NOW + H)),
            False,
        ),
        (
            [AccountUsage(True, used(20)), AccountUsage(True, used(25))],
            PoolWindow(23, 300, int(NOW + H)),
            False,
        ),
        ([AccountUsage(True, used(10.4))], PoolWindow(10, 300, int(NOW + H)), False),
        # The soonest reset among accounts with usage: an unused account's reset raises nothing.
        (
            [
                AccountUsage(True, used(0, resets_in=60)),
                AccountUsage(True, used(50, resets_in=600)),
            ],
            PoolWindow(25, 300, int(NOW + 600)),
            False,
        ),
        # A rate-limited account leaves the mean; its return is a reset that adds headroom.
        (
            [
                AccountUsage(True, used(30, resets_in=2 * H)),
                AccountUsage(False, used(100, resets_in=H), recovers_at=NOW + 120),
            ],
            PoolWindow(30, 300, int(NOW + 120)),
            False,
        ),
        # An account that never reported a window tells nothing about it.
        (
            [AccountUsage(True, used(70)), AccountUsage(True)],
            PoolWindow(70, 300, int(NOW + H)),
            False,
        ),
        # No account available: the pool is at 100% until the first comes back.
        (
            [
                AccountUsage(False, used(100), recovers_at=NOW + 900),
                AccountUsage(False, used(100), recovers_at=NOW + 300),
            ],
            PoolWindow(100, 300, int(NOW + 300)),
            True,
        ),
        # A disabled or unusable account (no return known) counts for nothing.
        (
            [AccountUsage(False, used(90)), AccountUsage(True, used(10))],
            PoolWindow(10, 300, int(NOW + H)),
            False,
        ),
        # Nothing reported at all: no window.
        ([AccountUsage(True), AccountUsage(True)], None, False),
        ([], None, True),
        # Window lengths: the longest reported; an unknown one stays unknown.
        ([AccountUsage(True, used(50, minutes=None))], PoolWindow(50, None, int(NOW + H)), False),
    ],
)
def test_the_pool_window(
    accounts: list[AccountUsage], primary: PoolWindow | None, limit_reached: bool
) -> None:
    pool = view(accounts, NOW)
    assert pool.primary == primary
    assert pool.limit_reached is limit_reached


@pytest.mark.parametrize(
    ("credits", "expected"),
    [
        ([None, None], None),
        ([Credits(False, False, 0.0), None], Credits(False, False, 0.0)),
        ([Credits(True, False, 10.5), Credits(False, False, 4.0)], Credits(True, False, 14.5)),
        ([Credits(True, True, None), Credits(True, False, None)], Credits(True, True, None)),
    ],
)
def test_credits_are_summed(credits: list[Credits | None], expected: Credits | None) -> None:
    accounts = [AccountUsage(True, credits=c) for c in credits]
    assert view(accounts, NOW).credits == expected


POOL = PoolView(
    primary=PoolWindow(40, 300, int(NOW + H)),
    secondary=PoolWindow(7, 10080, int(NOW + 24 * H)),
    credits=Credits(True, False, 14.5),
    limit_reached=False,
)


def test_headers_are_codex_rate_limit_headers() -> None:
    assert headers(POOL) == {
        "x-codex-primary-used-percent": "40",
        "x-codex-primary-window-minutes": "300",
        "x-codex-primary-reset-at": str(int(NOW + H)),
        "x-codex-secondary-used-percent": "7",
        "x-codex-secondary-window-minutes": "10080",
        "x-codex-secondary-reset-at": str(int(NOW + 24 * H)),
        "x-codex-credits-has-credits": "true",
        "x-codex-credits-unlimited": "false",
        "x-codex-credits-balance": "14.5",
    }
    assert headers(PoolView(None, None, None, limit_reached=False)) == {}


def test_the_event_keeps_the_plan_type() -> None:
    event = rate_limits_event(POOL, "plus")
    assert event == {
        "type": "codex.rate_limits",
        "plan_type": "plus",
        "rate_limits": {
            "primary": {"used_percent": 40, "window_minutes": 300, "reset_at": int(NOW + H)},
            "secondary": {
                "used_percent": 7,
                "window_minutes": 10080,
                "reset_at": int(NOW + 24 * H),
            },
        },
        "credits": {"has_credits": True, "unlimited": False, "balance": "14.5"},
    }


def test_usage_payload_has_every_field_codex_requires() -> None:
    payload = usage_payload(POOL, NOW)
    assert payload == {
        "plan_type": "pro",
        "rate_limit": {
            "allowed": True,
            "limit_reached": False,
            "primary_window": {
                "used_percent": 40,
                "limit_window_seconds": 18000,
                "reset_after_seconds": 3600,
                "reset_at": int(NOW + H),
            },
            "secondary_window": {
                "used_percent": 7,
                "limit_window_seconds": 604800,
                "reset_after_seconds": 24 * 3600,
                "reset_at": int(NOW + 24 * H),
            },
        },
        "credits": {"has_credits": True, "unlimited": False, "balance": "14.5"},
    }


def test_usage_payload_of_an_unknown_pool_is_still_whole() -> None:
    payload = usage_payload(PoolView(None, None, None, limit_reached=True), NOW)
    rate_limit = payload["rate_limit"]
    assert rate_limit["allowed"] is False
    assert rate_limit["limit_reached"] is True
    for name, seconds in (("primary_window", 18000), ("secondary_window", 604800)):
        window = rate_limit[name]
        assert window == {
            "used_percent": 0,
            "limit_window_seconds": seconds,
            "reset_after_seconds": seconds,
            "reset_at": int(NOW) + seconds,
        }
        assert all(type(v) is int for v in window.values())
    assert payload["credits"] == {"has_credits": False, "unlimited": False, "balance": "0"}


@pytest.mark.parametrize(
    ("key", "expected_primary", "limit_reached"),
    [
        (PoolView(None, None, None, limit_reached=False), POOL.primary, False),
        (
            PoolView(PoolWindow(90, 300, 5), None, None, limit_reached=False),
            PoolWindow(90, 300, 5),
            False,
        ),
        (PoolView(PoolWindow(10, 300, 5), None, None, limit_reached=False), POOL.primary, False),
        (
            PoolView(PoolWindow(100, 300, 5), None, None, limit_reached=True),
            PoolWindow(100, 300, 5),
            True,
        ),
    ],
)
def test_a_keys_own_limits_fold_in_as_the_tighter(
    key: PoolView, expected_primary: PoolWindow | None, limit_reached: bool
) -> None:
    shown = tighter(POOL, key)
    assert shown.primary == expected_primary
    assert shown.secondary == POOL.secondary
    assert shown.limit_reached is limit_reached


def usage_body(five_hours: tuple[int, int | None], week: tuple[int, int | None]) -> dict[str, Any]:
    """The ``windows`` of a ``GET /v1/usage`` body: (tokens, limit) per window."""
    return {
        "windows": {
            "5h": {"tokens": five_hours[0], "limit": five_hours[1], "resets_at": 1000},
            "week": {"tokens": week[0], "limit": week[1], "resets_at": None},
        }
    }


@pytest.mark.parametrize(
    ("five_hours", "week", "primary", "secondary", "reached"),
    [
        ((0, None), (0, None), None, None, None),
        ((25, 100), (0, None), PoolWindow(25, 300, 1000), None, False),
        ((1, 3), (10, 1000), PoolWindow(34, 300, 1000), PoolWindow(1, 10080, None), False),
        ((150, 100), (0, None), PoolWindow(100, 300, 1000), None, True),
        ((0, None), (1000, 1000), None, PoolWindow(100, 10080, None), True),
    ],
)
def test_a_keys_windows_from_its_usage(
    five_hours: tuple[int, int | None],
    week: tuple[int, int | None],
    primary: PoolWindow | None,
    secondary: PoolWindow | None,
    reached: bool | None,
) -> None:
    shown = key_windows(usage_body(five_hours, week))
    if reached is None:
        assert shown is None
        return
    assert shown is not None
    assert (shown.primary, shown.secondary, shown.limit_reached) == (primary, secondary, reached)
