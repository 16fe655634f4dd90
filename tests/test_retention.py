"""Old snapshots are pruned in the background while codexlb serves (SPEC S2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.harness import Fake, config_data, make_config, serve, stream_turn, user_message


async def test_snapshots_past_retention_are_pruned_in_the_background(
    fake: Fake, tmp_path: Path
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        snapshots={"retention_days": 0.5 / 86400, "prune_interval_seconds": 0.05},
    )
    async with serve(make_config(data, tmp_path)) as lb, aiohttp.ClientSession() as http:
        first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
        store = lb.services.store
        assert await store.get("alice", first.response_id) is not None
        for _ in range(100):  # bounded: retention is half a second, pruning every 50 ms
            if await store.get("alice", first.response_id) is None:
                break
            await asyncio.sleep(0.05)
        assert await store.get("alice", first.response_id) is None
        # The pruned conversation can no longer be continued; new ones still work.
        gone = await stream_turn(
            http, lb.url, {"input": "x", "previous_response_id": first.response_id}
        )
        assert gone.status == 400
        fresh = await stream_turn(http, lb.url, {"input": [user_message("new")]})
        assert fresh.status == 200
