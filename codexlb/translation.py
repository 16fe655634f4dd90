"""The translated APIs (SPEC S11): what a door beside the Responses API must say, as values.

A ``Door`` (``chat.CHAT_COMPLETIONS``, ``messages.MESSAGES``) turns a client's body into a
``Translation``: the Responses request (``create``) that goes through the one ``Exchange`` like
a native request (routing, failover before visible output, affinity), and the rules to turn the
answer back into the client's API, each pure:

    events()       a fresh translator per attempt: (event type, JSON data, raw bytes) of one
                   upstream SSE event in, the bytes the client gets for it out (often none)
    reply(r)       a terminal response object (completed, incomplete or failed, its output
                   filled in) → (status, the client's JSON)
    error(s, b)    an upstream error answer (status, OpenAI error body) → the client's shape

The transport (``http_proxy``) reads, relays and frames; it knows nothing of either API.
These requests are stateless (the client sends the whole history): no snapshot is stored.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from codexlb.config import ModelsConfig
from codexlb.errors import InvalidRequest, shown
from codexlb.payload import CreateRequest

EventTranslator = Callable[[str | None, bytes, bytes], bytes]
"""(event type, its JSON data, the raw SSE block) → the bytes the client gets for it."""

FORWARDED_HEADERS = ("session-id", "thread-id")
"""The only client headers a translated request carries upstream: the rest belong to another
API (``x-api-key``, ``anthropic-version``, SDK telemetry) and mean nothing to the upstream."""

SESSION_HEADERS = ("session-id", "thread-id", "x-claude-code-session-id")
"""Headers that name a client's session, for soft affinity (S4)."""


class Door(Protocol):
    route: str
    """The route name of the request's log line."""

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        """The ``Authorization`` value the client key is read from."""

    def translate(self, raw: bytes, models: ModelsConfig) -> Translation:
        """The client's body as a Responses request; raises S1.4's ``InvalidRequest``."""


class Translation(ABC):
    """One translated request: the Responses request and the way back."""

    def __init__(
        self,
        body: dict[str, Any],
        *,
        stream: bool,
        max_output_tokens: int | None,
        affinity: str | None,
    ) -> None:
        self.create = CreateRequest.from_body(body)
        self.stream = stream
        """The client asked for an event stream (the upstream always streams)."""
        self.max_output_tokens = max_output_tokens
        """Sent to platform accounts only: the ChatGPT backend refuses the field."""
        self.affinity = affinity

    def upstream_body(self, input_items: list[Any] | None, *, platform: bool) -> bytes:
        """The body for one attempt: ``input_items`` when the exchange changed the input."""
        body = dict(self.create.body)
        if input_items is not None:
            body["input"] = input_items
        if platform and self.max_output_tokens is not None:
            body["max_output_tokens"] = self.max_output_tokens
        return orjson.dumps(body)

    def affinity_key(self, headers: Mapping[str, str]) -> str | None:
        """Soft affinity (S4): a session header, else what the body names its session by."""
        for name in SESSION_HEADERS:
            if value := headers.get(name):
                return value
        return self.affinity

    @abstractmethod
    def events(self) -> EventTranslator: ...

    @abstractmethod
    def reply(self, response: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...

    @abstractmethod
    def error(self, status: int, body: Any) -> tuple[int, dict[str, Any]]: ...


def upstream_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in FORWARDED_HEADERS if name in headers}


# -- helpers shared by the doors ------------------------------------------------------------


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def json_object(data: bytes) -> dict[str, Any]:
    """An event's JSON object; ``{}`` for anything else."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def expect(value: Any, types: type | tuple[type, ...], param: str, what: str) -> Any:
    """``value`` when it is of ``types`` (a bool is no number), else S1.4's 400."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise InvalidRequest(f"Invalid type for '{param}': expected {what}.", param=param)
    return value


def required_model(body: Mapping[str, Any]) -> str:
    """The request's ``model``, which both translated APIs require."""
    model = body.get("model")
    if not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    return str(expect(model, str, "model", "a string"))


def optional_int(body: Mapping[str, Any], name: str, *, minimum: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    expect(value, int, name, "an integer")
    if value < minimum:
        raise invalid(name, f"expected at least {minimum}, got {value}.")
    return int(value)


def unsupported(param: str, value: Any) -> InvalidRequest:
    return invalid(param, f"'{shown(str(value))}' is not supported here.")


def session_digest(value: str) -> str:
    """A short, stable ``prompt_cache_key`` for a long client session name."""
    return hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def usage_counts(response: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(input, cached input, output, reasoning) tokens of a response's ``usage``."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    details_in = usage.get("input_tokens_details")
    details_out = usage.get("output_tokens_details")
    return (
        _count(usage.get("input_tokens")),
        _count(details_in.get("cached_tokens") if isinstance(details_in, dict) else 0),
        _count(usage.get("output_tokens")),
        _count(details_out.get("reasoning_tokens") if isinstance(details_out, dict) else 0),
    )


def output_items(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    output = response.get("output")
    if not isinstance(output, list):
        return []
    return [item for item in output if isinstance(item, dict)]


def message_texts(item: Mapping[str, Any]) -> list[str]:
    """The texts of an output message: its ``output_text`` and ``refusal`` parts."""
    texts: list[str] = []
    content = item.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
    return texts


def reasoning_text(item: Mapping[str, Any]) -> str:
    summary = item.get("summary")
    if not isinstance(summary, list):
        return ""
    return "\n\n".join(
        part["text"]
        for part in summary
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def failure_of(response: Mapping[str, Any]) -> tuple[str, str]:
    """(code, message) of a failed response."""
    error = response.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return (
        code if isinstance(code, str) else "server_error",
        message if isinstance(message, str) else "The upstream failed the response.",
    )


def error_message(body: Any) -> tuple[str | None, str]:
    """(code, message) of an OpenAI error body or ``error`` event."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, "The upstream failed the request."
    code = error.get("code") or error.get("type")
    message = error.get("message")
    return (
        code if isinstance(code, str) else None,
        message if isinstance(message, str) else "The upstream failed the request.",
    )


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
