"""What operators and clients meet around the core: metrics, the model catalog, compaction."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    Balancer,
    Fake,
    auth,
    stream_turn,
    user_message,
    ws_turn,
    ws_url,
)


async def scrape(
    http: aiohttp.ClientSession, lb: Balancer
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(lb.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_parse_and_move_with_traffic(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    before = await scrape(http, lb)
    first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
    fake.script(Fault.status(500))
    await stream_turn(
        http, lb.url, {"input": [user_message("two")], "previous_response_id": first.response_id}
    )
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        await ws_turn(ws, {"input": "hi"})
        during = await scrape(http, lb)
    after = await scrape(http, lb)

    requests = "codexlb_requests_total"
    assert value(after, requests, route="responses", transport="http", status="200") == (
        value(before, requests, route="responses", transport="http", status="200") + 2
    )
    assert value(after, requests, route="responses", transport="ws", status="200") == 1
    errors = sum(
        v
        for (name, labels), v in after.items()
        if name == "codexlb_upstream_attempts_total" and ("outcome", "error") in labels
    )
    assert errors == 1
    failovers = sum(v for (name, _), v in after.items() if name == "codexlb_failovers_total")
    assert failovers == 1
    # The continuation was replayed to its origin (which failed), then to another account.
    assert value(after, "codexlb_replays_total", kind="same_account") == 1
    assert value(after, "codexlb_replays_total", kind="cross_account") == 1
    assert value(during, "codexlb_open_websockets", side="client") == 1
    assert value(during, "codexlb_open_websockets", side="upstream") == 1
    assert value(after, "codexlb_open_websockets", side="client") == 0
    assert value(after, "codexlb_snapshot_write_seconds_count") == 3
    assert value(after, "codexlb_time_to_first_byte_seconds_count", transport="http") == 2
    states = [
        labels for (name, labels), v in after.items() if name == "codexlb_account_state" and v == 1
    ]
    assert len(states) == 3
    assert sum(1 for labels in states if ("state", "cooling_down") in labels) == 1
    assert value(after, "codexlb_account_inflight", account="a") == 0


async def test_models_come_from_an_account_with_its_etag_and_are_cached(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    path = "/backend-api/codex/models?client_version=0.169.0"
    async with http.get(lb.url + path, headers=auth()) as response:
        assert response.status == 200
        assert await response.json() == {"models": []}
        etag = response.headers["ETag"]
    async with http.get(lb.url + path, headers={**auth(), "If-None-Match": etag}) as response:
        assert response.status == 304
    async with http.get(lb.url + "/v1/models", headers=auth()) as response:
        assert response.status == 200
    fetched = [r for r in fake.received if r.path.endswith("/models")]
    assert len(fetched) == 2  # one per path and query, then served from the cache
    assert fetched[0].headers["authorization"].startswith("Bearer tok-")
    async with http.get(lb.url + path) as response:
        assert response.status == 401


async def test_compact_follows_the_conversation_and_fails_over(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
    origin = fake.received[-1].account
    body = {
        "model": "gpt-5-codex",
        "input": [user_message("x")],
        "previous_response_id": first.response_id,
    }
    async with http.post(lb.url + "/v1/responses/compact", json=body, headers=auth()) as response:
        assert response.status == 200
        assert (await response.json())["output"][0]["content"][0]["text"] == "compacted 4 items"
    sent = fake.received[-1]
    assert sent.path.endswith("/responses/compact")
    assert sent.account == origin
    assert sent.body["input"] == [user_message("one"), *first.output_items, user_message("x")]

    fake.script(Fault.status(503), account=origin)
    async with http.post(lb.url + "/v1/responses/compact", json=body, headers=auth()) as response:
        assert response.status == 200
    assert fake.received[-1].account != origin


async def test_requests_with_one_client_request_id_get_log_lines_told_apart(
    lb: Balancer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Codex sends one ``x-client-request-id`` for every turn on a WebSocket (and retries)."""
    caplog.set_level(logging.INFO, logger="codexlb.requests")
    headers = {**auth(), "x-client-request-id": "codex-session-1"}
    for text in ("one", "two"):
        turn = await stream_turn(http, lb.url, {"input": [user_message(text)]}, headers=headers)
        assert turn.status == 200
    async with http.ws_connect(ws_url(lb.url), headers=headers) as ws:
        for text in ("three", "four"):
            assert (await ws_turn(ws, {"input": text}))[-1]["type"] == "response.completed"
    await stream_turn(http, lb.url, {"input": [user_message("no id")]})

    records = [r for r in caplog.records if r.name == "codexlb.requests"]
    lines: list[dict[str, Any]] = [getattr(r, "fields", {}) for r in records]
    ids = [str(line.get("request_id")) for line in lines]
    assert [line.get("transport") for line in lines] == ["http", "http", "ws", "ws", "http"]
    assert len(set(ids)) == 5
    assert all(i.startswith("codex-session-1.") for i in ids[:4])
    assert ids[4].startswith("lb-")
    assert [r.getMessage().split()[0] for r in records] == [f"request_id={i}" for i in ids]
