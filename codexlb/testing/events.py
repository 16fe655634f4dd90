"""The events of one generated response, built as values and encoded once.

Pure helpers for the fake upstream: what a request asks for (`last_user_text`,
`foreign_reasoning`), the output items it gets (`reasoning_item`, `message_item`,
`complete_items`), and the event sequence of a response (`response_events`, `failed_events`)
with its encodings (`encode_sse`). Event shapes follow the Responses streaming API as the
ChatGPT backend sends it; `response.completed` carries ``output: []`` unless asked otherwise.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

_ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "custom_tool_call": "ctc",
    "reasoning": "rs",
}


def new_id(prefix: str) -> str:
    """A fresh server id such as ``resp_<24 hex>``."""
    return f"{prefix}_{secrets.token_hex(12)}"


def reasoning_item(account: str) -> dict[str, Any]:
    """A reasoning item whose ``encrypted_content`` is bound to ``account``."""
    return {
        "type": "reasoning",
        "id": new_id("rs"),
        "summary": [],
        "encrypted_content": f"enc:{account}:{secrets.token_hex(16)}",
    }


def reasoning_owner(encrypted_content: object) -> str | None:
    """The account an ``enc:<account>:<hex>`` blob belongs to; None if it is malformed."""
    if not isinstance(encrypted_content, str) or not encrypted_content.startswith("enc:"):
        return None
    account, _, digest = encrypted_content[4:].rpartition(":")
    if not account or not digest:
        return None
    try:
        bytes.fromhex(digest)
    except ValueError:
        return None
    return account


def foreign_reasoning(input_items: object, account: str) -> str | None:
    """The id of the first input reasoning item not made by ``account``, else None.

    A reasoning item without ``encrypted_content`` counts as foreign: with ``store: false``
    the upstream has nothing to look it up by.
    """
    if not isinstance(input_items, list):
        return None
    for item in input_items:
        if not isinstance(item, Mapping) or item.get("type") != "reasoning":
            continue
        if reasoning_owner(item.get("encrypted_content")) != account:
            return str(item.get("id", ""))
    return None


def last_user_text(input_items: object) -> str:
    """The input itself if it is a string, else the last user ``input_text``, else ""."""
    if isinstance(input_items, str):
        return input_items
    if not isinstance(input_items, list):
        return ""
    for item in reversed(input_items):
        if not isinstance(item, Mapping) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            for part in reversed(content):
                if isinstance(part, Mapping) and part.get("type") == "input_text":
                    return str(part.get("text", ""))
    return ""


def message_item(text: str) -> dict[str, Any]:
    """A completed assistant message with one ``output_text`` part."""
    return {
        "type": "message",
        "id": new_id("msg"),
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def complete_items(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of responder items with the fields the upstream assigns filled in.

    Items without an ``id`` get one (``fc_`` for function calls, ``msg_`` for messages);
    messages and function calls without ``status`` get ``"completed"``; function calls without
    ``call_id`` get a ``call_`` id.
    """
    completed = []
    for item in items:
        copy = dict(item)
        kind = str(copy.get("type", ""))
        copy.setdefault("id", new_id(_ITEM_ID_PREFIXES.get(kind, "item")))
        if kind in ("message", "function_call"):
            copy.setdefault("status", "completed")
        if kind == "function_call":
            copy.setdefault("call_id", new_id("call"))
        completed.append(copy)
    return completed


def usage(input_items: object, output: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Deterministic small token counts derived from the item counts and output text length."""
    input_tokens = 10 * (len(input_items) if isinstance(input_items, list) else 1)
    output_tokens = sum(8 + len(text) // 4 for item in output for text in _texts(item))
    output_tokens += 4 * len(output)
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(
    request: Mapping[str, Any], response_id: str, created_at: int, status: str
) -> dict[str, Any]:
    """The ``response`` of lifecycle events.

    Compact on purpose: the request's ``tools``, ``instructions`` and ``reasoning`` are not
    echoed, since Codex sends tens of kilobytes of tools and reads none of them back.
    """
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "store": False,
        "tool_choice": request.get("tool_choice", "auto"),
        "usage": None,
        "metadata": {},
    }


def response_events(
    request: Mapping[str, Any],
    response_id: str,
    output: Sequence[Mapping[str, Any]],
    *,
    created_at: int,
    deltas: int,
    completed_output: bool,
) -> list[dict[str, Any]]:
    """Every event of a successful response producing ``output``, numbered from 0.

    Messages stream each ``output_text`` part in ``deltas`` pieces (one per character when the
    text is shorter, one empty piece for an empty text, none when ``deltas`` is 0); function
    calls stream their arguments in one delta.
    """
    events: list[dict[str, Any]] = []
    in_progress = response_object(request, response_id, created_at, "in_progress")
    events.append({"type": "response.created", "response": in_progress})
    events.append({"type": "response.in_progress", "response": in_progress})
    for index, item in enumerate(output):
        events.extend(_item_events(index, item, deltas))
    completed = response_object(request, response_id, created_at, "completed")
    completed["usage"] = usage(request.get("input"), output)
    if completed_output:
        completed["output"] = list(output)
    events.append({"type": "response.completed", "response": completed})
    return _numbered(events)


def failed_events(
    request: Mapping[str, Any], response_id: str, code: str, *, created_at: int
) -> list[dict[str, Any]]:
    """``response.created`` then ``response.failed`` with ``response.error.code``."""
    created = response_object(request, response_id, created_at, "in_progress")
    failed = response_object(request, response_id, created_at, "failed")
    failed["error"] = {"code": code, "message": f"The response failed ({code})."}
    return _numbered(
        [
            {"type": "response.created", "response": created},
            {"type": "response.failed", "response": failed},
        ]
    )


def encode_sse(events: Sequence[Mapping[str, Any]]) -> bytes:
    """SSE framing, ``event: <type>\\ndata: <json>\\n\\n`` per event, as one byte string."""
    return "".join(
        f"event: {event['type']}\ndata: {encode_json(event)}\n\n" for event in events
    ).encode()


def encode_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _numbered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def _item_events(index: int, item: Mapping[str, Any], deltas: int) -> Iterator[dict[str, Any]]:
    kind = item.get("type")
    item_id = item.get("id")
    yield {"type": "response.output_item.added", "output_index": index, "item": _pending(item)}
    if kind == "message":
        for part_index, part in enumerate(item.get("content", [])):
            if part.get("type") != "output_text":
                continue
            text = str(part.get("text", ""))
            where = {"item_id": item_id, "output_index": index, "content_index": part_index}
            empty_part = {**part, "text": ""}
            yield {"type": "response.content_part.added", **where, "part": empty_part}
            for piece in split_text(text, deltas):
                yield {
                    "type": "response.output_text.delta",
                    **where,
                    "delta": piece,
                    "logprobs": [],
                }
            yield {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
            yield {"type": "response.content_part.done", **where, "part": dict(part)}
    elif kind == "function_call":
        arguments = str(item.get("arguments", ""))
        where = {"item_id": item_id, "output_index": index}
        yield {"type": "response.function_call_arguments.delta", **where, "delta": arguments}
        yield {"type": "response.function_call_arguments.done", **where, "arguments": arguments}
    yield {"type": "response.output_item.done", "output_index": index, "item": dict(item)}


def _pending(item: Mapping[str, Any]) -> dict[str, Any]:
    """The item as ``output_item.added`` shows it: nothing produced yet."""
    kind = item.get("type")
    if kind == "message":
        return {**item, "status": "in_progress", "content": []}
    if kind == "reasoning":
        return {key: value for key, value in item.items() if key != "encrypted_content"}
    if kind == "function_call":
        return {**item, "status": "in_progress", "arguments": ""}
    return dict(item)


def split_text(text: str, pieces: int) -> list[str]:
    """``text`` cut into ``pieces`` contiguous non-empty parts (fewer if it is shorter)."""
    if pieces <= 0:
        return []
    if not text:
        return [""]
    pieces = min(pieces, len(text))
    bounds = [len(text) * number // pieces for number in range(pieces + 1)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def _texts(item: Mapping[str, Any]) -> Iterator[str]:
    if item.get("type") == "function_call":
        yield str(item.get("arguments", ""))
    content = item.get("content")
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]
