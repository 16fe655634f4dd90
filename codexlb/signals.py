"""What a client learns of rate limits describes the pool its key may use (SPEC S13).

The upstream reports each account's usage in the ``x-codex-*`` headers of its answers and
101s and in ``codex.rate_limits`` events; the pool learns them (``Pool.observe_headers``,
``Pool.observe_rate_limits``) and the client gets, in their place, ``pool_view``'s view of the
accounts its key may use. Both transports go through here: ``client_headers`` for HTTP answers
and WebSocket handshakes, ``rate_limits_event`` for the events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson

from codexlb import pool_view
from codexlb.upstream import relayed_headers

if TYPE_CHECKING:
    from codexlb.app import Services
    from codexlb.pool import Account

FORMATTED = 16
"""Formatted answers kept (``_once_per_view``): per view, one per set of accounts keys may use
and mostly one, its headers and its event for each plan type."""
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


def _pool_headers(view: pool_view.PoolView) -> tuple[tuple[str, str], ...]:
    return _once_per_view(view, None, lambda: tuple(pool_view.headers(view).items()))


def rate_limits_event(services: Services, scope: str, event: Any) -> str | None:
    """The ``codex.rate_limits`` event the client gets in place of ``event`` (parsed), or
    ``None`` when ``event`` passes as it is (another metered limit, or not an object)."""
    if not isinstance(event, dict):
        return None
    if (event.get("metered_limit_name") or event.get("limit_name")) not in DEFAULT_LIMIT_IDS:
        return None
    view, plan_type = current(services, scope), event.get("plan_type")

    def formatted() -> str:
        return orjson.dumps(pool_view.rate_limits_event(view, plan_type)).decode()

    if not isinstance(plan_type, str | None):  # what a cache may hold: not the upstream's object
        return formatted()
    return _once_per_view(view, ("event", plan_type), formatted)


T = TypeVar("T")

_formatted: list[tuple[pool_view.PoolView, object, Any]] = []


def _once_per_view(view: pool_view.PoolView, what: object, format_it: Callable[[], T]) -> T:
    """``format_it()`` for ``view``, made once per view and ``what``: the pool hands out the same
    view object while nothing it is made of changes (``Pool.view``)."""
    for known, known_what, formatted in _formatted:
        if known is view and known_what == what:
            return cast(T, formatted)
    formatted = format_it()
    _formatted[:] = [(view, what, formatted), *_formatted[: FORMATTED - 1]]
    return formatted
