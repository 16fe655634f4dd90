"""What a client learns of rate limits describes the pool its key may use (SPEC S13).

The upstream reports each account's usage in the ``x-codex-*`` headers of its answers and
101s and in ``codex.rate_limits`` events; the pool learns them (``Pool.observe_headers``,
``Pool.observe_rate_limits``) and the client gets, in their place, ``pool_view``'s view of the
accounts its key may use. Both transports go through here: ``client_headers`` for HTTP answers
and WebSocket handshakes, ``rate_limits_event`` for the events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from codexlb import pool_view
from codexlb.upstream import relayed_headers

if TYPE_CHECKING:
    from codexlb.app import Services
    from codexlb.pool import Account

FORMATTED_VIEWS = 8
"""Views whose headers are kept formatted (one per set of accounts keys may use, mostly one)."""
DEFAULT_LIMIT_IDS = (None, "codex")
"""A ``codex.rate_limits`` event for these limit ids describes the default windows; an event
for another metered limit (a model's own) passes as the serving account's."""


def accounts_for(services: Services, scope: str) -> list[Account] | None:
    """The accounts the client key ``scope`` may draw from (SPEC S9 ``accounts``); ``None``:
    all of the pool's."""
    settings = services.keys.settings(scope)
    if settings is None or settings.accounts is None:
        return None
    allowed = settings.accounts
    return [account for account in services.pool.accounts if account.name in allowed]


def current(services: Services, scope: str) -> pool_view.PoolView:
    """The view of the pool for ``scope``, now."""
    return services.pool.view(accounts_for(services, scope))


def client_headers(
    services: Services, scope: str, upstream: Mapping[str, str], model: str | None
) -> dict[str, str]:
    """The headers a client gets with an upstream answer (``upstream.relayed_headers``), with
    the pool's rate-limit headers in place of the serving account's."""
    headers = relayed_headers(upstream, model, beside_pool_limits=True)
    headers.update(_pool_headers(current(services, scope)))
    return headers


_formatted: list[tuple[pool_view.PoolView, tuple[tuple[str, str], ...]]] = []


def _pool_headers(view: pool_view.PoolView) -> tuple[tuple[str, str], ...]:
    """``pool_view.headers``, formatted once per view: the pool hands out the same view object
    while nothing it is made of changes (``Pool.view``)."""
    for known, formatted in _formatted:
        if known is view:
            return formatted
    formatted = tuple(pool_view.headers(view).items())
    _formatted[:] = [(view, formatted), *_formatted[: FORMATTED_VIEWS - 1]]
    return formatted


def rate_limits_event(services: Services, scope: str, event: Any) -> str | None:
    """The ``codex.rate_limits`` event the client gets in place of ``event`` (parsed), or
    ``None`` when ``event`` passes as it is (another metered limit, or not an object)."""
    if not isinstance(event, dict):
        return None
    if (event.get("metered_limit_name") or event.get("limit_name")) not in DEFAULT_LIMIT_IDS:
        return None
    view, plan_type = current(services, scope), event.get("plan_type")
    for known, known_plan, formatted in _formatted_events:
        if known is view and known_plan == plan_type:
            return formatted
    formatted = orjson.dumps(pool_view.rate_limits_event(view, plan_type)).decode()
    if isinstance(plan_type, str | None):  # what a cache may hold: not a client's object
        _formatted_events[:] = [
            (view, plan_type, formatted),
            *_formatted_events[: FORMATTED_VIEWS - 1],
        ]
    return formatted


_formatted_events: list[tuple[pool_view.PoolView, str | None, str]] = []
"""``rate_limits_event``'s answers, formatted once per view and plan, as ``_pool_headers``."""
