"""Keeping ChatGPT access tokens fresh (SPEC S5).

:class:`CredentialManager` is the one owner of every configured account's live credentials:
it alone reads them (from the configuration, ``auth_file``s and the database, through each
account's ``credentials.Source``), reloads, refreshes and persists them. It keeps one
:class:`LiveCredentials` record per account; ``pool.Account`` holds a reference to its record
and reads the credentials there, so a refresh needs telling nobody::

    record(name)                   the account's record (replaced when a reload changes it)
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
  rotated tokens are kept (``Source.newer_copy``: the ``auth_file``, or the database row): if
  someone else rotated them (Codex CLI sharing the ``auth.json``, another replica), those are
  adopted instead.
- **Not cancellable by a caller.** The flight is a task owned by the manager and awaited
  through ``asyncio.shield``: a client hanging up mid-refresh must not drop an answer whose
  refresh token the server has already rotated. :meth:`CredentialManager.close` waits for it.
- **Persisted before anyone uses the result** (``Source.persist``). ``auth_file`` accounts
  get the tokens written back atomically (compare-and-swap on the old refresh token, see
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from sqlalchemy.exc import SQLAlchemyError

from codexlb.config import AccountConfig, Config
from codexlb.credential_store import CredentialStore, InlineTokens
from codexlb.credentials import (
    Credentials,
    CredentialsError,
    Source,
    key_or_file_source,
    token_account_id,
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


@dataclass(slots=True, eq=False)
class LiveCredentials:
    """One account's live credentials and refresh state, owned by the ``CredentialManager``.

    ``pool.Account`` reads ``credentials`` and ``error`` here; only the manager writes.
    """

    config: AccountConfig
    source: Source
    credentials: Credentials
    error: str | None = None
    """Why the configured credentials could not be read (an unreadable ``auth_file``)."""
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
    overlays the rotated tokens kept in the database.
    """

    def __init__(
        self,
        config: Config,
        *,
        store: CredentialStore | None,
        margin: float = REFRESH_MARGIN_SECONDS,
        timeout: float = REFRESH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._margin = margin
        self._timeout = timeout
        self._clock = clock
        self._token_url = config.upstream.token_url
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._live: dict[str, LiveCredentials] = {
            account.name: self._from_config(account) for account in config.accounts
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
        """Follow a reloaded configuration (before ``Pool.reconfigure``, which then gives each
        account the record now kept for it).

        Accounts whose credential settings are unchanged keep their record and its live
        (possibly rotated) credentials, unless ``Source.reread`` finds them replaced outside
        codexlb (``codex login`` again into an ``auth_file``): then a new record adopts those.
        Changed or added accounts get a new record from the configuration and the database, as
        at start-up. Removed accounts are forgotten (a refresh in flight still persists to an
        ``auth_file``; an inline one's retired tokens are not stored).
        """
        self._token_url = config.upstream.token_url
        fresh: list[LiveCredentials] = []
        live: dict[str, LiveCredentials] = {}
        for account in config.accounts:
            known = self._live.get(account.name)
            if known is None or known.config.credential_fields != account.credential_fields:
                live[account.name] = self._from_config(account)
                fresh.append(live[account.name])
                if known is not None:
                    log.info(
                        "account %s: credentials reloaded from the configuration", account.name
                    )
                continue
            known.config = account
            live[account.name] = known
            reread = known.source.reread(known.credentials) if known.flight is None else None
            if reread is not None:
                log.info("account %s: adopted the credentials now in its auth_file", account.name)
                live[account.name] = _record(account, known.source, reread)
        self._live = live
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

    # -- the questions --------------------------------------------------------------------------

    def record(self, name: str) -> LiveCredentials:
        """The live record of account ``name``; KeyError for an unknown name."""
        return self._live[name]

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

    def due(self, name: str) -> bool:
        """Whether ``ensure_fresh`` would refresh account ``name`` now: a cheap test, so that
        the common case awaits nothing."""
        return self._wants_refresh(self._live[name])

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
        if live.credentials.api_key is not None:
            return False
        current = live.credentials.access_token
        if rejected_access_token is not None and current and current != rejected_access_token:
            return True
        if live.dead is not None:
            return False
        return await self._fly(live, rejected=rejected_access_token)

    # -- the flight -----------------------------------------------------------------------------

    def _wants_refresh(self, live: LiveCredentials) -> bool:
        credentials = live.credentials
        if live.dead is not None or not credentials.refresh_token:
            return False  # a platform key has no refresh token either
        if self._clock() < live.retry_at:
            return False
        if not credentials.access_token:
            return True
        return live.expires_at is not None and live.expires_at - self._clock() <= self._margin

    async def _fly(self, live: LiveCredentials, *, rejected: str | None) -> bool:
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

    async def _flight(self, live: LiveCredentials, rejected: str | None) -> bool:
        """True when the live credentials were replaced; False when refreshing is over."""
        outcome: bool | None = None
        try:
            async with live.source.exclusive(live.name):
                outcome = await self._renew(live, rejected)
        except (SQLAlchemyError, OSError) as exc:
            if outcome is not None:
                return outcome  # only releasing the lock failed; the server drops it anyway
            if not live.source.in_database:
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

    async def _renew(self, live: LiveCredentials, rejected: str | None) -> bool:
        newer = await live.source.newer_copy(live.name, live.credentials)
        if newer is not None:
            _set(live, newer)
            if self._satisfied(live, rejected):
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
        if self._live.get(live.name) is live or not live.source.in_database:
            # A retired inline record (reloaded with other credentials meanwhile) must not
            # overwrite the row of the token family that replaced it.
            await live.source.persist(live.name, renewed, replacing=old.refresh_token)
        _set(live, renewed)
        expires = live.expires_at
        log.info(
            "account %s: access token refreshed (%s)%s",
            live.name,
            "after a 401" if rejected is not None else "before it expires",
            f"; valid until {_fmt_time(expires)}" if expires is not None else "",
        )
        return True

    def _satisfied(self, live: LiveCredentials, rejected: str | None) -> bool:
        access_token = live.credentials.access_token
        if not access_token:
            return False
        if rejected is not None:
            return access_token != rejected
        expires = live.expires_at
        return expires is None or expires - self._clock() > self._margin

    def _give_up(self, live: LiveCredentials, reason: str) -> None:
        live.dead = reason
        log.error(
            "account %s: %s; it is unusable until its credentials change: %s",
            live.name,
            reason,
            live.source.remedy(),
        )

    # -- helpers --------------------------------------------------------------------------------

    def _from_config(self, account: AccountConfig) -> LiveCredentials:
        """A new record for ``account``, from its source as configured (an unreadable
        ``auth_file`` is logged and gives empty credentials, with the reason)."""
        source = key_or_file_source(account) or InlineTokens(account, self._store)
        try:
            credentials = source.load()
        except CredentialsError as exc:
            log.error("account %s: %s", account.name, exc)
            return LiveCredentials(account, source, Credentials(), error=str(exc))
        return _record(account, source, credentials)

    async def _overlay_stored(self, accounts: list[LiveCredentials]) -> None:
        stored = [live for live in accounts if live.source.in_database]
        if not stored or self._store is None:
            return
        rows = await self._store.load_all()
        for live in stored:
            row = rows.get(live.name)
            if row is None:
                continue
            credentials = live.source.stored(row)
            if credentials is None:
                log.info(
                    "account %s: its configured refresh token changed since the last refresh; "
                    "using the configuration's tokens",
                    live.name,
                )
                continue
            _set(live, credentials)

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


def _record(account: AccountConfig, source: Source, credentials: Credentials) -> LiveCredentials:
    return LiveCredentials(account, source, credentials, expires_at=credentials.expires_at)


def _set(live: LiveCredentials, credentials: Credentials) -> None:
    live.credentials = credentials
    live.expires_at = credentials.expires_at
    live.dead = None
    live.retry_at = 0.0


def _fmt_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
