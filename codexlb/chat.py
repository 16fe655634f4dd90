"""Chat Completions on the pool (SPEC S11): ``POST /v1/chat/completions`` as a Responses request,
and the answer back as a ``chat.completion`` or a stream of ``chat.completion.chunk``.

Request, field by field::

    messages          system / developer → developer messages; user text and image_url
                      parts → input_text / input_image; assistant text → output_text,
                      its tool_calls → function_call items; tool → function_call_output
    tools             {type: function, function: {...}} → {type: function, name, ...}
    tool_choice       none / auto / required as they are; {function: {name}} → {name}
    response_format   text / json_object / json_schema → text.format
    max_tokens, max_completion_tokens → max_output_tokens (platform accounts only)
    reasoning_effort  → reasoning.effort;  verbosity → text.verbosity
    n                 1 only; anything else is refused

The answer: ``output_text`` deltas become ``delta.content``; a function call becomes a
``delta.tool_calls`` entry (index, id, name) and its argument deltas fragments of it;
``finish_reason`` is ``tool_calls`` when the model called a tool, ``length`` for a response cut
at its token cap, ``content_filter`` for one cut by the filter, else ``stop``; with
``stream_options.include_usage`` a last chunk with empty ``choices`` carries ``usage``; the
stream ends with ``data: [DONE]``. A failure after the stream began is a ``data: {"error"}``
chunk, which the SDKs raise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from codexlb.config import ModelsConfig
from codexlb.errors import InvalidRequest
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
    required_model,
    unsupported,
    usage_counts,
)

DONE = b"data: [DONE]\n\n"
REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


class ChatCompletions:
    route = "chat_completions"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("Authorization")

    def translate(self, raw: bytes, models: ModelsConfig) -> ChatTranslation:
        return translate(parse_object(raw), models)


CHAT_COMPLETIONS = ChatCompletions()


def translate(body: dict[str, Any], models: ModelsConfig) -> ChatTranslation:
    """The Chat Completions ``body`` as a Responses request (see the module's table)."""
    model = required_model(body)
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("n", "only n = 1 is served: each choice would be its own upstream response.")
    stream = expect(body.get("stream", False) or False, bool, "stream", "a boolean")
    stream_options = body.get("stream_options") or {}
    expect(stream_options, dict, "stream_options", "an object")
    include_usage = stream_options.get("include_usage") is True
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "Invalid value for 'messages': expected a non-empty array.", param="messages"
        )
    request: dict[str, Any] = {
        "model": upstream_model(models, model, use_default=False),
        "input": input_items(messages),
        "store": False,
        "stream": True,
    }
    tools = body.get("tools")
    if tools is not None:
        request["tools"] = [
            _tool(tool, f"tools[{i}]")
            for i, tool in enumerate(expect(tools, list, "tools", "an array"))
        ]
    if body.get("tool_choice") is not None:
        request["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        request["parallel_tool_calls"] = expect(
            body["parallel_tool_calls"], bool, "parallel_tool_calls", "a boolean"
        )
    text = _text_format(body.get("response_format"))
    verbosity = body.get("verbosity")
    if verbosity is not None:
        text = {**(text or {}), "verbosity": expect(verbosity, str, "verbosity", "a string")}
    if text is not None:
        request["text"] = text
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise invalid(
                "reasoning_effort", f"expected one of {', '.join(sorted(REASONING_EFFORTS))}."
            )
        request["reasoning"] = {"effort": effort}
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None:
        request["prompt_cache_key"] = expect(cache_key, str, "prompt_cache_key", "a string")
    user = body.get("safety_identifier") or body.get("user")
    max_tokens = optional_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens")
    return ChatTranslation(
        request,
        stream=stream,
        max_output_tokens=max_tokens,
        affinity=cache_key or (user if isinstance(user, str) and user else None),
        model=model,
        include_usage=include_usage,
    )


def input_items(messages: list[Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        expect(message, dict, where, "an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            items.append(_message("developer", _parts(content, where, "input_text")))
        elif role == "user":
            items.append(_message("user", _parts(content, where, "input_text", images=True)))
        elif role == "assistant":
            if content is not None and content != "" and content != []:
                items.append(_message("assistant", _parts(content, where, "output_text")))
            for number, call in enumerate(message.get("tool_calls") or []):
                items.append(_function_call(call, f"{where}.tool_calls[{number}]"))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.tool_call_id'.",
                    param=f"{where}.tool_call_id",
                )
            output = _parts(content, where, "input_text")
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": call_id,
                    "output": "".join(part.get("text", "") for part in output),
                }
            )
        else:
            raise invalid(f"{where}.role", "expected system, developer, user, assistant or tool.")
    return items


class ChatTranslation(Translation):
    def __init__(
        self,
        body: dict[str, Any],
        *,
        stream: bool,
        max_output_tokens: int | None,
        affinity: str | None,
        model: str,
        include_usage: bool,
    ) -> None:
        super().__init__(
            body, stream=stream, max_output_tokens=max_output_tokens, affinity=affinity
        )
        self.model = model
        """The name the client asked for: every answer names it back."""
        self.include_usage = include_usage

    def events(self) -> EventTranslator:
        return _ChunkStream(self.model, self.include_usage).event

    def reply(self, response: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if response.get("status") == "failed":
            code, reason = failure_of(response)
            return status_for(code), _error_body(code, reason)
        content: list[str] = []
        refusal: list[str] = []
        calls: list[dict[str, Any]] = []
        for item in output_items(response):
            kind = item.get("type")
            if kind == "message":
                for part in item.get("content") or []:
                    if isinstance(part, dict) and part.get("type") == "refusal":
                        refusal.append(str(part.get("refusal", "")))
                content.extend(
                    part["text"]
                    for part in item.get("content") or []
                    if isinstance(part, dict) and part.get("type") == "output_text"
                )
            elif kind == "function_call":
                calls.append(_tool_call(item))
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(content) if content or not calls else None,
            "refusal": "".join(refusal) or None,
            "annotations": [],
        }
        if calls:
            message["tool_calls"] = calls
        return 200, {
            "id": chat_id(response),
            "object": "chat.completion",
            "created": _created(response),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason(response, bool(calls)),
                }
            ],
            "usage": usage(response),
            "system_fingerprint": None,
        }

    def error(self, status: int, body: Any) -> tuple[int, dict[str, Any]]:
        return status, body  # already OpenAI's shape (``relay.shaped_error``)


def finish_reason(response: Mapping[str, Any], called: bool) -> str:
    if response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if called else "stop"


def usage(response: Mapping[str, Any]) -> dict[str, Any]:
    prompt, cached, completion, reasoning = usage_counts(response)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_id(response: Mapping[str, Any]) -> str:
    response_id = response.get("id")
    if isinstance(response_id, str) and response_id:
        return "chatcmpl-" + response_id.removeprefix("resp_")
    return "chatcmpl-codexlb"


class _ChunkStream:
    """The chunks of one attempt's answer, event by event."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = "chatcmpl-codexlb"
        self.created = int(time.time())
        self.started = False
        self.calls: dict[int, int] = {}
        """Output index of each function call → its ``tool_calls`` index."""
        self.sent_arguments: dict[int, int] = {}
        """Output index → characters of its arguments already sent."""

    def event(self, kind: str | None, data: bytes, raw: bytes) -> bytes:
        if kind is None:
            return raw  # a keep-alive comment: SSE clients skip it
        if kind == "response.created":
            response = json_object(data).get("response")
            if isinstance(response, dict):
                self.id = chat_id(response)
                self.created = _created(response, self.created)
            return self._start()
        if kind == "response.output_text.delta":
            return self._start() + self._chunk({"content": _text(json_object(data), "delta")})
        if kind == "response.refusal.delta":
            return self._start() + self._chunk({"refusal": _text(json_object(data), "delta")})
        if kind == "response.output_item.added" or kind == "response.output_item.done":
            event = json_object(data)
            item = event.get("item")
            index = event.get("output_index")
            if not isinstance(item, dict) or item.get("type") != "function_call":
                return b""
            if not isinstance(index, int):
                index = 10_000 + len(self.calls)
            return self._start() + self._call(index, item, done=kind.endswith("done"))
        if kind == "response.function_call_arguments.delta":
            event = json_object(data)
            index = event.get("output_index")
            if not isinstance(index, int) or index not in self.calls:
                return b""
            delta = _text(event, "delta")
            self.sent_arguments[index] += len(delta)
            return self._chunk(
                {"tool_calls": [{"index": self.calls[index], "function": {"arguments": delta}}]}
            )
        if kind in ("response.completed", "response.incomplete"):
            response = json_object(data).get("response")
            response = response if isinstance(response, dict) else {}
            out = self._start() + self._chunk({}, finish_reason(response, bool(self.calls)))
            if self.include_usage:
                out += _data({**self._base(), "choices": [], "usage": usage(response)})
            return out + DONE
        if kind == "response.failed":
            response = json_object(data).get("response")
            code, message = failure_of(response if isinstance(response, dict) else {})
            return _data(_error_body(code, message)) + DONE
        if kind == "error":
            error_code, text = error_message(json_object(data))
            return _data(_error_body(error_code or "server_error", text)) + DONE
        return b""

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def _call(self, index: int, item: Mapping[str, Any], *, done: bool) -> bytes:
        arguments = item.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        out = b""
        if index not in self.calls:
            self.calls[index] = len(self.calls)
            self.sent_arguments[index] = 0
            call = _tool_call(item)
            call["function"]["arguments"] = ""
            out = self._chunk({"tool_calls": [{"index": self.calls[index], **call}]})
        sent = self.sent_arguments[index]
        if done and len(arguments) > sent:  # arguments that came without their deltas
            self.sent_arguments[index] = len(arguments)
            fragment = {"index": self.calls[index], "function": {"arguments": arguments[sent:]}}
            out += self._chunk({"tool_calls": [fragment]})
        return out

    def _base(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }
        return base

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            **self._base(),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return _data(chunk)


# -- request pieces ----------------------------------------------------------------------------


def _message(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


def _parts(
    content: Any, where: str, text_type: str, *, images: bool = False
) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": text_type, "text": content}]
    if content is None:
        return []
    expect(content, list, f"{where}.content", "a string or an array of parts")
    parts: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        param = f"{where}.content[{number}]"
        expect(part, dict, param, "an object")
        kind = part.get("type")
        if kind == "text":
            parts.append(
                {
                    "type": text_type,
                    "text": expect(part.get("text"), str, f"{param}.text", "a string"),
                }
            )
        elif kind == "refusal" and text_type == "output_text":
            refusal = expect(part.get("refusal"), str, f"{param}.refusal", "a string")
            parts.append({"type": "refusal", "refusal": refusal})
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            expect(url, str, f"{param}.image_url.url", "a string")
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append(
                {
                    "type": "input_image",
                    "image_url": url,
                    "detail": detail if isinstance(detail, str) else "auto",
                }
            )
        elif kind == "file" and images:
            file = expect(part.get("file"), dict, f"{param}.file", "an object")
            entry: dict[str, Any] = {"type": "input_file"}
            for name in ("file_data", "file_id", "filename"):
                if isinstance(file.get(name), str):
                    entry[name] = file[name]
            parts.append(entry)
        else:
            raise unsupported(f"{param}.type", kind)
    return parts


def _function_call(call: Any, where: str) -> dict[str, Any]:
    expect(call, dict, where, "an object")
    function = expect(call.get("function"), dict, f"{where}.function", "an object")
    call_id = expect(call.get("id"), str, f"{where}.id", "a string")
    name = expect(function.get("name"), str, f"{where}.function.name", "a string")
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = orjson.dumps(arguments).decode()
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def _tool(tool: Any, where: str) -> dict[str, Any]:
    expect(tool, dict, where, "an object")
    if tool.get("type") != "function":
        raise unsupported(f"{where}.type", tool.get("type"))
    function = expect(tool.get("function"), dict, f"{where}.function", "an object")
    converted: dict[str, Any] = {
        "type": "function",
        "name": expect(function.get("name"), str, f"{where}.function.name", "a string"),
    }
    for name in ("description", "parameters", "strict"):
        if function.get(name) is not None:
            converted[name] = function[name]
    converted.setdefault("parameters", {"type": "object", "properties": {}})
    converted.setdefault("strict", False)
    return converted


def _tool_choice(choice: Any) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return {"type": "function", "name": name}
    raise invalid(
        "tool_choice", "expected none, auto, required or {type: function, function: {name}}."
    )


def _text_format(response_format: Any) -> dict[str, Any] | None:
    if response_format is None:
        return None
    expect(response_format, dict, "response_format", "an object")
    kind = response_format.get("type")
    if kind in ("text", "json_object"):
        return {"format": {"type": kind}}
    if kind == "json_schema":
        schema = expect(
            response_format.get("json_schema"), dict, "response_format.json_schema", "an object"
        )
        name = expect(schema.get("name"), str, "response_format.json_schema.name", "a string")
        text_format: dict[str, Any] = {"type": "json_schema", "name": name}
        for field in ("schema", "strict", "description"):
            if schema.get(field) is not None:
                text_format[field] = schema[field]
        return {"format": text_format}
    raise unsupported("response_format.type", kind)


# -- answer pieces ------------------------------------------------------------------------------


def _tool_call(item: Mapping[str, Any]) -> dict[str, Any]:
    arguments = item.get("arguments")
    return {
        "id": str(item.get("call_id") or item.get("id") or ""),
        "type": "function",
        "function": {
            "name": str(item.get("name") or ""),
            "arguments": arguments if isinstance(arguments, str) else "",
        },
    }


def _error_body(code: str, message: str) -> dict[str, Any]:
    status = status_for(code)
    kind = "invalid_request_error" if status == 400 else code if status == 429 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def _created(response: Mapping[str, Any], default: int | None = None) -> int:
    created = response.get("created_at")
    if type(created) is int:
        return created
    return default if default is not None else int(time.time())


def _text(event: Mapping[str, Any], field: str) -> str:
    value = event.get(field)
    return value if isinstance(value, str) else ""


def _data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
