"""Item keys and the decisions made from them, without a database."""

from __future__ import annotations

from typing import Any

from codexlb.provenance import item_key, keys_of, latest_owner, owner_keys, readable_by


def reasoning(content: str, **extra: Any) -> dict[str, Any]:
    return {"type": "reasoning", "summary": [], "encrypted_content": content, **extra}


def call(call_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}", **extra}


def said(text: str, role: str = "assistant", **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "role": role,
        "content": [{"type": "output_text", "text": text}],
        **extra,
    }


def test_keys_ignore_what_a_client_leaves_out_when_it_resends() -> None:
    assert item_key(reasoning("enc:a:01", id="rs_1")) == item_key(reasoning("enc:a:01"))
    assert item_key(call("call_1", id="fc_1", status="completed")) == item_key(call("call_1"))
    annotated = said("done")
    annotated["content"][0]["annotations"] = []
    assert item_key(annotated) == item_key(said("done", id="msg_1"))


def test_items_a_client_writes_have_no_key() -> None:
    for item in (
        said("hello", role="user"),
        said("be brief", role="developer"),
        {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
        reasoning(""),
        {"type": "reasoning", "summary": []},
        call(""),
        "not an item",
        {"type": "additional_tools", "tools": []},
    ):
        assert item_key(item) is None, item


def key(item: dict[str, Any]) -> int:
    found = item_key(item)
    assert found is not None
    return found


def test_keys_tell_items_apart_in_64_bits() -> None:
    keys = keys_of([reasoning("enc:a:01"), reasoning("enc:a:02"), call("call_1"), said("done")])
    assert len(set(keys)) == 4
    assert all(-(2**63) <= key < 2**63 for key in keys)  # a database's BIGINT
    assert keys_of([call("call_1"), call("call_1")]) == [key(call("call_1"))]


def test_a_response_is_traced_by_its_reasoning_else_by_its_last_item() -> None:
    first, second = reasoning("enc:a:01"), reasoning("enc:a:02")
    assert owner_keys([first, call("call_1"), second, said("done")]) == [key(first), key(second)]
    assert owner_keys([call("call_1"), call("call_2"), {"type": "web_search_call"}]) == [
        key(call("call_2"))
    ]
    assert owner_keys([{"type": "reasoning", "summary": []}, said("done")]) == [key(said("done"))]
    assert owner_keys([{"type": "web_search_call"}]) == []


def test_the_latest_known_item_names_the_account() -> None:
    items = [
        said("one", role="user"),
        reasoning("enc:a:01"),
        call("call_1"),
        said("two", role="user"),
    ]
    owners = {key(items[1]): "a", key(items[2]): "b"}
    assert latest_owner(items, owners) == "b"
    assert latest_owner(items[:2], owners) == "a"
    assert latest_owner(items, {}) is None  # nothing known


def test_only_reasoning_another_account_minted_is_dropped() -> None:
    mine, theirs, unknown = reasoning("enc:a:01"), reasoning("enc:b:02"), reasoning("enc:z:03")
    other_call = call("call_b")
    items = [said("q", role="user"), mine, theirs, unknown, other_call]
    owners = {
        key(mine): "a",
        key(theirs): "b",
        key(other_call): "b",
    }
    assert readable_by(items, owners, "a") == [said("q", role="user"), mine, unknown, other_call]
    assert readable_by(items, owners, "b") == [said("q", role="user"), theirs, unknown, other_call]
    assert readable_by(items, owners, "c") == [said("q", role="user"), unknown, other_call]
    assert readable_by(items, {key(mine): "a"}, "a") is None  # the input goes as is
