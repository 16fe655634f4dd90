"""What an account presents upstream (SPEC S5).

ChatGPT accounts send ``Authorization: Bearer <access_token>`` and ``chatgpt-account-id``;
platform accounts send their API key and no account header. Credentials come from the TOML
inline, or from a Codex ``auth.json`` (what ``codex login`` writes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codexlb.config import AccountConfig


class CredentialsError(Exception):
    """An account's credentials cannot be read; the message never carries a secret."""


@dataclass(frozen=True, slots=True)
class Credentials:
    access_token: str | None = None
    account_id: str | None = None
    refresh_token: str | None = None
    api_key: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(account_id={self.account_id!r}, platform={self.api_key is not None})"

    @property
    def usable(self) -> bool:
        return bool(self.api_key or self.access_token)

    def auth_headers(self) -> dict[str, str]:
        if self.api_key is not None:
            return {"Authorization": f"Bearer {self.api_key}"}
        headers = {"Authorization": f"Bearer {self.access_token or ''}"}
        if self.account_id:
            headers["chatgpt-account-id"] = self.account_id
        return headers


def load_credentials(account: AccountConfig) -> Credentials:
    if account.api_key is not None:
        return Credentials(api_key=account.api_key.get_secret_value())
    if account.auth_file is not None:
        return read_auth_file(account.auth_file)
    return Credentials(
        access_token=account.access_token.get_secret_value() if account.access_token else None,
        account_id=account.chatgpt_account_id,
        refresh_token=account.refresh_token.get_secret_value() if account.refresh_token else None,
    )


def read_auth_file(path: Path) -> Credentials:
    """Credentials from a Codex ``auth.json``: ChatGPT tokens, or an ``OPENAI_API_KEY``."""
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise CredentialsError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"{path}: not a readable auth.json ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path}: not a Codex auth.json object")
    tokens = data.get("tokens")
    if isinstance(tokens, dict) and tokens.get("access_token"):
        return Credentials(
            access_token=_str(tokens.get("access_token")),
            account_id=_str(tokens.get("account_id")),
            refresh_token=_str(tokens.get("refresh_token")),
        )
    api_key = data.get("OPENAI_API_KEY")
    if isinstance(api_key, str) and api_key:
        return Credentials(api_key=api_key)
    raise CredentialsError(f"{path}: holds neither ChatGPT tokens nor an OPENAI_API_KEY")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
