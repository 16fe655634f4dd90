"""What an account presents upstream, and where its credentials live (SPEC S5).

ChatGPT accounts send ``Authorization: Bearer <access_token>`` and ``chatgpt-account-id``;
platform accounts send their API key and no account header. Credentials come from the TOML
inline, or from a Codex ``auth.json`` (what ``codex login`` writes)::

    {"auth_mode": "chatgpt", "OPENAI_API_KEY": null,
     "tokens": {"id_token": "<jwt>", "access_token": "<jwt>", "refresh_token": "...",
                "account_id": "..."},
     "last_refresh": "2025-01-01T00:00:00.000000Z"}

This module holds the values and the files: reading an ``auth.json``, writing rotated tokens
back to it atomically (:func:`write_auth_file`), reading a JWT's claims without verifying it
(:func:`jwt_expiry`), and the ``import-auth`` helper (:func:`import_auth_snippet`).

Each kind of ``[[accounts]]`` entry is a :class:`Source`, a small object with the few operations
that differ between them: load, re-read a copy changed outside codexlb, persist rotated tokens::

    PlatformKey     api_key = ...           never refreshed: nothing to re-read or persist
    AuthFile        auth_file = ...         re-read and written back in place (Codex's format)
    InlineTokens    access/refresh_token    rotated tokens kept in the database
                                            (``codexlb.credential_store``)

Keeping the tokens fresh, with these sources, is ``codexlb.refresh``.

No secret ever reaches a ``repr``, an exception message or a log line from here.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import tempfile
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codexlb.config import AccountConfig

if TYPE_CHECKING:
    from codexlb.credential_store import StoredCredentials

log = logging.getLogger(__name__)

AUTH_CLAIM = "https://api.openai.com/auth"
"""The JWT claim holding ``chatgpt_account_id`` (and the plan) in Codex tokens."""
PLATFORM_BASE_URL = "https://api.openai.com/v1"


class CredentialsError(Exception):
    """An account's credentials cannot be read or used; the message never carries a secret."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """One account's credentials as sent upstream. ``repr`` shows no secret."""

    access_token: str | None = None
    account_id: str | None = None
    refresh_token: str | None = None
    api_key: str | None = None
    id_token: str | None = field(default=None, compare=False)
    """Kept to write back to an ``auth.json``; never sent upstream."""

    def __repr__(self) -> str:
        return f"Credentials(account_id={self.account_id!r}, platform={self.api_key is not None})"

    @property
    def usable(self) -> bool:
        return bool(self.api_key or self.access_token)

    @property
    def expires_at(self) -> float | None:
        """The access token's JWT ``exp`` (epoch seconds), None when it is not a JWT."""
        return jwt_expiry(self.access_token) if self.access_token else None

    def auth_headers(self) -> dict[str, str]:
        if self.api_key is not None:
            return {"Authorization": f"Bearer {self.api_key}"}
        headers = {"Authorization": f"Bearer {self.access_token or ''}"}
        if self.account_id:
            headers["chatgpt-account-id"] = self.account_id
        return headers


def load_credentials(account: AccountConfig) -> Credentials:
    """The credentials the configuration gives ``account`` (inline, or its ``auth_file``), as
    ``codexlb check-config`` reads them; the server's live ones are ``codexlb.refresh``'s.

    Raises :class:`CredentialsError` when the ``auth_file`` cannot be read.
    """
    source = key_or_file_source(account)
    return configured_tokens(account) if source is None else source.load()


def key_or_file_source(account: AccountConfig) -> Source | None:
    """The source of a platform key or an ``auth_file`` entry; None for inline tokens, whose
    source (``credential_store.InlineTokens``) keeps its rotated tokens in the database."""
    if account.api_key is not None:
        return PlatformKey(account.api_key.get_secret_value())
    if account.auth_file is not None:
        return AuthFile(account.auth_file)
    return None


def configured_tokens(account: AccountConfig) -> Credentials:
    """The ChatGPT tokens written inline in ``account``'s entry."""
    return Credentials(
        access_token=account.access_token.get_secret_value() if account.access_token else None,
        account_id=account.chatgpt_account_id,
        refresh_token=account.refresh_token.get_secret_value() if account.refresh_token else None,
    )


class Source(abc.ABC):
    """Where one account's credentials come from, and where its rotated tokens go.

    The base class re-reads and persists nothing; a subclass overrides what its kind of entry
    does. Operations log their own failures (naming the account, never a secret).
    """

    in_database = False
    """Its rotated tokens are kept in the database: a refresh holds the database's lock, and
    the database being down is a transient failure."""

    @abc.abstractmethod
    def load(self) -> Credentials:
        """The credentials as configured; :class:`CredentialsError` when they cannot be read."""

    def remedy(self) -> str:
        """What the operator should do once the upstream refuses the credentials for good."""
        return "put new tokens in the configuration and reload"

    def stored(self, row: StoredCredentials) -> Credentials | None:
        """The tokens of the database's ``row`` for this account, when they descend from the
        configured ones; else None."""
        return None

    def reread(self, current: Credentials) -> Credentials | None:
        """Credentials that replaced ``current`` outside codexlb (checked at a reload), or None."""
        return None

    async def newer_copy(self, account: str, current: Credentials) -> Credentials | None:
        """Tokens someone else rotated since ``current`` was loaded (checked before spending
        the refresh token), or None."""
        return None

    async def persist(  # noqa: B027 (optional: nothing to persist by default)
        self, account: str, renewed: Credentials, *, replacing: str
    ) -> None:
        """Keep ``renewed`` (which replaced the refresh token ``replacing``) where the next
        start-up looks; failures are logged, not raised."""

    def exclusive(self, account: str) -> AbstractAsyncContextManager[None]:
        """The cross-process lock a refresh of ``account`` holds; none by default."""
        return contextlib.nullcontext()


class PlatformKey(Source):
    """An OpenAI platform API key written in the entry: sent as it is, never refreshed."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def load(self) -> Credentials:
        return Credentials(api_key=self._api_key)


class AuthFile(Source):
    """A Codex ``auth.json``: shared with Codex CLI, so it is re-read before a refresh and at a
    reload, and rotated tokens are written back to it (:func:`write_auth_file`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Credentials:
        return read_auth_file(self.path)

    def remedy(self) -> str:
        return f"log in again (codex login) to renew {self.path}, then reload"

    def reread(self, current: Credentials) -> Credentials | None:
        try:
            on_disk = read_auth_file(self.path)
        except CredentialsError:
            return None  # unreadable now: keep what was read before
        return on_disk if on_disk != current else None

    async def newer_copy(self, account: str, current: Credentials) -> Credentials | None:
        on_disk = self.reread(current)
        if on_disk is None or on_disk.api_key is not None or not tokens_differ(on_disk, current):
            return None
        log.info("account %s: adopted the tokens now in %s", account, self.path)
        return on_disk

    async def persist(self, account: str, renewed: Credentials, *, replacing: str) -> None:
        try:
            written = await asyncio.to_thread(
                write_auth_file, self.path, renewed, replacing_refresh_token=replacing
            )
        except CredentialsError as exc:
            log.error(
                "account %s: refreshed tokens could not be written back (%s); a restart would "
                "reuse a dead refresh token",
                account,
                exc,
            )
            return
        if not written:
            log.warning(
                "account %s: %s changed while its token was refreshed; left as it is",
                account,
                self.path,
            )


def tokens_differ(one: Credentials, other: Credentials) -> bool:
    """Whether two ChatGPT credentials hold other tokens (an account id alone is no news)."""
    return (one.access_token, one.refresh_token) != (other.access_token, other.refresh_token)


def read_auth_file(path: Path) -> Credentials:
    """Credentials from a Codex ``auth.json``: ChatGPT tokens, or an ``OPENAI_API_KEY``."""
    data = _read_json_object(path)
    tokens = data.get("tokens")
    if isinstance(tokens, dict) and tokens.get("access_token"):
        return Credentials(
            access_token=_str(tokens.get("access_token")),
            account_id=_str(tokens.get("account_id")),
            refresh_token=_str(tokens.get("refresh_token")),
            id_token=_str(tokens.get("id_token")),
        )
    api_key = data.get("OPENAI_API_KEY")
    if isinstance(api_key, str) and api_key:
        return Credentials(api_key=api_key)
    raise CredentialsError(f"{path}: holds neither ChatGPT tokens nor an OPENAI_API_KEY")


def write_auth_file(
    path: Path, credentials: Credentials, *, replacing_refresh_token: str | None
) -> bool:
    """Write rotated ChatGPT tokens back to a Codex ``auth.json``, atomically.

    A compare-and-swap: the file is rewritten only while it still holds
    ``replacing_refresh_token`` (the token the refresh consumed); if someone else (``codex
    login``, Codex CLI's own refresh) changed it meanwhile, it is left alone and False is
    returned. Rewriting keeps the Codex shape: ``tokens.{id_token, access_token,
    refresh_token, account_id}`` are replaced (an absent ``id_token`` or ``account_id`` keeps
    the old value), ``last_refresh`` is set to now, every other key is preserved.

    Atomic: a temporary file in the same directory (mode 0600), fsync, ``os.replace``, fsync of
    the directory; a reader sees the old file or the new one, never a mix. A symlinked path is
    followed, so the link stays and its target is replaced. Raises ``CredentialsError`` when
    the file cannot be read or written (the message names the path and the error kind only).
    """
    target = path.resolve()
    data = _read_json_object(target)
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or tokens.get("refresh_token") != replacing_refresh_token:
        return False
    updated = dict(tokens)
    updated["access_token"] = credentials.access_token
    updated["refresh_token"] = credentials.refresh_token
    if credentials.id_token is not None:
        updated["id_token"] = credentials.id_token
    if credentials.account_id is not None:
        updated["account_id"] = credentials.account_id
    data["tokens"] = updated
    data["last_refresh"] = codex_timestamp(datetime.now(UTC))
    try:
        _replace_file(target, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot write ({type(exc).__name__})") from None
    return True


def codex_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as Codex writes ``last_refresh``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT (``header.payload.signature``), unverified; None if not a JWT.

    Used only to learn facts the token states about itself (``exp``, the account id), never to
    trust it: the upstream verifies it.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (epoch seconds); None when absent or not a JWT."""
    claims = jwt_claims(token)
    if claims is None:
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def token_account_id(token: str | None) -> str | None:
    """The ``chatgpt_account_id`` a Codex id or access token states, if any."""
    claims = jwt_claims(token) if token else None
    auth = claims.get(AUTH_CLAIM) if claims else None
    return _str(auth.get("chatgpt_account_id")) if isinstance(auth, dict) else None


def import_auth_snippet(auth_file: str | os.PathLike[str], *, name: str | None = None) -> str:
    """The ``[[accounts]]`` TOML entry that serves a Codex ``auth.json`` (``codexlb import-auth``).

    The file is read and validated (``CredentialsError`` otherwise) but no secret is copied:
    the entry points at the file with an absolute ``auth_file`` (a relative one would be read
    relative to the configuration file), so refreshed tokens keep being written back to it. A
    platform key file gets ``base_url = "https://api.openai.com/v1"``. ``name`` defaults to
    the local part of the login's e-mail, else ``codex-`` and the start of its account id.

    The entry starts with a blank line: appended (``>> codexlb.toml``) to a file whose last
    line has no newline, it still begins a line of its own.
    """
    path = Path(auth_file).expanduser().resolve()
    credentials = read_auth_file(path)
    if name is None:
        name = _default_name(credentials)
    if not name:
        raise CredentialsError("the account name must not be empty")
    lines = ["[[accounts]]", f"name = {toml_string(name)}", f"auth_file = {toml_string(str(path))}"]
    if credentials.api_key is not None:
        lines.append(f"base_url = {toml_string(PLATFORM_BASE_URL)}")
    return "\n" + "\n".join(lines) + "\n"


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    escaped = []
    for char in value:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _default_name(credentials: Credentials) -> str:
    if credentials.api_key is not None:
        return "platform"
    claims = jwt_claims(credentials.id_token) if credentials.id_token else None
    email = claims.get("email") if claims else None
    if isinstance(email, str) and "@" in email:
        local = re.sub(r"[^A-Za-z0-9._-]+", "-", email.split("@", 1)[0]).strip("-.")
        if local:
            return local
    account_id = credentials.account_id or token_account_id(credentials.id_token)
    if account_id:
        return "codex-" + re.sub(r"[^A-Za-z0-9-]+", "", account_id)[:8]
    return "codex"


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise CredentialsError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"{path}: not a readable auth.json ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path}: not a Codex auth.json object")
    return data


def _replace_file(target: Path, content: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # durability of the rename; not every FS allows it
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
