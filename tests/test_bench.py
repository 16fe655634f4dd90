"""The benchmarks' own machinery: the rotation of the sides, nginx as the plain proxy hop the
benchmarks start (skipped where nginx is not installed), and a tiny HTTP run with a second
codexlb as its baseline side."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench import http_sse, nginx
from bench.common import SIDES, Server
from bench.levels import round_order
from codexlb.testing.fake_upstream import FakeAccount, FakeUpstream

PATH = "/backend-api/codex/responses"
AUTH = {"Authorization": "Bearer tok-a", "chatgpt-account-id": "acct-a"}
DELTAS = 20
SSE_EVENTS = 10 + DELTAS
WS_FRAMES = 1 + SSE_EVENTS  # codex.rate_limits first

ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_SECONDS = 50

FOUND = nginx.find(None, disabled=False)
needs_nginx = pytest.mark.skipif(FOUND.path is None, reason=f"nginx {FOUND.why_not}")


def test_every_side_takes_every_place_alike_over_two_cycles() -> None:
    sides = list(SIDES)
    orders = [round_order(sides, number) for number in range(2 * len(sides))]
    assert all(sorted(order) == sorted(sides) for order in orders)
    for place in range(len(sides)):
        assert sorted(order[place] for order in orders) == sorted(sides * 2)
    assert round_order(sides[:2], 0) != round_order(sides[:2], 1)


def test_nginx_left_out_or_missing_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert nginx.find(None, disabled=True) == nginx.Found(None, "left out (--no-nginx)")
    missing = nginx.find(str(tmp_path / "nginx"), disabled=False)
    assert missing.path is None
    assert "not an executable" in missing.why_not
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(nginx, "FALLBACK_PATH", str(tmp_path / "sbin-nginx"))
    absent = nginx.find(None, disabled=False)
    assert absent.path is None
    assert "apt-get install nginx-light" in absent.why_not


@pytest.fixture
async def hop(tmp_path: Path) -> AsyncIterator[tuple[FakeUpstream, Server]]:
    assert FOUND.path is not None
    fake = FakeUpstream(
        [FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a")],
        deltas=DELTAS,
        text="y" * 4 * DELTAS,
        event_writes=True,
        ws_compression=True,
    )
    url = await fake.start()
    try:
        server = await nginx.start(FOUND.path, tmp_path, url)
        try:
            yield fake, server
        finally:
            assert await server.stop() == 0
    finally:
        await fake.close()


@needs_nginx
async def test_nginx_hop_streams_sse_and_upgrades_websockets(
    hop: tuple[FakeUpstream, Server],
) -> None:
    fake, server = hop
    assert len(nginx.group_pids(server)) == 2  # master and one worker
    body = {"model": "gpt-test", "stream": True, "input": "hi"}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + PATH, json=body, headers=AUTH) as reply:
            assert reply.status == 200
            text = await reply.text()
        assert text.count("\n\n") == SSE_EVENTS
        assert text.rstrip().splitlines()[-2] == "event: response.completed"
        for compress in (0, 15):
            ws = await http.ws_connect(server.url + PATH, headers=AUTH, compress=compress)
            async with ws:
                assert bool(ws.compress) is bool(compress)  # negotiated end to end
                await ws.send_str(json.dumps({"type": "response.create", **body, "store": False}))
                kinds: list[str] = []
                while not kinds or kinds[-1] != "response.completed":
                    kinds.append(json.loads(await ws.receive_str())["type"])
                assert len(kinds) == WS_FRAMES
    assert [r.transport for r in fake.received[-3:]] == ["http", "ws", "ws"]
    stats = nginx.group_stats(server)
    assert stats.peak_rss_mib >= stats.rss_mib > 0


def test_a_baseline_side_is_measured_compared_and_checked_like_codexlb() -> None:
    """This very checkout as the baseline: its side joins the rounds, each level compares
    codexlb with it, and its own SQLite file and log are checked."""
    argv = ["--requests", "40", "--deltas", "2", "--concurrency", "2", "--rounds", "2"]
    argv += ["--warmup", "4", "--no-nginx", "--baseline-tree", str(ROOT), "--json"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "http_sse.py"), *argv],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    level = report["levels"][0]
    assert [side for side in SIDES if side in level] == ["direct", "through", "baseline"]
    assert level["baseline"]["completed"] == 40
    assert level["baseline"]["proxy"] == "baseline"
    assert set(level["codexlb_vs_baseline"]) == {"throughput_ratio", "cpu_per_request_ratio"}
    baseline = report["servers"][0]["baseline"]
    assert baseline["snapshots"]["expected_at_least"] == 44  # the warm-up too
    assert baseline["snapshots"]["stored"] >= 44
    assert baseline["log"]["request_lines"] == 44
    assert baseline["exit_code"] == 0
    assert report["settings"]["baseline_commit"] == report["environment"]["commit"]
    text = http_sse.render(report)
    assert "  through baseline " in text
    assert "  codexlb vs baseline: throughput " in text
