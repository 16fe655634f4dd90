"""The account calls Codex makes on its ``chatgpt_base_url`` (SPEC S13, PROTOCOL §7).

Codex logged in with ChatGPT asks its ``chatgpt_base_url`` about the account: at start
(``accounts/check``), before each turn (``settings/user``), for the status line and the
app-server's ``account/rateLimits/read`` (``usage``, ``rate-limit-reset-credits``), and for
plugins and apps (``ps/plugins/...``, the MCP server at ``ps/mcp``). The path is
``/backend-api/wham/<path>`` when the configured URL holds ``/backend-api``, else
``/api/codex/<path>``; both are served here.

``usage`` answers the view of the pool the client key may use (``signals``) in the schema
Codex parses (``pool_view.usage_payload``), folded with the key's own limits when it has any
(``key_view``). The others answer what lets Codex go on quietly. Nothing here goes upstream:
the client's own token (ChatGPT-login mode) is read by no one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from codexlb import pool_view, signals
from codexlb.auth import ClientKeys

if TYPE_CHECKING:
    from codexlb.app import Services

ACCOUNT_PREFIXES = ("/backend-api/wham", "/api/codex")
PLUGIN_PREFIXES = ("/backend-api/ps", "/api/codex/ps")
DEFAULT_ACCOUNT_ID = "codexlb"
"""The account ``accounts/check`` names when the client sent no ``chatgpt-account-id``."""
MCP_VERSION = "2025-03-26"
MCP_EMPTY_LISTS = {
    "tools/list": "tools",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
    "prompts/list": "prompts",
}
NO_PLUGINS = {"plugins": [], "pagination": {"limit": 0, "next_page_token": None}}


class CodexSurface:
    """The handlers of the account calls; ``add_routes`` wires them."""

    def __init__(self, services: Services, keys: ClientKeys) -> None:
        self.services = services
        self.keys = keys

    def add_routes(self, app: web.Application) -> None:
        for prefix in ACCOUNT_PREFIXES:
            app.router.add_get(f"{prefix}/usage", self.usage)
            app.router.add_get(f"{prefix}/rate-limit-reset-credits", self.reset_credits)
            app.router.add_get(f"{prefix}/accounts/check", self.accounts_check)
            app.router.add_get(f"{prefix}/settings/user", self.user_settings)
        for prefix in PLUGIN_PREFIXES:
            app.router.add_post(f"{prefix}/mcp", self.mcp)
            app.router.add_get(f"{prefix}/plugins/installed", self.no_plugins)
            app.router.add_get(f"{prefix}/plugins/list", self.no_plugins)
            app.router.add_get(f"{prefix}/plugins/suggested/{{surface}}", self.no_plugins)

    async def usage(self, request: web.Request) -> web.Response:
        """``GET .../usage``: the pool's windows, as Codex's ``/wham/usage`` schema."""
        scope = self._scope(request)
        now = time.time()
        shown = signals.current(self.services, scope)
        own = await key_view(self.services, scope)
        if own is not None:
            shown = pool_view.tighter(shown, own)
        return web.json_response(pool_view.usage_payload(shown, now))

    async def reset_credits(self, request: web.Request) -> web.Response:
        """``GET .../rate-limit-reset-credits``: none to offer."""
        self._scope(request)
        return web.json_response({"credits": [], "available_count": 0})

    async def accounts_check(self, request: web.Request) -> web.Response:
        """``GET .../accounts/check``: the caller's account, served by this origin (the TUI
        requires an ``https`` one: ``[server] tls_cert``)."""
        self._scope(request)
        account_id = request.headers.get("chatgpt-account-id") or DEFAULT_ACCOUNT_ID
        entry: dict[str, Any] = {
            "id": account_id,
            "workspace_backend_origin": f"{request.scheme}://{request.host}",
            "account_routing_override": "NO_CONSTRAINT",
        }
        return web.json_response({"accounts": [entry], "default_account_id": account_id})

    async def user_settings(self, request: web.Request) -> web.Response:
        """``GET .../settings/user`` (before each turn)."""
        self._scope(request)
        return web.json_response({"commit_attribution_enabled": False})

    async def no_plugins(self, request: web.Request) -> web.Response:
        """``GET .../ps/plugins/...``: an empty page."""
        self._scope(request)
        return web.json_response(NO_PLUGINS)

    async def mcp(self, request: web.Request) -> web.Response:
        """``POST .../ps/mcp``: the apps' MCP server (streamable HTTP, JSON answers), here one
        that offers nothing, so that Codex's MCP client starts without an error."""
        self._scope(request)
        try:
            message = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            error = {"code": -32700, "message": "Send one JSON-RPC message."}
            return web.json_response({"jsonrpc": "2.0", "id": None, "error": error}, status=400)
        if "id" not in message:  # a notification: nothing to answer
            return web.Response(status=202)
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
        method = message.get("method")
        if method == "initialize":
            params = message.get("params")
            version = params.get("protocolVersion") if isinstance(params, dict) else None
            answer["result"] = {
                "protocolVersion": version if isinstance(version, str) else MCP_VERSION,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "codexlb", "version": "1"},
            }
        elif isinstance(method, str) and method in MCP_EMPTY_LISTS:
            answer["result"] = {MCP_EMPTY_LISTS[method]: []}
        elif method == "ping":
            answer["result"] = {}
        else:
            answer["error"] = {"code": -32601, "message": "Method not found"}
        return web.json_response(answer)

    def _scope(self, request: web.Request) -> str:
        return self.keys.scope_for(request.headers.get("Authorization"))


async def key_view(services: Services, scope: str) -> pool_view.PoolView | None:
    """The client key's own windows (SPEC S9 ``tokens_per_5h``, ``tokens_per_week``) as a view,
    or ``None`` for a key without limits: the one place they fold into what Codex reads of its
    usage."""
    settings = services.limits.keys.settings(scope)
    if settings is None or (settings.tokens_per_5h is None and settings.tokens_per_week is None):
        return None
    return pool_view.key_windows(await services.limits.key_usage(scope))
