"""The real Codex CLI (0.169.0) sees the pool (SPEC S13): logged in with its own ChatGPT
account or with a client key, over HTTP and WebSocket.

- ``codex app-server`` logged in with ChatGPT reads ``account/rateLimits/read`` from codexlb's
  ``/wham/usage``: two accounts at 20% and 60% show as one pool at 40%; and a turn runs on the
  pool, its own token never going upstream.
- With a client key, the ``account/rateLimits/updated`` notifications Codex derives from the
  rate-limit headers (HTTP) and the 101 and ``codex.rate_limits`` events (WebSocket) carry the
  pool's 40%, not the serving account's 20% or 60%.
- ``codex exec`` logged in with ChatGPT calls its image tool: ``images/generations`` reaches an
  account of the pool and the fake's small image reaches Codex.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.codex_model import codex_responder
from codexlb.testing.fake_upstream import FakeAccount
from tests import codex_cli
from tests.codex_cli import response_requests, summary
from tests.harness import (
    CLIENT_KEYS,
    Balancer,
    Fake,
    config_data,
    make_config,
    running_fake,
    serve,
    stream_turn,
    user_message,
)
from tests.local_tls import LocalTls, make_local_tls, openssl_missing
from tests.test_codex_app_server import (
    AppServer,
    app_server,
    assert_ran_echo_hello,
    run_turn,
)

pytestmark = pytest.mark.codex

CASE_TIMEOUT = 150
CLIENT_TOKEN = "codex-users-own-chatgpt-token"
TWO = (
    FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a", used_percent=20),
    FakeAccount("b", access_token="tok-b", chatgpt_account_id="acct-b", used_percent=60),
)


@asynccontextmanager
async def pool(
    tmp_path: Path, *, open_access: bool, tls: LocalTls | None = None
) -> AsyncIterator[tuple[Fake, Balancer]]:
    """Two accounts at 20% and 60% behind codexlb (listening with ``tls`` if given), which
    has seen both report once."""
    async with running_fake(TWO) as fake:
        fake.responder = codex_responder
        data = config_data(
            fake.url,
            f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
            accounts=TWO,
            keys={} if open_access else CLIENT_KEYS,
        )
        ssl_context = None if tls is None else tls_server_context(tls)
        connector = aiohttp.TCPConnector(ssl=tls.client_context() if tls else True)
        async with (
            serve(make_config(data, tmp_path), ssl_context=ssl_context) as lb,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            key = "any" if open_access else CLIENT_KEYS["alice"]
            for text in ("one", "two"):
                answer = await stream_turn(
                    http, lb.url, {"input": [user_message(text)]}, headers=_bearer(key)
                )
                assert answer.status == 200
            assert {r.account for r in fake.received} == {"a", "b"}
            fake.received.clear()
            yield fake, lb


def tls_server_context(tls: LocalTls) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chatgpt_home(root: Path, lb_url: str, *, websockets: bool) -> tuple[Path, Path]:
    """A CODEX_HOME logged in with a ChatGPT account of its own, its account calls and turns
    both pointed at codexlb."""
    home, workdir = codex_cli.prepare(root, lb_url, websockets=websockets)
    codex_cli.write_codex_home(
        home, lb_url, websockets=websockets, chatgpt_base_url=f"{lb_url}/backend-api/"
    )
    codex_cli.write_chatgpt_login(home, access_token=CLIENT_TOKEN, account_id="acct-own")
    return home, workdir


def assert_own_token_never_went_upstream(fake: Fake) -> None:
    for request in [*fake.received, *fake.handshakes]:
        assert request.account is not None, request  # every request bore a pool account's
        assert CLIENT_TOKEN not in json.dumps(dict(request.headers)), request.headers
        assert request.headers.get("chatgpt-account-id") != "acct-own", request.headers


@pytest.mark.timeout(CASE_TIMEOUT, func_only=True)
async def test_app_server_with_chatgpt_login_reads_the_pools_rate_limits(
    codex: Path, tmp_path: Path
) -> None:
    async with pool(tmp_path, open_access=True) as (fake, lb):
        home, workdir = chatgpt_home(tmp_path, lb.url, websockets=True)
        async with app_server(codex, home=home, api_key=None) as server:
            read = await server.request("account/rateLimits/read")
            limits = read["rateLimits"]
            assert limits["primary"]["usedPercent"] == 40, read  # (20 + 60) / 2
            assert limits["primary"]["windowDurationMins"] == 300, read
            assert limits["secondary"]["usedPercent"] == 0, read
            started = await server.request(
                "thread/start",
                {"cwd": str(workdir), "approvalPolicy": "never", "sandbox": "danger-full-access"},
            )
            result = await run_turn(server, started["thread"]["id"])
            assert_ran_echo_hello(result, server)
        turns = response_requests(fake.received)
        assert turns, summary(turns)
        assert_own_token_never_went_upstream(fake)


def rate_limit_updates(server: AppServer) -> list[dict[str, Any]]:
    return [
        note["params"]["rateLimits"]
        for note in server.notifications
        if note.get("method") == "account/rateLimits/updated"
    ]


@pytest.mark.timeout(CASE_TIMEOUT, func_only=True)
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "ws"])
async def test_rate_limit_notifications_carry_the_pools_figures(
    codex: Path, tmp_path: Path, websockets: bool
) -> None:
    async with pool(tmp_path, open_access=False) as (fake, lb):
        home, workdir = codex_cli.prepare(tmp_path, lb.url, websockets=websockets)
        async with app_server(codex, home=home, api_key=CLIENT_KEYS["alice"]) as server:
            started = await server.request(
                "thread/start",
                {"cwd": str(workdir), "approvalPolicy": "never", "sandbox": "danger-full-access"},
            )
            result = await run_turn(server, started["thread"]["id"])
            assert_ran_echo_hello(result, server)
            updates = rate_limit_updates(server)
        transports = {r.transport for r in response_requests(fake.received)}
        assert transports == {"ws" if websockets else "http"}
        primaries = [u["primary"]["usedPercent"] for u in updates if u.get("primary")]
        assert primaries, server.describe()
        assert set(primaries) == {40}, updates


@pytest.mark.timeout(CASE_TIMEOUT, func_only=True)
async def test_codex_exec_with_chatgpt_login_generates_an_image_on_the_pool(
    codex: Path, tmp_path: Path
) -> None:
    async with pool(tmp_path, open_access=True) as (fake, lb):
        home, workdir = chatgpt_home(tmp_path, lb.url, websockets=False)
        run = await codex_cli.run_codex(
            codex, home=home, workdir=workdir, api_key=None, prompt="Generate an image of a cat"
        )
        assert run.returncode == 0, run.describe()
        images = [r for r in fake.received if r.path.endswith("/images/generations")]
        assert len(images) == 1, run.describe()
        assert images[0].account in ("a", "b")
        assert images[0].body["model"] == "gpt-image-2"
        assert images[0].body["prompt"] == "a cat"
        assert "x-codex-image-turn-id" in images[0].headers
        messages = [item["text"] for item in run.completed_items("agent_message")]
        assert messages == ["The command printed: image data:image/png;base64,"], run.describe()
        assert " ERROR " not in run.stderr, run.describe()  # its account calls went quietly
        assert_own_token_never_went_upstream(fake)


@pytest.mark.timeout(CASE_TIMEOUT, func_only=True)
@pytest.mark.skipif(openssl_missing() is not None, reason=str(openssl_missing()))
@pytest.mark.parametrize("websockets", [False, True], ids=["https", "wss"])
async def test_codex_with_chatgpt_login_over_tls_trusting_the_local_authority(
    codex: Path, tmp_path: Path, websockets: bool
) -> None:
    """The README's recipe: a certificate from the local authority its two ``openssl``
    commands make, and Codex trusting that authority through ``CODEX_CA_CERTIFICATE``."""
    tls = make_local_tls(tmp_path / "tls")
    async with pool(tmp_path, open_access=True, tls=tls) as (fake, lb):
        assert lb.url.startswith("https://")
        home, workdir = chatgpt_home(tmp_path, lb.url, websockets=websockets)
        run = await codex_cli.run_codex(
            codex,
            home=home,
            workdir=workdir,
            api_key=None,
            env={"CODEX_CA_CERTIFICATE": str(tls.ca)},
        )
        codex_cli.assert_ran_echo_hello(run)
        transports = {r.transport for r in response_requests(fake.received)}
        assert transports == {"ws" if websockets else "http"}, summary(fake.received)
        assert_own_token_never_went_upstream(fake)
