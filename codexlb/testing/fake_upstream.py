"""A fake Codex/OpenAI upstream that speaks the real Responses protocol on loopback.

Used by the test suite (which asserts on exactly what it received) and by benchmarks (as the
"direct" baseline), so a normal answer is cheap: its events are encoded once and an HTTP
response goes out in a single write, or one write per event with ``event_writes``.

    FakeUpstream            serving: app(), start(), close(); the standalone entry point
    ├── state.UpstreamState accounts, usage, scripted faults, records; auth, validation, events
    ├── http_routes         POST {prefix}/responses (SSE), GET .../models, side calls
                            (``images/generations`` and any other path under a prefix)
    ├── ws_routes           GET {prefix}/responses upgraded to WebSocket mode
    ├── oauth.FakeOAuth     POST /oauth/token: refresh grants, rotation (``fake.oauth``)
    ├── faults              `Fault` values and OpenAI-shaped error rendering
    └── events              pure construction and encoding of a response's events

``prefix`` is ``/backend-api/codex``, ``/v1`` or empty. Continuity is the ChatGPT backend's:
with ``store: false`` nothing is kept, so HTTP refuses any ``previous_response_id`` and a
WebSocket accepts only the id of the last response completed on that same socket. Every
generated response starts with a reasoning item whose ``encrypted_content`` is bound to the
account that made it and is refused on any other account.

Standalone: ``python -m codexlb.testing.fake_upstream --account NAME:TOKEN:ACCOUNT_ID``
(repeatable; ``NAME:sk-...`` for a platform key) serves until SIGINT or SIGTERM, keeping only
the latest ``--keep`` received requests. For benchmarks shaped like real traffic:
``--event-writes`` (one HTTP chunk per event, each written on its own), ``--deltas N`` with
``--text-length L`` (an answer long enough for N deltas), ``--ws-compression on|off``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
from collections.abc import Sequence

from aiohttp import web

from codexlb.testing import http_routes, ws_routes
from codexlb.testing.faults import Fault
from codexlb.testing.oauth import TOKEN_PATH, FakeOAuth
from codexlb.testing.state import FakeAccount, ReceivedRequest, Responder, UpstreamState

__all__ = ["FakeAccount", "FakeUpstream", "Fault", "ReceivedRequest", "Responder", "main"]

logger = logging.getLogger(__name__)

PREFIXES = ("/backend-api/codex", "/v1", "")
SIDE_CALL_PREFIXES = ("/backend-api/codex", "/v1")
MODELS_PATHS = ("/backend-api/codex/models", "/v1/models")
SHUTDOWN_TIMEOUT = 2.0
STANDALONE_KEEP = 1000
"""Received requests a standalone fake keeps (nothing reads more of them)."""


class FakeUpstream(UpstreamState):
    """An in-process upstream; the state and test helpers are those of `UpstreamState`.

    ``responder``, when set, maps (account name, request body) to the output items that follow
    the reasoning item, instead of the default assistant message (``text``, else ``"echo: "``
    and the last user text).
    """

    def __init__(
        self,
        accounts: Sequence[FakeAccount],
        *,
        deltas: int = 3,
        text: str | None = None,
        completed_output: bool = False,
        keep: int | None = None,
        event_writes: bool = False,
        ws_compression: bool = True,
    ) -> None:
        super().__init__(
            accounts,
            deltas=deltas,
            text=text,
            completed_output=completed_output,
            keep=keep,
            event_writes=event_writes,
            ws_compression=ws_compression,
        )
        self.oauth = FakeOAuth(self)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """A new application serving this fake's state (an application runs only once).

        Served by another runner, an HTTP hang-up mid-response is noticed only if that runner
        enables ``handler_cancellation``, as `start` does.
        """
        app = web.Application(client_max_size=1 << 30)
        for prefix in PREFIXES:
            path = f"{prefix}/responses"
            app.router.add_post(path, functools.partial(http_routes.post_response, self))
            app.router.add_get(path, functools.partial(ws_routes.websocket, self))
            app.router.add_post(f"{path}/compact", functools.partial(http_routes.compact, self))
        for path in MODELS_PATHS:
            app.router.add_get(path, functools.partial(http_routes.models, self))
        app.router.add_post(TOKEN_PATH, self.oauth.handle)
        for prefix in SIDE_CALL_PREFIXES:  # last: what no route above takes
            tail = f"{prefix}/{{tail:.+}}"
            app.router.add_route("*", tail, functools.partial(http_routes.side_call, self))
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port); return the base URL ``http://host:port``."""
        if self._runner is not None:
            raise RuntimeError("the fake upstream is already serving")
        runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log=None,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        netloc = f"[{host}]" if ":" in host else host
        return f"http://{netloc}:{bound_port}"

    async def close(self) -> None:
        """Stop serving; idempotent. Open WebSockets get a 1001 close frame, stalled
        responses are dropped. The fake may be started again afterwards."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _on_startup(self, app: web.Application) -> None:
        self.closing.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.closing.set()
        closes = [ws.close(code=1001, message=b"server shutdown") for ws in self.sockets]
        await asyncio.gather(*closes)


def parse_account(spec: str) -> FakeAccount:
    """``NAME:TOKEN:ACCOUNT_ID`` (ChatGPT login) or ``NAME:KEY`` (platform key)."""
    parts = spec.split(":")
    if len(parts) == 3 and all(parts):
        return FakeAccount(parts[0], access_token=parts[1], chatgpt_account_id=parts[2])
    if len(parts) == 2 and all(parts):
        return FakeAccount(parts[0], api_key=parts[1])
    raise argparse.ArgumentTypeError(f"expected NAME:TOKEN:ACCOUNT_ID or NAME:KEY, got {spec!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake upstream until SIGINT or SIGTERM; logs go to stderr."""
    parser = argparse.ArgumentParser(prog="python -m codexlb.testing.fake_upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument(
        "--account",
        type=parse_account,
        action="append",
        required=True,
        metavar="NAME:TOKEN:ACCOUNT_ID|NAME:KEY",
    )
    parser.add_argument("--deltas", type=int, default=3, help="text deltas per message")
    parser.add_argument("--text", default=None, help="fixed answer text instead of the echo")
    parser.add_argument(
        "--text-length",
        type=int,
        default=None,
        help="fixed answer text of this many characters instead of the echo",
    )
    parser.add_argument(
        "--event-writes",
        action="store_true",
        help="write every HTTP event as its own chunk, as the real upstream streams",
    )
    parser.add_argument(
        "--ws-compression",
        choices=("on", "off"),
        default="on",
        help="accept permessage-deflate on WebSockets (default on)",
    )
    parser.add_argument("--completed-output", action="store_true")
    parser.add_argument(
        "--keep",
        type=int,
        default=STANDALONE_KEEP,
        help="received requests kept in memory (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    text = args.text
    if args.text_length is not None:
        text = filler_text(args.text_length)
    fake = FakeUpstream(
        args.account,
        deltas=args.deltas,
        text=text,
        completed_output=args.completed_output,
        keep=args.keep,
        event_writes=args.event_writes,
        ws_compression=args.ws_compression == "on",
    )
    asyncio.run(_serve(fake, args.host, args.port))
    return 0


def filler_text(length: int) -> str:
    """``length`` characters of words, as a model's answer reads."""
    words = "the quick brown fox jumps over the lazy dog and answers the question asked "
    return (words * (length // len(words) + 1))[:length]


async def _serve(fake: FakeUpstream, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    url = await fake.start(host, port)
    logger.info("fake upstream serving %s for accounts %s", url, ", ".join(fake.accounts))
    try:
        await stop.wait()
    finally:
        await fake.close()
        logger.info("fake upstream stopped")


if __name__ == "__main__":
    raise SystemExit(main())
