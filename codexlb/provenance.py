"""Which account produced an item of a conversation: pure keys and decisions.

Codex CLI resends its whole history on every new socket and over HTTP on every request, with
no ``previous_response_id`` and without the items' server ids (it never serializes them). To
know which account produced an item codexlb relayed, each output item gets a *key* derived
from what a client sends back unchanged:

    reasoning                     its ``encrypted_content`` (bound to the minting account)
    function / custom tool calls  their ``call_id``
    assistant messages            their text

The store records ``key → account`` for the output items of a completed response that say who
produced it (``owner_keys``), in the client key's scope; a later request's input is looked up by
the same keys. Two things follow:

- **Reasoning only where it can be read.** A reasoning item minted by another account is refused
  upstream (``invalid_encrypted_content``), so it is dropped before the request goes to an
  account; reasoning the account minted itself is kept, and so is reasoning codexlb never saw.
- **The conversation's account.** The account that produced the latest known item of the input
  is the one the conversation was on: a resumed or reconnected Codex session goes back to it,
  after a restart and on any replica.

Keys are 64-bit digests: an integer is the cheapest key for a database index and a dict, and it
reveals nothing of the item.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

CALL_TYPES = frozenset(
    {"function_call", "custom_tool_call", "local_shell_call", "tool_search_call", "mcp_call"}
)
"""Output items a client resends with their ``call_id``."""
KEYED_TYPES = frozenset({"reasoning", "message", *CALL_TYPES})
"""The item types that may have a key: a cheap test before ``item_key``."""


def item_key(item: Any) -> int | None:
    """The key of an item codexlb may have relayed as output, or ``None`` if it has none: a
    signed 64-bit integer, the first half of the text's 16-byte BLAKE2b digest (the digest
    keys of migration 0003, which migration 0004 carries over that way)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "reasoning":
        text = item.get("encrypted_content")
    elif kind in CALL_TYPES:
        text = item.get("call_id")
    elif kind == "message" and item.get("role") == "assistant":
        text = _message_text(item.get("content"))
    else:
        return None
    if not isinstance(text, str) or not text:
        return None
    digest = blake2b(text.encode(errors="surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def owner_keys(output: list[Any]) -> list[int]:
    """The keys that record who produced a response: its reasoning, each item of which must
    be traced to go only where it can be read; a response without reasoning, its last keyed
    item, which is enough to find the conversation's account (``latest_owner`` reads a
    history from its end). One key for a typical turn (reasoning, then a message or a call):
    each key is a row in a random place of an index, the costliest part of a snapshot's
    commit."""
    keys = keys_of(
        [item for item in output if type(item) is dict and item.get("type") == "reasoning"]
    )
    if keys:
        return keys
    for item in reversed(output):
        if (key := item_key(item)) is not None:
            return [key]
    return []


def keys_of(items: list[Any]) -> list[int]:
    """The keys of ``items`` that have one: each once, in order. (Called for every request
    and every stored response: one plain loop.)"""
    keys: dict[int, None] = {}
    for item in items:
        if type(item) is dict and item.get("type") in KEYED_TYPES and item.get("role") != "user":
            key = item_key(item)
            if key is not None:
                keys[key] = None
    return list(keys)


def latest_owner(items: list[Any], owners: Mapping[int, str]) -> str | None:
    """The account that produced the last item of ``items`` whose owner is known."""
    for item in reversed(items):
        key = item_key(item)
        if key is not None and key in owners:
            return owners[key]
    return None


def readable_by(items: list[Any], owners: Mapping[int, str], account: str) -> list[Any] | None:
    """``items`` without the reasoning ``owners`` says another account minted, or ``None``
    when there is none (the items can go as they are)."""
    kept = [item for item in items if not _minted_elsewhere(item, owners, account)]
    return kept if len(kept) != len(items) else None


def _minted_elsewhere(item: Any, owners: Mapping[int, str], account: str) -> bool:
    if not isinstance(item, dict) or item.get("type") != "reasoning":
        return False
    key = item_key(item)
    return key is not None and owners.get(key, account) != account


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    ]
    return "\x1f".join(texts)
