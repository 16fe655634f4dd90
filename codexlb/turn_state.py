"""Turn state stays with the account that issued it (SPEC S13, PROTOCOL §7).

An upstream account may give a turn an opaque state: over HTTP in the ``x-codex-turn-state``
header of an answer, over WebSocket in a ``response.metadata`` event's ``headers``. Codex sends
it back on the later requests of that turn: over HTTP as the same request header, over
WebSocket as ``client_metadata["x-codex-turn-state"]`` (also after a reconnect). It means
something to the account that issued it only, so the pool remembers who issued each
(``Pool.remember_turn_state``), the rest of the turn prefers that account, and any other
account gets the request without it. A turn state whose issuer is not known (issued before a
restart, or never seen) goes nowhere: dropping it is always safe, forwarding it to a stranger
is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADER = "x-codex-turn-state"
METADATA_KEY = HEADER
"""The ``client_metadata`` key of a WebSocket ``response.create``."""


def in_body(body: Mapping[str, Any]) -> str | None:
    """The turn state a request body carries in ``client_metadata``."""
    metadata = body.get("client_metadata")
    if metadata is None:  # most requests: no ``isinstance`` check against an ABC
        return None
    if isinstance(metadata, Mapping):
        value = metadata.get(METADATA_KEY)
        if isinstance(value, str) and value:
            return value
    return None


def in_headers(headers: Mapping[str, str]) -> str | None:
    """The turn state of headers whose names are looked up case-insensitively (a client
    request's) or kept in lower case (an upstream answer's)."""
    return headers.get(HEADER) or None


def in_any_case(headers: Mapping[str, str]) -> str | None:
    """The turn state of headers kept with the case the client sent their names in."""
    for name, value in headers.items():
        if name.lower() == HEADER:
            return value or None
    return None


def in_metadata_event(event: Any) -> str | None:
    """The turn state a WebSocket ``response.metadata`` event issues."""
    if isinstance(event, Mapping):
        headers = event.get("headers")
        if isinstance(headers, Mapping):
            value = headers.get(HEADER)
            if isinstance(value, str) and value:
                return value
    return None


def without_header(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without the turn state."""
    return {name: value for name, value in headers.items() if name.lower() != HEADER}


def without_in_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` whose ``client_metadata`` lost the turn state (other keys stay)."""
    metadata = body.get("client_metadata")
    if not isinstance(metadata, Mapping) or METADATA_KEY not in metadata:
        return dict(body)
    kept = {key: value for key, value in metadata.items() if key != METADATA_KEY}
    return {**body, "client_metadata": kept}
