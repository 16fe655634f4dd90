"""What each client key may use, checked before a request goes upstream (SPEC S9).

``KeyLimits.admit`` is the one check, called by ``Exchange.run`` before its first attempt, so
every route that spends upstream capacity (HTTP and WebSocket turns, compaction, the translated
APIs) goes through it. In order, each refusal an S1.4 error:

- the key is still configured and not past ``expires_at`` (401; a reload may have removed it
  while a WebSocket stayed open);
- the model is one of its ``models`` (404 ``model_not_found``);
- fewer than ``max_inflight`` of its requests are running (429 ``rate_limit_exceeded``,
  ``Retry-After: 1``);
- its tokens in the rolling 5 hours and 7 days are under ``tokens_per_5h`` and
  ``tokens_per_week`` (429 ``usage_limit_reached`` with ``resets_at``: when enough of its oldest
  use leaves the window). A response that crosses a token limit finishes; the next is refused;
- fewer than ``requests_per_minute`` were admitted in the last 60 seconds (429
  ``rate_limit_exceeded``, ``Retry-After`` when the oldest leaves the window). Checked last,
  as counting is the check: a request refused for another reason is not counted.

An admitted request holds an ``Admission`` until it ends (its in-flight place). Request counts
are taken from the counters every replica shares (``shared.SharedState.take``: in memory with
SQLite, in PostgreSQL with several processes), and the in-flight places of the other live
replicas count too (``SharedState.elsewhere``); tokens come from the durable ledger (``usage``),
so they survive a restart and are shared by every process on one database.

``key_usage`` answers "this key's limits and current use" (the body of ``GET /v1/usage``) for
any view that shows a key its own headroom.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from codexlb.auth import ClientKeys
from codexlb.config import ApiKeyConfig
from codexlb.errors import InvalidRequest, KeyRateLimited, KeyUsageLimitReached, ModelNotFound
from codexlb.shared import SharedState
from codexlb.usage import DAY, FIVE_HOURS, MINUTE, WEEK, UsageLedger, Windows

RATE_WINDOW = 60.0


@dataclass(slots=True)
class Admission:
    """An admitted request's place among its key's in-flight requests; ``release`` once."""

    limits: KeyLimits | None
    scope: str
    settings: ApiKeyConfig | None

    def release(self) -> None:
        if self.limits is not None:
            self.limits._release(self.scope)
            self.limits = None

    def may_use(self, account: str) -> bool:
        """Whether the key may draw from ``account`` (its ``accounts``)."""
        allowed = self.settings.accounts if self.settings is not None else None
        return allowed is None or account in allowed

    def barred(self, accounts: Iterable[str]) -> frozenset[str]:
        """The names in ``accounts`` the key may not draw from (not read when it may draw
        from any: a generator costs nothing then)."""
        allowed = self.settings.accounts if self.settings is not None else None
        if allowed is None:
            return frozenset()
        return frozenset(name for name in accounts if name not in allowed)


OPEN = Admission(None, "", None)
"""What a request of a key without limits holds: nothing to release."""


class KeyLimits:
    def __init__(self, keys: ClientKeys, ledger: UsageLedger, shared: SharedState) -> None:
        self.keys = keys
        self.ledger = ledger
        self.shared = shared
        """Counts ``requests_per_minute`` and the in-flight places of the other replicas (S12)."""
        self._inflight: dict[str, int] = {}
        shared.add_gauges(self._gauges)

    async def admit(self, scope: str, model: str | None) -> Admission:
        """Admit a request of ``scope`` for ``model``, or raise the S1.4 error that says why
        not. The caller releases the admission when the request ends."""
        settings = self.keys.check_current(scope)
        if settings is None:
            return OPEN
        if settings.models is not None:
            if model is None:
                raise InvalidRequest("This API key must name a model.", param="model")
            if model not in settings.models:
                raise ModelNotFound(model)
        inflight = settings.max_inflight
        if inflight is not None and self.inflight(scope) >= inflight:
            raise KeyRateLimited(
                f"API key '{scope}' is at its max_inflight of {inflight} requests at once; "
                "retry when one has finished.",
                1,
            )
        if settings.tokens_per_5h is not None or settings.tokens_per_week is not None:
            await self._check_tokens(scope, settings)
        if settings.requests_per_minute is not None:  # last: a refused request counts nothing
            limit = settings.requests_per_minute
            taken = await self.shared.take(_rate_counter(scope), limit=limit, window=RATE_WINDOW)
            if not taken.admitted:
                raise KeyRateLimited(
                    f"API key '{scope}' reached its requests_per_minute of {limit}; "
                    f"retry in {max(1, round(taken.retry_after))} s.",
                    taken.retry_after,
                )
        if settings.max_inflight is None:
            return Admission(None, scope, settings)
        self._inflight[scope] = self._inflight.get(scope, 0) + 1
        self.shared.gauges_changed()
        return Admission(self, scope, settings)

    async def key_usage(self, scope: str) -> dict[str, Any]:
        """The key's limits and current use, as ``GET /v1/usage`` answers (SPEC S9). Times
        are epoch seconds; an absent limit is ``null``. A window's ``resets_at`` is when its
        figure next drops: when it frees enough for a request at its limit, else when its
        oldest counted use leaves it (``null`` when it holds none)."""
        settings = self.keys.settings(scope)
        now = self.ledger.clock()
        windows = await self.ledger.windows(scope)
        limit_5h = settings.tokens_per_5h if settings is not None else None
        limit_week = settings.tokens_per_week if settings is not None else None
        day_start = now // DAY * DAY
        totals = await self.ledger.totals_since(
            scope, {"today": day_start, "7d": now - 7 * DAY, "30d": now - 30 * DAY}
        )
        return {
            "object": "usage",
            "key": scope or None,
            "limits": _limits(settings),
            "windows": {
                "minute": {
                    "requests": await self.shared.used(_rate_counter(scope), window=RATE_WINDOW),
                    "limit": settings.requests_per_minute if settings is not None else None,
                },
                "5h": {
                    "tokens": windows.five_hours,
                    "limit": limit_5h,
                    "resets_at": await self._resets_at(scope, FIVE_HOURS, limit_5h, windows),
                },
                "week": {
                    "tokens": windows.week,
                    "limit": limit_week,
                    "resets_at": await self._resets_at(scope, WEEK, limit_week, windows),
                },
            },
            "totals": {name: found.as_dict() for name, found in totals.items()},
        }

    def inflight(self, scope: str) -> int:
        """The key's requests in flight, in every live replica."""
        return self._inflight.get(scope, 0) + self.shared.elsewhere(_inflight_gauge(scope))

    # -- helpers ----------------------------------------------------------------------------

    async def _check_tokens(self, scope: str, settings: ApiKeyConfig) -> None:
        windows = await self.ledger.windows(scope)
        for name, window, limit, used in (
            ("tokens_per_5h", FIVE_HOURS, settings.tokens_per_5h, windows.five_hours),
            ("tokens_per_week", WEEK, settings.tokens_per_week, windows.week),
        ):
            if limit is None or used < limit:
                continue
            frees = await self.ledger.frees_at(scope, window, limit)
            if frees is None:  # the cached figure was behind: the window has moved on
                continue
            raise KeyUsageLimitReached(
                frees,
                f"API key '{scope}' reached its {name} limit of {limit} tokens "
                f"({used} used); it frees up at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(frees))}.",
                limit_name=f"API key '{scope}' ({name} = {limit})",
                now=self.ledger.clock(),
            )

    async def _resets_at(
        self, scope: str, window: int, limit: int | None, windows: Windows
    ) -> int | None:
        used = windows.five_hours if window == FIVE_HOURS else windows.week
        if limit is not None and used >= limit:
            frees = await self.ledger.frees_at(scope, window, limit)
            if frees is not None:
                return int(frees)
        oldest = await self.ledger.oldest_minute(scope, window)
        return None if oldest is None else oldest + window + MINUTE

    def _gauges(self) -> dict[str, int]:
        return {_inflight_gauge(scope): count for scope, count in self._inflight.items()}

    def _release(self, scope: str) -> None:
        count = self._inflight.get(scope, 0) - 1
        if count > 0:
            self._inflight[scope] = count
        else:
            self._inflight.pop(scope, None)
        self.shared.gauges_changed()


def _rate_counter(scope: str) -> str:
    return f"rpm:{scope}"


def _inflight_gauge(scope: str) -> str:
    return f"inflight:{scope}"


def _limits(settings: ApiKeyConfig | None) -> dict[str, Any]:
    if settings is None:
        return dict.fromkeys(
            (
                "models",
                "accounts",
                "expires_at",
                "requests_per_minute",
                "max_inflight",
                "tokens_per_5h",
                "tokens_per_week",
            )
        )
    return {
        "models": list(settings.models) if settings.models is not None else None,
        "accounts": list(settings.accounts) if settings.accounts is not None else None,
        "expires_at": int(settings.expires_at.timestamp()) if settings.expires_at else None,
        "requests_per_minute": settings.requests_per_minute,
        "max_inflight": settings.max_inflight,
        "tokens_per_5h": settings.tokens_per_5h,
        "tokens_per_week": settings.tokens_per_week,
    }


class UsageView:
    """``GET /v1/usage``: the calling key's own limits and use (``KeyLimits.key_usage``)."""

    def __init__(self, limits: KeyLimits) -> None:
        self._limits = limits

    async def handle(self, request: web.Request) -> web.Response:
        scope = self._limits.keys.scope_for(request.headers.get("Authorization"))
        return web.json_response(await self._limits.key_usage(scope))
