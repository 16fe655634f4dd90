"""Keeping ChatGPT access tokens fresh (SPEC S5).

:class:`CredentialManager` owns the live credentials of every configured account::

    current(name)                  cheap and synchronous: what to send upstream now
    await ensure_fresh(name)       before an attempt: refresh when the JWT ``exp`` is near
    await refresh_after_401(name, rejected_access_token)
                                   after a 401: True → retry once on the same account,
                                   False → the account is unusable until its credentials change

A refresh is an OAuth ``refresh_token`` grant at ``[upstream].token_url``
(:func:`request_refresh`). The answer rotates the refresh token: the old one is dead from then
on, and presenting it again locks the account out. Hence:

- **Single flight.** Per account, at most one refresh runs; concurrent callers join it. A
  caller whose rejected token is already replaced returns at once. On PostgreSQL the flight
  also holds a per-account advisory lock (``CredentialStore.exclusive``) so that replicas
  sharing the database refresh one at a time.
- **Newer copies first.** Before spending the refresh token, the flight re-reads where the
  rotated tokens are kept (the ``auth_file``, or the database row): if someone else rotated
  them (Codex CLI sharing the ``auth.json``, another replica), those are adopted instead.
- **Not cancellable by a caller.** The flight is a task owned by the manager and awaited
  through ``asyncio.shield``: a client hanging up mid-refresh must not drop an answer whose
  refresh token the server has already rotated. :meth:`CredentialManager.close` waits for it.
- **Persisted before anyone uses the result.** ``auth_file`` accounts get the tokens written
  back atomically (compare-and-swap on the old refresh token, see
  ``credentials.write_auth_file``); inline accounts get a ``credential_store`` row, which the
  next start-up prefers over the TOML as long as the TOML's refresh token is the one the row
  descends from.

Outcomes: a renewal; a refusal (``invalid_grant``, ``refresh_token_reused``... or no refresh
token at all), after which the account is "dead" (one error log line naming the account and the
reason) until its credentials change; or a transient failure (:class:`RefreshUnavailable`:
unreachable endpoint, 5xx, 429, database down), after which the refresh token is presumed still
valid and a later attempt may succeed.

Platform API-key accounts never refresh. Tokens that are not JWTs have no known expiry and are
refreshed only after a 401.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp
from sqlalchemy.exc import SQLAlchemyError

from codexlb.config import AccountConfig, Config
from codexlb.credential_store import CredentialStore, StoredCredentials, source_fingerprint
from codexlb.credentials import (
    Credentials,
    CredentialsError,
    load_credentials,
    read_auth_file,
    token_account_id,
    write_auth_file,
)
from codexlb.token_endpoint import (
    REFRESH_TIMEOUT_SECONDS,
    RefreshRefused,
    RefreshUnavailable,
    request_refresh,
)

log = logging.getLogger(__name__)

REFRESH_MARGIN_SECONDS = 300.0
"""Refresh proactively when the access token expires within this."""
RETRY_AFTER_FAILURE_SECONDS = 30.0
"""After a transient failure, proactive refreshes of that account pause this long."""

CredentialsListener = Callable[[str, Credentials], None]
"""Called with (account name, new credentials) whenever the live credentials change."""


Source = Literal["platform", "auth_file", "inline"]


@dataclass(slots=True)
class _Live:
    """One account's live credentials and refresh state."""

    config: AccountConfig
    credentials: Credentials
    source: Source
    fingerprint: str | None = field(default=None, repr=False)
    """Inline accounts: ``source_fingerprint`` of the TOML's refresh token."""
    expires_at: float | None = None
    dead: str | None = None
    """Why refreshing is over for these credentials (refused, no refresh token)."""
    retry_at: float = 0.0
    flight: asyncio.Task[bool] | None = None

    @property
    def name(self) -> str:
        return self.config.name


class CredentialManager:
    """The live credentials of every configured account, kept fresh (see the module docstring).

    Construction reads the configuration (inline values, ``auth_file`` contents) so that
    :meth:`current` works at once; :meth:`start` then binds the app's ``aiohttp`` session and
    overlays the rotated tokens kept in the database. ``on_change`` is told of every change of
    live credentials (the pool keeps its ``Account.credentials`` in step through it); it must
    not raise.
    """

    def __init__(
        self,
        config: Config,
        *,
        store: CredentialStore | None,
        on_change: CredentialsListener | None = None,
        margin: float = REFRESH_MARGIN_SECONDS,
        timeout: float = REFRESH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._margin = margin
        self._timeout = timeout
        self._clock = clock
        self._token_url = config.upstream.token_url
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._live: dict[str, _Live] = {
            account.name: _from_config(account) for account in config.accounts
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Bind the session used for every refresh; adopt the database's rotated tokens.

        An inline account whose TOML gives a refresh token but no access token is refreshed
        in the background. Database errors propagate (start-up should fail loudly rather than
        reuse dead refresh tokens).
        """
        self._session = session
        await self._overlay_stored(list(self._live.values()))
        self._refresh_missing_access_tokens()

    async def reconfigure(self, config: Config) -> None:
        """Follow a reloaded configuration (after ``Pool.reconfigure``).

        Accounts whose credential settings are unchanged keep their live (possibly rotated)
        credentials; an ``auth_file`` whose content changed (``codex login`` again) is adopted.
        Changed or added accounts start from the configuration and the database, as at
        start-up. Removed accounts are forgotten (a refresh in flight still persists).
        """
        self._token_url = config.upstream.token_url
        fresh: list[_Live] = []
        reread: list[_Live] = []
        live: dict[str, _Live] = {}
        for account in config.accounts:
            known = self._live.get(account.name)
            if known is None or known.config.credential_fields != account.credential_fields:
                live[account.name] = _from_config(account)
                fresh.append(live[account.name])
                continue
            known.config = account
            live[account.name] = known
            if account.auth_file is not None and known.flight is None:
                on_disk = _from_config(account)
                if on_disk.credentials.usable and (
                    on_disk.source != known.source
                    or _differ(on_disk.credentials, known.credentials)
                ):
                    live[account.name] = on_disk
                    reread.append(on_disk)
        self._live = live
        for account_live in reread:
            log.info("account %s: adopted the credentials now in its auth_file", account_live.name)
            self._changed(account_live)
        await self._overlay_stored(fresh)
        self._refresh_missing_access_tokens()

    async def close(self) -> None:
        """Wait for refreshes in flight (their results must be persisted), then stop."""
        self._closed = True
        tasks = list(self._tasks)
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=self._timeout + 5.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the three questions --------------------------------------------------------------------

    def current(self, name: str) -> Credentials:
        """The credentials to send for account ``name`` now; KeyError for an unknown name."""
        return self._live[name].credentials

    def problem(self, name: str) -> str | None:
        """Why account ``name`` can no longer refresh (for status pages), or None."""
        return self._live[name].dead

    async def ensure_fresh(self, name: str) -> Credentials:
        """The credentials for account ``name``, refreshed first when the access token's JWT
        ``exp`` is within the margin (or there is no access token but a refresh token).

        Never raises for a known account: when the refresh fails, the current credentials are
        returned (a refused refresh is logged and makes ``refresh_after_401`` answer False; a
        transient failure pauses proactive refreshes of the account briefly).
        """
        live = self._live[name]
        if not self._wants_refresh(live):
            return live.credentials
        try:
            await self._fly(live, rejected=None)
        except RefreshUnavailable:
            live.retry_at = self._clock() + RETRY_AFTER_FAILURE_SECONDS
        return live.credentials

    async def refresh_after_401(self, name: str, rejected_access_token: str | None) -> bool:
        """After the upstream refused ``rejected_access_token`` of account ``name`` with 401.

        True: new credentials are available (already, if ``current`` no longer holds the
        rejected token; else after a refresh this call joined or started): retry once on the
        same account. False: nothing to refresh (a platform key, no refresh token) or the
        refresh was refused: the account is unusable until its credentials change; the reason
        was logged once. Raises :class:`RefreshUnavailable` when the refresh failed for a
        transient reason: cool the account down and fail over; a later 401 tries again.
        """
        live = self._live[name]
        if live.source == "platform":
            return False
        current = live.credentials.access_token
        if rejected_access_token is not None and current and current != rejected_access_token:
            return True
        if live.dead is not None:
            return False
        return await self._fly(live, rejected=rejected_access_token)

    # -- the flight -----------------------------------------------------------------------------

    def _wants_refresh(self, live: _Live) -> bool:
        credentials = live.credentials
        if live.source == "platform" or live.dead is not None or not credentials.refresh_token:
            return False
        if self._clock() < live.retry_at:
            return False
        if not credentials.access_token:
            return True
        return live.expires_at is not None and live.expires_at - self._clock() <= self._margin

    async def _fly(self, live: _Live, *, rejected: str | None) -> bool:
        """Join the account's refresh in flight, or start one; shielded from our cancellation."""
        if self._session is None or self._closed:
            raise RefreshUnavailable("credential refresh is not running")
        flight = live.flight
        if flight is None:
            flight = asyncio.create_task(self._flight(live, rejected), name=f"refresh-{live.name}")
            live.flight = flight
            self._tasks.add(flight)
            flight.add_done_callback(self._forget)
        return await asyncio.shield(flight)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone

    async def _flight(self, live: _Live, rejected: str | None) -> bool:
        """True when the live credentials were replaced; False when refreshing is over."""
        outcome: bool | None = None
        try:
            async with self._coordinated(live):
                outcome = await self._renew(live, rejected)
        except (SQLAlchemyError, OSError) as exc:
            if outcome is not None:
                return outcome  # only releasing the lock failed; the server drops it anyway
            if live.source != "inline":
                raise
            message = f"the database is unreachable ({type(exc).__name__})"
            log.warning("account %s: cannot refresh its token: %s", live.name, message)
            raise RefreshUnavailable(message) from None
        except RefreshUnavailable as exc:
            log.warning(
                "account %s: token refresh failed (%s); it will be tried again", live.name, exc
            )
            raise
        finally:
            live.flight = None
        return outcome

    @asynccontextmanager
    async def _coordinated(self, live: _Live) -> AsyncIterator[None]:
        if live.source == "inline" and self._store is not None:
            async with self._store.exclusive(live.name):
                yield
        else:
            yield

    async def _renew(self, live: _Live, rejected: str | None) -> bool:
        if await self._adopt_newer_copy(live) and self._satisfied(live, rejected):
            return True
        old = live.credentials
        if not old.refresh_token:
            if rejected is not None:
                self._give_up(
                    live, "the upstream refused its access token (401) and it has no refresh token"
                )
            else:
                self._give_up(live, "its access token expires and it has no refresh token")
            return False
        assert self._session is not None
        try:
            grant = await request_refresh(
                self._session, self._token_url, old.refresh_token, timeout=self._timeout
            )
        except RefreshRefused as exc:
            self._give_up(live, f"its token refresh was refused ({exc})")
            return False
        renewed = Credentials(
            access_token=grant.access_token,
            account_id=old.account_id
            or token_account_id(grant.id_token)
            or token_account_id(grant.access_token),
            refresh_token=grant.refresh_token or old.refresh_token,
            id_token=grant.id_token or old.id_token,
        )
        await self._persist(live, renewed, replacing=old.refresh_token)
        self._set(live, renewed)
        expires = live.expires_at
        log.info(
            "account %s: access token refreshed (%s)%s",
            live.name,
            "after a 401" if rejected is not None else "before it expires",
            f"; valid until {_fmt_time(expires)}" if expires is not None else "",
        )
        return True

    def _satisfied(self, live: _Live, rejected: str | None) -> bool:
        access_token = live.credentials.access_token
        if not access_token:
            return False
        if rejected is not None:
            return access_token != rejected
        expires = live.expires_at
        return expires is None or expires - self._clock() > self._margin

    async def _adopt_newer_copy(self, live: _Live) -> bool:
        """Adopt tokens someone else rotated since we loaded ours; True if adopted."""
        if live.source == "auth_file":
            return self._adopt_file_changes(live)
        if live.source != "inline" or self._store is None or live.fingerprint is None:
            return False
        row = await self._store.get(live.name)
        if row is None or not self._row_applies(live, row):
            return False
        if row.credentials.refresh_token == live.credentials.refresh_token:
            return False
        self._set(live, self._from_row(live, row))
        log.info("account %s: adopted tokens another codexlb process refreshed", live.name)
        return True

    def _adopt_file_changes(self, live: _Live) -> bool:
        assert live.config.auth_file is not None
        try:
            on_disk = read_auth_file(live.config.auth_file)
        except CredentialsError:
            return False
        if on_disk.api_key is not None or not _differ(on_disk, live.credentials):
            return False
        self._set(live, on_disk)
        log.info("account %s: adopted the tokens now in %s", live.name, live.config.auth_file)
        return True

    async def _persist(self, live: _Live, renewed: Credentials, *, replacing: str) -> None:
        """Keep the rotated tokens where the next start-up will look; failures are logged."""
        if live.source == "auth_file":
            path = live.config.auth_file
            assert path is not None
            try:
                written = await asyncio.to_thread(
                    write_auth_file, path, renewed, replacing_refresh_token=replacing
                )
            except CredentialsError as exc:
                log.error(
                    "account %s: refreshed tokens could not be written back (%s); a restart "
                    "would reuse a dead refresh token",
                    live.name,
                    exc,
                )
                return
            if not written:
                log.warning(
                    "account %s: %s changed while its token was refreshed; left as it is",
                    live.name,
                    path,
                )
            return
        if self._live.get(live.name) is not live:
            return  # reloaded with other credentials meanwhile: this token family is retired
        if self._store is None or live.fingerprint is None:
            log.warning(
                "account %s: no database to keep its rotated refresh token; a restart would "
                "reuse the dead one from the configuration",
                live.name,
            )
            return
        try:
            await self._store.save(live.name, renewed, source_fingerprint=live.fingerprint)
        except (SQLAlchemyError, OSError) as exc:
            log.error(
                "account %s: refreshed tokens could not be stored (%s); a restart would reuse "
                "a dead refresh token",
                live.name,
                type(exc).__name__,
            )

    def _give_up(self, live: _Live, reason: str) -> None:
        live.dead = reason
        if live.source == "auth_file":
            remedy = f"log in again (codex login) to renew {live.config.auth_file}, then reload"
        else:
            remedy = "put new tokens in the configuration and reload"
        log.error(
            "account %s: %s; it is unusable until its credentials change: %s",
            live.name,
            reason,
            remedy,
        )

    # -- helpers --------------------------------------------------------------------------------

    def _set(self, live: _Live, credentials: Credentials) -> None:
        live.credentials = credentials
        live.expires_at = credentials.expires_at
        live.dead = None
        live.retry_at = 0.0
        self._changed(live)

    def _changed(self, live: _Live) -> None:
        if self._on_change is not None and self._live.get(live.name) is live:
            self._on_change(live.name, live.credentials)

    async def _overlay_stored(self, accounts: list[_Live]) -> None:
        inline = [live for live in accounts if live.fingerprint is not None]
        if not inline or self._store is None:
            return
        rows = await self._store.load_all()
        for live in inline:
            row = rows.get(live.name)
            if row is None:
                continue
            if not self._row_applies(live, row):
                log.info(
                    "account %s: its configured refresh token changed since the last refresh; "
                    "using the configuration's tokens",
                    live.name,
                )
                continue
            self._set(live, self._from_row(live, row))

    @staticmethod
    def _row_applies(live: _Live, row: StoredCredentials) -> bool:
        return row.source_fingerprint == live.fingerprint

    @staticmethod
    def _from_row(live: _Live, row: StoredCredentials) -> Credentials:
        # The configured account id wins: the operator's word over a token's claim.
        return replace(
            row.credentials, account_id=live.config.chatgpt_account_id or row.credentials.account_id
        )

    def _refresh_missing_access_tokens(self) -> None:
        if self._session is None or self._closed:
            return
        for live in self._live.values():
            if (
                live.flight is None
                and not live.credentials.access_token
                and self._wants_refresh(live)
            ):
                task = asyncio.create_task(self.ensure_fresh(live.name), name=f"warm-{live.name}")
                self._tasks.add(task)
                task.add_done_callback(self._forget)


def _from_config(account: AccountConfig) -> _Live:
    if account.api_key is not None:
        return _Live(account, load_credentials(account), "platform")
    if account.auth_file is not None:
        try:
            credentials = read_auth_file(account.auth_file)
        except CredentialsError:
            credentials = Credentials()  # the pool reports why; nothing to refresh
        source: Source = "platform" if credentials.api_key is not None else "auth_file"
        return _Live(account, credentials, source, expires_at=credentials.expires_at)
    credentials = load_credentials(account)
    fingerprint = (
        source_fingerprint(credentials.refresh_token) if credentials.refresh_token else None
    )
    return _Live(account, credentials, "inline", fingerprint, credentials.expires_at)


def _differ(one: Credentials, other: Credentials) -> bool:
    return (one.access_token, one.refresh_token) != (other.access_token, other.refresh_token)


def _fmt_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
