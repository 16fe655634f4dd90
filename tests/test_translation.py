"""The translations of SPEC S11 as tables, without sockets: Chat Completions and Anthropic
Messages requests in, Responses requests out; Responses events in, the other API's events out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from codexlb import chat, messages
from codexlb.config import ModelsConfig
from codexlb.errors import InvalidRequest
from codexlb.model_names import catalog_slugs, client_names, model_list, upstream_model
from codexlb.sse import SSEDecoder
from codexlb.testing import events
from codexlb.translation import Translation

MODELS = ModelsConfig(aliases={"claude-sonnet-4-5": "gpt-5.4", "fast": "gpt-5.4-mini"})
DEFAULTED = ModelsConfig(aliases={"fast": "gpt-5.4-mini"}, default="gpt-5.4")


def text(role: str, kind: str, value: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [{"type": kind, "text": value}]}


BASE = {"store": False, "stream": True}

# -- requests ---------------------------------------------------------------------------------

CHAT_REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "roles and an alias",
        {
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "developer", "content": [{"type": "text", "text": "D"}]},
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"},
            ],
        },
        {
            "model": "gpt-5.4",
            "input": [
                text("developer", "input_text", "S"),
                text("developer", "input_text", "D"),
                text("user", "input_text", "U"),
                text("assistant", "output_text", "A"),
            ],
        },
    ),
    (
        "an assistant with text and tool calls, then the tool's answer",
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "content": "Looking.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]},
            ],
        },
        {
            "model": "m",
            "input": [
                text("assistant", "output_text", "Looking."),
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            ],
        },
    ),
    (
        "tools, a named tool choice, parallel calls off",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "U"}],
            "tools": [
                {"type": "function", "function": {"name": "f", "strict": True, "parameters": {}}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
        },
        {
            "model": "m",
            "input": [text("user", "input_text", "U")],
            "tools": [{"type": "function", "name": "f", "strict": True, "parameters": {}}],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
        },
    ),
    (
        "json_object, effort, verbosity, cache key; max tokens kept aside",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "U"}],
            "response_format": {"type": "json_object"},
            "reasoning_effort": "high",
            "verbosity": "low",
            "prompt_cache_key": "k",
            "max_tokens": 50,
            "temperature": 0.2,
            "n": 1,
        },
        {
            "model": "m",
            "input": [text("user", "input_text", "U")],
            "text": {"format": {"type": "json_object"}, "verbosity": "low"},
            "reasoning": {"effort": "high"},
            "prompt_cache_key": "k",
        },
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "expected"), CHAT_REQUESTS, ids=[r[0] for r in CHAT_REQUESTS]
)
def test_chat_requests(name: str, body: dict[str, Any], expected: dict[str, Any]) -> None:
    translated = chat.translate(body, MODELS)
    assert translated.create.body == {**expected, **BASE}


def test_chat_token_cap_goes_to_platform_accounts_only() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "U"}], "max_tokens": 9}
    translated = chat.translate({**body, "max_completion_tokens": 7}, MODELS)
    assert translated.max_output_tokens == 7
    assert orjson.loads(translated.upstream_body(None, platform=True))["max_output_tokens"] == 7
    assert "max_output_tokens" not in orjson.loads(translated.upstream_body(None, platform=False))
    assert chat.translate(body, MODELS).max_output_tokens == 9


CHAT_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"messages": [{"role": "user", "content": "U"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "U"}], "n": 3}, "n"),
    ({"model": "m", "messages": [{"role": "function", "content": "U"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "tool", "content": "U"}]}, "messages[0].tool_call_id"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        "messages[0].content[0].type",
    ),
    (
        {
            "model": "m",
            "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "x"}]}],
        },
        "messages[0].content[0].type",
    ),
    (
        {"model": "m", "messages": [{"role": "user", "content": "U"}], "tools": [{"type": "x"}]},
        "tools[0].type",
    ),
    (
        {"model": "m", "messages": [{"role": "user", "content": "U"}], "tool_choice": "any"},
        "tool_choice",
    ),
    (
        {
            "model": "m",
            "messages": [{"role": "user", "content": "U"}],
            "response_format": {"type": "yaml"},
        },
        "response_format.type",
    ),
    ({"model": "m", "messages": [{"role": "user", "content": "U"}], "max_tokens": 0}, "max_tokens"),
    (
        {"model": "m", "messages": [{"role": "user", "content": "U"}], "max_tokens": True},
        "max_tokens",
    ),
    ({"model": "m", "messages": [{"role": "user", "content": "U"}], "stream": "yes"}, "stream"),
    (
        {"model": "m", "messages": [{"role": "user", "content": "U"}], "reasoning_effort": "lots"},
        "reasoning_effort",
    ),
]


@pytest.mark.parametrize(("body", "param"), CHAT_REFUSALS)
def test_chat_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        chat.translate(body, MODELS)
    assert raised.value.param == param


PNG = "aGVsbG8="

MESSAGES_REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "system blocks, text, images; the default serves an unknown name",
        {
            "model": "claude-opus-4-8",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "U"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
                    ],
                },
                {"role": "system", "content": "mid"},
            ],
        },
        {
            "model": "gpt-5.4",
            "input": [
                text("developer", "input_text", "S"),
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "U"},
                        {
                            "type": "input_image",
                            "image_url": f"data:image/png;base64,{PNG}",
                            "detail": "auto",
                        },
                        {"type": "input_image", "image_url": "https://x/a.png", "detail": "auto"},
                    ],
                },
                text("developer", "input_text", "mid"),
            ],
        },
    ),
    (
        "thinking, tool use and results in order; tools and choice",
        {
            "model": "fast",
            "max_tokens": 20000,
            "thinking": {"type": "enabled", "budget_tokens": 8000},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
            "metadata": {"user_id": "u1"},
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "enc:a:00"},
                        {"type": "thinking", "thinking": "foreign", "signature": ""},
                        {"type": "text", "text": "Calling."},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "fine"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "t2",
                            "is_error": True,
                            "content": [
                                {"type": "text", "text": "bad"},
                                {
                                    "type": "image",
                                    "source": {"type": "url", "url": "https://x/e.png"},
                                },
                            ],
                        },
                        {"type": "text", "text": "next"},
                    ],
                },
            ],
        },
        {
            "model": "gpt-5.4-mini",
            "input": [
                {
                    "type": "reasoning",
                    "summary": [{"type": "summary_text", "text": "hm"}],
                    "encrypted_content": "enc:a:00",
                },
                text("assistant", "output_text", "Calling."),
                {"type": "function_call", "call_id": "t1", "name": "f", "arguments": '{"a":1}'},
                {"type": "function_call_output", "call_id": "t1", "output": "fine"},
                {
                    "type": "function_call_output",
                    "call_id": "t2",
                    "output": [
                        {"type": "input_text", "text": "Error: "},
                        {"type": "input_text", "text": "bad"},
                        {"type": "input_image", "image_url": "https://x/e.png", "detail": "auto"},
                    ],
                },
                text("user", "input_text", "next"),
            ],
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}
            ],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"},
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "7f3ef3ecf8f2d2ce1a5e5a0c0a4b6d8e",
        },
    ),
    (
        "tool choice none and any; adaptive thinking with an effort",
        {
            "model": "m",
            "max_tokens": 10,
            "tool_choice": {"type": "any"},
            "thinking": {"type": "adaptive"},
            "output_config": {"effort": "max"},
            "messages": [{"role": "user", "content": "U"}],
        },
        {
            "model": "gpt-5.4",
            "input": [text("user", "input_text", "U")],
            "tool_choice": "required",
            "reasoning": {"summary": "auto", "effort": "high"},
            "include": ["reasoning.encrypted_content"],
        },
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "expected"), MESSAGES_REQUESTS, ids=[r[0] for r in MESSAGES_REQUESTS]
)
def test_messages_requests(name: str, body: dict[str, Any], expected: dict[str, Any]) -> None:
    translated = messages.translate(body, DEFAULTED)
    if "prompt_cache_key" in expected:
        expected = {**expected, "prompt_cache_key": translated.create.body["prompt_cache_key"]}
        assert translated.affinity == body["metadata"]["user_id"]
    assert translated.create.body == {**expected, **BASE}
    assert translated.max_output_tokens == body["max_tokens"]


MESSAGES_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": 5, "messages": []}, "model"),
    ({"model": "m", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": {}}, "messages"),
    (
        {"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]},
        "messages[0].role",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "assistant", "content": [{"type": "image"}]}],
        },
        "messages[0].content[0].type",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "tool_use"}]}],
        },
        "messages[0].content[0].type",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}
            ],
        },
        "messages[0].content[0].source.type",
    ),
    (
        {"model": "m", "max_tokens": 5, "messages": [], "tools": [{"type": "web_search_20250305"}]},
        "tools[0].type",
    ),
    (
        {"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "some"}},
        "tool_choice.type",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [],
            "thinking": {"type": "enabled", "budget_tokens": 9},
        },
        "thinking.budget_tokens",
    ),
    ({"model": "m", "max_tokens": 5, "messages": [], "stop_sequences": [""]}, "stop_sequences[0]"),
    (
        {"model": "m", "max_tokens": 5, "messages": [], "system": [{"type": "image"}]},
        "system[0].type",
    ),
]


@pytest.mark.parametrize(("body", "param"), MESSAGES_REFUSALS)
def test_messages_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        messages.translate(body, MODELS)
    assert raised.value.param == param


def test_model_names() -> None:
    assert upstream_model(MODELS, "claude-sonnet-4-5", use_default=True) == "gpt-5.4"
    assert upstream_model(DEFAULTED, "claude-haiku", use_default=True) == "gpt-5.4"
    assert upstream_model(DEFAULTED, "claude-haiku", use_default=False) == "claude-haiku"
    assert upstream_model(DEFAULTED, "fast", use_default=True) == "gpt-5.4-mini"
    slugs = catalog_slugs({"models": [{"slug": "gpt-5.4"}, {"slug": 3}, "x"]})
    assert slugs == ["gpt-5.4"]
    assert catalog_slugs({"data": [{"id": "gpt-4.1"}]}) == ["gpt-4.1"]
    assert catalog_slugs([1]) == []
    assert client_names(DEFAULTED, ["gpt-5.4", "gpt-5.5"]) == ["gpt-5.4", "gpt-5.5", "fast"]
    listed = model_list(["a", "b"])
    assert [entry["id"] for entry in listed["data"]] == ["a", "b"]
    assert (listed["object"], listed["first_id"], listed["last_id"]) == ("list", "a", "b")


# -- events -----------------------------------------------------------------------------------

REQUEST = {"model": "gpt-5.4", "input": [text("user", "input_text", "U")]}


def upstream(output: list[dict[str, Any]], *, deltas: int = 2) -> list[dict[str, Any]]:
    return events.response_events(
        REQUEST, "resp_1", output, created_at=7, deltas=deltas, completed_output=False
    )


def reasoning(summary: str = "") -> dict[str, Any]:
    item = events.reasoning_item("a")
    item["summary"] = [{"type": "summary_text", "text": summary}] if summary else []
    return item


def message(value: str) -> dict[str, Any]:
    return events.message_item(value)


def call(arguments: str = '{"a":1}') -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "f",
        "arguments": arguments,
        "status": "completed",
    }


def translated(
    translation: Translation, stream: list[dict[str, Any]]
) -> list[tuple[str | None, Any]]:
    """The client's events for ``stream``: (SSE event name, parsed data)."""
    out = b""
    translate = translation.events()
    for event in stream:
        data = orjson.dumps(event)
        out += translate(str(event["type"]), data, b"event: x\ndata: " + data + b"\n\n")
    return [
        (kind, data if data == b"[DONE]" else orjson.loads(data))
        for _, kind, data in SSEDecoder().feed(out)
    ]


def chat_of(**fields: Any) -> chat.ChatTranslation:
    return chat.translate(
        {
            "model": "alias",
            "messages": [{"role": "user", "content": "U"}],
            "stream": True,
            **fields,
        },
        MODELS,
    )


def deltas_of(chunks: list[tuple[str | None, Any]]) -> list[Any]:
    return [c["choices"][0]["delta"] for _, c in chunks if c != b"[DONE]" and c["choices"]]


def test_chat_chunks_of_text() -> None:
    chunks = translated(chat_of(), upstream([reasoning("r"), message("Hello there")]))
    assert deltas_of(chunks) == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hello"},
        {"content": " there"},
        {},
    ]
    assert chunks[-1] == (None, b"[DONE]")
    last = chunks[-2][1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert {c["id"] for _, c in chunks[:-1]} == {"chatcmpl-1"}
    assert {c["model"] for _, c in chunks[:-1]} == {"alias"}
    assert all("usage" not in c for _, c in chunks[:-1])


def test_chat_chunks_of_tool_calls_with_usage() -> None:
    stream = upstream(
        [message("Hm."), call('{"a":1}'), {**call('{"b":2}'), "call_id": "call_2", "id": "fc_2"}]
    )
    chunks = translated(chat_of(stream_options={"include_usage": True}), stream)
    calls = [d["tool_calls"][0] for d in deltas_of(chunks) if "tool_calls" in d]
    assert calls == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"a":1}'}},
        {
            "index": 1,
            "id": "call_2",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        },
        {"index": 1, "function": {"arguments": '{"b":2}'}},
    ]
    finish, usage, done = chunks[-3:]
    assert finish[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert usage[1]["choices"] == []
    assert usage[1]["usage"]["prompt_tokens"] == 10
    assert done == (None, b"[DONE]")
    assert all(c["usage"] is None for _, c in chunks[:-2])


def test_chat_arguments_that_came_without_deltas() -> None:
    stream = [
        e for e in upstream([call()]) if e["type"] != "response.function_call_arguments.delta"
    ]
    calls = [
        d["tool_calls"][0] for d in deltas_of(translated(chat_of(), stream)) if "tool_calls" in d
    ]
    assert "".join(c["function"]["arguments"] for c in calls) == '{"a":1}'


def ending(kind: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "response": {"id": "resp_1", "status": kind.split(".")[1], **response}}


def test_chat_endings() -> None:
    head = upstream([message("Hi")])[:-1]
    cut = ending("response.incomplete", {"incomplete_details": {"reason": "max_output_tokens"}})
    chunks = translated(chat_of(), [*head, cut])
    assert chunks[-2][1]["choices"][0]["finish_reason"] == "length"
    filtered = ending("response.incomplete", {"incomplete_details": {"reason": "content_filter"}})
    assert (
        translated(chat_of(), [*head, filtered])[-2][1]["choices"][0]["finish_reason"]
        == "content_filter"
    )
    failed = ending("response.failed", {"error": {"code": "stream_incomplete", "message": "cut"}})
    chunks = translated(chat_of(), [*head, failed])
    assert chunks[-2][1] == {
        "error": {
            "message": "cut",
            "type": "server_error",
            "code": "stream_incomplete",
            "param": None,
        }
    }
    assert chunks[-1] == (None, b"[DONE]")


def test_chat_reply_and_usage() -> None:
    translation = chat_of()
    response = {
        "id": "resp_9",
        "created_at": 5,
        "status": "completed",
        "output": [reasoning(), message("A"), message("B"), call()],
        "usage": {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 60},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 20},
        },
    }
    status, reply = translation.reply(response)
    assert status == 200
    assert reply["id"] == "chatcmpl-9"
    assert reply["created"] == 5
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": "AB",
        "refusal": None,
        "annotations": [],
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
        ],
    }
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert reply["usage"]["prompt_tokens"] == 100
    assert reply["usage"]["completion_tokens"] == 30
    assert reply["usage"]["total_tokens"] == 130
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 60
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == 20
    status, failed = translation.reply(
        {"status": "failed", "error": {"code": "context_length_exceeded", "message": "long"}}
    )
    assert status == 400
    assert failed["error"]["code"] == "context_length_exceeded"


def messages_of(**fields: Any) -> messages.MessagesTranslation:
    return messages.translate(
        {
            "model": "claude-x",
            "max_tokens": 9000,
            "messages": [{"role": "user", "content": "U"}],
            **fields,
        },
        DEFAULTED,
    )


def names(stream: list[tuple[str | None, Any]]) -> list[str]:
    return [
        str(kind)
        + (f":{data['delta']['type']}" if kind == "content_block_delta" else "")
        + (f":{data['content_block']['type']}" if kind == "content_block_start" else "")
        for kind, data in stream
    ]


def test_messages_events_in_anthropic_order() -> None:
    stream = translated(messages_of(), upstream([reasoning("r"), message("Hello there"), call()]))
    assert names(stream) == [
        "message_start",
        "ping",
        "content_block_start:text",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_stop",
        "content_block_start:tool_use",
        "content_block_delta:input_json_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = stream[0][1]["message"]
    assert (start["id"], start["model"], start["content"]) == ("msg_1", "claude-x", [])
    assert [
        data["index"] for kind, data in stream if kind and kind.startswith("content_block")
    ] == [0] * 4 + [1] * 3
    assert stream[6][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "f",
        "input": {},
    }
    assert stream[7][1]["delta"]["partial_json"] == '{"a":1}'
    delta = stream[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["input_tokens"] == 10


def test_messages_thinking_blocks_only_when_asked() -> None:
    asked = messages_of(thinking={"type": "enabled", "budget_tokens": 2000})
    stream = translated(asked, upstream([reasoning("why"), message("A")]))
    assert names(stream)[2:6] == [
        "content_block_start:thinking",
        "content_block_delta:thinking_delta",
        "content_block_delta:signature_delta",
        "content_block_stop",
    ]
    assert stream[3][1]["delta"]["thinking"] == "why"
    item = reasoning("why")
    stream = translated(asked, upstream([item, message("A")]))
    signature = stream[4][1]["delta"]["signature"]
    assert signature == f"{item['id']}.{item['encrypted_content']}"
    # The next turn sends the block back: the same reasoning item reaches the upstream.
    back = messages_of(
        messages=[
            {"role": "user", "content": "U"},
            {
                "role": "assistant",
                "content": [{"type": "thinking", "thinking": "why", "signature": signature}],
            },
        ]
    )
    assert back.create.body["input"][1] == {
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "why"}],
        "id": item["id"],
        "encrypted_content": item["encrypted_content"],
    }
    _, reply = asked.reply({"status": "completed", "output": [reasoning("why"), message("A")]})
    assert reply["content"][0]["type"] == "thinking"
    assert reply["content"][0]["thinking"] == "why"
    plain = translated(messages_of(), upstream([reasoning("why"), message("A")]))
    assert "content_block_start:thinking" not in names(plain)


def test_messages_stop_sequences_cut_across_deltas() -> None:
    translation = messages_of(stop_sequences=["STOP", "##"])
    stream = translated(translation, upstream([message("one two STOP three")], deltas=6))
    shown = "".join(data["delta"]["text"] for kind, data in stream if kind == "content_block_delta")
    assert shown == "one two "
    assert stream[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    _, reply = translation.reply({"status": "completed", "output": [message("a ## b"), call()]})
    assert reply["content"] == [{"type": "text", "text": "a ", "citations": None}]
    assert (reply["stop_reason"], reply["stop_sequence"]) == ("stop_sequence", "##")
    held = translated(translation, upstream([message("ends with S")], deltas=11))
    assert (
        "".join(d["delta"]["text"] for k, d in held if k == "content_block_delta") == "ends with S"
    )


def test_messages_endings() -> None:
    head = upstream([message("Hi")])[:-1]
    cut = ending("response.incomplete", {"incomplete_details": {"reason": "max_output_tokens"}})
    stream = translated(messages_of(), [*head, cut])
    assert stream[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert names(stream)[-1] == "message_stop"
    failed = ending("response.failed", {"error": {"code": "stream_incomplete", "message": "cut"}})
    stream = translated(messages_of(), [*head, failed])
    assert stream[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "cut"}},
    )
    assert "message_stop" not in names(stream)


def test_messages_reply_and_usage() -> None:
    translation = messages_of()
    response = {
        "id": "resp_2",
        "status": "completed",
        "output": [message("A"), call('{"x": [1]}')],
        "usage": {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 60},
            "output_tokens": 7,
        },
    }
    status, reply = translation.reply(response)
    assert status == 200
    assert reply == {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "A", "citations": None},
            {"type": "tool_use", "id": "call_1", "name": "f", "input": {"x": [1]}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 40,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 60,
            "output_tokens": 7,
        },
    }
    status, failed = translation.reply(
        {"status": "failed", "error": {"code": "rate_limit_exceeded", "message": "slow"}}
    )
    assert (status, failed) == (
        429,
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
    )
    assert translation.error(502, {"error": {"message": "bad"}}) == (
        502,
        {"type": "error", "error": {"type": "api_error", "message": "bad"}},
    )


def test_count_tokens_estimate_grows_with_the_request() -> None:
    small = messages.estimate_tokens(
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', MODELS
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi " * 400}]}
    large = messages.estimate_tokens(orjson.dumps(body), MODELS)
    assert 0 < small < 50 < large < 1000
