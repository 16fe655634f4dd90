"""Anthropic Messages on the pool (SPEC S11): ``POST /v1/messages`` as a Responses request, and
the answer back as a ``message`` or its event stream.

Request, field by field::

    system            string or text blocks → developer messages
    messages          user text / image (base64 → data URL, url) → input_text / input_image;
                      tool_result → function_call_output (an error result says so first);
                      assistant text → output_text; tool_use → function_call; thinking
                      (its signature is the reasoning item's id and encrypted content)
                      and redacted_thinking → reasoning items
    tools             {name, description, input_schema} → function tools
    tool_choice       auto / any / tool / none → auto / required / {name} / none;
                      disable_parallel_tool_use → parallel_tool_calls false
    thinking          enabled (budget_tokens → effort) or adaptive → reasoning with a
                      summary and its encrypted content, shown as thinking blocks;
                      output_config.effort → reasoning.effort
    max_tokens        → max_output_tokens (platform accounts only)
    stop_sequences    honoured by codexlb on text: the upstream has no such field
    metadata.user_id  → soft affinity (after Claude Code's session header) and the
                      upstream's prompt cache key
    role system       (inside messages) → a developer message

The stream follows Anthropic's order: ``message_start``, ``ping``, then per block
``content_block_start``, ``content_block_delta`` (``text_delta``, ``input_json_delta``,
``thinking_delta``, ``signature_delta``), ``content_block_stop``; then ``message_delta`` with
``stop_reason`` (``end_turn``, ``tool_use``, ``max_tokens``, ``stop_sequence``, ``refusal``) and
the usage, and ``message_stop``. A failure after the stream began is an ``error`` event. Errors
take Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from codexlb.config import ModelsConfig
from codexlb.errors import InvalidRequest, anthropic_error
from codexlb.failover import status_for
from codexlb.model_names import upstream_model
from codexlb.translation import (
    EventTranslator,
    Translation,
    error_message,
    expect,
    failure_of,
    invalid,
    json_object,
    optional_int,
    output_items,
    parse_object,
    reasoning_text,
    required_model,
    session_digest,
    unsupported,
    usage_counts,
)

TOOL_ERROR_PREFIX = "Error: "
"""How a ``tool_result`` with ``is_error`` reads to the upstream, which has no such flag."""
MAX_STOP_SEQUENCES = 16
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}
"""Anthropic's ``output_config.effort`` → the upstream's ``reasoning.effort``."""


class Messages:
    route = "messages"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        """``Authorization: Bearer``, else Anthropic's ``x-api-key``."""
        authorization = headers.get("Authorization")
        if authorization:
            return authorization
        key = headers.get("x-api-key")
        return f"Bearer {key}" if key else None

    def translate(self, raw: bytes, models: ModelsConfig) -> MessagesTranslation:
        return translate(parse_object(raw), models)


MESSAGES = Messages()


def translate(body: dict[str, Any], models: ModelsConfig) -> MessagesTranslation:
    """The Messages ``body`` as a Responses request (see the module's table)."""
    model = required_model(body)
    max_tokens = optional_int(body, "max_tokens")
    if max_tokens is None:
        raise InvalidRequest("Missing required parameter: 'max_tokens'.", param="max_tokens")
    stream = expect(body.get("stream", False) or False, bool, "stream", "a boolean")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("Invalid type for 'messages': expected an array.", param="messages")
    items = _system(body.get("system"))
    for index, message in enumerate(messages):
        items += _message_items(message, f"messages[{index}]")
    request: dict[str, Any] = {
        "model": upstream_model(models, model, use_default=True),
        "input": items,
        "store": False,
        "stream": True,
    }
    tools = body.get("tools")
    if tools is not None:
        expect(tools, list, "tools", "an array")
        request["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    if body.get("tool_choice") is not None:
        choice, parallel = _tool_choice(body["tool_choice"])
        request["tool_choice"] = choice
        if parallel is not None:
            request["parallel_tool_calls"] = parallel
    thinking = _thinking(body.get("thinking"), max_tokens)
    reasoning = dict(thinking or {})
    effort = _effort(body.get("output_config"))
    if effort is not None:
        reasoning["effort"] = effort
    if reasoning:
        request["reasoning"] = reasoning
    if thinking is not None:
        request["include"] = ["reasoning.encrypted_content"]
    user = None
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        user = metadata["user_id"] or None
    if user is not None:
        request["prompt_cache_key"] = session_digest(user)
    return MessagesTranslation(
        request,
        stream=stream,
        max_output_tokens=max_tokens,
        affinity=user,
        model=model,
        thinking=thinking is not None,
        stop_sequences=_stop_sequences(body.get("stop_sequences")),
    )


def estimate_tokens(raw: bytes, models: ModelsConfig) -> int:
    """``/v1/messages/count_tokens``: the request's size in tokens, estimated (about four
    bytes of JSON a token) from what would go upstream."""
    body = parse_object(raw)
    body.setdefault("max_tokens", 1)
    request = translate(body, models).create.body
    sent = orjson.dumps([request.get("input"), request.get("tools")])
    return max(1, len(sent) // 4)


class MessagesTranslation(Translation):
    def __init__(
        self,
        body: dict[str, Any],
        *,
        stream: bool,
        max_output_tokens: int | None,
        affinity: str | None,
        model: str,
        thinking: bool,
        stop_sequences: list[str],
    ) -> None:
        super().__init__(
            body, stream=stream, max_output_tokens=max_output_tokens, affinity=affinity
        )
        self.model = model
        self.thinking = thinking
        self.stop_sequences = stop_sequences

    def events(self) -> EventTranslator:
        return _EventStream(self).event

    def reply(self, response: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if response.get("status") == "failed":
            code, message = failure_of(response)
            status = status_for(code)
            return status, anthropic_error(status, message)
        content: list[dict[str, Any]] = []
        stopped: str | None = None
        called = False
        for item in output_items(response):
            kind = item.get("type")
            if kind == "reasoning" and self.thinking:
                content.append(_thinking_block(item))
            elif kind == "message" and stopped is None:
                for part in item.get("content") or []:
                    text = _part_text(part)
                    if text is None:
                        continue
                    text, stopped = _cut(text, self.stop_sequences)
                    content.append({"type": "text", "text": text, "citations": None})
                    if stopped is not None:
                        break
            elif kind == "function_call" and stopped is None:
                called = True
                content.append(_tool_use(item))
        return 200, {
            "id": message_id(response),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason(response, called, stopped),
            "stop_sequence": stopped,
            "usage": usage(response),
        }

    def error(self, status: int, body: Any) -> tuple[int, dict[str, Any]]:
        _, message = error_message(body)
        return status, anthropic_error(status, message)


def stop_reason(response: Mapping[str, Any], called: bool, stopped: str | None) -> str:
    if stopped is not None:
        return "stop_sequence"
    if response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return "refusal" if reason == "content_filter" else "max_tokens"
    return "tool_use" if called else "end_turn"


def usage(response: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic counts cached input apart: ``input_tokens`` is what was not read from the
    cache."""
    total, cached, output, _ = usage_counts(response)
    return {
        "input_tokens": max(total - cached, 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output,
    }


def message_id(response: Mapping[str, Any]) -> str:
    response_id = response.get("id")
    if isinstance(response_id, str) and response_id:
        return "msg_" + response_id.removeprefix("resp_")
    return "msg_codexlb"


class _EventStream:
    """The events of one attempt's answer, event by event."""

    def __init__(self, translation: MessagesTranslation) -> None:
        self.model = translation.model
        self.thinking = translation.thinking
        self.stop_sequences = translation.stop_sequences
        self.started = False
        self.finished = False
        self.blocks = 0
        self.open: int | None = None
        """The index of the open content block."""
        self.open_item: int | None = None
        """The output index of the item the open block shows."""
        self.called = False
        self.stopped: str | None = None
        self.text = ""
        """The open text block's text so far (with stop sequences)."""
        self.shown = 0
        """Characters of ``text`` sent to the client."""
        self.sent_arguments = 0
        self.summary_parts = 0
        self.thought = False
        """The open thinking block got summary deltas."""

    def event(self, kind: str | None, data: bytes, raw: bytes) -> bytes:
        if kind is None:
            return raw  # a keep-alive comment: SSE clients skip it
        if self.finished:
            return b""
        if kind == "response.created":
            response = json_object(data).get("response")
            return self._start(response if isinstance(response, dict) else {})
        if self.stopped is not None and kind not in _TERMINAL:
            return b""  # past a stop sequence: the rest of the output is not shown
        event = json_object(data)
        index = event.get("output_index")
        if kind == "response.content_part.added":
            part = event.get("part")
            if isinstance(part, dict) and part.get("type") in ("output_text", "refusal"):
                self.text, self.shown = "", 0
                return self._open(index, {"type": "text", "text": ""})
            return b""
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            return self._text(_string(event.get("delta")))
        if kind == "response.content_part.done":
            return self._text_done()
        if kind == "response.output_item.added":
            return self._item_added(event.get("item"), index)
        if kind == "response.function_call_arguments.delta":
            if self.open_item != index:
                return b""
            delta = _string(event.get("delta"))
            self.sent_arguments += len(delta)
            return self._delta({"type": "input_json_delta", "partial_json": delta})
        if kind == "response.reasoning_summary_text.delta":
            if not self.thinking or self.open_item != index:
                return b""
            self.thought = True
            return self._delta({"type": "thinking_delta", "thinking": _string(event.get("delta"))})
        if kind == "response.reasoning_summary_part.added":
            self.summary_parts += 1
            if not self.thinking or self.open_item != index or self.summary_parts == 1:
                return b""
            return self._delta({"type": "thinking_delta", "thinking": "\n\n"})
        if kind == "response.output_item.done":
            return self._item_done(event.get("item"), index)
        if kind in ("response.completed", "response.incomplete"):
            response = event.get("response")
            return self._finish(response if isinstance(response, dict) else {})
        if kind == "response.failed":
            response = event.get("response")
            _, message = failure_of(response if isinstance(response, dict) else {})
            return self._error(500, message)
        if kind == "error":
            status = event.get("status")
            _, message = error_message(event)
            return self._error(status if type(status) is int else 500, message)
        return b""

    def _start(self, response: Mapping[str, Any]) -> bytes:
        if self.started:
            return b""
        self.started = True
        message: dict[str, Any] = {
            "id": message_id(response),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        }
        return _event("message_start", {"type": "message_start", "message": message}) + _event(
            "ping", {"type": "ping"}
        )

    def _item_added(self, item: Any, index: Any) -> bytes:
        if not isinstance(item, dict):
            return b""
        kind = item.get("type")
        if kind == "function_call":
            self.called = True
            self.sent_arguments = 0
            block = {**_tool_use(item), "input": {}}
            return self._open(index, block)
        if kind == "reasoning" and self.thinking:
            self.summary_parts = 0
            self.thought = False
            return self._open(index, {"type": "thinking", "thinking": "", "signature": ""})
        return b""

    def _item_done(self, item: Any, index: Any) -> bytes:
        if not isinstance(item, dict):
            return b""
        kind = item.get("type")
        out = b""
        if kind == "function_call":
            if self.open_item != index:  # a call that came whole, without its added event
                self.called = True
                self.sent_arguments = 0
                out += self._open(index, {**_tool_use(item), "input": {}})
            arguments = _string(item.get("arguments"))
            if len(arguments) > self.sent_arguments:
                rest = arguments[self.sent_arguments :]
                out += self._delta({"type": "input_json_delta", "partial_json": rest})
            return out + self._close()
        if kind == "reasoning" and self.thinking:
            if self.open_item != index:
                out += self._open(index, {"type": "thinking", "thinking": "", "signature": ""})
            text = reasoning_text(item)
            if text and not self.thought:  # a summary that came without its deltas
                out += self._delta({"type": "thinking_delta", "thinking": text})
            signature = signature_of(item)
            out += self._delta({"type": "signature_delta", "signature": signature})
            return out + self._close()
        return b""

    def _open(self, index: Any, block: dict[str, Any]) -> bytes:
        out = self._start({}) + self._close()
        self.open = self.blocks
        self.open_item = index if isinstance(index, int) else None
        self.blocks += 1
        start = {"type": "content_block_start", "index": self.open, "content_block": block}
        return out + _event("content_block_start", start)

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        stop = {"type": "content_block_stop", "index": self.open}
        self.open = None
        self.open_item = None
        return _event("content_block_stop", stop)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        if self.open is None:
            return b""
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.open, "delta": delta},
        )

    def _text(self, delta: str) -> bytes:
        if self.open is None:
            return b""
        if not self.stop_sequences:
            return self._delta({"type": "text_delta", "text": delta})
        # What could be the start of a stop sequence waits for the next delta to decide.
        self.text += delta
        cut, stopped = _cut(self.text, self.stop_sequences)
        if stopped is not None:
            self.stopped = stopped
            return self._shown_until(len(cut)) + self._close()
        return self._shown_until(len(self.text) - _held(self.text, self.stop_sequences))

    def _shown_until(self, end: int) -> bytes:
        """The text block's text up to ``end`` that is not shown yet."""
        if end <= self.shown:
            return b""
        piece, self.shown = self.text[self.shown : end], end
        return self._delta({"type": "text_delta", "text": piece})

    def _text_done(self) -> bytes:
        return self._shown_until(len(self.text)) + self._close()

    def _finish(self, response: Mapping[str, Any]) -> bytes:
        out = self._start(response) + self._text_done()
        self.finished = True
        reason = stop_reason(response, self.called, self.stopped)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": self.stopped},
        }
        delta["usage"] = usage(response)
        return (
            out + _event("message_delta", delta) + _event("message_stop", {"type": "message_stop"})
        )

    def _error(self, status: int, message: str) -> bytes:
        self.finished = True
        return _event("error", anthropic_error(status, message))


_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})


# -- request pieces ----------------------------------------------------------------------------


def _system(system: Any, where: str = "system") -> list[dict[str, Any]]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [_input_message("developer", [{"type": "input_text", "text": system}])]
    expect(system, list, where, "a string or an array of text blocks")
    parts = []
    for index, block in enumerate(system):
        param = f"{where}[{index}]"
        expect(block, dict, param, "an object")
        if block.get("type") != "text":
            raise unsupported(f"{param}.type", block.get("type"))
        parts.append(
            {
                "type": "input_text",
                "text": expect(block.get("text"), str, f"{param}.text", "a string"),
            }
        )
    return [_input_message("developer", parts)] if parts else []


def _message_items(message: Any, where: str) -> list[dict[str, Any]]:
    expect(message, dict, where, "an object")
    role = message.get("role")
    if role == "system":  # a system message mid-conversation (Claude Code sends them)
        return _system(message.get("content"), f"{where}.content")
    if role not in ("user", "assistant"):
        raise invalid(f"{where}.role", "expected user, assistant or system.")
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    expect(content, list, f"{where}.content", "a string or an array of blocks")
    text_type = "input_text" if role == "user" else "output_text"
    items: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []

    def flush() -> None:
        if parts:
            items.append(_input_message(role, list(parts)))
            parts.clear()

    for number, block in enumerate(content):
        param = f"{where}.content[{number}]"
        expect(block, dict, param, "an object")
        kind = block.get("type")
        if kind == "text":
            parts.append(
                {
                    "type": text_type,
                    "text": expect(block.get("text"), str, f"{param}.text", "a string"),
                }
            )
        elif kind == "image" and role == "user":
            parts.append(_image(block, param))
        elif kind == "document" and role == "user":
            parts.append(_document(block, param))
        elif kind == "tool_result" and role == "user":
            flush()
            items.append(_tool_result(block, param))
        elif kind == "tool_use" and role == "assistant":
            flush()
            items.append(_function_call(block, param))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            flush()
            reasoning = _reasoning(block)
            if reasoning is not None:
                items.append(reasoning)
        else:
            raise unsupported(f"{param}.type", kind)
    flush()
    return items


def _input_message(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


def _image(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    source = expect(block.get("source"), dict, f"{param}.source", "an object")
    kind = source.get("type")
    if kind == "base64":
        media_type = expect(source.get("media_type"), str, f"{param}.source.media_type", "a string")
        data = expect(source.get("data"), str, f"{param}.source.data", "a string")
        return {
            "type": "input_image",
            "image_url": f"data:{media_type};base64,{data}",
            "detail": "auto",
        }
    if kind == "url":
        url = expect(source.get("url"), str, f"{param}.source.url", "a string")
        return {"type": "input_image", "image_url": url, "detail": "auto"}
    raise unsupported(f"{param}.source.type", kind)


def _document(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    source = expect(block.get("source"), dict, f"{param}.source", "an object")
    kind = source.get("type")
    if kind == "base64":
        media_type = expect(source.get("media_type"), str, f"{param}.source.media_type", "a string")
        data = expect(source.get("data"), str, f"{param}.source.data", "a string")
        title = block.get("title")
        return {
            "type": "input_file",
            "filename": title if isinstance(title, str) and title else "document.pdf",
            "file_data": f"data:{media_type};base64,{data}",
        }
    if kind == "text":
        text = expect(source.get("data"), str, f"{param}.source.data", "a string")
        return {"type": "input_text", "text": text}
    if kind == "url":
        url = expect(source.get("url"), str, f"{param}.source.url", "a string")
        return {"type": "input_file", "file_url": url}
    raise unsupported(f"{param}.source.type", kind)


def _tool_result(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    call_id = expect(block.get("tool_use_id"), str, f"{param}.tool_use_id", "a string")
    content = block.get("content", "")
    prefix = TOOL_ERROR_PREFIX if block.get("is_error") is True else ""
    if isinstance(content, str):
        output: Any = prefix + content
    else:
        expect(content, list, f"{param}.content", "a string or an array of blocks")
        parts: list[dict[str, Any]] = []
        for number, part in enumerate(content):
            where = f"{param}.content[{number}]"
            expect(part, dict, where, "an object")
            if part.get("type") == "text":
                parts.append(
                    {
                        "type": "input_text",
                        "text": expect(part.get("text"), str, f"{where}.text", "a string"),
                    }
                )
            elif part.get("type") == "image":
                parts.append(_image(part, where))
            else:
                raise unsupported(f"{where}.type", part.get("type"))
        if all(part["type"] == "input_text" for part in parts):
            output = prefix + "".join(part["text"] for part in parts)
        else:
            output = ([{"type": "input_text", "text": prefix}] if prefix else []) + parts
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def _function_call(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    call_id = expect(block.get("id"), str, f"{param}.id", "a string")
    name = expect(block.get("name"), str, f"{param}.name", "a string")
    arguments = orjson.dumps(block.get("input") or {}).decode()
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def _reasoning(block: Mapping[str, Any]) -> dict[str, Any] | None:
    """A thinking block as the reasoning item it came from: its signature is the encrypted
    content. One without (from elsewhere) cannot be sent back and is left out."""
    if block.get("type") == "redacted_thinking":
        data = block.get("data")
        if not isinstance(data, str) or not data:
            return None
        return {"type": "reasoning", "summary": [], **_from_signature(data)}
    signature = block.get("signature")
    if not isinstance(signature, str) or not signature:
        return None
    thinking = block.get("thinking")
    summary = (
        [{"type": "summary_text", "text": thinking}]
        if isinstance(thinking, str) and thinking
        else []
    )
    return {"type": "reasoning", "summary": summary, **_from_signature(signature)}


def signature_of(item: Mapping[str, Any]) -> str:
    """A thinking block's signature: the reasoning item's id and encrypted content, which is
    all the upstream needs to read it again (``_from_signature``)."""
    encrypted = _string(item.get("encrypted_content"))
    item_id = item.get("id")
    if encrypted and isinstance(item_id, str) and item_id.startswith("rs_") and "." not in item_id:
        return f"{item_id}.{encrypted}"
    return encrypted


def _from_signature(signature: str) -> dict[str, Any]:
    item_id, dot, encrypted = signature.partition(".")
    if dot and item_id.startswith("rs_") and encrypted:
        return {"id": item_id, "encrypted_content": encrypted}
    return {"encrypted_content": signature}


def _tool(tool: Any, where: str) -> dict[str, Any]:
    expect(tool, dict, where, "an object")
    if tool.get("type") not in (None, "custom"):
        raise unsupported(f"{where}.type", tool.get("type"))
    converted: dict[str, Any] = {
        "type": "function",
        "name": expect(tool.get("name"), str, f"{where}.name", "a string"),
        "parameters": expect(
            tool.get("input_schema", {}), dict, f"{where}.input_schema", "an object"
        ),
        "strict": False,
    }
    if isinstance(tool.get("description"), str):
        converted["description"] = tool["description"]
    return converted


def _tool_choice(choice: Any) -> tuple[Any, bool | None]:
    expect(choice, dict, "tool_choice", "an object")
    kind = choice.get("type")
    disable = choice.get("disable_parallel_tool_use")
    parallel = False if disable is True else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool":
        name = expect(choice.get("name"), str, "tool_choice.name", "a string")
        return {"type": "function", "name": name}, parallel
    raise unsupported("tool_choice.type", kind)


def _thinking(thinking: Any, max_tokens: int) -> dict[str, Any] | None:
    if thinking is None:
        return None
    expect(thinking, dict, "thinking", "an object")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return {"summary": "auto"}
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        expect(budget, int, "thinking.budget_tokens", "an integer")
        if budget >= max_tokens:
            raise invalid("thinking.budget_tokens", "must be less than max_tokens.")
        effort = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
        return {"effort": effort, "summary": "auto"}
    raise unsupported("thinking.type", kind)


def _effort(output_config: Any) -> str | None:
    """``output_config.effort`` as the upstream's reasoning effort (``max`` is its highest)."""
    if output_config is None:
        return None
    expect(output_config, dict, "output_config", "an object")
    effort = output_config.get("effort")
    if effort is None:
        return None
    if effort not in EFFORTS:
        raise invalid("output_config.effort", f"expected one of {', '.join(EFFORTS)}.")
    return EFFORTS[effort]


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    expect(value, list, "stop_sequences", "an array of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are served.")
    for index, sequence in enumerate(value):
        expect(sequence, str, f"stop_sequences[{index}]", "a string")
        if not sequence:
            raise invalid(f"stop_sequences[{index}]", "a stop sequence cannot be empty.")
    return list(value)


# -- answer pieces ------------------------------------------------------------------------------


def _cut(text: str, sequences: list[str]) -> tuple[str, str | None]:
    """``text`` up to the first stop sequence in it, and that sequence (``None``: none)."""
    first: tuple[int, str] | None = None
    for sequence in sequences:
        at = text.find(sequence)
        if at >= 0 and (first is None or at < first[0]):
            first = (at, sequence)
    if first is None:
        return text, None
    return text[: first[0]], first[1]


def _held(text: str, sequences: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop sequence."""
    held = 0
    for sequence in sequences:
        for size in range(min(len(sequence) - 1, len(text)), held, -1):
            if text.endswith(sequence[:size]):
                held = size
                break
    return held


def _part_text(part: Any) -> str | None:
    if not isinstance(part, dict):
        return None
    if part.get("type") == "output_text" and isinstance(part.get("text"), str):
        return str(part["text"])
    if part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
        return str(part["refusal"])
    return None


def _tool_use(item: Mapping[str, Any]) -> dict[str, Any]:
    arguments = item.get("arguments")
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        parsed = {}
    return {
        "type": "tool_use",
        "id": str(item.get("call_id") or item.get("id") or ""),
        "name": str(item.get("name") or ""),
        "input": parsed if isinstance(parsed, dict) else {},
    }


def _thinking_block(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "thinking",
        "thinking": reasoning_text(item),
        "signature": signature_of(item),
    }


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
