"""The real Codex CLI meets a client key at its limits (SPEC S9) and tells its user why.

What Codex 0.169.0 shows for each refusal:

- ``tokens_per_5h`` / ``tokens_per_week`` (429 ``usage_limit_reached``): its own sentence, which
  names the limit ``x-codex-limit-name`` names and when it frees up ("You've hit your usage limit
  for API key 'alice' (tokens_per_5h = 1). Switch to another model now, or try again at
  6:25 PM."); the turn fails at once, over WebSocket and HTTP alike;
- an expired key (401): the message itself, in its "Reconnecting... n/5" lines, then the turn
  fails;
- a model the key may not use (404): the message itself;
- ``requests_per_minute`` / ``max_inflight`` (429 ``rate_limit_exceeded`` with ``Retry-After``):
  Codex waits and sends again, so the turn goes through once the key frees up (not run here: it
  takes the minute).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.codex_model import codex_responder
from tests import codex_cli
from tests.codex_cli import CodexRun
from tests.harness import (
    CLIENT_KEYS,
    Balancer,
    Fake,
    make_config,
    serve,
    stream_turn,
    user_message,
)
from tests.test_key_limits import keyed

pytestmark = pytest.mark.codex

E2E_TIMEOUT = 180


async def codex_run(codex: Path, lb: Balancer, tmp_path: Path, *, websockets: bool) -> CodexRun:
    home, workdir = codex_cli.prepare(tmp_path, lb.url, websockets=websockets)
    return await codex_cli.run_codex(
        codex, home=home, workdir=workdir, api_key=CLIENT_KEYS["alice"]
    )


def failed_with(run: CodexRun) -> str:
    """The message the failed turn ended with."""
    assert run.returncode != 0, run.describe()
    failed = [event for event in run.events if event.get("type") == "turn.failed"]
    assert len(failed) == 1, run.describe()
    message: Any = failed[0]["error"]["message"]
    return str(message)


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
@pytest.mark.parametrize("websockets", [True, False], ids=["ws", "http"])
async def test_codex_names_the_key_s_exhausted_token_limit_and_when_it_frees_up(
    codex: Path, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession, websockets: bool
) -> None:
    fake.responder = codex_responder
    data = keyed(fake, tmp_path, alice={"tokens_per_5h": 1})
    async with serve(make_config(data, tmp_path)) as lb:
        result = await stream_turn(http, lb.url, {"input": [user_message("use it up")]})
        assert result.status == 200
        sent = len(fake.received)
        run = await codex_run(codex, lb, tmp_path, websockets=websockets)
    message = failed_with(run)
    assert "usage limit for API key 'alice' (tokens_per_5h = 1)" in message, run.describe()
    assert "try again at" in message, run.describe()
    assert len(fake.received) == sent  # nothing went upstream


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
async def test_codex_says_the_key_expired(
    codex: Path, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = keyed(fake, tmp_path, alice={"expires_at": "2020-01-01T00:00:00Z"})
    async with serve(make_config(data, tmp_path)) as lb:
        run = await codex_run(codex, lb, tmp_path, websockets=False)
    assert "The API key 'alice' expired at 2020-01-01T00:00:00Z" in failed_with(run)
    assert fake.received == []


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
async def test_codex_says_the_key_may_not_use_the_model(
    codex: Path, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = keyed(fake, tmp_path, alice={"models": ["gpt-5.4"]})
    async with serve(make_config(data, tmp_path)) as lb:
        run = await codex_run(codex, lb, tmp_path, websockets=True)
    assert "does not exist or this API key may not use it" in failed_with(run)
    assert fake.received == []
