"""No configured secret ever appears in a log line, an error, the metrics or check-config."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from codexlb.testing.fake_upstream import FakeAccount, Fault
from tests.harness import (
    Fake,
    config_data,
    make_config,
    running_fake,
    serve,
    stream_turn,
    user_message,
    write_toml,
    ws_turn,
    ws_url,
)

ACCOUNTS = (
    FakeAccount("a", access_token="at-secret-aaaaaaaaaaaaaaaa", chatgpt_account_id="acct-a"),
    FakeAccount("b", access_token="at-secret-bbbbbbbbbbbbbbbb", chatgpt_account_id="acct-b"),
)
KEYS = {"alice": "sk-lb-secret-alice-123456", "bob": "sk-lb-secret-bob-654321"}
SECRETS = [a.access_token for a in ACCOUNTS if a.access_token] + list(KEYS.values())


@pytest.fixture
async def secret_fake() -> AsyncIterator[Fake]:
    async with running_fake(ACCOUNTS) as fake:
        yield fake


async def test_no_secret_in_logs_errors_or_metrics(
    secret_fake: Fake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data = config_data(
        secret_fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=ACCOUNTS, keys=KEYS
    )
    seen: list[str] = []
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    async with serve(make_config(data, tmp_path)) as lb, aiohttp.ClientSession() as http:
        for wrong in ({}, {"Authorization": "Bearer sk-lb-secret-wrong-000000"}):
            async with http.post(lb.url + "/v1/responses", json={}, headers=wrong) as response:
                seen.append(await response.text())
        secret_fake.script(Fault.status(401), Fault.status(429, resets_in=60), Fault.status(500))
        result = await stream_turn(http, lb.url, {"input": [user_message("hi")]}, headers=headers)
        assert result.status == 429
        seen.append(repr(result.events))
        result = await stream_turn(
            http, lb.url, {"input": "x", "previous_response_id": "resp_nope"}, headers=headers
        )
        assert result.status == 400
        seen.append(repr(result.events))
        async with http.ws_connect(ws_url(lb.url), headers=headers) as ws:
            seen.append(repr(await ws_turn(ws, {"input": "hi"})))
            await ws.send_str("{broken")
            seen.append((await ws.receive(timeout=5)).data)
        async with http.get(lb.url + "/metrics") as response:
            seen.append(await response.text())
        async with http.get(lb.url + "/readyz") as response:
            seen.append(await response.text())
        seen.append(repr(lb.services.config))
        seen.append(repr([a.credentials for a in lb.services.pool.accounts]))

    config_file = write_toml(tmp_path / "c.toml", data)
    checked = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codexlb",
        "check-config",
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await checked.communicate()
    assert b"acct-a" not in stderr
    seen += [stdout.decode(), stderr.decode()]
    seen.append(caplog.text)

    everything = "\n".join(seen)
    assert "refused its credentials" in caplog.text  # the 401 was logged ...
    assert [secret for secret in SECRETS if secret in everything] == []  # ... without a token
