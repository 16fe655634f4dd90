"""Requests a browser was made to send, refused before any handler runs, keys or not.

A web page can make the operator's browser call codexlb on loopback: open a WebSocket (browsers
apply no same-origin rule to those), send a "simple" cross-site POST (``text/plain``, no
preflight), or, through DNS rebinding, reach it under the page's own host name. With no client
keys (the quick start) any of these would run turns on the pool. The middleware refuses, for
HTTP and WebSocket handshakes alike (a handshake before its upgrade):

- an ``Origin`` that is neither listed in ``[server] allowed_origins`` nor the server itself
  (same origin under a host name checked below, or an IP address): 403 ``origin_not_allowed``.
  No ``Origin`` at all is what Codex CLI and the SDKs send, and is fine;
- on a loopback bind, a ``Host`` other than ``localhost``, ``127.0.0.1``, ``[::1]`` or the
  configured host, with any port: 403 ``host_not_allowed``;
- a body that is not declared ``application/json`` (parameters allowed): 415
  ``unsupported_media_type``. 415 rather than S1.4's 400: the body may be fine, the header is
  what to fix, and HTTP has the status for exactly that;
- more than one ``Authorization`` header (``auth.one_authorization``): 400.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from codexlb.auth import one_authorization
from codexlb.config import ServerConfig
from codexlb.errors import Forbidden, UnsupportedMediaType, shown

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
HOSTS_REMEMBERED = 64
"""Good ``Host`` values kept as sent (each with its port): a few per client in practice."""


class RequestGuard:
    def __init__(self, server: ServerConfig) -> None:
        self._origins = frozenset(server.allowed_origins)
        self._own_host = _bracketed(server.host.lower())
        self._hosts = LOOPBACK_NAMES | {self._own_host} if server.is_loopback else None
        """The host names a loopback bind answers to; ``None``: any (a non-loopback bind)."""
        self._hosts_passed: set[str] = set()
        """``Host`` values already found good, as sent: a client repeats one on every request."""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        host = headers.get("Host")
        if host is not None and self._hosts is not None and host not in self._hosts_passed:
            if _name(host) not in self._hosts:
                raise Forbidden(
                    f"Host '{shown(host)}' is not one this server answers to.",
                    code="host_not_allowed",
                )
            if len(self._hosts_passed) < HOSTS_REMEMBERED:
                self._hosts_passed.add(host)
        origin = headers.get("Origin")
        if origin is not None and not self._allows(origin, host):
            raise Forbidden(
                f"Origin '{shown(origin)}' is not allowed; list it in [server] allowed_origins.",
                code="origin_not_allowed",
            )
        if (
            request.body_exists
            and headers.get("Content-Type") != "application/json"  # as clients send it
            and request.content_type != "application/json"
        ):
            raise UnsupportedMediaType(
                "Send the request body as JSON, with 'Content-Type: application/json'."
            )
        one_authorization(headers)
        return await handler(request)

    def _allows(self, origin: str, host: str | None) -> bool:
        origin = origin.lower()
        if origin in self._origins:
            return True
        if host is None or not self._trusted(_name(host)):
            return False
        scheme, _, authority = origin.partition("://")
        return scheme in ("http", "https") and authority == host.lower()

    def _trusted(self, name: str) -> bool:
        """Whether a page served under host ``name`` is this server's own (same origin): a
        name a rebinding page could carry is not, unless the loopback Host check vouched."""
        if self._hosts is not None:
            return True  # already checked against the loopback names
        if name == self._own_host:
            return True
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return True


def _name(host: str) -> str:
    """The host name of a ``Host`` header, without its port, lower case, no final dot."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0].rstrip(".")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
