"""What the fake upstream knows and decides, shared by its HTTP and WebSocket transports.

`UpstreamState` holds the accounts and their usage, the queue of scripted faults, the record of
everything received, and the protocol decisions both transports make the same way:
authentication, request validation (`check`) and the events of a response (`plan_events`).
The transports (`http_routes`, `ws_routes`) only frame and send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from codexlb.testing import events
from codexlb.testing.faults import (
    PRIMARY_WINDOW_MINUTES,
    Fault,
    UpstreamError,
    openai_error,
    previous_response_not_found_message,
)

logger = logging.getLogger("codexlb.testing.fake_upstream")

Responder = Callable[[str, Any], list[dict[str, Any]]]
"""(account name, request body) → the output items to produce after the reasoning item."""

Transport = Literal["http", "ws"]

SECONDARY_WINDOW_MINUTES = 7 * 24 * 60


@dataclass(frozen=True)
class FakeAccount:
    """An upstream account: a ChatGPT login (``access_token`` + ``chatgpt_account_id``) or a
    platform key (``api_key``, which must come without a ``chatgpt-account-id`` header).
    ``refresh_token`` is the login's first refresh token at the fake's ``/oauth/token``."""

    name: str
    access_token: str | None = field(default=None, repr=False)
    chatgpt_account_id: str | None = None
    api_key: str | None = field(default=None, repr=False)
    used_percent: float = 0.0
    refresh_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.access_token is None) == (self.api_key is None):
            raise ValueError(f"account {self.name!r} needs exactly one of access_token, api_key")


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the fake saw it.

    ``account`` is the name it authenticated as (None if auth failed), ``headers`` have
    lower-cased names, ``body`` is the parsed JSON (None if absent or not JSON); for a
    WebSocket message it is the message itself, with the headers of its handshake.
    """

    transport: Transport
    path: str
    account: str | None
    headers: Mapping[str, str]
    body: Any


class UpstreamState:
    """Accounts, faults and records of one fake upstream; see `FakeUpstream` for serving.

    ``received`` lists every request in arrival order: HTTP requests (rejected ones too),
    WebSocket messages, and WebSocket handshakes that were refused (body None).
    ``handshakes`` lists every WebSocket upgrade attempt (body None). With ``keep`` both lists
    hold only about the latest ``keep`` entries (between ``keep`` and twice as many): a
    long-running fake, as under a benchmark, would otherwise grow without end, and so would the
    pauses of the garbage collector that walks it. ``disconnects`` counts responses whose peer
    hung up before the fake finished them.

    ``event_writes`` streams a normal HTTP answer one event per chunk, each written on its own
    as the real upstream does (otherwise the whole stream goes out in one write); WebSocket
    answers always go out one event per frame, each written on its own. ``ws_compression``
    says whether the WebSocket side accepts permessage-deflate when the client offers it.
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
        if deltas < 0:
            raise ValueError("deltas must be >= 0")
        if keep is not None and keep < 1:
            raise ValueError("keep must be at least 1")
        self.accounts = {account.name: account for account in accounts}
        if len(self.accounts) != len(accounts):
            raise ValueError("account names must be unique")
        self._by_token: dict[str, FakeAccount] = {}
        for account in accounts:
            token = account.access_token or account.api_key or ""
            if token in self._by_token:
                raise ValueError(f"account {account.name!r} reuses another account's token")
            self._by_token[token] = account
        self.deltas = deltas
        self.text = text
        self.completed_output = completed_output
        self.event_writes = event_writes
        self.ws_compression = ws_compression
        self.responder: Responder | None = None
        self.keep = keep
        self.received: list[ReceivedRequest] = []
        self.issue_turn_states = False
        """Give every response a new turn state (HTTP: an ``x-codex-turn-state`` header;
        WebSocket: a ``response.metadata`` event), recorded in ``turn_states``."""
        self.turn_states: dict[str, str] = {}
        """Every turn state issued → the account that issued it."""
        self.handshakes: list[ReceivedRequest] = []
        self.disconnects = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.closing = asyncio.Event()
        self._faults: list[tuple[str | None, Fault]] = []
        self._poisons: dict[str, Fault] = {}
        self._used = {account.name: account.used_percent for account in accounts}
        self._headers: dict[str, dict[str, str]] = {}
        self._rate_limits: dict[str, Any] = {}
        now = int(time.time())
        self._primary_reset_at = now + PRIMARY_WINDOW_MINUTES * 60
        self._secondary_reset_at = now + SECONDARY_WINDOW_MINUTES * 60
        self._changed = asyncio.Event()

    # -- for tests ---------------------------------------------------------------------------

    def script(self, *faults: Fault, account: str | None = None) -> None:
        """Queue ``faults``. Each authenticated response request (HTTP POST or WebSocket
        ``response.create``) pops the first one queued for its account or for any account
        (``account=None``) and suffers it; an empty queue answers normally."""
        if account is not None and account not in self.accounts:
            raise KeyError(account)
        self._faults.extend((account, fault) for fault in faults)

    def poison(self, text: str, fault: Fault) -> None:
        """Make every response request whose last user text is ``text`` suffer ``fault``, on
        every account, every time: a request the upstream cannot process. Queued faults
        (``script``) come first."""
        self._poisons[text] = fault

    @property
    def pending_faults(self) -> int:
        """How many scripted faults no request has consumed yet."""
        return len(self._faults)

    def set_usage(self, account: str, used_percent: float) -> None:
        """Report ``used_percent`` in the account's later rate-limit headers and frames."""
        if account not in self._used:
            raise KeyError(account)
        self._used[account] = used_percent

    def set_headers(self, account: str, headers: Mapping[str, str]) -> None:
        """Send ``headers`` (over the usual rate-limit headers) on the account's later answers
        and WebSocket handshakes: whatever values a test wants codexlb to survive."""
        if account not in self._used:
            raise KeyError(account)
        self._headers[account] = dict(headers)

    def set_rate_limits(self, account: str, rate_limits: Any) -> None:
        """Send ``rate_limits`` as the ``rate_limits`` member of the account's later
        ``codex.rate_limits`` frames."""
        if account not in self._used:
            raise KeyError(account)
        self._rate_limits[account] = rate_limits

    def new_turn_state(self, account: str) -> str | None:
        """A new turn state from ``account`` when ``issue_turn_states`` is on, else None."""
        if not self.issue_turn_states:
            return None
        value = f"ts-{account}-{len(self.turn_states) + 1}"
        self.turn_states[value] = account
        return value

    def turn_states_received(self) -> list[tuple[str | None, str]]:
        """(receiving account, turn state) for every request that carried one, as a header
        or in ``client_metadata``."""
        found = []
        for request in self.received:
            values = [request.headers.get("x-codex-turn-state")]
            if isinstance(request.body, dict):
                metadata = request.body.get("client_metadata")
                if isinstance(metadata, dict):
                    values.append(metadata.get("x-codex-turn-state"))
            found += [(request.account, v) for v in values if isinstance(v, str)]
        return found

    def requests_for(self, account: str) -> list[ReceivedRequest]:
        """The received requests that authenticated as ``account``, in arrival order."""
        return [request for request in self.received if request.account == account]

    @property
    def open_websockets(self) -> int:
        """WebSocket connections currently open."""
        return len(self.sockets)

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 (a bound by default; tests pass their own)
    ) -> None:
        """Return once ``predicate()`` holds. It is re-checked whenever the state changes (a
        request, a handshake, a socket closing, a disconnect); TimeoutError after ``timeout``
        seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def accept_token(self, account: str, token: str) -> None:
        """Authenticate ``token`` as ``account`` from now on, beside its other tokens (an
        access token issued by a refresh at ``/oauth/token``)."""
        holder = self._by_token.get(token)
        if holder is not None and holder.name != account:
            raise ValueError(f"the token already belongs to account {holder.name!r}")
        self._by_token[token] = self.accounts[account]

    def revoke_token(self, token: str) -> None:
        """Stop accepting ``token``: requests bearing it get 401 ``invalid_api_key``."""
        self._by_token.pop(token, None)

    # -- for the transports ------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str]) -> FakeAccount | None:
        """The account a request's lower-cased headers authenticate as, or None."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        account = self._by_token.get(token) if scheme.lower() == "bearer" and token else None
        if account is None:
            return None
        sent_id = headers.get("chatgpt-account-id")
        if account.api_key is not None:
            return account if sent_id is None else None
        if account.chatgpt_account_id is not None and sent_id != account.chatgpt_account_id:
            return None
        return account

    def record(
        self,
        into: list[ReceivedRequest],
        transport: Transport,
        path: str,
        account: FakeAccount | None,
        headers: Mapping[str, str],
        body: Any,
    ) -> None:
        name = account.name if account is not None else None
        into.append(ReceivedRequest(transport, path, name, headers, body))
        if self.keep is not None and len(into) >= 2 * self.keep:
            del into[: -self.keep]
        logger.debug("%s %s account=%s", transport, path, name)
        self.notify()

    def take_fault(
        self, account: str, *, handshake: bool = False, body: Any = None
    ) -> Fault | None:
        """Pop the first fault queued for ``account`` or for any account; else the poison
        ``body`` carries (``poison``).

        A handshake takes it only if it is a handshake fault; otherwise it stays queued.
        """
        for index, (target, fault) in enumerate(self._faults):
            if target is None or target == account:
                if handshake and fault.kind != "handshake":
                    return None
                del self._faults[index]
                return fault
        if self._poisons and isinstance(body, dict):
            return self._poisons.get(events.last_user_text(body.get("input")))
        return None

    def check(
        self, body: Any, account: FakeAccount, *, transport: Transport, last_response_id: str | None
    ) -> UpstreamError | None:
        """The error the upstream answers ``body`` with, or None if it is acceptable.

        ``last_response_id`` is the last response completed on the same WebSocket: the only
        ``previous_response_id`` the upstream can continue from (never over HTTP).
        """
        now = time.time()
        if not isinstance(body, dict):
            return openai_error(400, "invalid_request", now=now, message="Invalid JSON body.")
        if transport == "http" and body.get("stream") is not True:
            message = "Stream must be set to true"
            return openai_error(400, "invalid_request", now=now, message=message, param="stream")
        previous = body.get("previous_response_id")
        if previous is not None and (transport == "http" or previous != last_response_id):
            return openai_error(
                400,
                "previous_response_not_found",
                now=now,
                message=previous_response_not_found_message(str(previous)),
                param="previous_response_id",
            )
        foreign = events.foreign_reasoning(body.get("input"), account.name)
        if foreign is not None:
            message = f"The encrypted content for item {foreign} could not be verified."
            return openai_error(400, "invalid_encrypted_content", now=now, message=message)
        return None

    def plan_events(
        self, body: Mapping[str, Any], account: FakeAccount, fault: Fault | None
    ) -> list[dict[str, Any]]:
        """Every event of the response to an accepted request (a failed one for
        `Fault.failed`); the transports cut it short for drop and stall faults."""
        response_id = events.new_id("resp")
        created_at = int(time.time())
        if fault is not None and fault.kind == "failed":
            code = fault.code or "server_error"
            return events.failed_events(body, response_id, code, created_at=created_at)
        output: list[dict[str, Any]] = []
        if body.get("generate") is not False:
            output.append(events.reasoning_item(account.name))
            if self.responder is not None:
                output += events.complete_items(self.responder(account.name, body))
            else:
                text = self.text
                if text is None:
                    text = "echo: " + events.last_user_text(body.get("input"))
                output.append(events.message_item(text))
        return events.response_events(
            body,
            response_id,
            output,
            created_at=created_at,
            deltas=self.deltas,
            completed_output=self.completed_output,
        )

    def rate_limit_headers(self, account: str) -> dict[str, str]:
        headers = {
            "x-codex-primary-used-percent": f"{self._used[account]:g}",
            "x-codex-primary-window-minutes": str(PRIMARY_WINDOW_MINUTES),
            "x-codex-primary-reset-at": str(self._primary_reset_at),
            "x-codex-secondary-used-percent": "0",
            "x-codex-secondary-window-minutes": str(SECONDARY_WINDOW_MINUTES),
            "x-codex-secondary-reset-at": str(self._secondary_reset_at),
        }
        headers.update(self._headers.get(account, {}))
        return headers

    def rate_limits_frame(self, account: str) -> dict[str, Any]:
        """The ``codex.rate_limits`` frame sent before each response over WebSocket."""
        frame: dict[str, Any] = {
            "type": "codex.rate_limits",
            "plan_type": "pro",
            "rate_limits": {
                "primary": {
                    "used_percent": self._used[account],
                    "window_minutes": PRIMARY_WINDOW_MINUTES,
                    "reset_at": self._primary_reset_at,
                },
                "secondary": {
                    "used_percent": 0.0,
                    "window_minutes": SECONDARY_WINDOW_MINUTES,
                    "reset_at": self._secondary_reset_at,
                },
            },
            "credits": None,
        }
        if account in self._rate_limits:
            frame["rate_limits"] = self._rate_limits[account]
        return frame

    def count_disconnect(self) -> None:
        """Count a peer hang-up mid-response, unless the fake itself is shutting down."""
        if not self.closing.is_set():
            self.disconnects += 1
            self.notify()

    def notify(self) -> None:
        """Wake `wait_until` callers to re-check their predicates."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_closing(self, seconds: float | None) -> None:
        """Wait ``seconds`` (None: forever), cut short when the fake starts shutting down."""
        try:
            async with asyncio.timeout(seconds):
                await self.closing.wait()
        except TimeoutError:
            pass
