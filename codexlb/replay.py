"""Pure rebuilding of a conversation's input from its snapshots (SPEC S3.2).

For each ancestor, oldest first: its input items, then its output items; then the current
request's input. Items go back verbatim to the account that produced them: that account can
read its own encrypted reasoning and knows its own item ids. Another account gets the
conversation without ``reasoning`` items (their ``encrypted_content`` is bound to the account
that made them) and without the server-assigned ``id`` of replayed output items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from codexlb.store import Snapshot


def normalize_input(value: Any) -> list[Any]:
    """The request's ``input`` as a list of items (a plain string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    return list(value)


def rebuild_input(chain: Sequence[Snapshot], current_input: list[Any], account: str) -> list[Any]:
    """The full input to send to ``account`` in place of ``previous_response_id``."""
    items: list[Any] = []
    for snapshot in chain:
        if snapshot.account == account:
            items.extend(snapshot.input_items)
            items.extend(snapshot.output_items)
        else:
            items.extend(item for item in snapshot.input_items if not _is_reasoning(item))
            items.extend(
                _without_id(item) for item in snapshot.output_items if not _is_reasoning(item)
            )
    items.extend(current_input)
    return items


def strip_reasoning(items: list[Any]) -> list[Any]:
    """The items without ``reasoning`` ones: for an account that cannot read them."""
    return [item for item in items if not _is_reasoning(item)]


def _is_reasoning(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "reasoning"


def _without_id(item: Any) -> Any:
    if isinstance(item, dict) and "id" in item:
        return {key: value for key, value in item.items() if key != "id"}
    return item
