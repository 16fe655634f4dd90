"""Runtime account state: cooldowns, usage, leases and affinity, against a fake clock."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from codexlb.config import Config
from codexlb.credentials import Credentials
from codexlb.errors import UpstreamUnavailable, UsageLimitReached
from codexlb.pool import AFFINITY_CAPACITY, AFFINITY_KEY_LENGTH, Account, Pool, Reconfiguration
from codexlb.reported import HORIZON_SECONDS, rate_limit_reset

NOW = 1_750_000_000.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_pool(
    clock: FakeClock, *names: str, routing: dict[str, Any] | None = None, **account: Any
) -> Pool:
    config = Config.model_validate(
        {
            "accounts": [{"name": n, "access_token": f"at-{n}", **account} for n in names],
            "routing": routing or {},
        }
    )
    return Pool(config, clock=clock)


def account(pool: Pool, name: str) -> Account:
    found = pool.get(name)
    assert found is not None
    return found


def choose(pool: Pool, *, prefer: str | None = None, key: str | None = None) -> str | None:
    chosen = pool.choose(prefer=prefer, affinity_key=key, exclude=())
    return chosen.name if chosen is not None else None


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict((name.replace("_", "-"), value) for name, value in values.items())


# -- rate_limit_reset ----------------------------------------------------------------------

HTTP_DATE = email.utils.formatdate(NOW + 90, usegmt=True)


@pytest.mark.parametrize(
    ("error", "hdrs", "expected"),
    [
        ({"resets_at": NOW + 300}, headers(retry_after="5"), NOW + 300),
        ({"resets_at": int(NOW) + 300}, headers(), int(NOW) + 300),
        ({"resets_at": NOW - 1, "resets_in_seconds": 40}, headers(), NOW + 40),
        ({"resets_in_seconds": 40}, headers(retry_after="5"), NOW + 40),
        ({"resets_in_seconds": "40"}, headers(), NOW + 40),
        ({"resets_at": "soon", "resets_in_seconds": None}, headers(retry_after="7"), NOW + 7),
        ({"resets_at": True}, headers(), None),
        (None, headers(retry_after="30"), NOW + 30),
        (None, headers(Retry_After="2.5"), NOW + 2.5),
        (None, headers(retry_after="-3"), NOW),
        (None, headers(retry_after=HTTP_DATE), NOW + 90),
        (None, headers(retry_after="whenever"), None),
        (None, headers(), None),
        (
            None,
            headers(x_codex_primary_used_percent="100", x_codex_primary_reset_at=str(NOW + 600)),
            NOW + 600,
        ),
        (
            None,
            headers(
                x_codex_primary_used_percent="100.0",
                x_codex_primary_reset_at=str(NOW + 600),
                x_codex_secondary_used_percent="100",
                x_codex_secondary_reset_at=str(NOW + 9000),
            ),
            NOW + 9000,
        ),
        (
            None,
            headers(
                x_codex_primary_used_percent="99",
                x_codex_primary_reset_at=str(NOW + 600),
                x_codex_secondary_used_percent="100",
                x_codex_secondary_reset_at=str(NOW + 9000),
            ),
            NOW + 9000,
        ),
        (
            None,
            headers(x_codex_primary_used_percent="99.5", x_codex_primary_reset_at=str(NOW + 600)),
            None,
        ),
        (
            None,
            headers(x_codex_primary_used_percent="100", x_codex_primary_reset_at=str(NOW - 5)),
            None,
        ),
        ({"resets_at": 1e300}, headers(), NOW + HORIZON_SECONDS),
        ({"resets_at": float("nan"), "resets_in_seconds": 1e300}, headers(), NOW + HORIZON_SECONDS),
        ({"resets_at": float("inf")}, headers(retry_after="nan"), None),
        (None, headers(retry_after="inf"), None),
        (None, headers(retry_after="1e400"), None),
        (None, headers(retry_after="99999999999"), NOW + HORIZON_SECONDS),
        (None, headers(retry_after="Fri, 31 Dec 9999 23:59:59 GMT"), NOW + HORIZON_SECONDS),
        (
            None,
            headers(x_codex_primary_used_percent="100", x_codex_primary_reset_at="9.5e19"),
            NOW + HORIZON_SECONDS,
        ),
        (
            None,
            headers(x_codex_primary_used_percent="nan", x_codex_primary_reset_at=str(NOW + 60)),
            None,
        ),
    ],
    ids=[
        "error-resets_at",
        "error-resets_at-int",
        "past-resets_at-falls-to-resets_in",
        "resets_in-beats-retry-after",
        "resets_in-string",
        "garbage-falls-to-retry-after",
        "bool-is-not-a-time",
        "retry-after-seconds",
        "retry-after-fraction",
        "retry-after-negative",
        "retry-after-http-date",
        "retry-after-garbage",
        "nothing",
        "primary-full",
        "both-full-latest",
        "only-secondary-full",
        "not-full",
        "full-reset-passed",
        "resets_at-far-clamped",
        "resets_in-far-clamped",
        "non-finite-ignored",
        "retry-after-inf",
        "retry-after-overflow",
        "retry-after-far-clamped",
        "retry-after-far-date-clamped",
        "window-reset-far-clamped",
        "window-nan-ignored",
    ],
)
def test_rate_limit_reset(
    error: dict[str, Any] | None, hdrs: CIMultiDict[str], expected: float | None
) -> None:
    assert rate_limit_reset(hdrs, error, NOW) == expected


# -- cooldowns -----------------------------------------------------------------------------


def test_rate_limited_cools_the_account_down_until_its_reset() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b")
    a = account(pool, "a")

    pool.rate_limited(a, headers=headers(), error={"resets_in_seconds": 100})

    assert a.cooldown_until == NOW + 100
    assert a.last_error == "rate limited"
    assert {choose(pool) for _ in range(5)} == {"b"}
    assert choose(pool, prefer="a") == "b"
    clock.now = NOW + 100
    assert choose(pool, prefer="a") == "a"


def test_rate_limited_without_a_reset_uses_the_default_cooldown() -> None:
    pool = make_pool(FakeClock(), "a", routing={"default_rate_limit_cooldown_seconds": 45})
    a = account(pool, "a")

    pool.rate_limited(a, headers=headers(), error=None)

    assert a.cooldown_until == NOW + 45


def test_rate_limited_never_shortens_a_cooldown() -> None:
    pool = make_pool(FakeClock(), "a")
    a = account(pool, "a")
    pool.rate_limited(a, headers=headers(retry_after="600"), error=None)

    pool.rate_limited(a, headers=headers(retry_after="10"), error=None)

    assert a.cooldown_until == NOW + 600


def test_rate_limited_learns_usage_from_its_headers() -> None:
    pool = make_pool(FakeClock(), "a")
    a = account(pool, "a")

    pool.rate_limited(
        a,
        headers=headers(x_codex_primary_used_percent="100", x_codex_primary_reset_at=str(NOW + 60)),
        error=None,
    )

    assert (a.primary.used_percent, a.primary.resets_at) == (100.0, NOW + 60)
    assert a.cooldown_until == NOW + 60


def test_failed_backs_off_exponentially_up_to_the_cap() -> None:
    clock = FakeClock()
    pool = make_pool(
        clock,
        "a",
        routing={"error_cooldown_seconds": 2, "max_error_cooldown_seconds": 30},
    )
    a = account(pool, "a")

    delays = []
    for _ in range(7):
        pool.failed(a, "HTTP 502")
        delays.append(a.cooldown_until - clock.now)
        clock.now = a.cooldown_until

    assert delays == [2, 4, 8, 16, 30, 30, 30]
    assert a.last_error == "HTTP 502"

    pool.succeeded(a)
    pool.failed(a, "HTTP 503")
    assert a.cooldown_until - clock.now == 2


def test_failed_backoff_survives_a_long_outage() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a")
    a = account(pool, "a")

    for _ in range(1100):
        clock.now = a.cooldown_until
        pool.failed(a, "connect error")

    assert a.cooldown_until == clock.now + 120.0


def test_unauthorized_takes_the_account_out() -> None:
    pool = make_pool(FakeClock(), "a", "b")

    pool.unauthorized(account(pool, "a"))

    assert not account(pool, "a").usable
    assert {choose(pool, prefer="a") for _ in range(4)} == {"b"}


# -- exhausted -----------------------------------------------------------------------------


def test_exhausted_when_rate_limited_is_usage_limit_reached() -> None:
    clock = FakeClock(float(math.floor(time.time())))
    pool = make_pool(clock, "a", "b")
    pool.rate_limited(account(pool, "a"), headers=headers(retry_after="120"), error=None)
    pool.rate_limited(account(pool, "b"), headers=headers(retry_after="30"), error=None)
    assert choose(pool) is None

    error = pool.exhausted(rate_limited=True)

    assert isinstance(error, UsageLimitReached)
    assert error.status == 429
    body = json.loads(error.body())["error"]
    assert (body["type"], body["code"]) == ("usage_limit_reached", "usage_limit_reached")
    assert body["resets_at"] == clock.now + 30
    assert 25 <= int(error.headers()["Retry-After"]) <= 30


def test_exhausted_by_full_usage_windows_is_usage_limit_reached() -> None:
    pool = make_pool(FakeClock(), "a")
    pool.observe_headers(
        account(pool, "a"),
        headers(x_codex_primary_used_percent="100", x_codex_primary_reset_at=str(NOW + 500)),
    )

    error = pool.exhausted(rate_limited=False)

    assert isinstance(error, UsageLimitReached)
    assert error.resets_at == NOW + 500


def test_exhausted_after_errors_is_upstream_unavailable() -> None:
    pool = make_pool(FakeClock(), "a", "b")
    pool.failed(account(pool, "a"), "HTTP 500")
    pool.failed(account(pool, "b"), "connect error")

    error = pool.exhausted(rate_limited=False)

    assert isinstance(error, UpstreamUnavailable)
    assert (error.status, error.type, error.code) == (502, "server_error", "upstream_error")
    assert "Retry-After" not in error.headers()


def test_a_success_ends_the_error_back_off_but_not_a_rate_limit() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b")
    a, b = account(pool, "a"), account(pool, "b")
    pool.failed(a, "HTTP 500")
    pool.failed(b, "HTTP 500")
    pool.rate_limited(b, headers=headers(retry_after="100"), error=None)

    pool.succeeded(a)  # a request that began before the back-off completed on it
    pool.succeeded(b)

    assert a.state(clock.now) == "ok"
    assert b.state(clock.now) == "rate_limited"
    assert a.error_streak == b.error_streak == 0


def test_a_pool_out_only_for_errors_is_never_usage_limit_reached() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b", routing={"error_cooldown_seconds": 10})
    a, b = account(pool, "a"), account(pool, "b")
    pool.rate_limited(a, headers=headers(retry_after="5"), error=None)
    pool.failed(a, "HTTP 500")  # backs off for longer than its rate limit lasts
    pool.failed(b, "HTTP 500")
    pool.succeeded(b)  # an earlier request completed on b
    pool.failed(b, "HTTP 500")
    clock.now += 6  # the rate limit is over; both accounts only back off after errors
    assert {a.state(clock.now), b.state(clock.now)} == {"cooling_down"}

    assert choose(pool) == "a"  # the first back-off to end is tried
    assert isinstance(pool.exhausted(rate_limited=False), UpstreamUnavailable)


@pytest.mark.parametrize("enabled", [True, False])
def test_exhausted_without_usable_accounts_is_upstream_unavailable(enabled: bool) -> None:
    pool = make_pool(FakeClock(), "a", enabled=enabled)
    if enabled:
        pool.unauthorized(account(pool, "a"))

    error = pool.exhausted(rate_limited=False)

    assert isinstance(error, UpstreamUnavailable)
    assert "No usable upstream account" in error.message


# -- usage -----------------------------------------------------------------------------------


def test_observe_headers_records_both_windows() -> None:
    pool = make_pool(FakeClock(), "a")
    a = account(pool, "a")

    pool.observe_headers(
        a,
        headers(
            x_codex_primary_used_percent="42.5",
            x_codex_primary_reset_at=str(NOW + 100),
            x_codex_secondary_used_percent="7",
            x_codex_primary_window_minutes="300",
        ),
    )

    assert (a.primary.used_percent, a.primary.resets_at) == (42.5, NOW + 100)
    assert (a.secondary.used_percent, a.secondary.resets_at) == (7.0, 0.0)
    assert a.candidate().used_percent == 42.5


def test_observe_headers_ignores_missing_or_garbage_usage() -> None:
    pool = make_pool(FakeClock(), "a")
    a = account(pool, "a")
    pool.observe_headers(a, headers(x_codex_primary_used_percent="30"))

    pool.observe_headers(a, headers())
    pool.observe_headers(a, headers(x_codex_primary_used_percent="n/a"))

    assert a.primary.used_percent == 30.0


def test_least_used_account_gets_new_work() -> None:
    pool = make_pool(FakeClock(), "a", "b")
    pool.observe_headers(account(pool, "a"), headers(x_codex_primary_used_percent="95"))
    pool.observe_headers(account(pool, "b"), headers(x_codex_secondary_used_percent="10"))

    assert {choose(pool) for _ in range(20)} == {"b"}


def test_full_window_blocks_until_reset() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a")
    pool.observe_headers(
        account(pool, "a"),
        headers(x_codex_secondary_used_percent="100", x_codex_secondary_reset_at=str(NOW + 60)),
    )

    assert choose(pool) is None
    clock.now = NOW + 60
    assert choose(pool) == "a"


# -- leases ----------------------------------------------------------------------------------


def test_lease_counts_inflight_and_releases_on_exception() -> None:
    pool = make_pool(FakeClock(), "a", max_inflight=2)
    a = account(pool, "a")
    seen: list[tuple[int, str | None]] = []

    def fail_while_leased() -> None:
        with pool.lease(a):
            seen.append((a.inflight, choose(pool)))
            raise RuntimeError("boom")

    with pool.lease(a):
        seen.append((a.inflight, choose(pool)))
        with pytest.raises(RuntimeError, match="boom"):
            fail_while_leased()
        seen.append((a.inflight, choose(pool)))
    seen.append((a.inflight, choose(pool)))

    assert seen == [(1, "a"), (2, None), (1, "a"), (0, "a")]


# -- affinity --------------------------------------------------------------------------------


def test_affinity_is_remembered_and_expires() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b", routing={"affinity_ttl_seconds": 60})
    b = account(pool, "b")
    pool.remember_affinity("thread-1", b)
    with pool.lease(b):  # b is busier: only affinity sends work there
        assert [choose(pool, key="thread-1") for _ in range(4)] == ["b"] * 4
        assert {choose(pool, key="thread-2") for _ in range(4)} == {"a"}
        assert choose(pool, prefer="a", key="thread-1") == "a"

        clock.now = NOW + 59.9
        assert choose(pool, key="thread-1") == "b"
        clock.now = NOW + 60
        assert choose(pool, key="thread-1") == "a"


def test_affinity_to_an_ineligible_account_is_ignored() -> None:
    pool = make_pool(FakeClock(), "a", "b")
    b = account(pool, "b")
    pool.remember_affinity("thread-1", b)

    pool.failed(b, "HTTP 500")

    assert choose(pool, key="thread-1") == "a"


def test_affinity_disabled_by_zero_ttl() -> None:
    pool = make_pool(FakeClock(), "a", "b", routing={"affinity_ttl_seconds": 0})
    b = account(pool, "b")
    pool.remember_affinity("thread-1", b)

    with pool.lease(b):
        assert choose(pool, key="thread-1") == "a"


# -- reconfigure (live reload, SPEC S6) ------------------------------------------------------


def config_of(*accounts: dict[str, Any], routing: dict[str, Any] | None = None) -> Config:
    return Config.model_validate({"accounts": list(accounts), "routing": routing or {}})


def inline(name: str, **values: Any) -> dict[str, Any]:
    return {"name": name, "access_token": f"at-{name}", **values}


def reconfigure(pool: Pool, config: Config) -> Reconfiguration:
    """Apply ``config`` as a reload does: the credential manager first, then the pool."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(pool.credentials.reconfigure(config))
    finally:
        loop.close()
    return pool.reconfigure(config)


def test_reconfigure_adds_and_removes_accounts() -> None:
    pool = make_pool(FakeClock(), "a", "b")

    changes = reconfigure(pool, config_of(inline("b"), inline("c")))

    assert (changes.added, changes.removed) == (("c",), ("a",))
    assert [a.name for a in pool.accounts] == ["b", "c"]
    assert pool.get("a") is None
    assert pool.draining == []
    assert {choose(pool) for _ in range(6)} == {"b", "c"}
    assert choose(pool, prefer="a") in {"b", "c"}


def test_reconfigure_keeps_the_runtime_state_of_unchanged_accounts() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b")
    a = account(pool, "a")
    credentials = a.credentials
    pool.rate_limited(a, headers=headers(retry_after="100"), error=None)
    pool.failed(a, "HTTP 502")
    pool.observe_headers(a, headers(x_codex_primary_used_percent="42"))
    pool.remember_affinity("thread-1", account(pool, "b"))

    with pool.lease(a):
        changes = reconfigure(pool, config_of(inline("a"), inline("b"), inline("c")))
        assert a.inflight == 1

    assert changes.describe() == "added c"
    assert account(pool, "a") is a
    assert a.credentials is credentials
    assert (a.cooldown_until, a.error_streak, a.primary.used_percent) == (NOW + 100, 1, 42.0)
    assert a.inflight == 0
    assert a.state(clock.now) == "rate_limited"
    assert choose(pool, key="thread-1") == "b"


def test_reconfigure_changes_settings_in_place() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b")
    a = account(pool, "a")

    changes = reconfigure(
        pool, config_of(inline("a", enabled=False), inline("b", weight=3, max_inflight=1))
    )

    assert changes.changed == ("a", "b")
    assert account(pool, "a") is a
    assert a.state(clock.now) == "disabled"
    assert {choose(pool, prefer="a") for _ in range(4)} == {"b"}
    b = account(pool, "b")
    assert (b.config.weight, b.config.max_inflight) == (3, 1)
    with pool.lease(b):
        assert b.state(clock.now) == "busy"
        assert choose(pool) is None


def test_reconfigure_applies_routing_settings() -> None:
    pool = make_pool(FakeClock(), "a", "b")
    pool.observe_headers(account(pool, "a"), headers(x_codex_primary_used_percent="90"))
    assert {choose(pool) for _ in range(6)} == {"b"}

    changes = reconfigure(
        pool,
        config_of(inline("a"), inline("b"), routing={"strategy": "round_robin", "max_attempts": 5}),
    )

    assert changes.routing
    assert changes.describe() == "routing settings changed"
    assert (pool.routing.strategy, pool.routing.max_attempts) == ("round_robin", 5)
    assert [choose(pool) for _ in range(4)].count("a") == 2


def test_removed_account_drains_its_leases_and_takes_no_new_work() -> None:
    pool = make_pool(FakeClock(), "a", "b")
    a = account(pool, "a")

    with pool.lease(a):
        with pool.lease(a):
            reconfigure(pool, config_of(inline("b")))
            assert pool.draining == [a]
            assert a.state(pool.now()) == "draining"
            assert not pool.eligible(a)
            assert {choose(pool, prefer="a") for _ in range(4)} == {"b"}
            pool.failed(a, "HTTP 500")  # an outcome reported after removal is harmless
        assert pool.draining == [a]
        assert a.inflight == 1

    assert a.inflight == 0
    assert pool.draining == []
    assert [x.name for x in pool.accounts] == ["b"]


def test_account_named_again_while_draining_comes_back_with_its_state() -> None:
    pool = make_pool(FakeClock(), "a", "b")
    a = account(pool, "a")
    pool.failed(a, "HTTP 500")

    with pool.lease(a):
        reconfigure(pool, config_of(inline("b")))
        changes = reconfigure(pool, config_of(inline("a"), inline("b")))
        assert changes.added == ("a",)
        assert account(pool, "a") is a
        assert pool.draining == []
        assert a.state(pool.now()) == "cooling_down"
        assert a.inflight == 1
    assert a.inflight == 0
    assert a.error_streak == 1


def test_changed_credentials_make_an_unauthorized_account_usable_again() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b", chatgpt_account_id="acct")
    a = account(pool, "a")
    pool.rate_limited(a, headers=headers(retry_after="100"), error=None)
    pool.unauthorized(a)
    assert a.state(clock.now) == "unusable"

    unchanged = reconfigure(
        pool,
        config_of(inline("a", chatgpt_account_id="acct"), inline("b", chatgpt_account_id="acct")),
    )
    assert unchanged.credentials == ()
    assert not a.usable

    changes = reconfigure(
        pool,
        config_of(
            inline("a", access_token="at-a-2", chatgpt_account_id="acct"),
            inline("b", chatgpt_account_id="acct"),
        ),
    )

    assert changes.credentials == ("a",)
    assert account(pool, "a") is a
    assert a.usable
    assert a.last_error is None
    assert a.credentials.access_token == "at-a-2"
    assert (a.refused, a.retry_at) == (None, 0.0)  # no longer tried as refused ones
    assert a.cooldown_until == NOW + 100  # the same upstream account: its rate limit stands
    assert a.state(clock.now) == "rate_limited"


def test_credentials_of_another_upstream_account_forget_what_was_learned() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", chatgpt_account_id="acct-1")
    a = account(pool, "a")
    pool.rate_limited(a, headers=headers(retry_after="100"), error=None)
    pool.observe_headers(a, headers(x_codex_primary_used_percent="80"))

    reconfigure(pool, config_of(inline("a", chatgpt_account_id="acct-2")))

    assert (a.cooldown_until, a.rate_limited_until, a.primary.used_percent) == (0, 0, 0)
    assert choose(pool) == "a"


def test_unreadable_new_credentials_leave_the_account_unusable(tmp_path: Path) -> None:
    pool = make_pool(FakeClock(), "a")
    missing = tmp_path / "auth.json"

    changes = reconfigure(pool, config_of({"name": "a", "auth_file": str(missing)}))

    a = account(pool, "a")
    assert changes.credentials == ("a",)
    assert not a.usable
    assert "file not found" in (a.last_error or "")
    assert choose(pool) is None


def test_unusable_auth_file_account_adopts_new_tokens_on_reload(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.json"
    write_auth(auth_file, "token-1")
    config = config_of({"name": "a", "auth_file": str(auth_file)})
    pool = Pool(config, clock=FakeClock())
    a = account(pool, "a")
    pool.unauthorized(a)

    assert reconfigure(pool, config).credentials == ()
    assert not a.usable
    write_auth(auth_file, "token-2")
    changes = reconfigure(pool, config)

    assert changes.credentials == ("a",)
    assert a.usable
    assert a.credentials.access_token == "token-2"


def write_auth(path: Path, access_token: str) -> None:
    tokens = {"access_token": access_token, "refresh_token": "rt", "account_id": "acct"}
    path.write_text(json.dumps({"tokens": tokens}))


def test_account_states() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "ok", "limited", "full", "cooling", "off", "bad")
    reconfigure(
        pool,
        config_of(
            *(inline(n) for n in ("ok", "limited", "full", "cooling", "bad")),
            inline("off", enabled=False),
        ),
    )
    pool.rate_limited(account(pool, "limited"), headers=headers(retry_after="9"), error=None)
    pool.observe_headers(
        account(pool, "full"),
        headers(x_codex_primary_used_percent="100", x_codex_primary_reset_at=str(NOW + 60)),
    )
    pool.failed(account(pool, "cooling"), "HTTP 503")
    pool.unauthorized(account(pool, "bad"))

    states = {a.name: a.state(clock.now) for a in pool.accounts}

    assert states == {
        "ok": "ok",
        "limited": "rate_limited",
        "full": "rate_limited",
        "cooling": "cooling_down",
        "off": "disabled",
        "bad": "unusable",
    }
    clock.now = NOW + 60
    assert [n for n in states if account(pool, n).state(clock.now) == "ok"] == [
        "ok",
        "limited",
        "full",
        "cooling",
    ]


def test_credentials_renewed_by_the_manager_are_read() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", chatgpt_account_id="acct")
    a = account(pool, "a")
    pool.failed(a, "HTTP 502")
    pool.unauthorized(a)

    a.live.credentials = Credentials(access_token="renewed", account_id="acct")  # a refresh

    assert a.usable
    assert a.credentials.access_token == "renewed"
    assert (a.last_error, a.error_streak) == (None, 1)  # the same identity: back-off stands
    a.live.credentials = Credentials()
    assert a.state(clock.now) == "unusable"
    assert a.last_error == "no usable credentials"


def test_renewed_credentials_of_another_upstream_account_forget_what_was_learned() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", chatgpt_account_id="acct-1")
    a = account(pool, "a")
    pool.rate_limited(a, headers=headers(retry_after="100"), error=None)

    a.live.credentials = Credentials(access_token="renewed", account_id="acct-2")  # a new login

    assert (a.cooldown_until, a.rate_limited_until, a.last_error) == (0, 0, "rate limited")
    assert choose(pool) == "a"


def test_affinity_keys_are_bounded_in_length_and_number() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a", "b", routing={"affinity_ttl_seconds": 60})
    a, b = pool.accounts
    long_key = "s" * 8192
    pool.remember_affinity(long_key, b)
    with pool.lease(b):  # b is busier: only affinity sends work there
        assert pool.choose(prefer=None, affinity_key=long_key, exclude=()) is b
        assert pool.choose(prefer=None, affinity_key="s" * 8191 + "t", exclude=()) is a
    for n in range(AFFINITY_CAPACITY + 100):
        pool.remember_affinity(f"{n:08d}" + "k" * 8184, a)
    entries = pool._affinity
    assert len(entries) == AFFINITY_CAPACITY
    assert max(len(key) for key in entries) <= AFFINITY_KEY_LENGTH


# -- codex.rate_limits events --------------------------------------------------------------


def rate_limits_event(used_percent: float, reset_at: float) -> dict[str, Any]:
    window = {"used_percent": used_percent, "window_minutes": 300, "reset_at": reset_at}
    return {"type": "codex.rate_limits", "rate_limits": {"primary": window}}


def test_a_repeated_rate_limits_event_teaches_nothing_until_headers_said_otherwise() -> None:
    clock = FakeClock()
    pool = make_pool(clock, "a")
    a = account(pool, "a")
    pool.observe_rate_limits(a, rate_limits_event(20, NOW + 3600))
    assert (a.primary.used_percent, a.learned.usage_at) == (20, NOW)

    clock.now += 10
    pool.observe_rate_limits(a, rate_limits_event(20, NOW + 3600))  # the same again
    assert a.learned.usage_at == NOW

    pool.observe_headers(a, headers(x_codex_primary_used_percent="60"))
    assert (a.primary.used_percent, a.learned.usage_at) == (60, NOW + 10)

    clock.now += 10
    pool.observe_rate_limits(a, rate_limits_event(20, NOW + 3600))  # news after the headers
    assert (a.primary.used_percent, a.learned.usage_at) == (20, NOW + 20)
    pool.observe_rate_limits(a, rate_limits_event(30, NOW + 3600))
    assert a.primary.used_percent == 30
