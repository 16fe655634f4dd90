"""The tiny Codex model: it answers a shell request with a call in the schema of the tool the
request offers, and a tool output with a final message quoting what the command printed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from codexlb.testing.codex_model import codex_responder, command_output
from tests.harness import user_message

ASK = "Run the shell command: echo hello"
CODE_MODE_DESCRIPTION = (
    "Run JavaScript code to orchestrate/compose tool calls\n"
    "### `exec_command`\n"
    "declare const tools: { exec_command(args: { cmd: string; }): Promise<{ output: string; }>; };"
)


def function_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "name": name, "parameters": {"type": "object"}}


def context_message() -> dict[str, Any]:
    return user_message("<environment_context>\n  <cwd>/tmp/x</cwd>\n</environment_context>")


def developer_message() -> dict[str, Any]:
    return {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": "You are Codex."}],
    }


def code_mode_tools() -> dict[str, Any]:
    """The ``additional_tools`` item Codex 0.169.0 sends for its default model."""
    return {
        "type": "additional_tools",
        "role": "developer",
        "tools": [
            {
                "type": "namespace",
                "name": "functions",
                "tools": [
                    {
                        "type": "custom",
                        "name": "exec",
                        "description": CODE_MODE_DESCRIPTION,
                        "format": {"type": "grammar", "syntax": "lark", "definition": "..."},
                    },
                    function_tool("wait"),
                ],
            },
            {"type": "namespace", "name": "clock", "tools": [function_tool("sleep")]},
        ],
    }


def only(items: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(items) == 1, items
    return items[0]


def message_text(item: dict[str, Any]) -> str:
    assert item["type"] == "message"
    assert item["role"] == "assistant"
    return "".join(part["text"] for part in item["content"])


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("shell_command", {"command": "echo hello"}),
        ("exec_command", {"cmd": "echo hello"}),
        ("shell", {"command": ["bash", "-lc", "echo hello"]}),
    ],
)
def test_calls_the_offered_shell_function_in_its_schema(
    tool: str, arguments: dict[str, Any]
) -> None:
    body = {
        "tools": [function_tool("view_image"), function_tool(tool)],
        "input": [developer_message(), context_message(), user_message(ASK)],
    }
    call = only(codex_responder("a", body))
    assert call["type"] == "function_call"
    assert call["name"] == tool
    assert json.loads(call["arguments"]) == arguments
    assert call["call_id"].startswith("call_")


def test_code_mode_runs_the_nested_exec_command_from_javascript() -> None:
    body = {"input": [code_mode_tools(), developer_message(), user_message(ASK)]}
    call = only(codex_responder("a", body))
    assert call["type"] == "custom_tool_call"
    assert call["name"] == "exec"
    assert call["input"] == (
        'const result = await tools.exec_command({cmd: "echo hello"});\ntext(result.output);'
    )
    assert call["call_id"].startswith("call_")


def test_a_direct_shell_function_wins_over_code_mode() -> None:
    body = {
        "tools": [function_tool("exec_command")],
        "input": [code_mode_tools(), user_message(ASK)],
    }
    assert only(codex_responder("a", body))["name"] == "exec_command"


def test_the_command_is_quoted_for_javascript() -> None:
    body = {"input": [code_mode_tools(), user_message('Run the shell command: echo "a\\b"')]}
    source = only(codex_responder("a", body))["input"]
    assert '{cmd: "echo \\"a\\\\b\\""}' in source


@pytest.mark.parametrize(
    ("output_item", "printed"),
    [
        (  # code mode, over WebSocket: just the output after previous_response_id
            {
                "type": "custom_tool_call_output",
                "call_id": "call_1",
                "output": [
                    {"type": "input_text", "text": "Script completed\nWall time 0.2 s\nOutput:\n"},
                    {"type": "input_text", "text": "hello\n"},
                ],
            },
            "hello",
        ),
        (
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": "Chunk ID: 2b0e37\nProcess exited with code 0\nOutput:\nhello\n",
            },
            "hello",
        ),
        (
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": json.dumps({"output": "hello\n", "metadata": {"exit_code": 0}}),
            },
            "hello",
        ),
    ],
)
def test_a_tool_output_gets_the_final_message(output_item: dict[str, Any], printed: str) -> None:
    item = only(codex_responder("a", {"input": [output_item]}))
    assert message_text(item) == f"The command printed: {printed}"


def test_the_whole_history_over_http_ends_with_the_final_message() -> None:
    call = only(codex_responder("a", {"input": [code_mode_tools(), user_message(ASK)]}))
    history = [
        code_mode_tools(),
        user_message(ASK),
        call,
        {"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "hello\n"},
    ]
    assert message_text(only(codex_responder("b", {"input": history}))) == (
        "The command printed: hello"
    )


def test_a_new_user_turn_after_a_tool_output_gets_a_new_call() -> None:
    history = [
        user_message(ASK),
        {"type": "function_call_output", "call_id": "call_1", "output": "Output:\nhello\n"},
        {"type": "message", "role": "assistant", "content": []},
        user_message("Run the shell command: echo again"),
    ]
    call = only(codex_responder("a", {"tools": [function_tool("exec_command")], "input": history}))
    assert json.loads(call["arguments"]) == {"cmd": "echo again"}


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [function_tool("view_image")], "input": [user_message(ASK)]},
        {"tools": [function_tool("exec_command")], "input": [user_message("hello?")]},
        {"input": []},
        {"input": "not a list"},
        None,
    ],
)
def test_anything_else_gets_a_plain_message(body: Any) -> None:
    assert message_text(only(codex_responder("a", body)))


def test_command_output_without_a_header_is_the_text_itself() -> None:
    assert command_output("  hello\n") == "hello"
    assert command_output(None) == ""
