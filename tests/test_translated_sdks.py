"""The official ``openai`` and ``anthropic`` SDKs on Chat Completions and Anthropic Messages
(SPEC S11), against codexlb in front of the fake upstream over loopback: what each SDK reads,
and the exact Responses request the fake received."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from anthropic import AsyncAnthropic, AuthenticationError
from anthropic import BadRequestError as AnthropicBadRequest
from anthropic.types import Message
from openai import APIError, AsyncOpenAI, BadRequestError

from codexlb.testing.fake_upstream import Fault
from tests.harness import CLIENT_KEYS, Balancer, Fake, auth

VIDEO: Any = {"type": "video", "x": 1}
USAGE_LIMIT = Fault.status(429, error_code="usage_limit_reached", resets_in=600)
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def weather_responder(account: str, body: Any) -> list[dict[str, Any]]:
    """The model: a call of ``get_weather`` first; once its output is in, an answer quoting it."""
    outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
    if outputs:
        return [_message(f"It is {outputs[-1]['output']}.")]
    return [
        {
            "type": "function_call",
            "call_id": "call_weather_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        }
    ]


def _message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def developer(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": text}],
    }


def sent(fake: Fake) -> dict[str, Any]:
    body: dict[str, Any] = fake.received[-1].body
    return body


@pytest.fixture
async def openai_sdk(lb: Balancer) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=lb.url + "/v1", api_key=CLIENT_KEYS["alice"], max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def anthropic_sdk(lb: Balancer) -> AsyncIterator[AsyncAnthropic]:
    client = AsyncAnthropic(base_url=lb.url, api_key=CLIENT_KEYS["alice"], max_retries=0)
    try:
        yield client
    finally:
        await client.close()


# -- Chat Completions ---------------------------------------------------------------------------


async def test_chat_plain(openai_sdk: AsyncOpenAI, fake: Fake, lb: Balancer) -> None:
    completion = await openai_sdk.chat.completions.create(
        model="gpt-5.4",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus two?"},
        ],
        max_completion_tokens=100,
        reasoning_effort="low",
    )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-5.4"
    choice = completion.choices[0]
    assert choice.message.content == "echo: What is two plus two?"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 20
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    # The ChatGPT backend refuses max_output_tokens: the cap goes to platform accounts only.
    assert sent(fake) == {
        "model": "gpt-5.4",
        "input": [developer("Be brief."), user("What is two plus two?")],
        "store": False,
        "stream": True,
        "reasoning": {"effort": "low"},
    }
    assert fake.received[-1].path == "/backend-api/codex/responses"
    # Stateless: the client resends its history, so no snapshot is kept.
    response_id = "resp_" + completion.id.removeprefix("chatcmpl-")
    assert await lb.services.store.get("alice", response_id) is None


async def test_chat_streamed_with_usage(openai_sdk: AsyncOpenAI, fake: Fake) -> None:
    stream = await openai_sdk.chat.completions.create(
        model="gpt-5.4",
        messages=[{"role": "user", "content": [{"type": "text", "text": "stream me"}]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert sent(fake)["input"] == [user("stream me")]


@pytest.mark.parametrize("streamed", [False, True])
async def test_chat_tool_call_and_its_result_over_two_requests(
    openai_sdk: AsyncOpenAI, fake: Fake, streamed: bool
) -> None:
    fake.responder = weather_responder
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather of a city",
                "parameters": WEATHER,
            },
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    if streamed:
        stream = await openai_sdk.chat.completions.create(
            model="gpt-5.4",
            messages=messages,
            tools=tools,
            tool_choice="auto",
            parallel_tool_calls=False,
            stream=True,
        )
        fragments = []
        finish = None
        async for chunk in stream:
            choice = chunk.choices[0]
            fragments += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
        assert fragments[0].id == "call_weather_1"
        assert fragments[0].function is not None
        assert fragments[0].function.name == "get_weather"
        arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
        assert {f.index for f in fragments} == {0}
        call_id, name = "call_weather_1", "get_weather"
    else:
        completion = await openai_sdk.chat.completions.create(
            model="gpt-5.4",
            messages=messages,
            tools=tools,
            tool_choice="auto",
            parallel_tool_calls=False,
        )
        finish = completion.choices[0].finish_reason
        calls = completion.choices[0].message.tool_calls
        assert calls is not None
        assert completion.choices[0].message.content is None
        call = calls[0]
        assert call.type == "function"
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert finish == "tool_calls"
    assert json.loads(arguments) == {"city": "Paris"}
    first = sent(fake)
    assert first["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": WEATHER,
            "strict": False,
        }
    ]
    assert first["tool_choice"] == "auto"
    assert first["parallel_tool_calls"] is False

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]
    answer = await openai_sdk.chat.completions.create(
        model="gpt-5.4", messages=messages, tools=tools
    )
    assert answer.choices[0].message.content == "It is sunny, 21 C."
    assert answer.choices[0].finish_reason == "stop"
    assert sent(fake)["input"] == [
        user("Weather in Paris?"),
        {
            "type": "function_call",
            "call_id": "call_weather_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_weather_1", "output": "sunny, 21 C"},
    ]


async def test_chat_json_schema(openai_sdk: AsyncOpenAI, fake: Fake) -> None:
    fake.text = '{"answer": 4}'
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    completion = await openai_sdk.chat.completions.create(
        model="gpt-5.4",
        messages=[{"role": "user", "content": "2+2 as JSON"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "sum", "schema": schema, "strict": True},
        },
    )
    assert json.loads(completion.choices[0].message.content or "") == {"answer": 4}
    assert sent(fake)["text"] == {
        "format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}
    }

    await openai_sdk.chat.completions.create(
        model="gpt-5.4",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
    )
    assert sent(fake)["text"] == {"format": {"type": "json_object"}}


async def test_chat_image_url_parts(openai_sdk: AsyncOpenAI, fake: Fake) -> None:
    await openai_sdk.chat.completions.create(
        model="gpt-5.4",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PIXEL}", "detail": "low"},
                    },
                ],
            }
        ],
    )
    assert sent(fake)["input"][0]["content"] == [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PIXEL}", "detail": "low"},
    ]


async def test_chat_refuses_n_other_than_one(openai_sdk: AsyncOpenAI, fake: Fake) -> None:
    with pytest.raises(BadRequestError) as raised:
        await openai_sdk.chat.completions.create(
            model="gpt-5.4", messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert raised.value.param == "n"
    assert raised.value.code == "invalid_request"
    assert "n = 1" in raised.value.message
    assert fake.received == []


@pytest.mark.parametrize("streamed", [False, True])
async def test_chat_fails_over_before_visible_output(
    openai_sdk: AsyncOpenAI, fake: Fake, streamed: bool
) -> None:
    fake.script(USAGE_LIMIT)
    messages: Any = [{"role": "user", "content": "after a limit"}]
    if streamed:
        stream = await openai_sdk.chat.completions.create(
            model="gpt-5.4", messages=messages, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    else:
        completion = await openai_sdk.chat.completions.create(model="gpt-5.4", messages=messages)
        text = completion.choices[0].message.content or ""
    assert text == "echo: after a limit"
    first, second = fake.received
    assert first.account != second.account
    assert first.body == second.body
    assert fake.pending_faults == 0


# -- Anthropic Messages ---------------------------------------------------------------------


async def test_messages_plain(anthropic_sdk: AsyncAnthropic, fake: Fake) -> None:
    message = await anthropic_sdk.messages.create(
        model="gpt-5.4",
        max_tokens=256,
        system="Be brief.",
        messages=[{"role": "user", "content": "What is two plus two?"}],
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "gpt-5.4"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "echo: What is two plus two?"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 20
    assert message.usage.output_tokens > 0
    assert message.id.startswith("msg_")
    assert sent(fake) == {
        "model": "gpt-5.4",
        "input": [developer("Be brief."), user("What is two plus two?")],
        "store": False,
        "stream": True,
    }


async def test_messages_stream(anthropic_sdk: AsyncAnthropic, fake: Fake) -> None:
    async with anthropic_sdk.messages.stream(
        model="gpt-5.4",
        max_tokens=256,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "stream me"}]}],
    ) as stream:
        kinds = []
        async for event in stream:
            kinds.append(event.type)
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds
    assert "content_block_stop" in kinds
    assert kinds[-2] == "message_delta"
    assert pieces == []  # consumed above
    assert final.content[0].text == "echo: stream me"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert final.usage.input_tokens == 20
    assert sent(fake)["input"] == [developer("Be brief."), user("stream me")]


@pytest.mark.parametrize("streamed", [False, True])
async def test_messages_tool_use_round_trip(
    anthropic_sdk: AsyncAnthropic, fake: Fake, streamed: bool
) -> None:
    fake.responder = weather_responder
    tools: Any = [
        {"name": "get_weather", "description": "The weather of a city", "input_schema": WEATHER}
    ]
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first: Message
    if streamed:
        async with anthropic_sdk.messages.stream(
            model="gpt-5.4",
            max_tokens=256,
            tools=tools,
            tool_choice={"type": "any"},
            messages=messages,
        ) as stream:
            first = await stream.get_final_message()
    else:
        first = await anthropic_sdk.messages.create(
            model="gpt-5.4",
            max_tokens=256,
            tools=tools,
            tool_choice={"type": "any"},
            messages=messages,
        )
    assert first.stop_reason == "tool_use"
    tool_use = first.content[-1]
    assert tool_use.type == "tool_use"
    assert tool_use.name == "get_weather"
    assert tool_use.input == {"city": "Paris"}
    assert sent(fake)["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": WEATHER,
            "strict": False,
            "description": "The weather of a city",
        }
    ]
    assert sent(fake)["tool_choice"] == "required"

    messages += [
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny, 21 C"},
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]
    answer = await anthropic_sdk.messages.create(
        model="gpt-5.4", max_tokens=256, tools=tools, messages=messages
    )
    assert answer.content[0].text == "It is sunny, 21 C."  # type: ignore[union-attr]
    assert answer.stop_reason == "end_turn"
    assert sent(fake)["input"] == [
        user("Weather in Paris?"),
        {
            "type": "function_call",
            "call_id": "call_weather_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_weather_1", "output": "sunny, 21 C"},
        user("Thanks."),
    ]


async def test_messages_tool_result_error(anthropic_sdk: AsyncAnthropic, fake: Fake) -> None:
    await anthropic_sdk.messages.create(
        model="gpt-5.4",
        max_tokens=256,
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no such city"}],
                    }
                ],
            },
        ],
    )
    assert sent(fake)["input"][-1] == {
        "type": "function_call_output",
        "call_id": "toolu_1",
        "output": "Error: no such city",
    }


async def test_messages_image(anthropic_sdk: AsyncAnthropic, fake: Fake) -> None:
    message = await anthropic_sdk.messages.create(
        model="gpt-5.4",
        max_tokens=256,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.png"},
                    },
                    {"type": "text", "text": "Describe these."},
                ],
            }
        ],
    )
    assert message.content[0].text == "echo: Describe these."  # type: ignore[union-attr]
    assert sent(fake)["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [
                {
                    "type": "input_image",
                    "image_url": f"data:image/png;base64,{PIXEL}",
                    "detail": "auto",
                },
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"},
                {"type": "input_text", "text": "Describe these."},
            ],
        }
    ]


@pytest.mark.parametrize("streamed", [False, True])
async def test_messages_fail_over_before_visible_output(
    anthropic_sdk: AsyncAnthropic, fake: Fake, streamed: bool
) -> None:
    fake.script(USAGE_LIMIT)
    messages: Any = [{"role": "user", "content": "after a limit"}]
    message: Message
    if streamed:
        async with anthropic_sdk.messages.stream(
            model="gpt-5.4", max_tokens=64, messages=messages
        ) as stream:
            message = await stream.get_final_message()
    else:
        message = await anthropic_sdk.messages.create(
            model="gpt-5.4", max_tokens=64, messages=messages
        )
    assert message.content[0].text == "echo: after a limit"  # type: ignore[union-attr]
    first, second = fake.received
    assert first.account != second.account
    assert fake.pending_faults == 0


async def test_messages_errors_take_anthropic_shape(lb: Balancer, fake: Fake) -> None:
    wrong = AsyncAnthropic(base_url=lb.url, api_key="sk-wrong", max_retries=0)
    try:
        with pytest.raises(AuthenticationError) as raised:
            await wrong.messages.create(
                model="gpt-5.4", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await wrong.close()
    assert raised.value.status_code == 401
    assert raised.value.body == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
        },
    }
    right = AsyncAnthropic(base_url=lb.url, api_key=CLIENT_KEYS["alice"], max_retries=0)
    try:
        with pytest.raises(AnthropicBadRequest) as bad:
            await right.messages.create(
                model="gpt-5.4",
                max_tokens=8,
                messages=[{"role": "user", "content": [VIDEO]}],
            )
    finally:
        await right.close()
    assert bad.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Invalid value for 'messages[0].content[0].type': 'video' is not "
            "supported here.",
        },
    }
    assert fake.received == []


async def test_messages_key_from_authorization_too(
    lb: Balancer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-5.4", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(lb.url + "/v1/messages", json=body, headers=auth()) as response:
        assert response.status == 200
        assert (await response.json())["type"] == "message"
    async with http.post(lb.url + "/v1/messages", json=body) as response:
        assert response.status == 401
        assert (await response.json())["error"]["type"] == "authentication_error"


async def test_count_tokens_answers_an_estimate(anthropic_sdk: AsyncAnthropic, fake: Fake) -> None:
    counted = await anthropic_sdk.messages.count_tokens(
        model="claude-sonnet-4-5",
        system="Be brief.",
        messages=[{"role": "user", "content": "What is two plus two? " * 40}],
    )
    assert 200 < counted.input_tokens < 400
    assert fake.received == []


# -- a stream that breaks after visible output --------------------------------------------


async def test_chat_stream_broken_after_output_ends_in_an_error(
    openai_sdk: AsyncOpenAI, fake: Fake
) -> None:
    fake.script(Fault.drop_after(7))  # after the first text delta
    stream = await openai_sdk.chat.completions.create(
        model="gpt-5.4", messages=[{"role": "user", "content": "cut me"}], stream=True
    )
    seen: list[str] = []

    async def read() -> None:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")

    with pytest.raises(APIError) as raised:
        await read()
    assert "".join(seen) == "echo"
    assert "ended before the response completed" in raised.value.message
    assert len(fake.received) == 1  # visible output: no failover


async def test_messages_stream_broken_after_output_ends_in_an_error_event(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.drop_after(7))
    body = {
        "model": "gpt-5.4",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "cut me"}],
    }
    async with http.post(lb.url + "/v1/messages", json=body, headers=auth()) as response:
        assert response.status == 200
        raw = (await response.read()).decode()
    names = [line.removeprefix("event: ") for line in raw.splitlines() if line.startswith("event:")]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    last = json.loads(raw.strip().splitlines()[-1].removeprefix("data: "))
    assert last["type"] == "error"
    assert last["error"]["type"] == "api_error"


# -- bad input -------------------------------------------------------------------------------


async def test_bad_bodies_get_each_api_its_own_error_shape(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    cases: list[tuple[str, bytes, int]] = [
        ("/v1/chat/completions", b"not json", 400),
        ("/v1/chat/completions", b"[]", 400),
        ("/v1/chat/completions", json.dumps({"model": "m", "messages": deep}).encode(), 400),
        ("/v1/messages", b"not json", 400),
        ("/v1/messages", b'{"model": "m", "max_tokens": 1, "messages": [{"role": 1}]}', 400),
        ("/v1/messages/count_tokens", b"{}", 400),
    ]
    for path, body, status in cases:
        headers = {**auth(), "Content-Type": "application/json"}
        async with http.post(lb.url + path, data=body, headers=headers) as response:
            assert response.status == status, (path, body[:40])
            answer = await response.json()
        if path.startswith("/v1/messages"):
            assert answer["type"] == "error", answer
            assert answer["error"]["type"] == "invalid_request_error", answer
        else:
            assert answer["error"]["code"] == "invalid_request", answer
    async with http.post(lb.url + "/v1/messages/count_tokens", json={}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["type"] == "authentication_error"
    async with http.get(lb.url + "/v1/messages/nope", headers=auth()) as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"
    assert fake.received == []


async def test_messages_thinking_round_trip(anthropic_sdk: AsyncAnthropic, fake: Fake) -> None:
    messages: list[Any] = [{"role": "user", "content": "Think first."}]
    first = await anthropic_sdk.messages.create(
        model="gpt-5.4",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        metadata={"user_id": "session-1"},
        messages=messages,
    )
    assert [block.type for block in first.content] == ["thinking", "text"]
    asked = sent(fake)
    assert asked["reasoning"] == {"effort": "low", "summary": "auto"}
    assert asked["include"] == ["reasoning.encrypted_content"]
    account = fake.received[-1].account

    messages += [
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": "Go on."},
    ]
    await anthropic_sdk.messages.create(
        model="gpt-5.4",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        metadata={"user_id": "session-1"},
        messages=messages,
    )
    assert fake.received[-1].account == account  # the session's affinity
    returned = sent(fake)["input"][1]
    assert returned["type"] == "reasoning"
    assert returned["id"].startswith("rs_")
    assert returned["encrypted_content"].startswith(f"enc:{account}:")
