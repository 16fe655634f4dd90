"""The model catalog: ``GET /backend-api/codex/models`` and ``GET /v1/models``.

Fetched from an available account with the one query parameter Codex sends,
``client_version`` (any other is dropped: a client cannot make codexlb fetch and keep a catalog
per invented query string), cached briefly per path and version in a bounded LRU cache
(``CACHE_ENTRIES``), and served with the upstream's
``ETag`` (or one computed from the body) so Codex's ``If-None-Match`` gets a 304. Codex
re-fetches whenever a response's ``x-models-etag`` differs from what it has.

``GET /v1/models`` without ``client_version`` is an SDK's (OpenAI's or Anthropic's), not
Codex's: it is answered with the list those read, naming the upstream's models and the
``[models]`` aliases (S11), from the same cached catalog.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web

from codexlb.auth import ClientKeys
from codexlb.config import ModelsConfig
from codexlb.errors import UpstreamUnavailable
from codexlb.model_names import catalog_slugs, client_names, model_list
from codexlb.pool import Account

if TYPE_CHECKING:
    from codexlb.app import Services

log = logging.getLogger(__name__)

CACHE_SECONDS = 60.0
MAX_CATALOG_BYTES = 8 * 1024 * 1024
CACHE_ENTRIES = 32
"""Catalogs kept (per path and ``client_version``); the least recently used goes first."""
MAX_VERSION_LENGTH = 64


@dataclass(frozen=True, slots=True)
class _Entry:
    body: bytes
    etag: str
    content_type: str
    expires: float


class ModelCatalog:
    def __init__(
        self, services: Services, keys: ClientKeys, models: Callable[[], ModelsConfig]
    ) -> None:
        self.services = services
        self.keys = keys
        self.models = models
        self._cache: OrderedDict[str, _Entry] = OrderedDict()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        scope = self.keys.scope_for(request.headers.get("Authorization"))
        query = _upstream_query(request)
        key = f"{request.path}?{query}"
        entry = self._cache.get(key)
        if entry is None or entry.expires <= time.monotonic():
            entry = await self._fetch(query, self._barred(scope))
            self._cache[key] = entry
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        if request.path == "/v1/models" and not query:
            return web.json_response(self._model_list(entry))
        if request.headers.get("If-None-Match") == entry.etag:
            return web.Response(status=304, headers={"ETag": entry.etag})
        return web.Response(
            body=entry.body, headers={"ETag": entry.etag, "Content-Type": entry.content_type}
        )

    def _model_list(self, entry: _Entry) -> dict[str, object]:
        try:
            catalog = orjson.loads(entry.body)
        except orjson.JSONDecodeError:
            catalog = None
        return model_list(client_names(self.models(), catalog_slugs(catalog)))

    def _barred(self, scope: str) -> set[str]:
        """The accounts the key may not draw from (its ``accounts``): not asked for it."""
        settings = self.keys.settings(scope)
        allowed = settings.accounts if settings is not None else None
        if allowed is None:
            return set()
        return {a.name for a in self.services.pool.accounts if a.name not in allowed}

    async def _fetch(self, query: str, barred: set[str]) -> _Entry:
        pool = self.services.pool
        tried: set[str] = set(barred)
        for _ in range(pool.routing.max_attempts):
            account = pool.choose(prefer=None, affinity_key=None, exclude=tried)
            if account is None:
                break
            tried.add(account.name)
            entry = await self._fetch_from(account, query)
            if entry is not None:
                return entry
        raise UpstreamUnavailable("No upstream account could serve the model catalog.")

    async def _fetch_from(self, account: Account, query: str) -> _Entry | None:
        url = f"{account.base_url}/models" + (f"?{query}" if query else "")
        timeout = aiohttp.ClientTimeout(total=self.services.config.timeouts.first_byte_seconds)
        try:
            async with self.services.upstream.session.get(
                url, headers=account.credentials.auth_headers(), timeout=timeout
            ) as response:
                body = await response.content.read(MAX_CATALOG_BYTES)
                if response.status != 200:
                    log.warning(
                        "account %s: models answered HTTP %d", account.name, response.status
                    )
                    if response.status == 401:
                        self.services.pool.unauthorized(account)
                    elif response.status == 429:
                        self.services.pool.rate_limited(
                            account, headers=response.headers, error=None
                        )
                    return None
                self.services.pool.observe_headers(account, response.headers)
                etag = response.headers.get("ETag") or _etag(body)
                content_type = response.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("account %s: models request failed: %s", account.name, type(exc).__name__)
            return None
        return _Entry(body, etag, content_type, time.monotonic() + CACHE_SECONDS)


def _upstream_query(request: web.Request) -> str:
    """The query string sent upstream: ``client_version`` alone, when the client gave one."""
    version = request.query.get("client_version")
    if version is None:
        return ""
    return urlencode({"client_version": version[:MAX_VERSION_LENGTH]})


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
