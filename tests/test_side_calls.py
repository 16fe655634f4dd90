"""Side calls on the provider base (SPEC S13): ``images/generations``, ``alpha/search`` and any
other path under the two prefixes reach an eligible account with that account's credentials,
with the client keys, affinity and failover before the first byte of a turn, and are not
stored."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from codexlb.testing.fake_upstream import Fault
from codexlb.testing.http_routes import TINY_PNG
from tests.harness import Balancer, Fake, auth, config_data, make_config, serve

MIB = 1024 * 1024

IMAGE = {
    "prompt": "a cat",
    "model": "gpt-image-2",
    "background": "auto",
    "quality": "auto",
    "size": "auto",
}


@pytest.mark.parametrize("prefix", ["/backend-api/codex", "/v1"])
async def test_image_generation_reaches_an_account_with_its_credentials(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession, prefix: str
) -> None:
    headers = {**auth(), "x-codex-image-turn-id": "turn-1", "chatgpt-account-id": "acct-client"}
    async with http.post(
        lb.url + f"{prefix}/images/generations", json=IMAGE, headers=headers
    ) as answer:
        assert answer.status == 200
        body = await answer.json()
        assert "x-codex-primary-used-percent" in answer.headers
    assert body["data"] == [{"b64_json": TINY_PNG}]
    [received] = fake.received
    assert received.path == "/backend-api/codex/images/generations"  # the account's base
    assert received.account is not None  # authenticated as one of the pool's accounts
    assert received.body == IMAGE
    assert received.headers["x-codex-image-turn-id"] == "turn-1"
    assert "sk-lb-alice" not in received.headers["authorization"]
    assert await lb.services.store.owners("alice", [1]) == {}


@pytest.mark.parametrize(
    "tail", ["alpha/search", "memories/trace_summarize", "realtime/calls?intent=x"]
)
async def test_other_paths_are_relayed_as_they_came(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession, tail: str
) -> None:
    url = lb.url + "/backend-api/codex/" + tail
    async with http.post(url, json={"q": tail}, headers=auth()) as answer:
        assert answer.status == 200
        body = await answer.json()
    path, _, query = tail.partition("?")
    assert body["path"] == "/backend-api/codex/" + path
    assert body["query"] == query
    assert body["body"] == {"q": tail}
    assert fake.received[0].account == body["account"]


async def test_image_edits_are_relayed(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    edit = {**IMAGE, "images": [{"image_url": "data:image/png;base64," + TINY_PNG}]}
    async with http.post(lb.url + "/v1/images/edits", json=edit, headers=auth()) as answer:
        assert answer.status == 200
        assert (await answer.json())["data"] == [{"b64_json": TINY_PNG}]
    assert fake.received[0].body == edit


async def test_a_get_side_call_is_relayed(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.get(lb.url + "/v1/alpha/things?limit=2", headers=auth()) as answer:
        assert answer.status == 200
        assert (await answer.json())["method"] == "GET"


async def test_side_calls_need_a_client_key(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.post(lb.url + "/v1/images/generations", json=IMAGE) as answer:
        assert answer.status == 401
        assert (await answer.json())["error"]["code"] == "invalid_api_key"
    assert fake.received == []


async def test_a_rate_limited_account_fails_over_before_the_first_byte(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=600))
    fake.script(Fault.status(500))
    async with http.post(lb.url + "/v1/images/generations", json=IMAGE, headers=auth()) as answer:
        assert answer.status == 200
    accounts = [r.account for r in fake.received]
    assert len(accounts) == 3
    assert len(set(accounts)) == 3  # each failure moved on to another account


async def test_session_affinity_keeps_side_calls_on_one_account(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    headers = {**auth(), "session-id": "sess-42"}
    for _ in range(4):
        async with http.post(lb.url + "/v1/alpha/search", json={}, headers=headers) as answer:
            assert answer.status == 200
    assert len({r.account for r in fake.received}) == 1


async def test_the_clients_own_error_is_passed_on(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(400, error_code="invalid_request"))
    async with http.post(lb.url + "/v1/images/generations", json=IMAGE, headers=auth()) as answer:
        assert answer.status == 400
        assert (await answer.json())["error"]["code"] == "invalid_request"
    assert len(fake.received) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/../responses",
        "/v1/images/%2e%2e/x",
        "/v1/a//b",
        "/backend-api/codex/.hidden",
    ],
)
async def test_paths_that_could_leave_the_prefix_are_refused(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession, path: str
) -> None:
    url = URL(lb.url + path, encoded=True)
    async with http.post(url, json={}, headers=auth()) as answer:
        assert answer.status in (404, 405)
        assert "error" in await answer.json()
    assert fake.received == []


async def test_own_paths_with_another_method_are_not_relayed(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.put(lb.url + "/v1/responses", json={}, headers=auth()) as answer:
        assert answer.status == 405
    assert fake.received == []


async def test_any_success_status_is_the_answer(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    created = b'{"id": "call_1", "object": "realtime.call"}'
    fake.script(Fault.raw(created, status=201, headers={"Content-Type": "application/json"}))
    async with http.post(lb.url + "/v1/realtime/calls", json={}, headers=auth()) as answer:
        assert answer.status == 201
        assert await answer.read() == created
    assert len(fake.received) == 1


async def test_an_upstream_answer_over_the_limit_is_a_bad_gateway(
    fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A side call's answer is read whole, within ``max_upstream_response_bytes``: a larger
    one is a broken upstream, never a truncated answer."""
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        limits={"max_upstream_response_bytes": MIB},
    )
    fake.script(*[Fault.raw(b"x" * (MIB + 1)) for _ in range(3)])
    async with (
        serve(make_config(data, tmp_path)) as small,
        http.post(small.url + "/v1/alpha/search", json={}, headers=auth()) as answer,
    ):
        assert answer.status == 502
        assert (await answer.json())["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE"])
async def test_methods_without_a_body_to_relay_are_refused(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession, method: str
) -> None:
    async with http.request(method, lb.url + "/v1/alpha/search", headers=auth()) as answer:
        assert answer.status == 405
    assert fake.received == []
