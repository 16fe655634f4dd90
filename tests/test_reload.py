"""Live reload of the TOML file (SPEC S6): codexlb on loopback, reading a real file on disk,
in front of the fake upstream; SIGHUP against a real ``codexlb serve`` child process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from codexlb.app import RELOADER, make_runner
from codexlb.config import load_config
from codexlb.pool import Account
from codexlb.reload import Reloader
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    ADMIN_KEY,
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    config_data,
    eventually,
    start_child,
    stream_turn,
    user_message,
    write_toml,
)

RELOAD_TIMEOUT = 5.0
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
"""Bound on how long a change may take to be applied (the watch polls about once a second)."""


@dataclass
class Live:
    """codexlb serving from a configuration file, with the reloader that watches it."""

    balancer: Balancer
    reloader: Reloader
    path: Path
    data: dict[str, Any]

    @property
    def url(self) -> str:
        return self.balancer.url

    def account(self, name: str) -> Account:
        found = self.balancer.services.pool.get(name)
        assert found is not None, name
        return found

    def rewrite(self, edit: Callable[[dict[str, Any]], None]) -> int:
        """Apply ``edit`` to the file's data and write it; returns the reload to wait for."""
        edit(self.data)
        write_toml(self.path, self.data)
        return self.reloader.generation + 1

    async def reloaded(self, generation: int) -> None:
        async with asyncio.timeout(RELOAD_TIMEOUT):
            await self.reloader.wait_generation(generation)


@asynccontextmanager
async def serve_file(
    fake: Fake, tmp_path: Path, *, enabled: dict[str, bool], watch_interval: float = 0.2
) -> AsyncIterator[Live]:
    data = config_data(
        fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}", admin={"key": ADMIN_KEY}
    )
    data["accounts"] = [a for a in data["accounts"] if a["name"] in enabled]
    for entry in data["accounts"]:
        entry["enabled"] = enabled[entry["name"]]
    path = write_toml(tmp_path / "codexlb.toml", data)
    runner = make_runner(
        load_config(path), config_path=path, shutdown_timeout=5, watch_interval=watch_interval
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        balancer = Balancer(f"http://{host}:{port}", runner.app)
        yield Live(balancer, runner.app[RELOADER], path, data)
    finally:
        await runner.cleanup()


def accounts_of(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from data["accounts"]


def set_enabled(**enabled: bool) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for entry in accounts_of(data):
            if entry["name"] in enabled:
                entry["enabled"] = enabled[entry["name"]]

    return edit


async def served_by(fake: Fake, http: aiohttp.ClientSession, url: str, text: str) -> str | None:
    """Send one new conversation; the account that completed it."""
    result = await stream_turn(http, url, {"input": [user_message(text)]})
    assert result.status == 200, result.events
    assert result.response_id
    return fake.received[-1].account


async def account_metrics(http: aiohttp.ClientSession, url: str, account: str) -> tuple[str, float]:
    """The state ``/metrics`` shows for ``account`` (the one state at 1), and its in-flight."""
    async with http.get(url + "/metrics", headers=ADMIN) as response:
        assert response.status == 200
        text = await response.text()
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("account") == account
    ]
    [state] = [
        s.labels["state"] for s in samples if s.name == "codexlb_account_state" and s.value == 1
    ]
    [inflight] = [s.value for s in samples if s.name == "codexlb_account_inflight"]
    return state, inflight


async def test_appended_account_takes_new_requests_within_seconds(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serve_file(
        fake, tmp_path, enabled={"a": True, "b": True}, watch_interval=1.0
    ) as live:
        a, b = live.account("a"), live.account("b")
        assert await served_by(fake, http, live.url, "before") in {"a", "b"}

        def append_c_only(data: dict[str, Any]) -> None:
            set_enabled(a=False, b=False)(data)
            data["accounts"].append(
                {"name": "c", "access_token": "tok-c", "chatgpt_account_id": "acct-c"}
            )

        await live.reloaded(live.rewrite(append_c_only))

        served = [await served_by(fake, http, live.url, f"after {n}") for n in range(4)]
        assert served == ["c"] * 4
        assert (live.account("a"), live.account("b")) == (a, b)  # the same objects: state kept


@pytest.mark.parametrize("how", ["removed", "disabled"])
async def test_account_taken_out_finishes_its_request_and_takes_no_new_work(
    how: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serve_file(fake, tmp_path, enabled={"a": True, "b": False}) as live:
        a = live.account("a")
        fake.script(Fault.stall_after(3), account="a")
        async with http.post(
            live.url + CODEX_PATH,
            json={"model": "m", "input": "long", "stream": True},
            headers=auth(),
        ) as stalled:
            await stalled.content.readuntil(b"response.output_item.added")
            assert a.inflight == 1

            def take_a_out(data: dict[str, Any]) -> None:
                set_enabled(b=True)(data)
                if how == "removed":
                    data["accounts"] = [e for e in data["accounts"] if e["name"] != "a"]
                else:
                    set_enabled(a=False)(data)

            await live.reloaded(live.rewrite(take_a_out))

            pool = live.balancer.services.pool
            if how == "removed":
                assert pool.get("a") is None
                assert pool.draining == [a]
            else:
                assert pool.get("a") is a
            assert a.inflight == 1
            async with http.get(live.url + "/status", headers=ADMIN) as response:
                [shown] = [e for e in (await response.json())["accounts"] if e["name"] == "a"]
            expected = ("draining", True) if how == "removed" else ("disabled", False)
            assert (shown["state"], shown["removed"], shown["inflight"]) == (*expected, 1)
            assert await account_metrics(http, live.url, "a") == (expected[0], 1.0)
            served = [await served_by(fake, http, live.url, f"new {n}") for n in range(3)]
            assert served == ["b"] * 3
            assert len(fake.requests_for("a")) == 1
            assert not stalled.content.is_eof()  # the reload did not cut it
            assert fake.disconnects == 0
            stalled.close()

        await fake.wait_until(lambda: fake.disconnects == 1, timeout=10)
        assert a.inflight == 0
        assert pool.draining == []


async def test_cooldown_of_an_unchanged_account_survives_a_reload(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serve_file(fake, tmp_path, enabled={"a": True, "b": True}) as live:
        fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=600))
        assert await served_by(fake, http, live.url, "first") is not None
        limited = live.account(str(fake.received[0].account))
        other = "b" if limited.name == "a" else "a"
        cooldown = limited.cooldown_until
        assert cooldown > 0

        def reweigh_and_add(data: dict[str, Any]) -> None:
            for entry in accounts_of(data):
                entry["weight"] = 2
            data["accounts"].append(
                {"name": "c", "access_token": "tok-c", "chatgpt_account_id": "acct-c"}
            )

        await live.reloaded(live.rewrite(reweigh_and_add))

        assert live.account(limited.name) is limited
        assert limited.cooldown_until == cooldown
        assert limited.config.weight == 2
        served = {await served_by(fake, http, live.url, f"after {n}") for n in range(6)}
        assert served <= {other, "c"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('\n[[accounts]]\nnmae = "d"\napi_key = "sk-d"\n', "accounts[2].nmae"),
        ("\n[[accounts]\n", "invalid TOML"),
    ],
    ids=["validation", "syntax"],
)
async def test_invalid_edit_keeps_the_old_pool_and_logs_one_line(
    text: str,
    expected: str,
    fake: Fake,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve_file(fake, tmp_path, enabled={"a": True, "b": True}) as live:
        pool = live.balancer.services.pool
        before = pool.accounts
        generation = live.reloader.generation + 1
        with live.path.open("a") as f:
            f.write(text)

        await live.reloaded(generation)

        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        line = errors[0].getMessage()
        assert "\n" not in line
        assert str(live.path) in line
        assert expected in line
        assert pool.accounts == before
        assert await served_by(fake, http, live.url, "still serving") in {"a", "b"}

        await live.reloaded(live.rewrite(set_enabled(a=False)))  # a fixed file applies again
        assert await served_by(fake, http, live.url, "fixed") == "b"
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_restart_only_settings_are_reported_and_kept(
    fake: Fake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_file(fake, tmp_path, enabled={"a": True}) as live:
        started = live.balancer.services.config

        def edit(data: dict[str, Any]) -> None:
            data["server"]["port"] = 1
            data["routing"]["max_attempts"] = 7

        await live.reloaded(live.rewrite(edit))

    assert live.balancer.services.pool.routing.max_attempts == 7
    assert live.balancer.services.config is started
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("server.port " in w and "restart" in w and str(live.path) in w for w in warnings)


async def test_sighup_reloads_a_child_server_at_once(fake: Fake, tmp_path: Path) -> None:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    set_enabled(a=True, b=False, c=False)(data)
    path = write_toml(tmp_path / "codexlb.toml", data)
    before = os.stat(path)
    server = await start_child(path)
    try:
        async with aiohttp.ClientSession() as http:
            assert await served_by(fake, http, server.url, "before") == "a"
            # An edit the file watch cannot see (same size, inode and mtime): only SIGHUP can.
            set_enabled(a=False, b=True)(data)
            text = write_toml(tmp_path / "next.toml", data).read_text()
            assert len(text.encode()) == before.st_size
            path.write_text(text)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

            server.signal(signal.SIGHUP)

            await eventually(lambda: any("(SIGHUP)" in line for line in server.log))
            assert await served_by(fake, http, server.url, "after") == "b"
    finally:
        assert await server.stop() == 0
    assert not any("rejected" in line for line in server.log)
