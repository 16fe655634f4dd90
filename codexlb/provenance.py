"""Which account produced an item of a conversation: pure keys and decisions.

Codex CLI resends its whole history on every new socket and over HTTP on every request, with
no ``previous_response_id`` and without the items' server ids (it never serializes them). To
know which account produced an item codexlb relayed, each output item gets a *key* derived
from what a client sends back unchanged:

    reasoning                     its ``encrypted_content`` (bound to the minting account)
    function / custom tool calls  their ``call_id``
    assistant messages            their text

The store records ``key → account`` for every output item of a completed response, in the
client key's scope; a later request's input is looked up by the same keys. Two things follow:

- **Reasoning only where it can be read.** A reasoning item minted by another account is refused
  upstream (``invalid_encrypted_content``), so it is dropped before the request goes to an
  account; reasoning the account minted itself is kept, and so is reasoning codexlb never saw.
- **The conversation's account.** The account that produced the latest known item of the input
  is the one the conversation was on: a resumed or reconnected Codex session goes back to it,
  after a restart and on any replica.

Keys are digests: they are short, fixed-size and reveal nothing of the item.
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


def item_key(item: Any) -> str | None:
    """The key of an item codexlb may have relayed as output, or ``None`` if it has none."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "reasoning":
        prefix, text = "r:", item.get("encrypted_content")
    elif kind in CALL_TYPES:
        prefix, text = "c:", item.get("call_id")
    elif kind == "message" and item.get("role") == "assistant":
        prefix, text = "m:", _message_text(item.get("content"))
    else:
        return None
    if not isinstance(text, str) or not text:
        return None
    digest = blake2b(text.encode(errors="surrogatepass"), digest_size=16).hexdigest()
    return prefix + digest


def keys_of(items: list[Any]) -> list[str]:
    """The keys of ``items`` that have one: each once, in order. (Called for every request
    and every stored response: one plain loop.)"""
    keys: dict[str, None] = {}
    for item in items:
        if type(item) is dict and item.get("type") in KEYED_TYPES:
            key = item_key(item)
            if key is not None:
                keys[key] = None
    return list(keys)


def latest_owner(items: list[Any], owners: Mapping[str, str]) -> str | None:
    """The account that produced the last item of ``items`` whose owner is known."""
    for item in reversed(items):
        key = item_key(item)
        if key is not None and key in owners:
            return owners[key]
    return None


def readable_by(items: list[Any], owners: Mapping[str, str], account: str) -> list[Any] | None:
    """``items`` without the reasoning ``owners`` says another account minted, or ``None``
    when there is none (the items can go as they are)."""
    kept = [item for item in items if not _minted_elsewhere(item, owners, account)]
    return kept if len(kept) != len(items) else None


def _minted_elsewhere(item: Any, owners: Mapping[str, str], account: str) -> bool:
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
