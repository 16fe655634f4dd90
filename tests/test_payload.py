"""Validation of the client's ``response.create`` body and the body sent upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from codexlb.errors import InvalidRequest
from codexlb.payload import CreateRequest

USER_HI = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "gpt-5-codex", **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_body_that_is_not_a_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as info:
        CreateRequest.from_bytes(raw)

    assert info.value.param is None
    assert (info.value.status, info.value.code) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", 5),
        ("previous_response_id", 1),
        ("instructions", ["x"]),
        ("prompt_cache_key", {}),
        ("stream", "true"),
        ("stream", 1),
        ("store", 0),
        ("generate", "no"),
        ("background", []),
        ("parallel_tool_calls", "yes"),
        ("tools", {}),
        ("include", "reasoning.encrypted_content"),
        ("metadata", []),
        ("reasoning", "high"),
        ("text", "plain"),
        ("client_metadata", 1),
        ("tool_choice", 3),
        ("max_output_tokens", 1.5),
        ("max_output_tokens", True),
        ("temperature", "hot"),
        ("temperature", False),
        ("top_p", True),
        ("input", 5),
        ("input", {"type": "message"}),
        ("input", True),
    ],
)
def test_wrong_field_type_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest, match=f"'{field}'") as info:
        CreateRequest.from_bytes(body(**{field: value}))

    assert info.value.param == field
    assert info.value.status == 400


@pytest.mark.parametrize(
    "fields",
    [
        {"stream": True, "store": False, "tools": [], "include": [], "metadata": {}},
        {"tool_choice": "auto", "max_output_tokens": 10, "temperature": 1, "top_p": 0.5},
        {"tool_choice": {"type": "function", "name": "f"}, "temperature": 0.2},
        {"previous_response_id": None, "instructions": None, "input": None},
    ],
)
def test_fields_of_the_right_type_are_accepted(fields: dict[str, Any]) -> None:
    request = CreateRequest.from_bytes(body(**fields))

    assert request.model == "gpt-5-codex"


@pytest.mark.parametrize("raw", [b"{}", b'{"model": ""}', b'{"model": null, "input": "x"}'])
def test_missing_model(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="model") as info:
        CreateRequest.from_bytes(raw)

    assert info.value.param == "model"


@pytest.mark.parametrize(
    ("items", "param"),
    [
        (["hi"], "input[0]"),
        ([USER_HI, None], "input[1]"),
        ([USER_HI, USER_HI, [USER_HI]], "input[2]"),
    ],
)
def test_non_object_input_item_names_its_index(items: list[Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        CreateRequest.from_bytes(body(input=items))

    assert info.value.param == param
    assert param in info.value.message


@pytest.mark.parametrize(
    ("value", "items"),
    [(None, []), ("hi", [USER_HI]), ([USER_HI], [USER_HI]), ([], [])],
)
def test_input_items(value: Any, items: list[Any]) -> None:
    fields = {} if value is None else {"input": value}

    assert CreateRequest.from_bytes(body(**fields)).input_items == items


def test_properties() -> None:
    request = CreateRequest.from_bytes(
        body(previous_response_id="resp_1", stream=True, prompt_cache_key="thread-1")
    )

    assert request.previous_response_id == "resp_1"
    assert request.stream is True
    assert request.prompt_cache_key == "thread-1"
    assert CreateRequest.from_bytes(body()).stream is False


def test_unknown_fields_are_preserved() -> None:
    extra = {"x_future_field": {"nested": [1, 2]}, "service_tier": "flex"}
    request = CreateRequest.from_bytes(body(input="hi", **extra))

    sent = json.loads(request.upstream_body(input_items=[USER_HI]))

    assert sent["x_future_field"] == extra["x_future_field"]
    assert sent["service_tier"] == "flex"


def test_upstream_body_is_the_raw_bytes_when_nothing_changes() -> None:
    raw = b'{ "model" : "gpt-5-codex",\n  "stream": true, "input": "hi", "zz": 1.0 }'

    assert CreateRequest.from_bytes(raw).upstream_body(input_items=None) is raw


@pytest.mark.parametrize(
    ("fields", "input_items"),
    [
        ({"stream": True, "previous_response_id": "resp_1", "input": []}, None),
        ({"stream": True, "previous_response_id": None, "input": []}, None),
        ({"input": []}, None),
        ({"stream": False, "input": []}, None),
        ({"stream": True, "input": "hi"}, [USER_HI]),
        ({"stream": True, "previous_response_id": "resp_1", "input": "x"}, [USER_HI]),
    ],
)
def test_upstream_body_rewrites_when_needed(
    fields: dict[str, Any], input_items: list[Any] | None
) -> None:
    request = CreateRequest.from_bytes(body(tools=[{"type": "function"}], **fields))

    sent = json.loads(request.upstream_body(input_items=input_items))

    expected = {"model": "gpt-5-codex", "tools": [{"type": "function"}], **fields, "stream": True}
    expected.pop("previous_response_id", None)
    if input_items is not None:
        expected["input"] = input_items
    assert sent == expected


def test_upstream_body_of_a_parsed_body_is_encoded() -> None:
    request = CreateRequest.from_body({"model": "m", "stream": True, "input": "hi"})

    assert request.raw is None
    assert json.loads(request.upstream_body(input_items=None)) == {
        "model": "m",
        "stream": True,
        "input": "hi",
    }


def test_upstream_body_does_not_mutate_the_request() -> None:
    request = CreateRequest.from_bytes(body(previous_response_id="resp_1", input="hi"))

    request.upstream_body(input_items=[USER_HI])

    assert request.body["previous_response_id"] == "resp_1"
    assert request.body["input"] == "hi"
    assert "stream" not in request.body


TURN = {"x-codex-turn-state": "ts-a-1", "other": "kept"}


def test_turn_state_is_dropped_from_every_shape_of_the_upstream_body() -> None:
    request = CreateRequest.from_bytes(
        body(stream=True, input=[USER_HI], previous_response_id="resp_1", client_metadata=TURN)
    )
    # A live anchor whose socket belongs to another account: the delta and the anchor stay.
    message = json.loads(request.upstream_message(input_items=None, drop_turn_state=True) or "")
    assert message["client_metadata"] == {"other": "kept"}
    assert message["previous_response_id"] == "resp_1"
    assert message["input"] == [USER_HI]
    assert message["type"] == "response.create"
    assert request.upstream_message(input_items=None) is None  # as the client sent it
    for sent in (
        request.upstream_body(input_items=None, drop_turn_state=True),
        request.upstream_json(input_items=None, drop_turn_state=True),
    ):
        assert json.loads(sent)["client_metadata"] == {"other": "kept"}
    assert request.body["client_metadata"] == TURN  # the request itself is left as it came


def test_a_body_without_turn_state_is_sent_as_it_came() -> None:
    raw = body(stream=True, input=[USER_HI], client_metadata={"other": "kept"})
    request = CreateRequest.from_bytes(raw)
    assert request.upstream_body(input_items=None) is raw
