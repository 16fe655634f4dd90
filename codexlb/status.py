"""The pool status view: ``GET /status`` (JSON) and the table ``codexlb status`` prints.

Both ends of the document live here, so its shape has one owner::

    {"time": "...Z", "strategy": "least_used",
     "accounts": [{"name", "kind", "enabled", "usable", "state", "removed",
                   "cooldown_until", "usage": {"primary": {"used_percent", "resets_at"},
                                               "secondary": {...}},
                   "inflight", "weight", "max_inflight", "last_error"}, ...]}

Times are ISO 8601 UTC strings or null. ``state`` is ``pool.AccountState``: ``draining`` for
an account removed from the configuration that still carries requests (``removed``).
The document is built from names, numbers and states only: it has no field a credential could
reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from codexlb.auth import AdminAccess
from codexlb.pool import Account, Pool, UsageWindow

COLUMNS = (
    "ACCOUNT",
    "KIND",
    "STATE",
    "INFLIGHT",
    "WEIGHT",
    "PRIMARY",
    "SECONDARY",
    "COOLDOWN UNTIL",
    "LAST ERROR",
)


class StatusView:
    """``GET /status``, an operator view (``auth.AdminAccess``)."""

    def __init__(self, pool: Pool, admin: AdminAccess) -> None:
        self._pool = pool
        self._admin = admin

    async def handle(self, request: web.Request) -> web.Response:
        self._admin.check_view(request.headers.get("Authorization"))
        return web.json_response(pool_status(self._pool), headers={"Cache-Control": "no-store"})


def pool_status(pool: Pool) -> dict[str, Any]:
    now = pool.now()
    accounts = [account_status(a, now) for a in [*pool.accounts, *pool.draining]]
    return {"time": _iso(now), "strategy": pool.routing.strategy, "accounts": accounts}


def account_status(account: Account, now: float) -> dict[str, Any]:
    return {
        "name": account.name,
        "kind": account.kind,
        "enabled": account.config.enabled,
        "usable": account.usable,
        "state": account.state(now),
        "removed": account.removed,
        "cooldown_until": _iso(account.cooldown_until) if account.cooldown_until > now else None,
        "usage": {"primary": _window(account.primary), "secondary": _window(account.secondary)},
        "inflight": account.inflight,
        "weight": account.config.weight,
        "max_inflight": account.config.max_inflight,
        "last_error": account.last_error,
    }


def render_table(status: Mapping[str, Any]) -> str:
    """The status document as the text table ``codexlb status`` prints."""
    rows = [_row(account) for account in status.get("accounts", [])]
    lines = [_line(COLUMNS, rows), *(_line(row, rows) for row in rows)]
    if not rows:
        lines.append("(no accounts)")
    lines.append(f"strategy {status.get('strategy', '?')}, as of {status.get('time', '?')}")
    return "\n".join(lines)


def _row(account: Mapping[str, Any]) -> tuple[str, ...]:
    usage = account.get("usage") or {}
    limit = account.get("max_inflight") or 0
    return (
        str(account.get("name")),
        str(account.get("kind")),
        str(account.get("state")),
        f"{account.get('inflight', 0)}/{limit or '-'}",
        f"{account.get('weight', 1):g}",
        _usage_cell(usage.get("primary")),
        _usage_cell(usage.get("secondary")),
        account.get("cooldown_until") or "-",
        account.get("last_error") or "-",
    )


def _line(cells: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(COLUMNS[i]), *(len(r[i]) for r in rows)]) for i in range(len(COLUMNS))]
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def _usage_cell(window: Mapping[str, Any] | None) -> str:
    if not window:
        return "-"
    cell = f"{window.get('used_percent', 0):g}%"
    if window.get("resets_at"):
        cell += f" (resets {window['resets_at']})"
    return cell


def _window(window: UsageWindow) -> dict[str, Any]:
    return {
        "used_percent": window.used_percent,
        "resets_at": _iso(window.resets_at) if window.resets_at > 0 else None,
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
