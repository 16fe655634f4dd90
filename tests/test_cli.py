"""The ``codexlb`` command as an operator runs it (real child processes)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from codexlb.cli import _parser
from codexlb.config import load_config
from tests.harness import start_child

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"


def codexlb(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codexlb", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def help_texts(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
    """The ``--help`` text of ``parser`` and of each of its subcommands, by command line."""
    yield parser.prog, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from help_texts(command)


def test_help_speaks_to_users_not_to_the_specification() -> None:
    texts = dict(help_texts(_parser()))

    assert set(texts) == {
        "codexlb",
        *(f"codexlb {c}" for c in ("serve", "check-config", "db", "status", "import-auth")),
        "codexlb usage",
        *("codexlb hash-key", "codexlb db upgrade", "codexlb db backup"),
    }
    for command, text in texts.items():
        assert not re.search(r"SPEC|\bS\d", text), f"{command} --help:\n{text}"
        assert "``" not in text, f"{command} --help shows docstring markup:\n{text}"
        if command != "codexlb":
            assert text.count("\n\n") >= 2, f"{command} --help has no description:\n{text}"
    result = codexlb("--help")  # the module docstring is not the description either
    assert result.returncode == 0
    assert result.stdout.startswith("usage: codexlb")
    assert not re.search(r"SPEC|\bS\d|``", result.stdout), result.stdout


def test_check_config_prints_the_example_pool_without_secrets() -> None:
    result = codexlb("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout
    assert "chatgpt" in result.stdout
    assert "replace-with-an-access-token" not in result.stdout + result.stderr


def test_check_config_names_file_and_key_path_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[accounts]]\nname = "a"\napi_key = "k"\n\n[[accounts]]\nnmae = "b"\n')
    result = codexlb("check-config", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}: accounts[1].nmae" in result.stderr
    assert f"{config}: accounts[1].name" in result.stderr


def test_check_config_reports_an_unreadable_auth_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[accounts]]\nname = "laptop"\nauth_file = "missing/auth.json"\n')
    result = codexlb("check-config", "--config", str(config))
    assert result.returncode == 1
    assert "UNUSABLE" in result.stdout
    assert "file not found" in result.stdout


def test_import_auth_appends_valid_toml_to_a_file_without_a_final_newline(
    tmp_path: Path,
) -> None:
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"OPENAI_API_KEY": "sk-platform-0123456789"}))
    config = tmp_path / "codexlb.toml"
    config.write_text('[[accounts]]\nname = "first"\napi_key = "sk-first"')  # no final newline

    result = codexlb("import-auth", str(auth_file), "--name", "second")
    assert result.returncode == 0, result.stderr
    with config.open("a") as target:  # what `>> codexlb.toml` does
        target.write(result.stdout)

    entries = tomllib.loads(config.read_text())["accounts"]
    assert [entry["name"] for entry in entries] == ["first", "second"]
    accounts = load_config(config).accounts
    assert [(a.name, a.auth_file) for a in accounts] == [("first", None), ("second", auth_file)]


def test_db_upgrade_creates_the_schema_next_to_the_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[database]\nurl = "sqlite+aiosqlite:///data/lb.db"\n')
    result = codexlb("db", "upgrade", "--config", str(config))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "data" / "lb.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
    assert "snapshots" in tables


def test_hash_key_prints_sha256() -> None:
    result = codexlb("hash-key", "sk-lb-alice")
    assert result.stdout.strip() == hashlib.sha256(b"sk-lb-alice").hexdigest()


def test_serve_refuses_open_access_on_a_public_address(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\nport = 0\n')
    result = codexlb("serve", "--config", str(config))
    assert result.returncode == 1
    assert "allow_open_access" in result.stderr


async def test_serve_runs_the_example_config_and_drains_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(EXAMPLE.read_text().replace("port = 2455", "port = 0", 1))
    server = await start_child(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "/healthz") as health:
                assert health.status == 200
            async with http.get(server.url + "/readyz") as ready:
                assert ready.status == 200
                assert (await ready.json())["status"] == "ready"
            async with http.get(server.url + "/nowhere") as missing:
                assert missing.status == 404
                assert (await missing.json())["error"]["code"] == "not_found"
    finally:
        assert await server.stop() == 0
    assert (tmp_path / "codexlb.db").exists()
    assert any("shutting down" in line for line in server.log)


async def test_codexlb_config_environment_variable_is_honoured(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[accounts]]\nname = "a"\napi_key = "k"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codexlb",
        "check-config",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"CODEXLB_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    assert b"platform" in stdout


async def test_json_logs_carry_request_facts_as_fields(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        EXAMPLE.read_text()
        .replace("port = 2455", "port = 0", 1)
        .replace('format = "text"', 'format = "json"', 1)
    )
    server = await start_child(config)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                server.url + "/v1/responses",
                data=b"not json",
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 400
    finally:
        assert await server.stop() == 0
    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    [request] = [line for line in lines if line.get("route") == "responses"]
    assert request["status"] == 400
    assert request["transport"] == "http"
    assert request["attempts"] == 0
    assert isinstance(request["duration_ms"], float)
    assert request["level"] == "INFO"
