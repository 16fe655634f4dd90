"""Rebuilding a conversation's input from its snapshots (SPEC S3.2)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from codexlb.replay import normalize_input, rebuild_input, strip_reasoning
from codexlb.store import Snapshot


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def reasoning(item_id: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "encrypted_content": "gAAA" + item_id,
    }


def assistant(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text}],
    }


def call(item_id: str, call_id: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": "shell",
        "arguments": "{}",
    }


def call_output(call_id: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": "ok"}


def snapshot(n: int, account: str, input_items: list[Any], output_items: list[Any]) -> Snapshot:
    return Snapshot(
        response_id=f"resp_{n}",
        previous_response_id=f"resp_{n - 1}" if n > 1 else None,
        scope="alice",
        account=account,
        model="gpt-5-codex",
        input_items=input_items,
        output_items=output_items,
        usage=None,
        created_at=datetime(2025, 6, 1, 12, n, tzinfo=UTC),
    )


def chain(*accounts: str) -> list[Snapshot]:
    """Three turns: a prompt, a tool call and its output, a follow-up prompt."""
    turns: list[tuple[list[Any], list[Any]]] = [
        ([user("first")], [reasoning("rs_1"), call("fc_1", "call_1")]),
        (
            [reasoning("rs_1"), call_output("call_1")],
            [reasoning("rs_2"), assistant("msg_2", "done")],
        ),
        ([user("third")], [assistant("msg_3", "bye")]),
    ]
    return [
        snapshot(n, account, inputs, outputs)
        for n, (account, (inputs, outputs)) in enumerate(zip(accounts, turns, strict=True), 1)
    ]


CURRENT = [reasoning("rs_client"), user("now"), call_output("call_9")]


def test_same_account_replay_is_verbatim_oldest_first() -> None:
    snapshots = chain("work-1", "work-1", "work-1")

    items = rebuild_input(snapshots, CURRENT, "work-1")

    assert items == [
        user("first"),
        reasoning("rs_1"),
        call("fc_1", "call_1"),
        reasoning("rs_1"),
        call_output("call_1"),
        reasoning("rs_2"),
        assistant("msg_2", "done"),
        user("third"),
        assistant("msg_3", "bye"),
        *CURRENT,
    ]


def test_cross_account_replay_drops_reasoning_and_output_ids() -> None:
    snapshots = chain("work-1", "work-1", "work-1")

    items = rebuild_input(snapshots, CURRENT, "work-2")

    assert items == [
        user("first"),
        {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{}"},
        call_output("call_1"),
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "done"}],
        },
        user("third"),
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "bye"}],
        },
        *CURRENT,
    ]


def test_current_input_is_never_altered() -> None:
    items = rebuild_input(chain("work-1", "work-1", "work-1"), CURRENT, "work-2")

    assert items[-3:] == CURRENT
    assert items[-3]["id"] == "rs_client"


def test_mixed_account_chain_applies_the_rule_per_snapshot() -> None:
    snapshots = chain("work-1", "work-2", "work-1")

    items = rebuild_input(snapshots, [user("now")], "work-2")

    assert items == [
        user("first"),
        {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{}"},
        reasoning("rs_1"),
        call_output("call_1"),
        reasoning("rs_2"),
        assistant("msg_2", "done"),
        user("third"),
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "bye"}],
        },
        user("now"),
    ]


def test_replay_does_not_mutate_the_snapshots() -> None:
    snapshots = chain("work-1", "work-1", "work-1")
    before = copy.deepcopy(snapshots)

    rebuild_input(snapshots, CURRENT, "work-2")

    assert snapshots == before


def test_empty_chain_is_the_current_input() -> None:
    assert rebuild_input([], [user("now")], "work-1") == [user("now")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("hi", [user("hi")]),
        ("", [user("")]),
        ([], []),
        ([user("a"), call_output("c")], [user("a"), call_output("c")]),
    ],
)
def test_normalize_input(value: Any, expected: list[Any]) -> None:
    assert normalize_input(value) == expected


def test_normalize_input_returns_a_new_list() -> None:
    items = [user("a")]

    normalized = normalize_input(items)
    normalized.append(user("b"))

    assert items == [user("a")]


def test_strip_reasoning_keeps_everything_else_in_order() -> None:
    items = [reasoning("rs_1"), user("a"), "opaque", reasoning("rs_2"), call("fc_1", "c")]

    assert strip_reasoning(items) == [user("a"), "opaque", call("fc_1", "c")]
