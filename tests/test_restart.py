"""Conversations survive restarts of ``codexlb serve`` (a real child process)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.harness import (
    Fake,
    child_config,
    running_child,
    start_child,
    stream_turn,
    user_message,
)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_chain_continues_after_restart(
    stop: signal.Signals, fake: Fake, tmp_path: Path
) -> None:
    config_file = child_config(tmp_path, fake)
    async with aiohttp.ClientSession() as http:
        server = await start_child(config_file)
        try:
            first = await stream_turn(http, server.url, {"input": [user_message("one")]})
            second = await stream_turn(
                http,
                server.url,
                {"input": [user_message("two")], "previous_response_id": first.response_id},
            )
            assert second.status == 200
            # SIGKILL lands right after response.completed reached the client.
            server.signal(stop)
            code = await server.wait()
        finally:
            if server.process.returncode is None:
                await server.stop()
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)

        async with running_child(config_file) as server:
            third = await stream_turn(
                http,
                server.url,
                {"input": [user_message("three")], "previous_response_id": second.response_id},
            )

    assert third.status == 200, third.events
    assert fake.received[-1].body["input"] == [
        user_message("one"),
        *first.output_items,
        user_message("two"),
        *second.output_items,
        user_message("three"),
    ]
    assert (tmp_path / "codexlb.db").exists()


async def test_backup_of_a_live_database_serves_the_conversation(
    fake: Fake, tmp_path: Path
) -> None:
    config_file = child_config(tmp_path, fake)
    async with aiohttp.ClientSession() as http:
        async with running_child(config_file) as server:
            first = await stream_turn(http, server.url, {"input": [user_message("one")]})
            backup = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "codexlb",
                "db",
                "backup",
                "backup.db",
                "--config",
                str(config_file),
                cwd=tmp_path,
            )
            assert await backup.wait() == 0

        restored = tmp_path / "restored"
        restored.mkdir()
        (tmp_path / "backup.db").rename(restored / "codexlb.db")
        async with running_child(child_config(restored, fake)) as server:
            second = await stream_turn(
                http,
                server.url,
                {"input": [user_message("two")], "previous_response_id": first.response_id},
            )
    assert second.status == 200, second.events
    assert fake.received[-1].body["input"] == [
        user_message("one"),
        *first.output_items,
        user_message("two"),
    ]
