"""The client's ``response.create`` body, validated before anything goes upstream.

Only the fields codexlb reads or that would be refused upstream anyway are type-checked; every
other field passes through untouched (Codex adds new ones often). Two limits hold for the whole
body, because the store must be able to keep what it accepts: containers nest at most
``MAX_DEPTH`` deep (the JSON encoder gives up a little beyond 250), and the ids that end up in
database columns hold no NUL character (PostgreSQL's text cannot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from codexlb import turn_state
from codexlb.errors import InvalidRequest
from codexlb.replay import normalize_input

_STRING = (str,)
_BOOL = (bool,)
_OBJECT = (dict,)
_ARRAY = (list,)
_NUMBER = (int, float)

MAX_DEPTH = 128
"""The deepest nesting of arrays and objects accepted in a body (the body itself is 1)."""

ID_FIELDS = frozenset({"previous_response_id", "model"})
"""String fields stored in or looked up by database columns."""

_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": (_STRING, "a string"),
    "previous_response_id": (_STRING, "a string"),
    "instructions": (_STRING, "a string"),
    "prompt_cache_key": (_STRING, "a string"),
    "stream": (_BOOL, "a boolean"),
    "store": (_BOOL, "a boolean"),
    "generate": (_BOOL, "a boolean"),
    "background": (_BOOL, "a boolean"),
    "parallel_tool_calls": (_BOOL, "a boolean"),
    "tools": (_ARRAY, "an array"),
    "include": (_ARRAY, "an array"),
    "metadata": (_OBJECT, "an object"),
    "reasoning": (_OBJECT, "an object"),
    "text": (_OBJECT, "an object"),
    "client_metadata": (_OBJECT, "an object"),
    "tool_choice": ((str, dict), "a string or an object"),
    "max_output_tokens": ((int,), "an integer"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
}


@dataclass(slots=True)  # not frozen: one per request, and frozen fields cost a call each
class CreateRequest:
    """A validated ``response.create`` body; treated as immutable (but see ``forget_raw``)."""

    body: dict[str, Any]
    """The body as the client sent it (minus ``type`` for a WebSocket message)."""
    raw: bytes | None
    """The exact bytes of the body, when the body can be forwarded as-is."""
    input_items: list[Any]
    """``input`` as a list of items: what this request adds to the conversation."""

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def previous_response_id(self) -> str | None:
        value = self.body.get("previous_response_id")
        return value if isinstance(value, str) else None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def prompt_cache_key(self) -> str | None:
        value = self.body.get("prompt_cache_key")
        return value if isinstance(value, str) else None

    def forget_raw(self) -> None:
        """Drop the client's bytes once no attempt can follow (the response completed): a
        body of up to ``max_body_bytes`` need not stay alive while its snapshot is written."""
        self.raw = None

    @classmethod
    def from_bytes(cls, raw: bytes) -> CreateRequest:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.") from None
        return cls(body, raw, _validated_input(body, raw))

    @classmethod
    def side_call(cls, raw: bytes) -> CreateRequest:
        """A side call's body (``images/generations``...): relayed as it came, whatever its
        type. It has no conversation, so the exchange has nothing to replay or store."""
        return cls({}, raw, [])

    @classmethod
    def from_body(cls, body: Any, text: str | None = None) -> CreateRequest:
        """``body`` as parsed from ``text``, when the caller has it (a WebSocket message)."""
        return cls(body, None, _validated_input(body, text))

    def upstream_message(
        self,
        *,
        input_items: list[Any] | None,
        anchored: bool = False,
        drop_turn_state: bool = False,
    ) -> str | None:
        """The ``response.create`` text for an upstream WebSocket with other input (a replay,
        or ``anchored``: the client's delta, changed, after its live anchor) or without the
        turn state (``drop_turn_state``, see ``turn_state``), or ``None`` when the client's
        own message can go as it is."""
        if input_items is None and not drop_turn_state:
            return None
        body = turn_state.without_in_body(self.body) if drop_turn_state else self.body
        message = {"type": "response.create", **body}
        if input_items is not None:
            message["input"] = input_items
            if not anchored:
                message.pop("previous_response_id", None)
        return orjson.dumps(message).decode()

    def upstream_json(
        self, *, input_items: list[Any] | None, drop_turn_state: bool = False
    ) -> bytes:
        """The body for a non-streaming upstream call (compact): as sent, or replayed."""
        return self._upstream(input_items, drop_turn_state, stream=False)

    def upstream_body(
        self, *, input_items: list[Any] | None, drop_turn_state: bool = False
    ) -> bytes:
        """The streaming body for the upstream: the client's bytes when nothing must change."""
        return self._upstream(input_items, drop_turn_state, stream=True)

    def _upstream(
        self, input_items: list[Any] | None, drop_turn_state: bool, *, stream: bool
    ) -> bytes:
        if (
            input_items is None
            and not drop_turn_state
            and self.raw is not None
            and (self.stream or not stream)
            and "previous_response_id" not in self.body
        ):
            return self.raw
        body = turn_state.without_in_body(self.body) if drop_turn_state else dict(self.body)
        body.pop("previous_response_id", None)
        if stream:
            body["stream"] = True
        if input_items is not None:
            body["input"] = input_items
        return orjson.dumps(body)


def _validated_input(body: Any, raw: bytes | str | None = None) -> list[Any]:
    """Check the fields codexlb reads or the upstream would refuse; the input as a list.
    ``raw``, the text ``body`` was parsed from, spares most bodies the walk for depth."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name, value in body.items():  # fewer than the checked fields, usually
        expected = _FIELD_TYPES.get(name)
        if expected is None or value is None:
            continue
        types, description = expected
        if not isinstance(value, types) or (type(value) is bool and bool not in types):
            raise InvalidRequest(f"Invalid type for '{name}': expected {description}.", param=name)
        if name in ID_FIELDS and isinstance(value, str):
            check_id(name, value)
    if not _shallow(raw) and _deeper_than(MAX_DEPTH, body):
        name = next(name for name, value in body.items() if _deeper_than(MAX_DEPTH - 1, value))
        raise InvalidRequest(
            f"Invalid value for '{name}': arrays and objects nest deeper than {MAX_DEPTH} levels.",
            param=name,
        )
    if not body.get("model"):
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    value = body.get("input")
    if value is not None and not isinstance(value, str | list):
        raise InvalidRequest(
            "Invalid type for 'input': expected a string or an array of items.", param="input"
        )
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise InvalidRequest(
                    f"Invalid type for 'input[{index}]': expected an object.",
                    param=f"input[{index}]",
                )
    return normalize_input(value)


def check_id(name: str, value: str) -> None:
    """Refuse an id that no stored response can have: one holding a NUL character."""
    if "\x00" in value:
        raise InvalidRequest(
            f"Invalid value for '{name}': it contains a NUL character.", param=name
        )


def _shallow(raw: bytes | str | None) -> bool:
    """Whether a body parsed from ``raw`` cannot nest deeper than ``MAX_DEPTH``: it opens no
    more arrays and objects than that in all (counted at C speed, strings included)."""
    if raw is None:
        return False
    if isinstance(raw, bytes):
        return raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH
    return raw.count("[") + raw.count("{") <= MAX_DEPTH


def _deeper_than(limit: int, value: Any) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels deep; walked
    level by level, so a deep value costs no recursion."""
    level = [value] if type(value) is dict or type(value) is list else []
    for _ in range(limit):
        if not level:
            return False
        deeper: list[Any] = []
        for container in level:
            for child in container.values() if type(container) is dict else container:
                if type(child) is dict or type(child) is list:
                    deeper.append(child)
        level = deeper
    return bool(level)
