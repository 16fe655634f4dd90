"""Credentials as values and files: auth.json read and atomic write-back, JWT claims, the
``import-auth`` snippet, and the database rows of rotated inline tokens (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.config import parse_config
from codexlb.credential_store import CredentialStore, source_fingerprint
from codexlb.credentials import (
    Credentials,
    CredentialsError,
    import_auth_snippet,
    jwt_claims,
    jwt_expiry,
    read_auth_file,
    token_account_id,
    toml_string,
    write_auth_file,
)
from codexlb.testing.oauth import access_token, id_token, make_jwt

NOW = time.time()


def auth_json(path: Path, **tokens: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": id_token("acct-1", email="dev.one@example.com", expires_at=NOW + 3600),
            "access_token": "old-access",
            "refresh_token": "old-refresh",
            "account_id": "acct-1",
            "kept_token_field": "yes",
            **tokens,
        },
        "last_refresh": "2020-01-01T00:00:00.000000Z",
        "agent_identity": {"kept": [1, 2]},
    }
    path.write_text(json.dumps(data))
    path.chmod(0o644)
    return data


ROTATED = Credentials(
    access_token="new-access", account_id="acct-1", refresh_token="new-refresh", id_token="new-id"
)

# -- values -----------------------------------------------------------------------------------


def test_repr_shows_no_secret() -> None:
    credentials = Credentials(
        access_token="A-SECRET", account_id="acct", refresh_token="R-SECRET", id_token="I-SECRET"
    )
    text = repr(credentials) + str(credentials) + repr(Credentials(api_key="K-SECRET"))
    assert "SECRET" not in text
    assert "acct" in text


def test_jwt_expiry_reads_the_unverified_payload() -> None:
    token = access_token("acct-1", expires_at=1_900_000_000)
    assert jwt_expiry(token) == 1_900_000_000.0
    assert token_account_id(token) == "acct-1"
    assert Credentials(access_token=token).expires_at == 1_900_000_000.0


@pytest.mark.parametrize(
    "token",
    [
        "tok-a",
        "sk-not.a-jwt",
        "a.b.c",
        "a.!!!.c",
        make_jwt({"sub": "no exp"}),
        make_jwt({"exp": True}),
        make_jwt({"exp": "1900000000"}),
        "eyJhbGciOiJub25lIn0.WzFd.sig",  # payload [1]: not an object
    ],
)
def test_tokens_without_a_readable_exp_have_no_expiry(token: str) -> None:
    assert jwt_expiry(token) is None
    assert Credentials(access_token=token).expires_at is None


def test_jwt_claims_pads_base64url() -> None:
    token = make_jwt({"exp": 1, "x": "??>>"})  # base64url characters - and _ and no padding
    assert jwt_claims(token) == {"exp": 1, "x": "??>>"}


# -- auth.json --------------------------------------------------------------------------------


def test_read_auth_file_keeps_the_id_token(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    data = auth_json(path)
    credentials = read_auth_file(path)
    assert credentials.access_token == "old-access"
    assert credentials.refresh_token == "old-refresh"
    assert credentials.account_id == "acct-1"
    assert credentials.id_token == data["tokens"]["id_token"]


def test_write_back_replaces_the_tokens_and_keeps_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    before = auth_json(path)

    assert write_auth_file(path, ROTATED, replacing_refresh_token="old-refresh") is True

    after = json.loads(path.read_text())
    assert after["tokens"] == {
        "id_token": "new-id",
        "access_token": "new-access",
        "refresh_token": "new-refresh",
        "account_id": "acct-1",
        "kept_token_field": "yes",
    }
    assert after["auth_mode"] == "chatgpt"
    assert after["OPENAI_API_KEY"] is None
    assert after["agent_identity"] == before["agent_identity"]
    refreshed = datetime.strptime(after["last_refresh"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(refreshed.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["auth.json"], "no temporary file is left behind"


def test_write_back_keeps_old_id_token_when_none_is_given(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    before = auth_json(path)
    rotated = Credentials(access_token="new-access", refresh_token="new-refresh")
    assert write_auth_file(path, rotated, replacing_refresh_token="old-refresh")
    tokens = json.loads(path.read_text())["tokens"]
    assert tokens["id_token"] == before["tokens"]["id_token"]
    assert tokens["account_id"] == "acct-1"


def test_write_back_leaves_a_file_someone_else_changed(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    auth_json(path, refresh_token="codex-cli-rotated-it")
    content = path.read_text()
    assert write_auth_file(path, ROTATED, replacing_refresh_token="old-refresh") is False
    assert path.read_text() == content


def test_write_back_follows_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    auth_json(real / "auth.json")
    link = tmp_path / "auth.json"
    link.symlink_to(real / "auth.json")

    assert write_auth_file(link, ROTATED, replacing_refresh_token="old-refresh")

    assert link.is_symlink()
    assert read_auth_file(real / "auth.json").refresh_token == "new-refresh"
    assert sorted(os.listdir(real)) == ["auth.json"]


def test_write_back_of_a_missing_file_names_the_path_only(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as missing:
        write_auth_file(tmp_path / "gone.json", ROTATED, replacing_refresh_token="old-refresh")
    assert str(missing.value) == f"{tmp_path / 'gone.json'}: file not found"


# -- import-auth -------------------------------------------------------------------------------


def test_import_auth_snippet_points_at_the_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    auth_json(path)

    snippet = import_auth_snippet(path)

    assert snippet == f'\n[[accounts]]\nname = "dev.one"\nauth_file = "{path}"\n'
    for secret in ("old-access", "old-refresh"):
        assert secret not in snippet
    config = parse_config(tomllib.loads(snippet), source=tmp_path / "elsewhere" / "c.toml")
    assert config.accounts[0].auth_file == path
    assert config.accounts[0].name == "dev.one"


def test_import_auth_snippet_makes_the_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth_json(tmp_path / "auth.json")
    monkeypatch.chdir(tmp_path)
    snippet = import_auth_snippet("auth.json", name='work "one"')
    entry = tomllib.loads(snippet)["accounts"][0]
    assert entry == {"name": 'work "one"', "auth_file": str(tmp_path / "auth.json")}


def test_import_auth_snippet_names_by_account_id_without_an_email(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    auth_json(path, id_token=make_jwt({"exp": 1}))
    assert tomllib.loads(import_auth_snippet(path))["accounts"][0]["name"] == "codex-acct-1"


def test_import_auth_snippet_for_a_platform_key(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"OPENAI_API_KEY": "sk-platform-secret", "tokens": None}))
    snippet = import_auth_snippet(path, name="platform-1")
    assert "sk-platform-secret" not in snippet
    entry = tomllib.loads(snippet)["accounts"][0]
    assert entry["base_url"] == "https://api.openai.com/v1"
    assert parse_config(tomllib.loads(snippet), source=tmp_path / "c.toml").accounts[0].auth_file


@pytest.mark.parametrize("content", [None, "{not json", '["a list"]', '{"tokens": {}}'])
def test_import_auth_refuses_what_is_not_a_codex_auth_json(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "auth.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialsError, match=r"auth\.json"):
        import_auth_snippet(path)


def test_toml_string_escapes_what_toml_requires() -> None:
    value = 'a"b\\c\nd\te\x7ff/é'
    assert tomllib.loads(f"x = {toml_string(value)}")["x"] == value


# -- the database rows of inline accounts -------------------------------------------------------


async def test_store_saves_replaces_and_loads_rows(engine: AsyncEngine) -> None:
    store = CredentialStore(engine)
    assert await store.get("a") is None
    assert await store.load_all() == {}

    first = Credentials(access_token="at-1", account_id="acct", refresh_token="rt-1")
    await store.save("a", first, source_fingerprint=source_fingerprint("toml-rt"))
    await store.save("b", ROTATED, source_fingerprint=source_fingerprint("toml-rt-b"))
    await store.save("a", ROTATED, source_fingerprint=source_fingerprint("toml-rt"))

    row = await store.get("a")
    assert row is not None
    assert row.credentials == ROTATED
    assert row.credentials.id_token == "new-id"
    assert row.source_fingerprint == source_fingerprint("toml-rt")
    assert row.updated_at.tzinfo is not None
    assert abs(row.updated_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert "new-refresh" not in repr(row)
    assert "new-access" not in repr(row)
    assert sorted(await store.load_all()) == ["a", "b"]

    await store.delete("a")
    assert sorted(await store.load_all()) == ["b"]


def test_fingerprint_is_not_the_token() -> None:
    fingerprint = source_fingerprint("rt-secret")
    assert "rt-secret" not in fingerprint
    assert fingerprint == source_fingerprint("rt-secret") != source_fingerprint("rt-other")


async def test_exclusive_serializes_refreshes_across_connections(engine: AsyncEngine) -> None:
    store = CredentialStore(engine)
    if engine.dialect.name != "postgresql":
        async with store.exclusive("a"), store.exclusive("a"):
            return  # SQLite: one process per database; no lock to take, none to deadlock on
    order: list[str] = []
    inside = asyncio.Event()

    async def first() -> None:
        async with store.exclusive("a"):
            order.append("first in")
            async with store.exclusive("another account"):
                order.append("another account")
            inside.set()
            await _until_a_lock_is_awaited(engine)
            order.append("first out")

    async def second() -> None:
        await inside.wait()
        async with store.exclusive("a"):
            order.append("second in")

    await asyncio.gather(first(), second())
    assert order == ["first in", "another account", "first out", "second in"]


async def _until_a_lock_is_awaited(engine: AsyncEngine) -> None:
    query = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    async with asyncio.timeout(5):
        while True:
            async with engine.connect() as conn:
                if (await conn.execute(query)).scalar_one():
                    return
            await asyncio.sleep(0.01)
