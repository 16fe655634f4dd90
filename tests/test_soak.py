"""A fault soak: many conversations at once over both transports while the upstream fails at
random, the way Codex CLI drives codexlb (SPEC S4).

Each conversation is a client that behaves as Codex does: over HTTP it resends the whole
history every turn; over WebSocket it chains its turns on one socket and, after a failure,
resends the whole history without an anchor. A turn that fails for a reason Codex retries (a
5xx, ``response.failed`` with a server error, ``stream_incomplete``) is sent again, at most
five times; a 429 ``usage_limit_reached`` is fatal to Codex, so codexlb must never pass one on
while an account is eligible, and here one always is. The fault pattern is random but seeded,
so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp

from codexlb.testing.events import foreign_reasoning
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    Balancer,
    Fake,
    auth,
    config_data,
    make_config,
    serve,
    stream_turn,
    user_message,
    ws_url,
)

CONVERSATIONS = 24
TURNS = 4
RETRIES = 5
SEED = 20261203
RETRIED = frozenset({"server_error", "stream_incomplete", "upstream_error"})
"""Failure codes Codex sends the turn again after."""


def fault_pattern(count: int, rng: random.Random) -> list[Fault]:
    """About one upstream request in five fails, in one of the ways the upstream does."""
    kinds = [
        lambda: Fault.status(500),
        lambda: Fault.status(503, error_code="server_is_overloaded"),
        lambda: Fault.drop_after(0),
        lambda: Fault.drop_after(4),  # after output reached the client
        lambda: Fault.failed("server_error"),
        lambda: Fault.ws_error(500, "server_error"),
    ]
    return [
        rng.choice(kinds)() if rng.random() < 0.2 else Fault.slow_first_byte(0)
        for _ in range(count)
    ]


class Conversation:
    def __init__(self, number: int, lb: Balancer, http: aiohttp.ClientSession) -> None:
        self.number = number
        self.lb = lb
        self.http = http
        self.history: list[Any] = []
        self.failures: list[str] = []

    async def run_http(self) -> None:
        for turn in range(TURNS):
            self.history.append(user_message(f"conversation {self.number}, turn {turn}"))
            for _ in range(RETRIES + 1):
                result = await stream_turn(self.http, self.lb.url, {"input": self.history})
                last = result.events[-1]
                if result.status == 200 and last.get("type") == "response.completed":
                    self.history += result.output_items
                    break
                self.check_retried(result.status, last)
            else:
                raise AssertionError(f"conversation {self.number}: turn {turn} never completed")

    async def run_ws(self) -> None:
        async with self.http.ws_connect(ws_url(self.lb.url), headers=auth()) as ws:
            previous: str | None = None
            for turn in range(TURNS):
                message = user_message(f"conversation {self.number}, turn {turn}")
                self.history.append(message)
                for _ in range(RETRIES + 1):
                    body: dict[str, Any] = {"type": "response.create", "model": "gpt-5-codex"}
                    if previous is not None:
                        body.update(previous_response_id=previous, input=[message])
                    else:
                        body["input"] = self.history
                    await ws.send_str(json.dumps(body))
                    events = await _events(ws)
                    last = events[-1]
                    if last["type"] == "response.completed":
                        previous = last["response"]["id"]
                        self.history += [
                            e["item"] for e in events if e["type"] == "response.output_item.done"
                        ]
                        break
                    self.check_retried(last.get("status"), last)
                    previous = None  # Codex resends the whole input after a failure
                else:
                    raise AssertionError(f"conversation {self.number}: turn {turn} never completed")

    def check_retried(self, status: Any, last: dict[str, Any]) -> None:
        error = last.get("error") or last.get("response", {}).get("error") or {}
        code = error.get("code")
        self.failures.append(f"{status} {code}")
        fatal = status == 429 or code in ("usage_limit_reached", "rate_limit_exceeded")
        assert not fatal, f"conversation {self.number}: a rate limit Codex gives up on: {last}"
        assert code in RETRIED or (isinstance(status, int) and status >= 500), last


async def _events(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(1000):
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        events.append(json.loads(message.data))
        if events[-1]["type"] in ("response.completed", "response.failed", "error"):
            return events
    raise AssertionError("no terminal event")


async def test_conversations_survive_random_upstream_faults(fake: Fake, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    fake.script(*fault_pattern(CONVERSATIONS * TURNS * 3, rng))
    # One account also runs into its rate limit now and then; the others never do.
    fake.script(
        *[Fault.status(429, error_code="usage_limit_reached", resets_in=0.3)] * 4, account="a"
    )
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    async with serve(make_config(data, tmp_path)) as lb, aiohttp.ClientSession() as http:
        talks = [Conversation(n, lb, http) for n in range(CONVERSATIONS)]
        async with asyncio.timeout(60):
            await asyncio.gather(
                *(talk.run_http() if talk.number % 2 else talk.run_ws() for talk in talks)
            )

    failures = [failure for talk in talks for failure in talk.failures]
    assert len(failures) >= 5, "the soak met too few faults to test anything"
    for request in fake.received:
        if isinstance(request.body, dict) and request.account is not None:
            assert foreign_reasoning(request.body.get("input"), request.account) is None
