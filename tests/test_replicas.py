"""Several codexlb processes sharing one PostgreSQL database serve one pool (SPEC S7)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.harness import Fake, config_data, make_config, serve, stream_turn, user_message


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_conversation_continues_through_another_replica(
    database_url: str, fake: Fake, tmp_path: Path
) -> None:
    config = make_config(config_data(fake.url, database_url), tmp_path)
    async with (
        serve(config) as first_replica,
        serve(config) as second_replica,
        aiohttp.ClientSession() as http,
    ):
        one = await stream_turn(http, first_replica.url, {"input": [user_message("one")]})
        two = await stream_turn(
            http,
            second_replica.url,
            {"input": [user_message("two")], "previous_response_id": one.response_id},
        )
        three = await stream_turn(
            http,
            first_replica.url,
            {"input": [user_message("three")], "previous_response_id": two.response_id},
        )
    assert three.status == 200, three.events
    assert fake.received[-1].body["input"] == [
        user_message("one"),
        *one.output_items,
        user_message("two"),
        *two.output_items,
        user_message("three"),
    ]
