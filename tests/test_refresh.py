"""Credential refresh (SPEC S5) against the fake upstream's token endpoint on loopback.

The manager is exercised as the proxies use it: ``ensure_fresh`` before an attempt,
``refresh_after_401`` with the token the upstream refused, and a new manager on the same
configuration and database standing for a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.config import Config
from codexlb.credential_store import CredentialStore
from codexlb.credentials import Credentials, read_auth_file
from codexlb.db import create_engine, upgrade
from codexlb.pool import Account, Pool
from codexlb.refresh import CredentialManager
from codexlb.testing.fake_upstream import FakeAccount, Fault
from codexlb.testing.oauth import TOKEN_PATH, TokenFault, access_token, id_token
from codexlb.token_endpoint import (
    CLIENT_ID,
    RefreshRefused,
    RefreshUnavailable,
    request_refresh,
)
from tests.harness import CODEX_PATH, Fake, eventually, make_config, running_fake

EXPIRES_SOON = time.time() + 60
EXPIRES_LATER = time.time() + 3600
SOON = access_token("acct-s", expires_at=EXPIRES_SOON)
LATER = access_token("acct-l", expires_at=EXPIRES_LATER)

ACCOUNTS = (
    FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a", refresh_token="rt-a"),
    FakeAccount("b", access_token="tok-b", chatgpt_account_id="acct-b", refresh_token="rt-b"),
    FakeAccount("soon", access_token=SOON, chatgpt_account_id="acct-s", refresh_token="rt-s"),
    FakeAccount("later", access_token=LATER, chatgpt_account_id="acct-l", refresh_token="rt-l"),
    FakeAccount("n", access_token="tok-n", chatgpt_account_id="acct-n"),
    FakeAccount("p", api_key="sk-p"),
)
INLINE = {a.name: a for a in ACCOUNTS}


@pytest.fixture
async def upstream() -> AsyncIterator[Fake]:
    async with running_fake(ACCOUNTS) as fake:
        yield fake


def inline(name: str, **override: Any) -> dict[str, Any]:
    account = INLINE[name]
    if account.api_key is not None:
        return {"name": name, "api_key": account.api_key, **override}
    entry = {
        "name": name,
        "access_token": account.access_token,
        "chatgpt_account_id": account.chatgpt_account_id,
        "refresh_token": account.refresh_token,
        **override,
    }
    return {key: value for key, value in entry.items() if value is not None}


def config(
    upstream: Fake,
    tmp_path: Path,
    accounts: Iterable[Mapping[str, Any]],
    *,
    database_url: str | None = None,
) -> Config:
    data = {
        "database": {"url": database_url or f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"},
        "upstream": {
            "base_url": f"{upstream.url}/backend-api/codex",
            "token_url": upstream.url + TOKEN_PATH,
        },
        "accounts": list(accounts),
    }
    return make_config(data, tmp_path)


@asynccontextmanager
async def running(
    cfg: Config,
    http: aiohttp.ClientSession,
    *,
    store: CredentialStore | None = None,
    **options: Any,
) -> AsyncIterator[CredentialManager]:
    manager = CredentialManager(cfg, store=store, **options)
    await manager.start(http)
    try:
        yield manager
    finally:
        await manager.close()


async def upstream_status(
    http: aiohttp.ClientSession, upstream: Fake, credentials: Credentials
) -> tuple[int, Any]:
    """Status and the error code (or the last event's type) of a turn sent with
    ``credentials`` to the fake's Responses endpoint."""
    body = {"model": "gpt-test", "stream": True, "input": "hi"}
    async with http.post(
        upstream.url + CODEX_PATH, json=body, headers=credentials.auth_headers()
    ) as response:
        if response.status != 200:
            return response.status, (await response.json())["error"]["code"]
        return 200, (await response.text()).strip().rsplit("event: ", 1)[-1].split("\n")[0]


async def token_post(
    http: aiohttp.ClientSession, upstream: Fake, body: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(upstream.url + TOKEN_PATH, json=body) as response:
        return response.status, await response.json()


def pool_account(pool: Pool, name: str) -> Account:
    found = pool.get(name)
    assert found is not None
    return found


def grant(refresh_token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "refresh_token": refresh_token,
        "scope": "openid profile email",
    }


def write_auth_json(path: Path, account: str = "a") -> None:
    fake = INLINE[account]
    path.write_text(
        json.dumps(
            {
                "auth_mode": "chatgpt",
                "OPENAI_API_KEY": None,
                "tokens": {
                    "id_token": id_token(
                        fake.chatgpt_account_id, email="x@example.com", expires_at=EXPIRES_LATER
                    ),
                    "access_token": fake.access_token,
                    "refresh_token": fake.refresh_token,
                    "account_id": fake.chatgpt_account_id,
                },
                "last_refresh": "2020-01-01T00:00:00.000000Z",
                "preferences": {"kept": True},
            }
        )
    )
    path.chmod(0o644)


# -- single flight ---------------------------------------------------------------------------


async def test_twenty_concurrent_401s_make_one_refresh(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = config(upstream, tmp_path, [inline("a")])
    async with running(cfg, http) as manager:
        results = await asyncio.gather(
            *(manager.refresh_after_401("a", "tok-a") for _ in range(20))
        )
        renewed = manager.current("a")

        assert results == [True] * 20
        assert upstream.oauth.total_calls == 1
        assert upstream.oauth.requests == [grant("rt-a")]
        assert renewed.access_token not in (None, "tok-a")
        assert renewed.refresh_token == upstream.oauth.refresh_token("a") != "rt-a"
        assert renewed.account_id == "acct-a"
        assert renewed.expires_at is not None
        assert await upstream_status(http, upstream, renewed) == (200, "response.completed")

        # A late caller whose rejected token is already replaced: no second refresh.
        assert await manager.refresh_after_401("a", "tok-a") is True
        assert upstream.oauth.total_calls == 1
    status, answer = await token_post(http, upstream, grant("rt-a"))
    assert (status, answer["error"]["code"]) == (401, "refresh_token_reused")


async def test_a_cancelled_caller_does_not_cancel_the_refresh(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth.json"
    write_auth_json(auth_file)
    cfg = config(upstream, tmp_path, [{"name": "a", "auth_file": str(auth_file)}])
    upstream.oauth.script(TokenFault.slow(0.3))
    manager = CredentialManager(cfg, store=None)
    await manager.start(http)
    caller = asyncio.create_task(manager.refresh_after_401("a", "tok-a"))
    await upstream.wait_until(lambda: upstream.oauth.total_calls == 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    await manager.close()  # waits for the flight, which persists its result

    rotated = upstream.oauth.refresh_token("a")
    assert read_auth_file(auth_file).refresh_token == rotated
    assert manager.current("a").refresh_token == rotated


# -- proactive refresh -----------------------------------------------------------------------


async def test_a_token_near_its_exp_is_refreshed_before_use(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = config(upstream, tmp_path, [inline("soon")])
    async with running(cfg, http) as manager:
        fresh = await manager.ensure_fresh("soon")
        assert upstream.oauth.calls("rt-s") == 1
        assert fresh == manager.current("soon")
        assert fresh.access_token != SOON
        assert fresh.expires_at is not None
        assert fresh.expires_at > EXPIRES_SOON + 1000

        assert await manager.ensure_fresh("soon") == fresh
        assert upstream.oauth.total_calls == 1


async def test_concurrent_proactive_refreshes_share_one_flight(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = config(upstream, tmp_path, [inline("soon")])
    async with running(cfg, http) as manager:
        fresh, renewed = await asyncio.gather(
            asyncio.gather(*(manager.ensure_fresh("soon") for _ in range(5))),
            manager.refresh_after_401("soon", SOON),
        )
        assert {credentials.access_token for credentials in fresh} == {
            manager.current("soon").access_token
        }
    assert renewed is True
    assert upstream.oauth.total_calls == 1


async def test_no_refresh_far_from_exp_or_without_a_jwt(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = config(upstream, tmp_path, [inline("later"), inline("a"), inline("p")])
    async with running(cfg, http) as manager:
        assert (await manager.ensure_fresh("later")).access_token == LATER
        assert (await manager.ensure_fresh("a")).access_token == "tok-a"
        assert (await manager.ensure_fresh("p")).api_key == "sk-p"
    assert upstream.oauth.total_calls == 0


async def test_a_refresh_token_without_an_access_token_is_used_at_start(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = config(upstream, tmp_path, [{"name": "a", "refresh_token": "rt-a"}])

    async with running(cfg, http) as manager:
        a = pool_account(Pool(cfg, manager), "a")
        assert manager.current("a").usable is False
        assert not a.usable
        await eventually(lambda: a.usable)
        assert a.credentials is manager.current("a")
        assert manager.current("a").usable
        assert manager.current("a").account_id == "acct-a"  # from the new tokens' claims
    assert upstream.oauth.calls("rt-a") == 1


async def test_platform_keys_never_refresh(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"OPENAI_API_KEY": "sk-p"}))
    cfg = config(upstream, tmp_path, [inline("p"), {"name": "f", "auth_file": str(auth_file)}])
    async with running(cfg, http) as manager:
        for name in ("p", "f"):
            assert await manager.refresh_after_401(name, "sk-p") is False
            assert (await manager.ensure_fresh(name)).api_key == "sk-p"
    assert upstream.oauth.total_calls == 0


# -- persistence: auth_file ----------------------------------------------------------------


async def test_auth_file_gets_the_rotated_tokens_and_a_restart_uses_them(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth.json"
    write_auth_json(auth_file)
    before = json.loads(auth_file.read_text())
    cfg = config(upstream, tmp_path, [{"name": "a", "auth_file": str(auth_file)}])

    async with running(cfg, http) as manager:
        assert await manager.refresh_after_401("a", "tok-a")
        rotated = manager.current("a")

    after = json.loads(auth_file.read_text())
    assert after["tokens"] == {
        "id_token": rotated.id_token,
        "access_token": rotated.access_token,
        "refresh_token": rotated.refresh_token,
        "account_id": "acct-a",
    }
    assert rotated.id_token != before["tokens"]["id_token"]
    assert after["preferences"] == {"kept": True}
    assert after["auth_mode"] == "chatgpt"
    assert after["last_refresh"] > before["last_refresh"]
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["auth.json"]

    async with running(cfg, http) as restarted:  # a restart reads the file again
        assert restarted.current("a") == rotated
        assert await restarted.refresh_after_401("a", rotated.access_token)
    assert rotated.refresh_token is not None
    assert upstream.oauth.calls(rotated.refresh_token) == 1
    assert upstream.oauth.calls("rt-a") == 1
    status, answer = await token_post(http, upstream, grant(rotated.refresh_token))
    assert (status, answer["error"]["code"]) == (401, "refresh_token_reused")


async def test_tokens_rotated_in_the_auth_file_by_someone_else_are_adopted(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth.json"
    write_auth_json(auth_file)
    cfg = config(upstream, tmp_path, [{"name": "a", "auth_file": str(auth_file)}])
    async with running(cfg, http) as manager:
        # Codex CLI, sharing the file, refreshes first and writes its tokens.
        status, answer = await token_post(http, upstream, grant("rt-a"))
        assert status == 200
        data = json.loads(auth_file.read_text())
        data["tokens"].update(
            access_token=answer["access_token"], refresh_token=answer["refresh_token"]
        )
        auth_file.write_text(json.dumps(data))

        assert await manager.refresh_after_401("a", "tok-a") is True
        assert manager.current("a").access_token == answer["access_token"]
        assert manager.current("a").refresh_token == answer["refresh_token"]
    assert upstream.oauth.total_calls == 1  # only Codex CLI's: the dead rt-a was not reused


# -- persistence: inline accounts in the database ------------------------------------------


async def test_inline_rotation_is_stored_and_survives_a_restart(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path, database_url: str
) -> None:
    cfg = config(upstream, tmp_path, [inline("a"), inline("b")], database_url=database_url)
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        store = CredentialStore(engine)
        async with running(cfg, http, store=store) as manager:
            assert await manager.refresh_after_401("a", "tok-a")
            rotated = manager.current("a")
        row = await store.get("a")
        assert row is not None
        assert row.credentials == rotated
        assert await store.get("b") is None
    finally:
        await engine.dispose()

    engine = create_engine(database_url)  # the restart: a new engine, a new manager
    try:
        async with running(cfg, http, store=CredentialStore(engine)) as restarted:
            assert restarted.current("a") == rotated
            assert restarted.current("b").access_token == "tok-b"
            assert await restarted.refresh_after_401("a", rotated.access_token)
    finally:
        await engine.dispose()
    assert rotated.refresh_token is not None
    assert upstream.oauth.calls(rotated.refresh_token) == 1
    assert upstream.oauth.calls("rt-a") == 1
    status, answer = await token_post(http, upstream, grant("rt-a"))
    assert (status, answer["error"]["code"]) == (401, "refresh_token_reused")


async def test_new_tokens_in_the_toml_win_over_the_stored_row(
    upstream: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        store = CredentialStore(engine)
        cfg = config(upstream, tmp_path, [inline("a")], database_url=database_url)
        async with running(cfg, http, store=store) as manager:
            assert await manager.refresh_after_401("a", "tok-a")

        # The operator logs in again and pastes the new tokens into the TOML.
        relogin = upstream.oauth.issue_refresh_token("a")
        edited = config(
            upstream,
            tmp_path,
            [inline("a", access_token="tok-a-relogin", refresh_token=relogin)],
            database_url=database_url,
        )
        with caplog.at_level(logging.INFO, logger="codexlb.refresh"):
            async with running(edited, http, store=store) as restarted:
                assert restarted.current("a").access_token == "tok-a-relogin"
                assert restarted.current("a").refresh_token == relogin
                assert await restarted.refresh_after_401("a", "tok-a-relogin")
                renewed = restarted.current("a")
        assert "account a: its configured refresh token changed" in caplog.text
        assert upstream.oauth.calls(relogin) == 1
        row = await store.get("a")
        assert row is not None
        assert row.credentials == renewed
    finally:
        await engine.dispose()


async def test_replicas_sharing_the_database_never_reuse_a_refresh_token(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path, database_url: str
) -> None:
    cfg = config(upstream, tmp_path, [inline("a")], database_url=database_url)
    engines = [create_engine(database_url), create_engine(database_url)]
    try:
        await upgrade(engines[0])
        async with (
            running(cfg, http, store=CredentialStore(engines[0])) as one,
            running(cfg, http, store=CredentialStore(engines[1])) as two,
        ):
            if engines[0].dialect.name == "postgresql":
                upstream.oauth.script(TokenFault.slow(0.2))  # overlap the two flights
                results = list(
                    await asyncio.gather(
                        one.refresh_after_401("a", "tok-a"), two.refresh_after_401("a", "tok-a")
                    )
                )
            else:  # one process per SQLite database: replicas take turns at most
                results = [
                    await one.refresh_after_401("a", "tok-a"),
                    await two.refresh_after_401("a", "tok-a"),
                ]
            assert results == [True, True]
            assert one.current("a") == two.current("a")
            assert one.current("a").refresh_token == upstream.oauth.refresh_token("a")
        assert upstream.oauth.total_calls == 1
    finally:
        for engine in engines:
            await engine.dispose()


# -- refusals and failures -----------------------------------------------------------------


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture, upstream: Fake) -> None:
    secrets = {"tok-a", "rt-a", "sk-p"}
    for body in upstream.oauth.requests:
        secrets.add(body["refresh_token"])
    for name in ("a", "b"):
        token = upstream.oauth.refresh_token(name)
        if token:
            secrets.add(token)
    text = caplog.text
    for record in caplog.records:
        text += repr(record.args) + str(record.exc_info)
    for secret in secrets:
        assert secret not in text


async def test_a_refused_refresh_makes_the_account_unusable_with_one_clear_line(
    upstream: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(upstream, tmp_path, [inline("a")])
    # Someone else spends the refresh token first: ours is now a reused one.
    status, answer = await token_post(http, upstream, grant("rt-a"))
    assert status == 200
    with caplog.at_level(logging.DEBUG, logger="codexlb"):
        async with running(cfg, http) as manager:
            assert await manager.refresh_after_401("a", "tok-a") is False
            assert await manager.refresh_after_401("a", "tok-a") is False
            assert manager.problem("a") is not None
            assert (await manager.ensure_fresh("a")).access_token == "tok-a"
    assert upstream.oauth.calls("rt-a") == 2  # ours, once, after the other party's
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "account a: its token refresh was refused (HTTP 401 refresh_token_reused); it is "
        "unusable until its credentials change: put new tokens in the configuration and reload"
    ]
    secrets_seen_by_test = {answer["access_token"], answer["refresh_token"], answer["id_token"]}
    assert not any(secret in caplog.text for secret in secrets_seen_by_test)
    assert_no_secret_logged(caplog, upstream)


async def test_a_scripted_refusal_names_its_code_and_the_auth_file_remedy(
    upstream: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth_file = tmp_path / "auth.json"
    write_auth_json(auth_file)
    content = auth_file.read_text()
    cfg = config(upstream, tmp_path, [{"name": "a", "auth_file": str(auth_file)}])
    upstream.oauth.script(TokenFault.refuse(401, "refresh_token_expired"))
    with caplog.at_level(logging.INFO, logger="codexlb"):
        async with running(cfg, http) as manager:
            assert await manager.refresh_after_401("a", "tok-a") is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("account a: its token refresh was refused (HTTP 401 refresh_")
    assert f"log in again (codex login) to renew {auth_file}, then reload" in errors[0]
    assert auth_file.read_text() == content
    assert_no_secret_logged(caplog, upstream)


async def test_without_a_refresh_token_a_401_is_final(
    upstream: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(upstream, tmp_path, [inline("n")])
    with caplog.at_level(logging.INFO, logger="codexlb"):
        async with running(cfg, http) as manager:
            assert await manager.refresh_after_401("n", "tok-n") is False
            assert await manager.refresh_after_401("n", "tok-n") is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith(
        "account n: the upstream refused its access token (401) and it has no refresh token"
    )
    assert "tok-n" not in caplog.text
    assert upstream.oauth.total_calls == 0


async def test_a_transient_failure_keeps_the_refresh_token_for_later(
    upstream: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(upstream, tmp_path, [inline("a"), inline("soon")])
    upstream.oauth.script(TokenFault.error(503), TokenFault.error(502))
    with caplog.at_level(logging.INFO, logger="codexlb"):
        async with running(cfg, http) as manager:
            with pytest.raises(RefreshUnavailable, match=r"HTTP 503 server_error"):
                await manager.refresh_after_401("a", "tok-a")
            assert manager.problem("a") is None

            # Proactive: the current token is returned; no new attempt for a while.
            assert (await manager.ensure_fresh("soon")).access_token == SOON
            assert (await manager.ensure_fresh("soon")).access_token == SOON
            assert upstream.oauth.calls("rt-s") == 1

            assert await manager.refresh_after_401("a", "tok-a") is True
    assert upstream.oauth.calls("rt-a") == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0] == (
        "account a: token refresh failed (the token endpoint failed (HTTP 503 server_error)); "
        "it will be tried again"
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_no_secret_logged(caplog, upstream)


async def test_an_unreachable_token_endpoint_is_transient(http: aiohttp.ClientSession) -> None:
    gone = Fake(ACCOUNTS)
    url = await gone.start()
    await gone.close()
    with pytest.raises(RefreshUnavailable, match=r"unreachable \(ClientConnectorError\)"):
        await request_refresh(http, url + TOKEN_PATH, "rt-a", timeout=5)


async def test_a_slow_token_endpoint_times_out_as_transient(
    upstream: Fake, http: aiohttp.ClientSession
) -> None:
    upstream.oauth.script(TokenFault.slow(5))
    with pytest.raises(RefreshUnavailable, match="did not answer in time"):
        await request_refresh(http, upstream.url + TOKEN_PATH, "rt-a", timeout=0.2)


# -- the fake upstream's side of a refresh --------------------------------------------------


async def test_the_upstream_401_then_the_new_token_is_accepted(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    upstream.script(Fault.status(401, error_code="token_expired"), account="a")
    upstream.oauth.revoke_on_refresh = True
    cfg = config(upstream, tmp_path, [inline("a")])
    async with running(cfg, http) as manager:
        sent = manager.current("a")
        assert await upstream_status(http, upstream, sent) == (401, "token_expired")
        assert await manager.refresh_after_401("a", sent.access_token)
        assert await upstream_status(http, upstream, manager.current("a")) == (
            200,
            "response.completed",
        )
    assert await upstream_status(http, upstream, sent) == (401, "invalid_api_key")
    assert [r.account for r in upstream.received] == ["a", "a", None]


async def test_the_fake_token_endpoint_speaks_the_oauth_protocol(
    upstream: Fake, http: aiohttp.ClientSession
) -> None:
    bad_client = {**grant("rt-a"), "client_id": "someone-else"}
    assert await token_post(http, upstream, bad_client) == (
        401,
        {"error": "invalid_client", "error_description": "Unknown client."},
    )
    status, answer = await token_post(http, upstream, {**grant("rt-a"), "grant_type": "password"})
    assert (status, answer["error"]) == (400, "unsupported_grant_type")
    status, answer = await token_post(http, upstream, grant("rt-unknown"))
    assert (status, answer["error"]) == (400, "invalid_grant")
    with pytest.raises(RefreshRefused) as refused:
        await request_refresh(http, upstream.url + TOKEN_PATH, "rt-unknown")
    assert (refused.value.status, refused.value.code) == (400, "invalid_grant")

    status, answer = await token_post(http, upstream, grant("rt-a"))
    assert status == 200
    assert set(answer) == {"access_token", "refresh_token", "id_token", "token_type", "expires_in"}
    issued = Credentials(access_token=answer["access_token"], id_token=answer["id_token"])
    assert issued.expires_at is not None
    assert abs(issued.expires_at - (time.time() + 3600)) < 60
    assert upstream.oauth.calls("rt-a") == 1
    assert upstream.oauth.refresh_token("a") == answer["refresh_token"]


# -- reloads and the pool's view -----------------------------------------------------------


async def test_reload_keeps_rotated_tokens_and_adopts_a_new_login(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth.json"
    write_auth_json(auth_file)
    accounts = [inline("b"), {"name": "a", "auth_file": str(auth_file)}]
    cfg = config(upstream, tmp_path, accounts)
    upstream.oauth.script(TokenFault.refuse(401, "refresh_token_invalidated"), account="a")
    async with running(cfg, http) as manager:
        pool = Pool(cfg, manager)
        assert await manager.refresh_after_401("b", "tok-b")
        assert await manager.refresh_after_401("a", "tok-a") is False
        pool.unauthorized(pool_account(pool, "a"))  # as the exchange does after that answer
        rotated_b = manager.current("b")
        assert pool_account(pool, "b").credentials == rotated_b
        assert pool_account(pool, "a").credentials.access_token == "tok-a"

        await manager.reconfigure(cfg)  # nothing changed: live tokens stay, no news
        assert pool.reconfigure(cfg).credentials == ()
        assert not pool_account(pool, "a").usable
        assert manager.current("b") == rotated_b
        assert manager.problem("a") is not None

        # `codex login` again writes a new login to the file; then the reload.
        relogin = upstream.oauth.issue_refresh_token("a")
        data = json.loads(auth_file.read_text())
        data["tokens"].update(access_token="tok-a-relogin", refresh_token=relogin)
        auth_file.write_text(json.dumps(data))
        await manager.reconfigure(cfg)
        assert pool.reconfigure(cfg).credentials == ("a",)
        assert manager.problem("a") is None
        assert manager.current("a").refresh_token == relogin
        assert pool_account(pool, "a").credentials.access_token == "tok-a-relogin"
        assert pool_account(pool, "a").usable
        assert await manager.refresh_after_401("a", "tok-a-relogin")
        assert upstream.oauth.calls(relogin) == 1

        # New inline tokens for b in the TOML replace the live ones.
        edited = config(upstream, tmp_path, [inline("b", access_token="tok-b-new"), accounts[1]])
        await manager.reconfigure(edited)
        assert manager.current("b").access_token == "tok-b-new"
        with pytest.raises(KeyError):
            manager.current("gone")
