"""No configured secret ever appears in a log line, an error, the metrics or check-config."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from codexlb.testing.fake_upstream import FakeAccount, Fault
from tests.harness import (
    CLIENT_KEYS,
    Fake,
    config_data,
    logged,
    make_config,
    running_child,
    running_fake,
    serve,
    stream_turn,
    user_message,
    write_toml,
    ws_turn,
    ws_url,
)

ACCOUNTS = (
    FakeAccount("a", access_token="at-secret-aaaaaaaaaaaaaaaa", chatgpt_account_id="acct-a"),
    FakeAccount("b", access_token="at-secret-bbbbbbbbbbbbbbbb", chatgpt_account_id="acct-b"),
)
KEYS = {"alice": "sk-lb-secret-alice-123456", "bob": "sk-lb-secret-bob-654321"}
SECRETS = [a.access_token for a in ACCOUNTS if a.access_token] + list(KEYS.values())


@pytest.fixture
async def secret_fake() -> AsyncIterator[Fake]:
    async with running_fake(ACCOUNTS) as fake:
        yield fake


async def test_no_secret_in_logs_errors_or_metrics(
    secret_fake: Fake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data = config_data(
        secret_fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=ACCOUNTS, keys=KEYS
    )
    seen: list[str] = []
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    async with serve(make_config(data, tmp_path)) as lb, aiohttp.ClientSession() as http:
        for wrong in ({}, {"Authorization": "Bearer sk-lb-secret-wrong-000000"}):
            async with http.post(lb.url + "/v1/responses", json={}, headers=wrong) as response:
                seen.append(await response.text())
        secret_fake.script(Fault.status(401), Fault.status(429, resets_in=60), Fault.status(500))
        result = await stream_turn(http, lb.url, {"input": [user_message("hi")]}, headers=headers)
        assert result.status == 429
        seen.append(repr(result.events))
        result = await stream_turn(
            http, lb.url, {"input": "x", "previous_response_id": "resp_nope"}, headers=headers
        )
        assert result.status == 400
        seen.append(repr(result.events))
        async with http.ws_connect(ws_url(lb.url), headers=headers) as ws:
            seen.append(repr(await ws_turn(ws, {"input": "hi"})))
            await ws.send_str("{broken")
            seen.append((await ws.receive(timeout=5)).data)
        async with http.get(lb.url + "/metrics") as response:
            seen.append(await response.text())
        async with http.get(lb.url + "/readyz") as response:
            seen.append(await response.text())
        seen.append(repr(lb.services.config))
        seen.append(repr([a.credentials for a in lb.services.pool.accounts]))

    config_file = write_toml(tmp_path / "c.toml", data)
    checked = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codexlb",
        "check-config",
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await checked.communicate()
    assert b"acct-a" not in stderr
    seen += [stdout.decode(), stderr.decode()]
    seen.append(caplog.text)

    everything = "\n".join(seen)
    assert "refused its credentials" in caplog.text  # the 401 was logged ...
    assert [secret for secret in SECRETS if secret in everything] == []  # ... without a token


MALFORMED = (
    # A header line without a colon, after the key.
    b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %(key)s\r\n"
    b"Broken header %(key)s\r\n\r\n",
    # A length that is not a number, and a body quoting the key.
    b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %(key)s\r\n"
    b'Content-Length: 12x\r\n\r\n{"input": "%(key)s"}',
    # A control character in a header value.
    b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %(key)s\x01\r\n\r\n",
    # A chunk size that is not hexadecimal, in a body quoting the key.
    b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %(key)s\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'zz %(key)s\r\n{"input": "%(key)s"}\r\n0\r\n\r\n',
    # A request line that is not HTTP, carrying the key.
    b"%(key)s %(key)s %(key)s\r\n\r\n",
)


async def test_malformed_requests_leave_one_short_line_without_their_bytes(
    fake: Fake, tmp_path: Path
) -> None:
    """aiohttp's own report of a request it cannot parse is a traceback quoting the bytes; the
    suite's sweep (tests/conftest.py) checks these children's logs for the key too."""
    key = CLIENT_KEYS["alice"].encode()
    data = config_data(fake.url, "sqlite+aiosqlite:///codexlb.db")
    data["timeouts"] = {"client_body_seconds": 0.5}
    async with running_child(write_toml(tmp_path / "codexlb.toml", data)) as child:
        host, port = child.url.removeprefix("http://").split(":")
        for request in MALFORMED:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request % {b"key": key})
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert b" 400 " in answer.split(b"\r\n")[0], answer
            assert key not in answer
        # A chunk size that is not hexadecimal, arriving after the handler began to read: aiohttp
        # leaves the body waiting, so the body's deadline answers.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n\r\n" % key
        )
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
            writer.write(b'zz %s\r\n{"input": "%s"}\r\n0\r\n\r\n' % (key, key))
            answer = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        await logged(child, r"refused a malformed request from 127\.0\.0\.1: \w+ \(status 400\)")
    log = "".join(child.log)
    assert CLIENT_KEYS["alice"] not in log
    assert "Traceback" not in log
    assert "Error handling request" not in log
