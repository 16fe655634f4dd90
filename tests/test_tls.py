"""codexlb listening with TLS (``[server] tls_cert``, ``tls_key``; SPEC S13): HTTPS and WSS
with a certificate from a local CA, as the README makes it."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from codexlb.config import ConfigError, load_config
from tests.harness import (
    Fake,
    auth,
    config_data,
    running_child,
    start_child,
    stream_turn,
    user_message,
    write_toml,
    ws_turn,
)
from tests.local_tls import make_local_tls, openssl_missing

pytestmark = pytest.mark.skipif(openssl_missing() is not None, reason=str(openssl_missing()))


async def test_https_and_wss_with_a_local_certificate(fake: Fake, tmp_path: Path) -> None:
    tls = make_local_tls(tmp_path / "tls")
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}")
    data["server"] = {**data["server"], "tls_cert": "tls/server.pem", "tls_key": "tls/server.key"}
    config_file = write_toml(tmp_path / "codexlb.toml", data)
    async with running_child(config_file) as server:
        assert server.url.startswith("https://")
        connector = aiohttp.TCPConnector(ssl=tls.client_context())
        async with aiohttp.ClientSession(connector=connector) as https:
            result = await stream_turn(https, server.url, {"input": [user_message("hi")]})
            assert result.status == 200
            assert result.completed["status"] == "completed"
            wss = "wss" + server.url.removeprefix("https") + "/backend-api/codex/responses"
            async with https.ws_connect(wss, headers=auth()) as ws:
                events = await ws_turn(ws, {"input": [user_message("over wss")]})
                assert events[-1]["type"] == "response.completed"
        # Plain HTTP on the TLS port gets no answer it could use.
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get("http" + server.url.removeprefix("https") + "/healthz"):
                    pass


def test_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"server": {"tls_cert": "x.pem"}})
    with pytest.raises(ConfigError, match="tls_cert and tls_key together"):
        load_config(path)


async def test_unreadable_certificate_stops_the_server_with_a_clear_line(
    fake: Fake, tmp_path: Path
) -> None:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}")
    data["server"] = {**data["server"], "tls_cert": "missing.pem", "tls_key": "missing.key"}
    config_file = write_toml(tmp_path / "codexlb.toml", data)
    with pytest.raises(AssertionError, match="file not found") as failed:
        await start_child(config_file)
    assert "tls_cert" in str(failed.value)
