"""Claude Code runs a turn offline against codexlb's ``/v1/messages`` (SPEC S11): the fake
upstream plays the model, calling Claude Code's ``Bash`` tool, then answering with its output.
Claude Code asks for a Claude model; ``[models] default`` serves it with an upstream one."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.claude_code import QUIET, install_claude_code
from tests.harness import CLIENT_KEYS, Fake, config_data, make_config, serve

RUN_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def claude() -> Path:
    found = install_claude_code()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def bash_then_answer(account: str, body: Any) -> list[dict[str, Any]]:
    """The model: a ``Bash`` call of ``echo hello`` when the tool is offered and not yet run;
    then, or for any other request, an answer."""
    outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
    tools = {tool.get("name") for tool in body.get("tools") or []}
    if outputs:
        text = f"The command printed: {str(outputs[-1]['output']).strip()}"
    elif "Bash" in tools:
        return [
            {
                "type": "function_call",
                "call_id": "call_bash_1",
                "name": "Bash",
                "arguments": json.dumps({"command": "echo hello", "description": "Print hello"}),
            }
        ]
    else:
        text = "hello"
    return [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    ]


@pytest.mark.timeout(180)
async def test_claude_code_runs_a_tool_turn(claude: Path, fake: Fake, tmp_path: Path) -> None:
    fake.responder = bash_then_answer
    data = config_data(
        fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", models={"default": "gpt-5.4"}
    )
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    async with serve(make_config(data, tmp_path)) as lb:
        process = await asyncio.create_subprocess_exec(
            str(claude),
            "-p",
            "Run the shell command: echo hello",
            "--output-format",
            "json",
            "--allowedTools",
            "Bash",
            cwd=work,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),
                "ANTHROPIC_BASE_URL": lb.url,
                "ANTHROPIC_API_KEY": CLIENT_KEYS["alice"],
                **QUIET,
            },
        )
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                stdout, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    report = f"stdout: {stdout.decode()[-3000:]}\nstderr: {stderr.decode()[-3000:]}"
    assert process.returncode == 0, report
    result = json.loads(stdout)
    assert result["is_error"] is False, report
    assert result["result"] == "The command printed: hello", report

    turns = [r for r in fake.received if r.path.endswith("/responses")]
    assert all(r.body["model"] == "gpt-5.4" for r in turns)  # the default served claude-*
    call, answer = turns[-2:]
    assert "Bash" in {tool["name"] for tool in call.body["tools"]}
    outputs = [i for i in answer.body["input"] if i["type"] == "function_call_output"]
    assert outputs[-1]["call_id"] == "call_bash_1"
    assert outputs[-1]["output"].strip() == "hello"
