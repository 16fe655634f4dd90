"""A tiny model that drives Codex CLI through one shell command, for the fake upstream.

`codex_responder` is a `Responder` (``FakeUpstream.responder``): given the request body Codex
sent, it returns the output items of the model's answer.

    user asks "Run the shell command: <cmd>"  →  one call of Codex's shell tool running <cmd>
    user asks "Generate an image of <prompt>" →  one code-mode call of Codex's image tool
    the last input item is that tool's output →  a final assistant message quoting the output

Codex offers its shell in several shapes, depending on the version and the model it believes
it talks to, so the tool is picked from what the request offers, in the exact schema of each:

    function ``shell_command``   {"command": "<cmd>"}
    function ``exec_command``    {"cmd": "<cmd>"}
    function ``shell``           {"command": ["bash", "-lc", "<cmd>"]}
    custom ``exec`` (code mode)  JavaScript calling the nested ``tools.exec_command``

Tools come in the top-level ``tools`` list or, as Codex 0.169.0 sends them for its default
model, in an ``additional_tools`` input item grouping them in namespaces. Over WebSocket Codex
sends only the new items after ``previous_response_id``; over HTTP the whole history. Either way
the decision rests on the last user message or tool output in ``input``.

Run it by hand in front of a real Codex: set ``responder`` on a `FakeUpstream` to this function.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from codexlb.testing import events

IMAGE_REQUEST = re.compile(r"generate an image of\s*(?P<prompt>.+)", re.IGNORECASE | re.DOTALL)
IMAGE_TOOL = "image_gen__imagegen"
"""Codex's image tool as code mode nests it (it calls ``{base}/images/generations``)."""
SHELL_REQUEST = re.compile(r"run the shell command:\s*(?P<command>.+)", re.IGNORECASE | re.DOTALL)
TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})
FINAL_PREFIX = "The command printed: "
CODE_MODE_TOOL = "exec"


def codex_responder(account: str, body: Any) -> list[dict[str, Any]]:
    """The output items answering ``body`` (``account`` is not used: every account answers
    alike)."""
    input_items = body.get("input") if isinstance(body, Mapping) else None
    last = _last_turn_item(input_items)
    if last is None:
        return [_message("There is nothing to do.")]
    if last.get("type") in TOOL_OUTPUTS:
        return [_message(FINAL_PREFIX + command_output(last.get("output")))]
    text = events.last_user_text([last])
    image = IMAGE_REQUEST.search(text)
    if image is not None:
        call = image_call(offered_tools(body), image.group("prompt").strip())
        return [call] if call is not None else [_message("I have no image tool.")]
    match = SHELL_REQUEST.search(text)
    if match is None:
        return [_message("Ask me to run a shell command: 'Run the shell command: <command>'.")]
    call = shell_call(offered_tools(body), match.group("command").strip())
    if call is None:
        return [_message("I have no shell tool to run that command with.")]
    return [call]


def offered_tools(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every tool the request offers: the top-level ``tools`` and those of ``additional_tools``
    input items, with namespaces flattened."""
    tools: list[Mapping[str, Any]] = []
    listed = body.get("tools")
    if isinstance(listed, list):
        tools += _flatten(listed)
    input_items = body.get("input")
    if isinstance(input_items, list):
        for item in input_items:
            if isinstance(item, Mapping) and item.get("type") == "additional_tools":
                nested = item.get("tools")
                if isinstance(nested, list):
                    tools += _flatten(nested)
    return tools


def shell_call(tools: list[Mapping[str, Any]], command: str) -> dict[str, Any] | None:
    """One call running ``command`` with the best shell tool among ``tools``, or None."""
    by_name = {(tool.get("type"), tool.get("name")): tool for tool in tools}
    if ("function", "shell_command") in by_name:
        return _function_call("shell_command", {"command": command})
    if ("function", "exec_command") in by_name:
        return _function_call("exec_command", {"cmd": command})
    if ("function", "shell") in by_name:
        return _function_call("shell", {"command": ["bash", "-lc", command]})
    code_mode = by_name.get(("custom", CODE_MODE_TOOL))
    if code_mode is not None:
        source = _code_mode_source(str(code_mode.get("description", "")), command)
        if source is not None:
            return _code_mode_call(source)
    return None


def image_call(tools: list[Mapping[str, Any]], prompt: str) -> dict[str, Any] | None:
    """One code-mode call of Codex's image tool with ``prompt``, printing the start of the
    image's data URL (what the tool returned), or None when the tool is not offered."""
    code_mode = {(t.get("type"), t.get("name")): t for t in tools}.get(("custom", CODE_MODE_TOOL))
    if code_mode is None or f"{IMAGE_TOOL}(" not in str(code_mode.get("description", "")):
        return None
    source = (
        '// @exec: {"yield_time_ms": 120000}\n'
        f"const result = await tools.{IMAGE_TOOL}({{prompt: {json.dumps(prompt)}}});\n"
        'text("image " + result.image_url.slice(0, 22));'
    )
    return _code_mode_call(source)


def _code_mode_call(source: str) -> dict[str, Any]:
    """A call of Codex's code-mode tool running ``source``."""
    return {
        "type": "custom_tool_call",
        "call_id": events.new_id("call"),
        "name": CODE_MODE_TOOL,
        "input": source,
        "status": "completed",
    }


def command_output(output: object) -> str:
    """What the command printed, from a tool output as Codex reports it.

    The output is a string or a list of ``input_text`` parts; Codex frames the command's
    output with a header ending in ``Output:`` (exec_command, shell_command, code mode) or,
    for the ``shell`` tool, as JSON ``{"output": ..., "metadata": ...}``.
    """
    if isinstance(output, list):
        text = "".join(
            str(part.get("text", ""))
            for part in output
            if isinstance(part, Mapping) and part.get("type") in ("input_text", "output_text")
        )
    else:
        text = str(output) if output is not None else ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, Mapping) and isinstance(parsed.get("output"), str):
        text = parsed["output"]
    _, marker, after = text.rpartition("Output:\n")
    return (after if marker else text).strip()


def _last_turn_item(input_items: object) -> Mapping[str, Any] | None:
    """The last user message or tool output: what the model answers."""
    if not isinstance(input_items, list):
        return None
    for item in reversed(input_items):
        if not isinstance(item, Mapping):
            continue
        if item.get("type") in TOOL_OUTPUTS:
            return item
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return item
    return None


def _flatten(tools: list[Any]) -> Iterator[Mapping[str, Any]]:
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        if tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            yield from _flatten(tool["tools"])
        else:
            yield tool


def _code_mode_source(description: str, command: str) -> str | None:
    """JavaScript for code mode's ``exec``, calling the nested shell tool its description
    declares (``exec_command`` returns ``{output, ...}``)."""
    quoted = json.dumps(command)
    if "exec_command(" in description:
        return f"const result = await tools.exec_command({{cmd: {quoted}}});\ntext(result.output);"
    if "shell_command(" in description:
        return f"text(await tools.shell_command({{command: {quoted}}}));"
    return None


def _function_call(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": events.new_id("call"),
        "name": name,
        "arguments": json.dumps(arguments),
    }


def _message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
