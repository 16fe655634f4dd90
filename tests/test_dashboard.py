"""The dashboard's server side (S10): the page and its files, login sessions, the limit on
wrong keys, and the JSON under ``/admin/``, over loopback; the recorder and the session and
limiter tables on their own, on a clock of the test's."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import time
import tomllib
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb import activity, dashboard
from codexlb.activity import Activity, FinishedRequest, outcome_of
from codexlb.dashboard import LoginLimiter, Sessions, TooManyLogins
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    ADMIN_KEY,
    CLIENT_KEYS,
    Balancer,
    Fake,
    auth,
    config_data,
    make_config,
    serve,
    stream_turn,
    user_message,
    ws_events,
    ws_turn,
    ws_url,
)
from tests.test_status import secrets_of, status_config

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def lb_admin(fake: Fake, tmp_path: Path) -> AsyncIterator[tuple[Balancer, dict[str, Any]]]:
    """codexlb with an admin key, the three fake accounts and two disabled ones carrying a
    platform key and a refresh token (``test_status.status_config``)."""
    data = status_config(fake, tmp_path)
    async with serve(make_config(data, tmp_path)) as balancer:
        yield balancer, data


def origin(lb: Balancer) -> dict[str, str]:
    return {"Origin": lb.url}


async def login(
    http: aiohttp.ClientSession, lb: Balancer, key: str = ADMIN_KEY, **kwargs: Any
) -> aiohttp.ClientResponse:
    headers = kwargs.pop("headers", origin(lb))
    async with http.post(
        lb.url + "/admin/login", json={"key": key}, headers=headers, **kwargs
    ) as response:
        await response.read()
        return response


def session_cookie(response: aiohttp.ClientResponse) -> SimpleCookie:
    cookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie"):
        cookie.load(header)
    return cookie


# --- the page --------------------------------------------------------------------------------


async def test_the_page_and_its_files_come_from_codexlb_alone(
    lb_admin: tuple[Balancer, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    lb, _ = lb_admin
    async with http.get(lb.url + "/dashboard") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    files = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(files) == ["/dashboard/dashboard.css", "/dashboard/dashboard.js"]
    for path, kind in zip(files, ["text/css", "text/javascript"], strict=True):
        async with http.get(lb.url + path) as response:
            assert (response.status, response.content_type) == (200, kind)
            text = await response.text()
        # No address elsewhere: the only URL is the SVG namespace, a name, not a fetch.
        assert set(re.findall(r"https?://[^\s\"'`)]+", text)) <= {"http://www.w3.org/2000/svg"}
    assert "http" not in page.replace('content="light dark"', "")


def test_the_page_files_ship_as_package_data() -> None:
    """Each file of ``codexlb/web`` is served, and is named by pyproject's package data (an
    installed wheel holds it)."""
    web = Path(dashboard.__file__).parent / "web"
    shipped = sorted(f"web/{path.name}" for path in web.iterdir())
    assert sorted(f"web/{name}" for name, _ in dashboard.ASSETS.values()) == shipped
    pyproject = tomllib.loads((web.parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["codexlb"]
    for name in shipped:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


async def test_without_an_admin_key_the_views_name_the_setting(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    async with serve(make_config(data, tmp_path)) as lb:
        for path in ("/dashboard", "/admin/overview", "/admin/requests"):
            async with http.get(lb.url + path, headers=auth()) as response:
                assert response.status == 403, path
                assert "[admin] key" in (await response.json())["error"]["message"]
        response = await login(http, lb, CLIENT_KEYS["alice"])
        assert response.status == 403


async def test_open_access_opens_the_dashboard_too(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}", keys={})
    async with serve(make_config(data, tmp_path)) as lb:
        assert (await stream_turn(http, lb.url, {"input": "hi"})).status == 200
        async with http.get(lb.url + "/admin/overview") as response:
            assert response.status == 200
            keys = (await response.json())["keys"]
        assert [(k["name"], k["today"]["requests"]) for k in keys] == [("", 1)]
        async with http.get(lb.url + "/dashboard") as response:
            assert response.status == 200


# --- sessions -------------------------------------------------------------------------------


@pytest.fixture
async def browser_like() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that keeps cookies set by an IP address, as a browser does."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def test_login_opens_a_server_side_session_and_logout_ends_it(
    lb_admin: tuple[Balancer, dict[str, Any]], browser_like: aiohttp.ClientSession
) -> None:
    lb, _ = lb_admin
    http = browser_like
    async with http.get(lb.url + "/admin/overview") as response:
        assert response.status == 401
    response = await login(http, lb)
    assert response.status == 200
    [header] = response.headers.getall("Set-Cookie")
    cookie = session_cookie(response)[dashboard.COOKIE]
    assert len(cookie.value) >= 40  # 32 random bytes
    assert ADMIN_KEY not in header
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/"
    assert cookie["max-age"] == str(dashboard.SESSION_SECONDS)
    assert cookie["secure"] == ""  # plain http on loopback: a Secure cookie would be dropped
    stolen = {dashboard.COOKIE: cookie.value}

    async with aiohttp.ClientSession(cookies=stolen) as other:
        async with other.get(lb.url + "/admin/overview") as answer:
            assert answer.status == 200
        async with other.get(lb.url + "/admin/requests") as answer:
            assert answer.status == 200
        # /status and /metrics keep to the bearer token
        async with other.get(lb.url + "/status") as answer:
            assert answer.status == 401

    async with http.post(lb.url + "/admin/logout", headers=origin(lb)) as response:
        assert response.status == 200
        assert "Max-Age=0" in response.headers["Set-Cookie"]
    async with http.get(lb.url + "/admin/overview") as response:
        assert response.status == 401
    # The session is gone on the server: its id, kept by someone, opens nothing either.
    async with (
        aiohttp.ClientSession(cookies=stolen) as other,
        other.get(lb.url + "/admin/overview") as answer,
    ):
        assert answer.status == 401


async def test_a_random_cookie_opens_nothing(
    lb_admin: tuple[Balancer, dict[str, Any]],
) -> None:
    lb, _ = lb_admin
    for value in ("x", "0" * 43, ADMIN_KEY):
        async with (
            aiohttp.ClientSession(cookies={dashboard.COOKIE: value}) as other,
            other.get(lb.url + "/admin/overview") as answer,
        ):
            assert answer.status == 401


async def test_logging_in_and_out_takes_the_pages_own_origin(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = status_config(fake, tmp_path)
    data["server"]["allowed_origins"] = ["https://app.example"]
    async with serve(make_config(data, tmp_path)) as lb:
        for headers in ({}, {"Origin": "https://app.example"}, {"Origin": "null"}):
            response = await login(http, lb, headers=headers)
            assert response.status == 403, headers
            async with http.post(lb.url + "/admin/logout", headers=headers) as answer:
                assert answer.status == 403
        response = await login(http, lb, headers={"Origin": "https://evil.example"})
        assert response.status == 403  # the guard's own refusal
        # A form a foreign page could post cross-site without a preflight: not JSON.
        async with http.post(
            lb.url + "/admin/login",
            data=f"key={ADMIN_KEY}",
            headers={**origin(lb), "Content-Type": "application/x-www-form-urlencoded"},
        ) as answer:
            assert answer.status == 415
        # Behind a TLS proxy the page's origin is https, codexlb's own scheme http.
        https = lb.url.replace("http://", "https://")
        assert (await login(http, lb, headers={"Origin": https})).status == 200
        assert (await login(http, lb)).status == 200


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"key": 5}', b'{"key": "  "}', b'{"key": "' + b"k" * 5000 + b'"}'],
)
async def test_bad_login_bodies_are_refused_plainly(
    lb_admin: tuple[Balancer, dict[str, Any]], http: aiohttp.ClientSession, body: bytes
) -> None:
    lb, _ = lb_admin
    async with http.post(
        lb.url + "/admin/login",
        data=body,
        headers={**origin(lb), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_a_login_body_in_pieces_is_read_whole_and_a_stalled_one_times_out(
    lb_admin: tuple[Balancer, dict[str, Any]],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lb, _ = lb_admin
    body = json.dumps({"key": ADMIN_KEY}).encode()
    headers = {**origin(lb), "Content-Type": "application/json"}

    async def pieces(pause: float) -> AsyncIterator[bytes]:
        for start in range(0, len(body), 5):
            yield body[start : start + 5]
            await asyncio.sleep(pause)

    async with http.post(lb.url + "/admin/login", data=pieces(0.01), headers=headers) as answer:
        assert answer.status == 200
    monkeypatch.setattr(dashboard, "LOGIN_BODY_SECONDS", 0.2)
    async with http.post(lb.url + "/admin/login", data=pieces(1.0), headers=headers) as answer:
        assert answer.status == 408
        assert (await answer.json())["error"]["code"] == "request_timeout"


async def test_wrong_keys_are_refused_then_limited_per_address(
    lb_admin: tuple[Balancer, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    lb, _ = lb_admin
    wrong = [CLIENT_KEYS["alice"], "guess-1", "guess-2"]
    for key in wrong:
        response = await login(http, lb, key)
        assert response.status == 401
        assert "Set-Cookie" not in response.headers
    for _ in range(dashboard.LOGIN_FAILURES - len(wrong)):  # a bearer token counts as well
        async with http.get(lb.url + "/admin/overview", headers=auth("bob")) as answer:
            assert answer.status == 401
    for key in ("guess-3", ADMIN_KEY):  # even the right key, while the address is refused
        async with http.post(
            lb.url + "/admin/login", json={"key": key}, headers=origin(lb)
        ) as response:
            assert response.status == 429
            body = await response.json()
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(response.headers["Retry-After"]) <= dashboard.LOGIN_WINDOW_SECONDS
    async with http.get(lb.url + "/admin/overview", headers=ADMIN) as response:
        assert response.status == 429
    # Another address is not concerned.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as elsewhere:
        async with elsewhere.get(lb.url + "/admin/overview", headers=ADMIN) as response:
            assert response.status == 200
        assert (await login(elsewhere, lb)).status == 200


def test_the_limiter_forgets_failures_outside_its_window() -> None:
    now = [1000.0]
    limiter = LoginLimiter(clock=lambda: now[0])
    for _ in range(dashboard.LOGIN_FAILURES):
        limiter.check("a")
        limiter.failed("a")
        now[0] += 1
    with pytest.raises(TooManyLogins) as refused:
        limiter.check("a")
    assert refused.value.headers() == {"Retry-After": str(int(dashboard.LOGIN_WINDOW_SECONDS) - 5)}
    limiter.check("b")
    now[0] += dashboard.LOGIN_WINDOW_SECONDS - 5
    limiter.check("a")  # the first failure left the window
    limiter.failed("a")
    with pytest.raises(TooManyLogins):
        limiter.check("a")
    limiter.succeeded("a")
    limiter.check("a")


def test_the_limiter_holds_a_bounded_number_of_addresses() -> None:
    limiter = LoginLimiter(clock=lambda: 5.0)
    for n in range(dashboard.ADDRESSES_CAP + 10):
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter._failures) == dashboard.ADDRESSES_CAP


def test_sessions_expire_and_are_bounded() -> None:
    now = [0.0]
    sessions = Sessions(clock=lambda: now[0])
    first = sessions.open()
    assert sessions.valid(first)
    assert not sessions.valid(None)
    assert not sessions.valid(first + "x")
    now[0] += dashboard.SESSION_SECONDS - 1
    assert sessions.valid(first)
    now[0] += 1
    assert not sessions.valid(first)
    opened = [sessions.open() for _ in range(dashboard.SESSIONS_CAP + 1)]
    assert not sessions.valid(opened[0])
    assert all(sessions.valid(s) for s in opened[1:])
    sessions.close(opened[1])
    assert not sessions.valid(opened[1])


# --- what the JSON says -------------------------------------------------------------------


async def test_overview_and_requests_after_a_rate_limited_account(
    lb_admin: tuple[Balancer, dict[str, Any]], fake: Fake, http: aiohttp.ClientSession
) -> None:
    lb, data = lb_admin
    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=600))
    first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
    assert first.status == 200
    limited = str(fake.received[0].account)
    served = str(fake.received[1].account)
    second = await stream_turn(http, lb.url, {"input": [user_message("two")]}, client="bob")
    assert second.status == 200
    bad_body = {**auth(), "Content-Type": "application/json"}
    async with http.post(lb.url + "/backend-api/codex/responses", data=b"{", headers=bad_body) as r:
        assert r.status == 400

    async with http.get(lb.url + "/admin/overview", headers=ADMIN) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        overview_text = await response.text()
    overview = json.loads(overview_text)
    accounts = {a["name"]: a for a in overview["accounts"]}
    assert list(accounts) == ["a", "b", "c", "p", "r"]
    assert accounts[limited]["state"] == "rate_limited"
    assert accounts[limited]["hour"] == {"requests": 1, "errors": 1}
    assert accounts[limited]["cooldown_until"] is not None
    assert accounts[served]["hour"]["requests"] >= 1
    assert accounts[served]["hour"]["errors"] == 0
    assert accounts[served]["usage"]["primary"]["resets_at"] is not None
    keys = {k["name"]: k for k in overview["keys"]}
    assert list(keys) == ["alice", "bob"]
    assert keys["alice"]["today"]["requests"] == 2  # the turn and the bad body
    assert keys["bob"]["week"]["requests"] == 1
    assert keys["alice"]["today"]["tokens"] > 0
    assert keys["alice"]["today"]["tokens"] == (
        keys["alice"]["today"]["input_tokens"] + keys["alice"]["today"]["output_tokens"]
    )
    assert keys["alice"]["limits"] == []
    minutes = overview["minutes"]
    assert len(minutes) == activity.HOUR_MINUTES
    assert sum(m["ok"] for m in minutes) == 2
    assert sum(m["client_error"] for m in minutes) == 1
    assert minutes[-1]["ttfb_p50_ms"] is not None or minutes[-2]["ttfb_p50_ms"] is not None

    async with http.get(lb.url + "/admin/requests", headers=ADMIN) as response:
        requests_text = await response.text()
    recent = json.loads(requests_text)
    assert [(r["key"], r["status"]) for r in recent["requests"]] == [
        ("alice", 400),
        ("bob", 200),
        ("alice", 200),
    ]
    turn = recent["requests"][2]
    assert (turn["account"], turn["attempts"], turn["transport"]) == (served, 2, "http")
    assert turn["input_tokens"] > 0
    assert turn["ttfb_ms"] <= turn["duration_ms"]
    assert recent["choices"]["keys"] == ["alice", "bob"]
    assert recent["choices"]["statuses"] == ["200", "400"]

    async def listed(query: str) -> list[tuple[str, int]]:
        async with http.get(lb.url + "/admin/requests?" + query, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            return [(r["key"], r["status"]) for r in (await response.json())["requests"]]

    assert await listed("key=bob") == [("bob", 200)]
    assert await listed(f"account={served}&key=alice") == [("alice", 200)]
    assert await listed("status=4xx") == [("alice", 400)]
    assert await listed("status=error") == [("alice", 400)]
    assert await listed("status=200") == [("bob", 200), ("alice", 200)]
    assert await listed("limit=1") == [("alice", 400)]
    assert await listed("key=nobody") == []
    async with http.get(lb.url + "/admin/requests?limit=x", headers=ADMIN) as response:
        assert response.status == 400

    for secret in secrets_of(data):
        assert secret not in overview_text
        assert secret not in requests_text


async def test_websocket_turns_are_listed_like_http_ones(
    lb_admin: tuple[Balancer, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    lb, _ = lb_admin
    async with http.ws_connect(ws_url(lb.url), headers=auth("bob")) as ws:
        events = await ws_turn(ws, {"input": [user_message("over a socket")]})
        assert events[-1]["type"] == "response.completed"
        await ws.send_str("not json")
        assert (await ws_events(ws))[-1]["type"] == "error"
    async with http.get(lb.url + "/admin/requests", headers=ADMIN) as response:
        listed = (await response.json())["requests"]
    assert [(r["key"], r["transport"], r["status"]) for r in listed] == [("bob", "ws", 200)]
    assert listed[0]["output_tokens"] > 0


async def test_client_keys_never_open_the_admin_views(
    lb_admin: tuple[Balancer, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    lb, _ = lb_admin
    for path in ("/admin/overview", "/admin/requests"):
        async with http.get(lb.url + path, headers=auth()) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
        async with http.get(lb.url + path) as response:
            assert response.status == 401


# --- the recorder -------------------------------------------------------------------------


def finished(when: float, **fields: Any) -> FinishedRequest:
    values: dict[str, Any] = {
        "time": when,
        "key": "alice",
        "account": "a",
        "route": "responses",
        "transport": "http",
        "attempts": 1,
        "status": 200,
        "ttfb_ms": 100.0,
        "duration_ms": 300.0,
        "input_tokens": 10,
        "output_tokens": 5,
    }
    values.update(fields)
    return FinishedRequest(**values)


def test_outcomes() -> None:
    assert [outcome_of(s) for s in (0, 200, 400, 404, 429, 500, 502)] == [
        "cancelled",
        "ok",
        "client_error",
        "client_error",
        "rate_limited",
        "server_error",
        "server_error",
    ]


def test_the_hour_is_sixty_minutes_and_forgets_older_ones() -> None:
    now = [86400.0 * 100 + 30]
    recorder = Activity(clock=lambda: now[0])
    for ttfb in (10.0, 20.0, 400.0):
        recorder.request(finished(now[0], ttfb_ms=ttfb))
    recorder.request(finished(now[0], status=429, ttfb_ms=None))
    recorder.attempt("a", "ok")
    recorder.attempt("a", "rate_limited")
    hour = recorder.hour()
    assert len(hour) == 60
    assert (hour[-1]["ok"], hour[-1]["rate_limited"]) == (3, 1)
    assert 20 / 1.2 <= hour[-1]["ttfb_p50_ms"] <= 20 * 1.2
    assert hour[-2]["ttfb_p50_ms"] is None
    assert recorder.account_hour() == {"a": (2, 1)}

    now[0] += 59 * 60
    assert recorder.hour()[0]["ok"] == 3  # still the first minute of the hour
    assert recorder.account_hour() == {"a": (2, 1)}
    now[0] += 60
    assert sum(m["ok"] for m in recorder.hour()) == 0
    assert recorder.account_hour() == {}
    recorder.request(finished(now[0]))  # takes over the slot of the minute an hour ago
    assert sum(m["ok"] for m in recorder.hour()) == 1


def test_the_median_time_to_first_byte_is_close() -> None:
    recorder = Activity(clock=lambda: 600.0)
    values = [1.0, 5.0, 50.0, 120.0, 700.0, 3000.0, 90000.0, 500000.0, 0.2]
    for value in values:
        recorder.request(finished(600.0, ttfb_ms=value))
    median = sorted(values)[len(values) // 2]
    p50 = recorder.hour()[-1]["ttfb_p50_ms"]
    assert median / 1.1 <= p50 <= median * 1.1


def test_keys_count_today_and_seven_days() -> None:
    day = 86400.0
    now = [day * 200 + 3600]
    recorder = Activity(clock=lambda: now[0])
    recorder.request(finished(now[0] - 7 * day))  # eight days ago, counting today
    recorder.request(finished(now[0] - 6 * day, input_tokens=100))
    recorder.request(finished(now[0] - 3600 - 1, output_tokens=7))  # yesterday, 23:59:59
    recorder.request(finished(now[0], input_tokens=None, output_tokens=None))
    recorder.request(finished(now[0], key="bob"))
    usage = recorder.key_usage(["carol", "alice"])
    assert list(usage) == ["carol", "alice", "bob"]
    assert usage["carol"]["week"] == {
        "requests": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "tokens": 0,
    }
    assert usage["alice"]["today"] == {
        "requests": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "tokens": 0,
    }
    assert usage["alice"]["week"] == {
        "requests": 3,
        "input_tokens": 110,
        "output_tokens": 12,
        "tokens": 122,
    }
    assert usage["bob"]["today"]["tokens"] == 15


def test_the_recent_list_is_bounded_and_filtered() -> None:
    recorder = Activity(clock=lambda: 1000.0)
    for n in range(activity.RECENT_REQUESTS + 50):
        recorder.request(
            finished(1000.0, key=f"k{n % 3}", status=(200, 429, 502)[n % 3], attempts=n)
        )
    everything = recorder.recent()
    assert len(everything) == activity.RECENT_REQUESTS
    assert everything[0].attempts == activity.RECENT_REQUESTS + 49  # newest first
    assert {f.status for f in recorder.recent(status="rate_limited")} == {429}
    assert {f.status for f in recorder.recent(status="5xx")} == {502}
    assert {f.status for f in recorder.recent(status="error")} == {429, 502}
    assert {f.key for f in recorder.recent(key="k1")} == {"k1"}
    assert recorder.recent(account="nobody") == []
    assert len(recorder.recent(limit=7)) == 7
    assert recorder.recent_names() == {
        "keys": ["k0", "k1", "k2"],
        "accounts": ["a"],
        "statuses": ["200", "429", "502"],
    }


async def test_a_keys_limits_show_as_bars_of_what_it_used(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = status_config(fake, tmp_path)
    for entry in data["api_keys"]:
        if entry["name"] == "alice":
            entry.update(tokens_per_5h=100_000, requests_per_minute=60)
    async with serve(make_config(data, tmp_path)) as lb:
        result = await stream_turn(http, lb.url, {"input": [user_message("hello")]})
        assert result.status == 200
        usage = result.completed["usage"]
        async with http.get(lb.url + "/admin/overview", headers=ADMIN) as response:
            keys = {k["name"]: k for k in (await response.json())["keys"]}
    limits = {limit["name"]: limit for limit in keys["alice"]["limits"]}
    assert list(limits) == ["requests_per_minute", "tokens_per_5h"]
    assert (limits["requests_per_minute"]["used"], limits["requests_per_minute"]["limit"]) == (
        1,
        60,
    )
    spent = usage["input_tokens"] + usage["output_tokens"]
    assert (limits["tokens_per_5h"]["used"], limits["tokens_per_5h"]["limit"]) == (spent, 100_000)
    # when the turn's tokens leave the window
    assert time.time() + 4.9 * 3600 < limits["tokens_per_5h"]["resets_at"] <= time.time() + 18060
    assert keys["bob"]["limits"] == []
