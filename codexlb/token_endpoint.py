"""The OAuth token endpoint (``[upstream].token_url``): one ``refresh_token`` grant.

The answer rotates the refresh token: the old one is dead from then on. Errors are sorted into
a refusal (do not present that refresh token again) and a transient failure (it is presumed
still valid); neither message ever carries a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from codexlb.credentials import CredentialsError

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
SCOPE = "openid profile email"
REFRESH_TIMEOUT_SECONDS = 30.0

_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class RefreshError(CredentialsError):
    """A refresh did not produce new credentials. Messages name a status or an error code,
    never a token.

        CredentialsError
        └── RefreshError
            ├── RefreshRefused      the endpoint refused the refresh token: do not retry
            └── RefreshUnavailable  transient: unreachable, timed out, 5xx/429, odd answer,
                                    database down; the refresh token is presumed still valid
    """


class RefreshRefused(RefreshError):
    def __init__(self, status: int, code: str | None) -> None:
        super().__init__(f"HTTP {status} {code}" if code else f"HTTP {status}")
        self.status = status
        self.code = code


class RefreshUnavailable(RefreshError):
    pass


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A successful refresh answer. ``repr`` shows no token."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    """None when the endpoint did not rotate it (the old one stays valid)."""
    id_token: str | None = field(repr=False)


async def request_refresh(
    session: aiohttp.ClientSession,
    token_url: str,
    refresh_token: str,
    *,
    timeout: float = REFRESH_TIMEOUT_SECONDS,  # noqa: ASYNC109 (a bound on the whole exchange)
) -> TokenGrant:
    """POST one ``refresh_token`` grant; the new tokens, or :class:`RefreshError`.

    4xx answers (other than 408 and 429) are refusals; the error code is taken from
    ``{"error": "invalid_grant"}`` or ``{"error": {"code": "refresh_token_reused"}}``.
    """
    body = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "refresh_token": refresh_token,
        "scope": SCOPE,
    }
    try:
        async with session.post(
            token_url,
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            status = response.status
            raw = await response.read()
    except TimeoutError:
        raise RefreshUnavailable("the token endpoint did not answer in time") from None
    except aiohttp.ClientError as exc:
        raise RefreshUnavailable(f"token endpoint unreachable ({type(exc).__name__})") from None
    try:
        answer: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = None
    if status == 200:
        if not isinstance(answer, dict) or not _token(answer.get("access_token")):
            raise RefreshUnavailable("the token endpoint answered without an access token")
        return TokenGrant(
            access_token=answer["access_token"],
            refresh_token=_token(answer.get("refresh_token")),
            id_token=_token(answer.get("id_token")),
        )
    code = _error_code(answer, secret=refresh_token)
    if status in (408, 429) or status >= 500 or status < 400:
        detail = f"HTTP {status} {code}" if code else f"HTTP {status}"
        raise RefreshUnavailable(f"the token endpoint failed ({detail})")
    raise RefreshRefused(status, code)


def _token(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _error_code(answer: Any, *, secret: str) -> str | None:
    """The error code of an OAuth or OpenAI-shaped error, if it is a plain identifier."""
    if not isinstance(answer, dict):
        return None
    error = answer.get("error")
    code = error.get("code") or error.get("type") if isinstance(error, dict) else error
    if isinstance(code, str) and _CODE.match(code) and secret not in code:
        return code
    return None
