"""The pool status view: ``GET /status`` over loopback and ``codexlb status`` against a child
server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.config import Config, ConfigError, load_config
from codexlb.pool import Pool
from codexlb.status import pool_status, render_table
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    ACCOUNTS,
    ADMIN_KEY,
    CLIENT_KEYS,
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    config_data,
    make_config,
    serve,
    start_child,
    stream_turn,
    user_message,
    write_toml,
)

PLATFORM_KEY = "sk-platform-secret-0123456789"
REFRESH_TOKEN = "rt-secret-0123456789"


def status_config(fake: Fake, tmp_path: Path, *, port: int = 0) -> dict[str, Any]:
    """The three fake accounts (at most one request each), plus two disabled accounts that
    carry the other kinds of secret: a platform key and a refresh token."""
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        upstream={"token_url": f"{fake.url}/oauth/token"},
        server={"port": port},
        admin={"key": ADMIN_KEY},
    )
    for entry in data["accounts"]:
        entry["max_inflight"] = 1
    data["accounts"] += [
        {"name": "p", "api_key": PLATFORM_KEY, "base_url": f"{fake.url}/v1", "enabled": False},
        {
            "name": "r",
            "access_token": "tok-secret-r-0123456789",
            "refresh_token": REFRESH_TOKEN,
            "chatgpt_account_id": "acct-r",
            "enabled": False,
        },
    ]
    return data


def secrets_of(data: dict[str, Any]) -> list[str]:
    secrets = [key["key"] for key in data["api_keys"]] + [data["admin"]["key"]]
    for entry in data["accounts"]:
        secrets += [entry[k] for k in ("access_token", "refresh_token", "api_key") if k in entry]
    assert len(secrets) == len(CLIENT_KEYS) + 1 + len(ACCOUNTS) + 3
    return secrets


@pytest.fixture
async def lb_status(fake: Fake, tmp_path: Path) -> AsyncIterator[tuple[Balancer, dict[str, Any]]]:
    data = status_config(fake, tmp_path)
    async with serve(make_config(data, tmp_path)) as balancer:
        yield balancer, data


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def get_status(http: aiohttp.ClientSession, url: str) -> tuple[dict[str, Any], str]:
    async with http.get(url + "/status", headers=ADMIN) as response:
        assert response.status == 200
        text = await response.text()
    return json.loads(text), text


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in status["accounts"]}


async def test_status_after_a_429_and_a_401(
    lb_status: tuple[Balancer, dict[str, Any]], fake: Fake, http: aiohttp.ClientSession
) -> None:
    lb, data = lb_status
    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=600))
    first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
    assert first.status == 200
    limited = fake.received[0].account
    fake.script(Fault.status(401))
    second = await stream_turn(http, lb.url, {"input": [user_message("two")]})
    assert second.status == 200
    refused = fake.received[2].account
    [healthy] = {"a", "b", "c"} - {limited, refused}

    status, text = await get_status(http, lb.url)

    accounts = by_name(status)
    assert [e["name"] for e in status["accounts"]] == ["a", "b", "c", "p", "r"]
    assert status["strategy"] == "least_used"
    rate_limited = accounts[str(limited)]
    assert rate_limited["state"] == "rate_limited"
    assert rate_limited["usable"] is True
    assert rate_limited["last_error"] == "rate limited"
    until = datetime.fromisoformat(rate_limited["cooldown_until"])
    now = datetime.fromisoformat(status["time"])
    assert 590 <= (until - now).total_seconds() <= 610
    assert rate_limited["usage"]["primary"]["used_percent"] == 100.0
    assert rate_limited["usage"]["primary"]["resets_at"] is not None
    unusable = accounts[str(refused)]
    assert (unusable["state"], unusable["usable"]) == ("unusable", False)
    assert unusable["last_error"] == "unauthorized"
    assert unusable["cooldown_until"] is None
    ok = accounts[healthy]
    assert (ok["state"], ok["last_error"], ok["cooldown_until"]) == ("ok", None, None)
    assert accounts["p"]["kind"] == "platform"
    assert (accounts["p"]["state"], accounts["p"]["enabled"]) == ("disabled", False)
    assert accounts["r"]["kind"] == "chatgpt"
    for entry in status["accounts"]:
        assert (entry["inflight"], entry["weight"], entry["removed"]) == (0, 1.0, False)
    assert [accounts[n]["max_inflight"] for n in "abcpr"] == [1, 1, 1, 0, 0]
    for secret in secrets_of(data):
        assert secret not in text


async def test_status_counts_requests_in_flight(
    lb_status: tuple[Balancer, dict[str, Any]], fake: Fake, http: aiohttp.ClientSession
) -> None:
    lb, _ = lb_status
    fake.script(Fault.stall_after(3))
    async with http.post(
        lb.url + CODEX_PATH,
        json={"model": "m", "input": "hi", "stream": True},
        headers=auth(),
    ) as stalled:
        await stalled.content.readuntil(b"response.output_item.added")
        busy = fake.received[0].account

        status, _ = await get_status(http, lb.url)

        accounts = by_name(status)
        assert (accounts[str(busy)]["inflight"], accounts[str(busy)]["state"]) == (1, "busy")
        assert sum(e["inflight"] for e in status["accounts"]) == 1
        stalled.close()
    await fake.wait_until(lambda: fake.disconnects == 1, timeout=10)
    status, _ = await get_status(http, lb.url)
    assert {e["state"] for e in status["accounts"][:3]} == {"ok"}


async def test_status_needs_the_admin_key(
    lb_status: tuple[Balancer, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    lb, _ = lb_status
    for headers in ({}, {"Authorization": "Bearer sk-lb-wrong"}, auth()):
        async with http.get(lb.url + "/status", headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"


def test_pool_status_of_every_kind_of_credentials(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"OPENAI_API_KEY": "sk-from-auth-file-0123"}))
    config = Config.model_validate(
        {
            "accounts": [
                {"name": "chat", "access_token": "at-secret", "refresh_token": "rt-secret"},
                {"name": "key", "api_key": "sk-inline-secret", "weight": 2.5},
                {"name": "file", "auth_file": str(auth_file)},
                {"name": "gone", "auth_file": str(tmp_path / "missing.json")},
            ]
        }
    )

    status = pool_status(Pool(config, clock=lambda: 1_750_000_000.0))

    assert status["time"] == "2025-06-15T15:06:40Z"
    kinds = {e["name"]: (e["kind"], e["state"], e["weight"]) for e in status["accounts"]}
    assert kinds == {
        "chat": ("chatgpt", "ok", 1.0),
        "key": ("platform", "ok", 2.5),
        "file": ("platform", "ok", 1.0),
        "gone": ("chatgpt", "unusable", 1.0),
    }
    assert "file not found" in by_name(status)["gone"]["last_error"]
    text = json.dumps(status)
    for secret in ("at-secret", "rt-secret", "sk-inline-secret", "sk-from-auth-file-0123"):
        assert secret not in text


def test_render_table() -> None:
    status = {
        "time": "2025-06-15T15:06:40Z",
        "strategy": "least_used",
        "accounts": [
            {
                "name": "work-1",
                "kind": "chatgpt",
                "state": "rate_limited",
                "inflight": 2,
                "max_inflight": 4,
                "weight": 1.0,
                "usage": {
                    "primary": {"used_percent": 100.0, "resets_at": "2025-06-15T16:00:00Z"},
                    "secondary": {"used_percent": 12.5, "resets_at": None},
                },
                "cooldown_until": "2025-06-15T16:00:00Z",
                "last_error": "rate limited",
            },
            {
                "name": "k",
                "kind": "platform",
                "state": "ok",
                "inflight": 0,
                "max_inflight": 0,
                "weight": 2.5,
                "usage": {"primary": None, "secondary": None},
                "cooldown_until": None,
                "last_error": None,
            },
        ],
    }

    lines = render_table(status).splitlines()

    assert lines[0].split() == [
        "ACCOUNT",
        "KIND",
        "STATE",
        "INFLIGHT",
        "WEIGHT",
        "PRIMARY",
        "SECONDARY",
        "COOLDOWN",
        "UNTIL",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split()[:6] == ["work-1", "chatgpt", "rate_limited", "2/4", "1", "100%"]
    assert "12.5%" in lines[1]
    assert lines[1].endswith("rate limited")
    assert lines[2].split() == ["k", "platform", "ok", "0/-", "2.5", "-", "-", "-", "-"]
    assert lines[0].index("STATE") == lines[1].index("rate_limited") == lines[2].index("ok")
    assert lines[3] == "strategy least_used, as of 2025-06-15T15:06:40Z"
    assert render_table({"accounts": []}).splitlines()[1] == "(no accounts)"


async def codexlb(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codexlb",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_status_command_prints_the_table_of_a_running_server(
    fake: Fake, tmp_path: Path, unused_tcp_port: int
) -> None:
    data = status_config(fake, tmp_path, port=unused_tcp_port)
    path = write_toml(tmp_path / "codexlb.toml", data)
    server = await start_child(path)
    try:
        env = {"CODEXLB_ADMIN_KEY": ADMIN_KEY}
        code, out, err = await codexlb("status", "--config", str(path), env=env)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("ACCOUNT")
        rows = {line.split()[0]: line.split()[1:3] for line in lines[1:-1]}
        assert rows == {
            "a": ["chatgpt", "ok"],
            "b": ["chatgpt", "ok"],
            "c": ["chatgpt", "ok"],
            "p": ["platform", "disabled"],
            "r": ["chatgpt", "disabled"],
        }
        for secret in secrets_of(data):
            assert secret not in out + err

        for wrong in ("sk-lb-nope", CLIENT_KEYS["alice"]):
            code, out, err = await codexlb("status", "--url", server.url, "--key", wrong, "--json")
            assert (code, out) == (1, "")
            assert "401" in err

        key = ADMIN_KEY
        code, out, err = await codexlb("status", "--url", server.url, "--key", key, "--json")
        assert code == 0, err
        assert [e["name"] for e in json.loads(out)["accounts"]] == ["a", "b", "c", "p", "r"]
    finally:
        assert await server.stop() == 0
    code, _, err = await codexlb("status", "--url", server.url, "--key", "x")
    assert code == 1
    assert "cannot get the status" in err


async def test_status_command_reads_only_the_server_section(
    lb_status: tuple[Balancer, dict[str, Any]], tmp_path: Path
) -> None:
    """The operator's shell lacks the server's secrets: ``status`` needs only host and port."""
    lb, _ = lb_status
    unset = "CODEXLB_TEST_NEVER_SET_0123"
    assert unset not in os.environ
    host, port = lb.url.removeprefix("http://").rsplit(":", 1)
    path = tmp_path / "server.toml"
    path.write_text(
        f'[server]\nhost = "{host}"\nport = {port}\n\n'
        f'[[accounts]]\nname = "env"\naccess_token = "env:{unset}"\n\n'
        f'[[accounts]]\nname = "file"\nauth_file = "{tmp_path / "unreadable"}"\n\n'
        '[database]\nurl = "env:CODEXLB_TEST_NEVER_SET_0123"\n'
    )
    with pytest.raises(ConfigError, match=unset):
        load_config(path)  # what the server itself would say about this file

    env = {"CODEXLB_ADMIN_KEY": ADMIN_KEY}
    code, out, err = await codexlb("status", "--config", str(path), "--json", env=env)

    assert code == 0, err
    assert [e["name"] for e in json.loads(out)["accounts"]] == ["a", "b", "c", "p", "r"]


async def test_status_command_names_the_file_and_key_of_a_bad_server_section(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = "high"\nhots = "127.0.0.1"\n')

    code, out, err = await codexlb("status", "--config", str(path))

    assert (code, out) == (1, "")
    assert f"{path}: server.port: " in err
    assert f"{path}: server.hots: " in err
