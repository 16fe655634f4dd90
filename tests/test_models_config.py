"""``[models]`` (SPEC S11): aliases and the default, validated, shown by ``check-config``,
applied to the translated APIs, listed by ``GET /v1/models``, and changed by a reload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from codexlb.app import RELOADER, make_runner
from codexlb.config import ConfigError, load_config
from tests.harness import CLIENT_KEYS, Fake, auth
from tests.test_cli import codexlb

PROMPT: Any = [{"role": "user", "content": "hi"}]


def config_text(fake: Fake, tmp_path: Path, models: str) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0

[database]
url = "sqlite+aiosqlite:///{tmp_path / "lb.db"}"

[upstream]
base_url = "{fake.url}/backend-api/codex"

[[api_keys]]
name = "alice"
key = "{CLIENT_KEYS["alice"]}"

[[accounts]]
name = "a"
access_token = "tok-a"
chatgpt_account_id = "acct-a"

[models]
{models}
"""


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[tuple[str, web.Application]]:
    runner = make_runner(load_config(path), config_path=path, watch_interval=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", runner.app
    finally:
        await runner.cleanup()


def test_models_are_validated_and_shown_by_check_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[[accounts]]\nname = "a"\napi_key = "k"\n\n[models]\n'
        'aliases = { "claude-sonnet-4-5" = "gpt-5.4", "fast" = "gpt-5.4-mini" }\n'
        'default = "gpt-5.4"\n'
    )
    result = codexlb("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "claude-sonnet-4-5 -> gpt-5.4" in result.stdout
    assert "fast -> gpt-5.4-mini" in result.stdout
    assert "default gpt-5.4" in result.stdout

    config.write_text('[models]\naliases = { "x" = "" }\nfallback = "y"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert f"{config}: models.aliases.x" in str(raised.value)
    assert f"{config}: models.fallback" in str(raised.value)


async def test_aliases_default_model_list_and_reload(fake: Fake, tmp_path: Path) -> None:
    path = tmp_path / "codexlb.toml"
    path.write_text(config_text(fake, tmp_path, 'aliases = { "fast" = "gpt-5.4-mini" }'))
    async with serving(path) as (url, app):
        openai_sdk = AsyncOpenAI(base_url=url + "/v1", api_key=CLIENT_KEYS["alice"], max_retries=0)
        claude = AsyncAnthropic(base_url=url, api_key=CLIENT_KEYS["alice"], max_retries=0)
        try:
            completion = await openai_sdk.chat.completions.create(model="fast", messages=PROMPT)
            assert completion.model == "fast"  # the client's own name, answered back
            assert fake.received[-1].body["model"] == "gpt-5.4-mini"
            await openai_sdk.chat.completions.create(model="gpt-5.5", messages=PROMPT)
            assert fake.received[-1].body["model"] == "gpt-5.5"
            await claude.messages.create(model="claude-opus-4-8", max_tokens=8, messages=PROMPT)
            assert fake.received[-1].body["model"] == "claude-opus-4-8"  # no default yet

            listed = [model.id async for model in openai_sdk.models.list()]
            assert listed == ["fast"]  # the fake's catalog is empty
            async with aiohttp.ClientSession() as http:
                codex = url + "/v1/models?client_version=0.169.0"
                async with http.get(codex, headers=auth()) as response:
                    assert await response.json() == {"models": []}  # Codex's own catalog

            reloader = app[RELOADER]
            generation = reloader.generation + 1
            path.write_text(
                config_text(
                    fake, tmp_path, 'aliases = { "fast" = "gpt-5.4-nano" }\ndefault = "gpt-5.4"'
                )
            )
            async with asyncio.timeout(5):
                await reloader.wait_generation(generation)

            await openai_sdk.chat.completions.create(model="fast", messages=PROMPT)
            assert fake.received[-1].body["model"] == "gpt-5.4-nano"
            message = await claude.messages.create(
                model="claude-opus-4-8", max_tokens=8, messages=PROMPT
            )
            assert message.model == "claude-opus-4-8"
            assert fake.received[-1].body["model"] == "gpt-5.4"
            await openai_sdk.chat.completions.create(model="claude-opus-4-8", messages=PROMPT)
            assert fake.received[-1].body["model"] == "claude-opus-4-8"  # default: Messages only
            anthropic_listed = [model.id async for model in claude.models.list()]
            assert anthropic_listed == ["fast", "gpt-5.4"]
        finally:
            await openai_sdk.close()
            await claude.close()
