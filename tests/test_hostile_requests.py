"""Hostile requests from the client side, over loopback: other origins and hosts (a web page,
DNS rebinding), malformed headers and bodies, spoofed log ids, headers that must not reach the
upstream, huge echoed ids, and the operator views behind the admin key (SPEC S10)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.config import ConfigError
from codexlb.logs import new_request_id
from tests.harness import (
    ADMIN_KEY,
    CLIENT_KEYS,
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    config_data,
    eventually,
    make_config,
    serve,
    stream_turn,
    user_message,
    ws_events,
    ws_turn,
    ws_url,
)


def lb_config(fake: Fake, tmp_path: Path, database_url: str | None = None, **sections: Any) -> Any:
    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}"
    keys = sections.pop("keys", CLIENT_KEYS)
    return make_config(config_data(fake.url, url, keys=keys, **sections), tmp_path)


@pytest.fixture
async def open_lb(fake: Fake, tmp_path: Path) -> AsyncIterator[Balancer]:
    """The quick start: no client keys, on loopback."""
    async with serve(lb_config(fake, tmp_path, keys={})) as balancer:
        yield balancer


def host_of(lb: Balancer) -> str:
    return lb.url.removeprefix("http://")


async def raw_request(lb: Balancer, head: bytes, body: bytes = b"") -> tuple[int, Any]:
    """Send ``head`` and ``body`` as bytes; the status and the answer's JSON body."""
    host, port = host_of(lb).rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            answer = await reader.readexactly(length)
    finally:
        writer.close()
    return int(status_line.split()[1]), json.loads(answer) if length else answer


def assert_error(body: Mapping[str, Any], code: str, param: str | None = None) -> str:
    error = body["error"]
    assert error["code"] == code, body
    assert error["type"] == "invalid_request_error", body
    assert error["param"] == param, body
    message: str = error["message"]
    return message


# --- Origin and Host ------------------------------------------------------------------------


async def test_a_web_page_cannot_open_a_websocket_in_open_access(
    open_lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    for origin in ("http://evil.example", "null", f"http://{host_of(open_lb)}.evil.example"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(ws_url(open_lb.url), origin=origin)
        assert info.value.status == 403
    assert fake.received == []  # refused before any upstream socket opened

    async with http.ws_connect(ws_url(open_lb.url)) as ws:  # no Origin: Codex, SDKs
        assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"


async def test_the_refusal_is_openai_shaped_before_the_upgrade(open_lb: Balancer) -> None:
    status, body = await raw_request(
        open_lb,
        b"GET " + CODEX_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Origin: https://evil.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    assert status == 403
    assert "https://evil.example" in assert_error(body, "origin_not_allowed")


async def test_listed_and_same_origins_are_served(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = lb_config(
        fake, tmp_path, keys={}, server={"allowed_origins": ["https://App.Example/"]}
    )
    async with serve(config) as lb:
        async with http.ws_connect(ws_url(lb.url), origin="https://app.example") as ws:
            assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"
        async with http.ws_connect(ws_url(lb.url), origin=lb.url) as ws:  # the dashboard's
            assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"
        result = await stream_turn(
            http, lb.url, {"input": "hi"}, headers={"Origin": "https://app.example"}
        )
        assert result.status == 200
        result = await stream_turn(
            http, lb.url, {"input": "hi"}, headers={"Origin": "https://app.example:8443"}
        )
        assert result.status == 403


async def test_a_cross_site_text_plain_post_is_refused(
    open_lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    body = json.dumps({"model": "gpt-5-codex", "input": "hi", "stream": True})
    plain = {"Content-Type": "text/plain"}
    for headers, status, code in (
        ({**plain, "Origin": "http://evil.example"}, 403, "origin_not_allowed"),
        (plain, 415, "unsupported_media_type"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ):
        for path in (CODEX_PATH, "/v1/responses", "/v1/responses/compact"):
            async with http.post(open_lb.url + path, data=body, headers=headers) as response:
                assert response.status == status
                assert_error(await response.json(), code)
    assert fake.received == []

    json_with_charset = {"Content-Type": "application/json; charset=utf-8"}
    async with http.post(
        open_lb.url + CODEX_PATH, data=body, headers=json_with_charset
    ) as response:
        assert response.status == 200
        assert b"response.completed" in await response.read()


async def test_dns_rebinding_host_is_refused_on_loopback(
    open_lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    port = host_of(open_lb).rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        async with http.get(open_lb.url + "/v1/models", headers={"Host": host}) as response:
            assert response.status == 403
            assert host in assert_error(await response.json(), "host_not_allowed")
        result = await stream_turn(http, open_lb.url, {"input": "hi"}, headers={"Host": host})
        assert result.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(ws_url(open_lb.url), headers={"Host": host})
        assert info.value.status == 403
    assert fake.received == []

    for host in (f"localhost:{port}", "localhost", f"[::1]:{port}", f"127.0.0.1:{port}"):
        result = await stream_turn(http, open_lb.url, {"input": "hi"}, headers={"Host": host})
        assert result.status == 200, host


async def test_any_host_on_a_non_loopback_bind(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serve(lb_config(fake, tmp_path, server={"host": "0.0.0.0"})) as lb:
        headers = {**auth(), "Host": "codexlb.internal:2455"}
        result = await stream_turn(http, lb.url, {"input": "hi"}, headers=headers)
        assert result.status == 200


def test_allowed_origins_must_be_origins(tmp_path: Path) -> None:
    for bad in ("evil.example", "https://app.example/path", "*", "ftp://x"):
        with pytest.raises(ConfigError, match=r"server\.allowed_origins"):
            make_config({"server": {"allowed_origins": [bad]}}, tmp_path)


# --- The Authorization header ---------------------------------------------------------------


async def test_a_non_utf8_authorization_is_a_401(lb: Balancer) -> None:
    status, body = await raw_request(
        lb,
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer sk-\xff\xfe\xc3\r\nConnection: close\r\n\r\n",
    )
    assert status == 401
    assert_error(body, "invalid_api_key")


async def test_two_authorization_headers_are_refused(lb: Balancer) -> None:
    for first, second in ((CLIENT_KEYS["alice"], "sk-other"), (CLIENT_KEYS["alice"],) * 2):
        status, body = await raw_request(
            lb,
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n".encode()
            + b"Connection: close\r\n\r\n",
        )
        assert status == 400
        assert "Authorization" in assert_error(body, "invalid_request")


# --- Request bodies ---------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_deeply_nested_json_is_refused_before_anything_runs(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    item = {**user_message("hi"), "extra": nested(300)}
    result = await stream_turn(http, lb.url, {"input": [item]})
    assert result.status == 400
    assert "nest" in assert_error(result.events[0], "invalid_request", "input")
    result = await stream_turn(http, lb.url, {"input": "hi", "metadata": {"x": nested(200)}})
    assert result.status == 400
    assert_error(result.events[0], "invalid_request", "metadata")
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        [error] = await ws_turn(ws, {"input": [item]})
        assert (error["type"], error["status"]) == ("error", 400)
        assert_error(error, "invalid_request", "input")
        assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.received] == ["ws"]  # only the turn that was fine

    fine = {**user_message("hi"), "extra": nested(60)}
    assert (await stream_turn(http, lb.url, {"input": [fine]})).status == 200


async def test_a_nul_in_an_id_is_a_clear_400_on_both_transports(
    fake: Fake, tmp_path: Path, database_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve(lb_config(fake, tmp_path, database_url)) as lb:
        first = await stream_turn(http, lb.url, {"input": "hi"})
        assert first.status == 200
        bad_ids = {
            "previous_response_id": first.response_id + "\x00",
            "model": "gpt-5-codex\x00",
        }
        for param, value in bad_ids.items():
            result = await stream_turn(http, lb.url, {"input": "hi", param: value})
            assert result.status == 400
            assert_error(result.events[0], "invalid_request", param)
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            for param, value in bad_ids.items():
                [error] = await ws_turn(ws, {"input": "hi", param: value})
                assert (error["type"], error["status"]) == ("error", 400)
                assert_error(error, "invalid_request", param)
            events = await ws_turn(ws, {"input": "more", "previous_response_id": first.response_id})
            assert events[-1]["type"] == "response.completed"
        async with http.get(
            f"{lb.url}/v1/responses/{first.response_id}%00", headers=auth()
        ) as response:
            assert response.status == 400
            assert_error(await response.json(), "invalid_request", "response_id")


# --- Logs -------------------------------------------------------------------------------------


async def test_a_client_request_id_cannot_spoof_log_lines(
    lb: Balancer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="codexlb.requests")
    # The HTTP parser refuses CR, LF and ASCII controls in a header; what gets through are
    # spaces and tabs (fake fields), NEL and U+2028 (line breaks to many readers), any length.
    spoof = "abc\u2028\x852026-01-01 00:00:00,000 INFO codexlb.requests: request_id=x\tkey=root"
    headers = {"x-client-request-id": "abc key=admin status=200 " + "x" * 4000}
    body = json.dumps({"model": "m", "input": "hi"}).encode()
    status, _ = await raw_request(
        lb,
        f"POST {CODEX_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {CLIENT_KEYS['alice']}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\nx-client-request-id: {spoof}{'x' * 4000}\r\n\r\n".encode(),
        body,
    )
    assert status == 200
    async with http.ws_connect(ws_url(lb.url), headers={**auth(), **headers}) as ws:
        assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"
    await eventually(lambda: len([r for r in caplog.records if r.name == "codexlb.requests"]) > 1)

    for record in caplog.records:
        if record.name == "codexlb.requests":
            request_id = record.fields["request_id"]  # type: ignore[attr-defined]
            assert len(request_id) <= 80
            assert request_id.isascii()
            assert request_id.isprintable()
            assert " " not in request_id
            assert request_id.startswith("abc")
            line = record.getMessage()
            assert len(line.splitlines()) == 1
            assert line.count("key=") == 1


def test_an_ordinary_client_request_id_is_kept() -> None:
    codex_id = "0199a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b"
    assert new_request_id({"x-client-request-id": codex_id}).startswith(codex_id + ".")


# --- Headers the upstream never sees ----------------------------------------------------------


async def test_organization_and_project_stay_with_the_client(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    chosen = {"OpenAI-Organization": "org-client", "OpenAI-Project": "proj_client"}
    assert (await stream_turn(http, lb.url, {"input": "hi"}, headers=chosen)).status == 200
    compact = {"model": "gpt-5-codex", "input": [user_message("hi")]}
    async with http.post(
        lb.url + CODEX_PATH + "/compact", json=compact, headers={**auth(), **chosen}
    ) as response:
        assert response.status == 200
    async with http.ws_connect(ws_url(lb.url), headers={**auth(), **chosen}) as ws:
        assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"
    assert {r.transport for r in fake.received} == {"http", "ws"}
    assert len(fake.received) >= 3
    for received in fake.received:
        assert "openai-organization" not in received.headers
        assert "openai-project" not in received.headers


# --- Echoed ids -------------------------------------------------------------------------------


async def test_not_found_echoes_a_bounded_id(lb: Balancer, http: aiohttp.ClientSession) -> None:
    normal = "resp_0123456789abcdef0123456789abcdef"
    result = await stream_turn(http, lb.url, {"input": "hi", "previous_response_id": normal})
    assert result.status == 400
    message = assert_error(result.events[0], "previous_response_not_found", "previous_response_id")
    assert message == f"Previous response with id '{normal}' not found."

    huge = "resp_" + "x" * (4 * 1024 * 1024)
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        await ws.send_str(
            json.dumps({"type": "response.create", "model": "m", "previous_response_id": huge})
        )
        [error] = await ws_events(ws)
    shorter = huge[: 512 * 1024]
    result = await stream_turn(http, lb.url, {"input": "hi", "previous_response_id": shorter})
    for body in (error, result.events[0]):
        message = assert_error(body, "previous_response_not_found", "previous_response_id")
        assert len(message) < 300
        assert message.startswith("Previous response with id 'resp_xxx")
        assert message.endswith("…' not found.")

    async with http.get(f"{lb.url}/v1/responses/{'y' * 6000}", headers=auth()) as response:
        assert response.status == 404
        message = (await response.json())["error"]["message"]
        assert len(message) < 300
        assert "yyy…" in message
    async with http.get(f"{lb.url}/v1/responses/{normal}", headers=auth()) as response:
        assert (await response.json())["error"]["message"] == (
            f"No response found with id '{normal}'."
        )


# --- Operator views (SPEC S10) ----------------------------------------------------------------


async def get(http: aiohttp.ClientSession, url: str, key: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.get(url, headers=headers) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_status_without_admin_is_closed_to_client_keys(
    lb: Balancer, http: aiohttp.ClientSession
) -> None:
    for key in (CLIENT_KEYS["alice"], None, ADMIN_KEY):
        status, body = await get(http, lb.url + "/status", key)
        assert status == 403
        assert "[admin]" in assert_error(body, "invalid_api_key")
    status, body = await get(http, lb.url + "/metrics", None)  # a loopback bind
    assert status == 200
    assert "codexlb_requests_total" in body


async def test_status_in_open_access_without_admin_is_open(
    open_lb: Balancer, http: aiohttp.ClientSession
) -> None:
    status, body = await get(http, open_lb.url + "/status", None)
    assert status == 200
    assert body["accounts"]


async def test_admin_key_guards_status_and_metrics(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEXLB_TEST_ADMIN_KEY", ADMIN_KEY)
    for keys in (CLIENT_KEYS, {}):
        config = lb_config(fake, tmp_path, keys=keys, admin={"key": "env:CODEXLB_TEST_ADMIN_KEY"})
        assert ADMIN_KEY not in repr(config)
        async with serve(config) as lb:
            for path in ("/status", "/metrics"):
                for key in (None, CLIENT_KEYS["alice"], "wrong"):
                    status, body = await get(http, lb.url + path, key)
                    assert status == 401, (path, key)
                    assert "admin key" in assert_error(body, "invalid_api_key")
                status, body = await get(http, lb.url + path, ADMIN_KEY)
                assert status == 200, path
            # the admin key is no client key
            result = await stream_turn(
                http, lb.url, {"input": "hi"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            assert result.status == (401 if keys else 200)


async def test_metrics_without_admin_are_refused_off_loopback(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serve(lb_config(fake, tmp_path, server={"host": "0.0.0.0"})) as lb:
        status, body = await get(http, lb.url + "/metrics", None)
        assert status == 403
        assert "[admin]" in assert_error(body, "invalid_api_key")
    sha = {"key_sha256": __import__("hashlib").sha256(ADMIN_KEY.encode()).hexdigest()}
    config = lb_config(fake, tmp_path, server={"host": "0.0.0.0"}, admin=sha)
    async with serve(config) as lb:
        status, body = await get(http, lb.url + "/metrics", ADMIN_KEY)
        assert status == 200
        assert "codexlb_requests_total" in body


def test_admin_takes_exactly_one_key(tmp_path: Path) -> None:
    for admin in ({}, {"key": "a", "key_sha256": "0" * 64}, {"key_sha256": "nothex"}):
        with pytest.raises(ConfigError, match=r"admin"):
            make_config({"admin": admin}, tmp_path)
