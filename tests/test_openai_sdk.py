"""The official ``openai`` Python SDK as a client of codexlb."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI, BadRequestError

from tests.harness import CLIENT_KEYS, Balancer, Fake


@pytest.fixture
async def sdk(lb: Balancer) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=lb.url + "/v1", api_key=CLIENT_KEYS["alice"], max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def test_create_stream_continue_and_retrieve(sdk: AsyncOpenAI, fake: Fake) -> None:
    first = await sdk.responses.create(model="gpt-5-codex", input="What is two plus two?")
    assert first.status == "completed"
    assert first.output_text == "echo: What is two plus two?"

    stream = await sdk.responses.create(
        model="gpt-5-codex", input="And three?", previous_response_id=first.id, stream=True
    )
    kinds = []
    completed = None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            completed = event.response
    assert kinds[0] == "response.created"
    assert "response.output_text.delta" in kinds
    assert completed is not None
    # The continuation reached the upstream replayed, without the anchor.
    sent = fake.received[-1].body
    assert "previous_response_id" not in sent
    assert [item.get("role") for item in sent["input"] if item.get("type") == "message"] == [
        "user",
        "assistant",
        "user",
    ]

    stored = await sdk.responses.retrieve(completed.id)
    assert stored.id == completed.id
    assert stored.output_text == "echo: And three?"


async def test_unknown_previous_response_is_a_clean_sdk_error(sdk: AsyncOpenAI) -> None:
    with pytest.raises(BadRequestError) as raised:
        await sdk.responses.create(
            model="gpt-5-codex", input="hi", previous_response_id="resp_nope"
        )
    assert raised.value.code == "previous_response_not_found"
    assert raised.value.param == "previous_response_id"
