"""The doors of the other APIs (SPEC S11): ``POST /v1/chat/completions``, ``POST /v1/messages``
and ``POST /v1/messages/count_tokens``.

Thin on purpose: each hands its door (``chat``, ``messages``) and the live ``[models]`` to the
HTTP transport, which runs the translated request like a native one. ``[models]`` is read per
request, so a reload applies it to the next one.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from codexlb.auth import ClientKeys
from codexlb.chat import CHAT_COMPLETIONS
from codexlb.config import ModelsConfig
from codexlb.edge import read_body
from codexlb.http_proxy import HttpProxy
from codexlb.messages import MESSAGES, estimate_tokens


class TranslatedApis:
    def __init__(
        self, proxy: HttpProxy, keys: ClientKeys, models: Callable[[], ModelsConfig]
    ) -> None:
        self.proxy = proxy
        self.keys = keys
        self.models = models

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.translated(request, CHAT_COMPLETIONS, self.models())

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.translated(request, MESSAGES, self.models())

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """An estimate, from the request as it would go upstream: no account is spent."""
        self.keys.scope_for(MESSAGES.authorization(request.headers))
        services = self.proxy.services
        raw = await read_body(request, services.config, services.bodies)
        try:
            tokens = estimate_tokens(raw, self.models())
        finally:
            services.bodies.give(len(raw))
        return web.json_response({"input_tokens": tokens})
