"""The fake upstream's OAuth token endpoint: ``POST /oauth/token`` (refresh grants only).

It behaves like ``auth.openai.com``'s for what codexlb relies on:

- the request is JSON ``{"grant_type": "refresh_token", "client_id": CLIENT_ID,
  "refresh_token": ..., "scope": "openid profile email"}``;
- the answer is ``{"access_token", "refresh_token", "id_token", "token_type", "expires_in"}``
  with unsigned JWTs (``header.payload.signature``; ``exp`` and the
  ``https://api.openai.com/auth`` claim with ``chatgpt_account_id``);
- the refresh token rotates: the presented one is dead from then on and presenting it again
  answers 401 ``refresh_token_reused``; an unknown one answers 400 ``invalid_grant`` (the
  OAuth shape, ``{"error": "invalid_grant"}``);
- the new access token authenticates the account at the fake's Responses endpoints at once
  (``UpstreamState.accept_token``); the old ones stay valid, as real ones do until they
  expire, unless ``revoke_on_refresh`` is set.

Each account's first refresh token is its ``FakeAccount.refresh_token``. Tests script
failures with `TokenFault` (refuse, fail transiently, answer slowly) and read ``requests``
and ``calls(refresh_token)``. To make the Responses side refuse a still-valid access token
once, script ``Fault.status(401, error_code="token_expired")`` (HTTP and WebSocket
``response.create``) or ``Fault.handshake(401)`` (WebSocket upgrade) on the fake upstream.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from codexlb.testing.state import UpstreamState

TOKEN_PATH = "/oauth/token"
CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIM = "https://api.openai.com/auth"


def make_jwt(claims: dict[str, Any]) -> str:
    """An unsigned JWT carrying ``claims`` (the fake never checks signatures)."""

    def segment(value: dict[str, Any]) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(claims)}.{secrets.token_hex(8)}"


def access_token(account_id: str | None, *, expires_at: float) -> str:
    """A Codex-style access token for ``account_id`` that expires at ``expires_at``."""
    return make_jwt(
        {
            "exp": int(expires_at),
            "iat": int(time.time()),
            "jti": secrets.token_hex(8),
            AUTH_CLAIM: {"chatgpt_account_id": account_id, "chatgpt_plan_type": "pro"},
        }
    )


def id_token(account_id: str | None, *, email: str, expires_at: float) -> str:
    """A Codex-style id token (what ``auth.json`` keeps as ``tokens.id_token``)."""
    return make_jwt(
        {
            "exp": int(expires_at),
            "email": email,
            AUTH_CLAIM: {"chatgpt_account_id": account_id, "chatgpt_plan_type": "pro"},
        }
    )


@dataclass(frozen=True)
class TokenFault:
    """One scripted answer of the token endpoint. Build it with the classmethods.

    A refusal or an error does not consume the presented refresh token; a slow answer does
    (it is rotated before the wait, as a server that commits and then answers late).
    """

    status: int | None = None
    code: str | None = None
    seconds: float = 0.0

    @classmethod
    def refuse(cls, status: int = 401, code: str = "refresh_token_expired") -> TokenFault:
        """Refuse the grant: ``{"error": {"code": code, ...}}`` with ``status``."""
        return cls(status=status, code=code)

    @classmethod
    def error(cls, status: int = 503) -> TokenFault:
        """A transient failure (5xx or 429) with an OpenAI-shaped ``server_error`` body."""
        return cls(status=status, code="server_error")

    @classmethod
    def slow(cls, seconds: float) -> TokenFault:
        """Rotate as usual, then wait ``seconds`` before answering."""
        return cls(seconds=seconds)


@dataclass
class _Grant:
    account: str
    live: bool = True


class FakeOAuth:
    """Refresh tokens, rotation and scripted faults of one fake upstream."""

    def __init__(self, state: UpstreamState, *, access_token_ttl: float = 3600.0) -> None:
        self.state = state
        self.access_token_ttl = access_token_ttl
        """Lifetime of issued access tokens (their ``exp``), in seconds."""
        self.revoke_on_refresh = False
        """When set, a refresh makes the account's previous access tokens fail with 401."""
        self.requests: list[Any] = []
        """Every request body received (parsed JSON, None if not JSON), in order."""
        self._calls: Counter[str] = Counter()
        self._grants: dict[str, _Grant] = {}
        self._issued: dict[str, list[str]] = {}
        self._faults: list[tuple[str | None, TokenFault]] = []
        for account in state.accounts.values():
            if account.refresh_token is not None:
                self._grants[account.refresh_token] = _Grant(account.name)
            if account.access_token is not None:
                self._issued[account.name] = [account.access_token]

    # -- for tests ------------------------------------------------------------------------------

    def script(self, *faults: TokenFault, account: str | None = None) -> None:
        """Queue ``faults``: each refresh request presenting a known refresh token pops the
        first one queued for its account or for any account (``account=None``)."""
        if account is not None and account not in self.state.accounts:
            raise KeyError(account)
        self._faults.extend((account, fault) for fault in faults)

    def calls(self, refresh_token: str) -> int:
        """How many refresh requests presented ``refresh_token``."""
        return self._calls[refresh_token]

    @property
    def total_calls(self) -> int:
        return len(self.requests)

    def refresh_token(self, account: str) -> str | None:
        """The account's live refresh token (None if it has none)."""
        for token, grant in self._grants.items():
            if grant.account == account and grant.live:
                return token
        return None

    def issue_refresh_token(self, account: str) -> str:
        """A new live refresh token for ``account`` (another login; older ones stay valid)."""
        if account not in self.state.accounts:
            raise KeyError(account)
        token = "rt_" + secrets.token_urlsafe(24)
        self._grants[token] = _Grant(account)
        return token

    # -- the endpoint ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body: Any = json.loads(await request.read())
        except ValueError:
            body = None
        self.requests.append(body)
        self.state.notify()
        if not isinstance(body, dict):
            return _oauth_error(400, "invalid_request", "The body must be a JSON object.")
        if body.get("grant_type") != "refresh_token":
            return _oauth_error(400, "unsupported_grant_type", "Only refresh_token is served.")
        if body.get("client_id") != CLIENT_ID:
            return _oauth_error(401, "invalid_client", "Unknown client.")
        presented = body.get("refresh_token")
        if not isinstance(presented, str) or not presented:
            return _oauth_error(400, "invalid_request", "refresh_token is required.")
        self._calls[presented] += 1
        grant = self._grants.get(presented)
        if grant is None:
            return _oauth_error(400, "invalid_grant", "Invalid refresh token.")
        fault = self._take_fault(grant.account)
        if fault is not None and fault.status is not None:
            return _openai_error(fault.status, fault.code or "server_error")
        if not grant.live:
            return _openai_error(401, "refresh_token_reused")
        answer = self._rotate(presented, grant)
        if fault is not None and fault.seconds:
            await self.state.wait_closing(fault.seconds)
        return web.json_response(answer)

    def _take_fault(self, account: str) -> TokenFault | None:
        for index, (target, fault) in enumerate(self._faults):
            if target is None or target == account:
                del self._faults[index]
                return fault
        return None

    def _rotate(self, presented: str, grant: _Grant) -> dict[str, Any]:
        grant.live = False
        account = self.state.accounts[grant.account]
        expires_at = time.time() + self.access_token_ttl
        new_access = access_token(account.chatgpt_account_id, expires_at=expires_at)
        new_refresh = "rt_" + secrets.token_urlsafe(24)
        self._grants[new_refresh] = _Grant(grant.account)
        issued = self._issued.setdefault(grant.account, [])
        if self.revoke_on_refresh:
            for old in issued:
                self.state.revoke_token(old)
            issued.clear()
        issued.append(new_access)
        self.state.accept_token(grant.account, new_access)
        return {
            "access_token": new_access,
            "refresh_token": new_refresh,
            "id_token": id_token(
                account.chatgpt_account_id,
                email=f"{grant.account}@example.com",
                expires_at=expires_at,
            ),
            "token_type": "Bearer",
            "expires_in": int(self.access_token_ttl),
        }


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


_MESSAGES = {
    "refresh_token_reused": "Your refresh token has already been used to generate a new "
    "access token. Please try signing in again.",
    "refresh_token_expired": "Your refresh token has expired. Please try signing in again.",
    "refresh_token_invalidated": "Your refresh token has been invalidated. Please try signing "
    "in again.",
}


def _openai_error(status: int, code: str) -> web.Response:
    error = {
        "message": _MESSAGES.get(code, f"Token refresh failed ({code})."),
        "type": "server_error" if status >= 500 else "invalid_request_error",
        "code": code,
        "param": None,
    }
    return web.json_response({"error": error}, status=status)
