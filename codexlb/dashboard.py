"""The operator dashboard (S10): ``GET /dashboard`` and the JSON it reads under ``/admin/``.

The page is three static files shipped in the package (``codexlb/web/``): no CDN, no build
step, nothing fetched from anywhere but codexlb. It reads

- ``GET /admin/overview``: the pool (the ``/status`` document, each account with its attempts
  and failed attempts over the last hour), the client keys' usage and limits, and the last
  hour minute by minute (``activity.Activity``);
- ``GET /admin/requests?key=&account=&status=&limit=``: the most recent requests.

Both take the admin key as a bearer token or a session cookie. ``POST /admin/login`` (JSON
``{"key": ...}``) checks the admin key and opens a server-side session: a random id in an
``HttpOnly``, ``SameSite=Strict`` cookie, kept ``SESSION_SECONDS``; ``POST /admin/logout``
ends it. Against cross-site requests: the cookie is ``SameSite=Strict``, and a POST here must
carry an ``Origin`` that is this server's own (``guard.RequestGuard`` has already refused
foreign ones; here a missing one or an allowed third-party one is refused too), with a JSON
body (no HTML form can send one cross-site without a preflight codexlb never answers).

A wrong admin key (at login or as a bearer token here) counts against the client's address:
``LOGIN_FAILURES`` within ``LOGIN_WINDOW_SECONDS`` and the address is refused with 429 and
``Retry-After`` until the oldest failure leaves the window. Behind a reverse proxy every client
shares the proxy's address.

Every field is a name, a number, a state or a time: no token, no client key, no admin key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web

from codexlb.activity import RECENT_REQUESTS, Activity
from codexlb.auth import AdminAccess
from codexlb.errors import (
    CodexLBError,
    Forbidden,
    InvalidApiKey,
    InvalidRequest,
    RequestTimeout,
)
from codexlb.limits import KeyLimits
from codexlb.logs import Throttled
from codexlb.pool import Pool
from codexlb.status import pool_status

log = logging.getLogger(__name__)

COOKIE = "codexlb_session"
SESSION_SECONDS = 12 * 3600
SESSIONS_CAP = 256
"""Sessions held at once; the oldest is ended to make room."""
LOGIN_FAILURES = 5
LOGIN_WINDOW_SECONDS = 60.0
ADDRESSES_CAP = 4096
"""Client addresses whose failures are remembered; the oldest is forgotten to make room."""
LOGIN_BODY_BYTES = 4096
LOGIN_BODY_SECONDS = 10.0
ASSETS = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class TooManyLogins(CodexLBError):
    """429 for an address with too many wrong admin keys of late (S1.4's shape)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, retry_after: float) -> None:
        super().__init__("Too many wrong admin keys from this address; try again later.")
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Sessions:
    """Server-side dashboard sessions: random ids, each valid until its expiry or logout.
    Ids are kept as SHA-256 digests, so not even this process's memory holds a usable one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def open(self) -> str:
        while len(self._expiry) >= SESSIONS_CAP:
            self._expiry.popitem(last=False)
        session = secrets.token_urlsafe(32)
        self._expiry[_digest(session)] = self._clock() + SESSION_SECONDS
        return session

    def valid(self, session: str | None) -> bool:
        if not session:
            return False
        digest = _digest(session)
        expiry = self._expiry.get(digest)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[digest]
            return False
        return True

    def close(self, session: str | None) -> None:
        if session:
            self._expiry.pop(_digest(session), None)


class LoginLimiter:
    """Wrong admin keys per client address, within a sliding window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        self._refused = Throttled(log, logging.WARNING)

    def check(self, address: str) -> None:
        """Raise ``TooManyLogins`` while ``address`` is over the limit."""
        failures = self._recent(address)
        if failures is not None and len(failures) >= LOGIN_FAILURES:
            raise TooManyLogins(failures[0] + LOGIN_WINDOW_SECONDS - self._clock())

    def failed(self, address: str) -> None:
        failures = self._recent(address)
        if failures is None:
            while len(self._failures) >= ADDRESSES_CAP:
                self._failures.popitem(last=False)
            failures = self._failures[address] = collections.deque(maxlen=LOGIN_FAILURES)
        failures.append(self._clock())
        self._failures.move_to_end(address)
        self._refused("wrong admin key from %s", address)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _recent(self, address: str) -> collections.deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        cutoff = self._clock() - LOGIN_WINDOW_SECONDS
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures


async def key_panel(activity: Activity, limits: KeyLimits) -> list[dict[str, Any]]:
    """The client keys panel: per key name (the configured ones, as reloaded, and any seen),
    requests and tokens today and over seven days, and its limits, each
    ``{"name", "used", "limit", "resets_at"}`` (SPEC S9, as ``GET /v1/usage`` counts them)."""
    usage = activity.key_usage(limits.keys.names())
    return [
        {"name": name, **counts, "limits": await _key_limits(limits, name)}
        for name, counts in usage.items()
    ]


async def _key_limits(limits: KeyLimits, name: str) -> list[dict[str, Any]]:
    settings = limits.keys.settings(name)
    if settings is None or not settings.limited:
        return []
    windows = (await limits.key_usage(name))["windows"]
    shown = [
        ("requests_per_minute", windows["minute"]["requests"], settings.requests_per_minute, None),
        ("max_inflight", limits.inflight(name), settings.max_inflight, None),
        ("tokens_per_5h", windows["5h"]["tokens"], settings.tokens_per_5h, windows["5h"]),
        ("tokens_per_week", windows["week"]["tokens"], settings.tokens_per_week, windows["week"]),
    ]
    return [
        {
            "name": limit_name,
            "used": used,
            "limit": limit,
            "resets_at": window.get("resets_at") if window else None,
        }
        for limit_name, used, limit, window in shown
        if limit is not None
    ]


class Dashboard:
    def __init__(
        self,
        pool: Pool,
        activity: Activity,
        admin: AdminAccess,
        limits: KeyLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._activity = activity
        self._admin = admin
        self._limits = limits
        self.sessions = Sessions(clock)
        self.logins = LoginLimiter(clock)
        package = resources.files("codexlb") / "web"
        self._assets = {
            path: (package.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in ASSETS.items()
        }

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for path in ASSETS:
            router.add_get(path, self.asset)
        router.add_post("/admin/login", self.login)
        router.add_post("/admin/logout", self.logout)
        router.add_get("/admin/overview", self.overview)
        router.add_get("/admin/requests", self.requests)

    # --- the page ---------------------------------------------------------------------------

    async def asset(self, request: web.Request) -> web.Response:
        """The page and its files: no data in them, so they are served to anyone who could
        log in (not when no admin key is configured and access is not open: S10's 403)."""
        with contextlib.suppress(InvalidApiKey):  # the page's login form asks for it
            self._admin.check_view(None)
        body, content_type = self._assets[request.path]
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS
        )

    # --- sessions ---------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        _same_origin(request)
        address = request.remote or "?"
        self.logins.check(address)
        key = await _login_key(request)
        try:
            self._admin.check_view(f"Bearer {key}")
        except InvalidApiKey:
            self.logins.failed(address)
            raise
        self.logins.succeeded(address)
        response = web.json_response({"authenticated": True}, headers=JSON_HEADERS)
        response.set_cookie(
            COOKIE,
            self.sessions.open(),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        _same_origin(request)
        self.sessions.close(request.cookies.get(COOKIE))
        response = web.json_response({"authenticated": False}, headers=JSON_HEADERS)
        response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
        return response

    # --- data -------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        self._authorize(request)
        status = pool_status(self._pool)
        hour = self._activity.account_hour()
        for account in status["accounts"]:
            attempts, failed = hour.get(account["name"], (0, 0))
            account["hour"] = {"requests": attempts, "errors": failed}
        status["keys"] = await key_panel(self._activity, self._limits)
        status["minutes"] = self._activity.hour()
        return web.json_response(status, headers=JSON_HEADERS)

    async def requests(self, request: web.Request) -> web.Response:
        self._authorize(request)
        query = request.query
        try:
            limit = int(query.get("limit", "200"))
        except ValueError:
            raise InvalidRequest("'limit' must be a number.", param="limit") from None
        limit = min(max(limit, 1), RECENT_REQUESTS)
        found = self._activity.recent(
            key=query.get("key"),
            account=query.get("account"),
            status=query.get("status"),
            limit=limit,
        )
        body = {
            "requests": [finished.as_json() for finished in found],
            "choices": self._activity.recent_names(),
        }
        return web.json_response(body, headers=JSON_HEADERS)

    def _authorize(self, request: web.Request) -> None:
        """A live session, or the admin key as a bearer token (counted when wrong)."""
        if self.sessions.valid(request.cookies.get(COOKIE)):
            return
        authorization = request.headers.get("Authorization")
        address = request.remote or "?"
        if authorization:
            self.logins.check(address)
        try:
            self._admin.check_view(authorization)
        except InvalidApiKey:
            if authorization:
                self.logins.failed(address)
            raise


def _same_origin(request: web.Request) -> None:
    """Refuse a POST whose ``Origin`` is missing or not this server (compared by host and
    port, like ``guard.RequestGuard``: behind a TLS proxy the page is https, codexlb http)."""
    origin = (request.headers.get("Origin") or "").lower()
    host = (request.headers.get("Host") or "").lower()
    scheme, _, authority = origin.partition("://")
    if not host or scheme not in ("http", "https") or authority != host:
        raise Forbidden(
            "Log in and out from the dashboard page itself (this request's Origin is not it).",
            code="origin_not_allowed",
        )


async def _login_key(request: web.Request) -> str:
    if request.content_length is not None and request.content_length > LOGIN_BODY_BYTES:
        raise InvalidRequest("The login body is too large.")
    raw = b""
    try:
        async with asyncio.timeout(LOGIN_BODY_SECONDS):
            while len(raw) <= LOGIN_BODY_BYTES:
                chunk = await request.content.read(LOGIN_BODY_BYTES + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
    except TimeoutError:
        raise RequestTimeout("The login body did not arrive in time.") from None
    if len(raw) > LOGIN_BODY_BYTES:
        raise InvalidRequest("The login body is too large.")
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest('Send {"key": "<admin key>"} as JSON.') from None
    key = body.get("key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise InvalidRequest('Send {"key": "<admin key>"} as JSON.', param="key")
    return key.strip()


def _digest(session: str) -> bytes:
    return hashlib.sha256(session.encode("utf-8", "surrogateescape")).digest()
