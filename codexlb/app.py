"""``create_app(config)``: every resource, route and middleware is wired here.

The services are built here (nothing connects yet) and stored under typed ``web.AppKey``s;
each resource's life is one cleanup context: the database (migrations, then the snapshot
store's writer), the upstream client session, the background pruning task, and, when the app
knows its configuration file, the task that reloads it (``reload.Reloader``). Nothing is
created at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb import db
from codexlb.auth import AdminAccess, ClientKeys
from codexlb.catalog import ModelCatalog
from codexlb.codex_surface import CodexSurface
from codexlb.config import Config, ModelsConfig
from codexlb.credential_store import CredentialStore
from codexlb.dashboard import Dashboard
from codexlb.edge import BodyBudget, EdgeRunner
from codexlb.errors import CodexLBError, InvalidRequest, NotFound
from codexlb.guard import RequestGuard
from codexlb.http_proxy import HttpProxy
from codexlb.limits import KeyLimits, UsageView
from codexlb.metrics import CONTENT_TYPE, Metrics
from codexlb.pool import Pool
from codexlb.refresh import CredentialManager
from codexlb.reload import WATCH_INTERVAL_SECONDS, Reloader
from codexlb.shared import LocalState, SharedState, shared_state
from codexlb.status import StatusView
from codexlb.store import SnapshotStore
from codexlb.stored import StoredResponses
from codexlb.translated import TranslatedApis
from codexlb.upstream import Upstream
from codexlb.usage import UsageLedger
from codexlb.ws_proxy import WsProxy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """The app's shared resources, built once by ``create_app``: what an exchange, a
    transport or a view may use."""

    config: Config
    pool: Pool
    store: SnapshotStore
    upstream: Upstream
    credentials: CredentialManager
    keys: ClientKeys
    ledger: UsageLedger
    """What each client key used (S9), durably."""
    limits: KeyLimits = field(init=False)
    """What each client key may use, checked before anything goes upstream (S9)."""
    shared: SharedState = field(default_factory=LocalState)
    """What the replicas share (S12): in memory with SQLite, PostgreSQL's tables and NOTIFY."""
    metrics: Metrics = field(init=False)
    bodies: BodyBudget = field(init=False)
    """Request bodies and WebSocket messages held at once (``[limits]``)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "metrics", Metrics(lambda: [*self.pool.accounts, *self.pool.draining])
        )
        object.__setattr__(self, "bodies", BodyBudget(self.config.limits.max_body_bytes_in_flight))
        object.__setattr__(self, "limits", KeyLimits(self.keys, self.ledger, self.shared))


SERVICES = web.AppKey("services", Services)
ENGINE = web.AppKey("engine", AsyncEngine)
RELOADER = web.AppKey("reloader", Reloader)
ADMIN = web.AppKey("admin", AdminAccess)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    config: Config,
    config_path: Path | None = None,
    *,
    watch_interval: float = WATCH_INTERVAL_SECONDS,
) -> web.Application:
    """The application for ``config``.

    With ``config_path`` (the file ``config`` was loaded from) the app reloads it live (S6):
    ``app[RELOADER].request()`` asks for a reload, and the file is polled every
    ``watch_interval`` seconds.
    """
    app = web.Application(
        middlewares=[_openai_errors, RequestGuard(config.server).middleware],
        client_max_size=config.limits.max_body_bytes,
    )
    engine = db.create_engine(config.database.url)
    credentials = CredentialManager(config, store=CredentialStore(engine))
    ledger = UsageLedger(engine)
    pool = Pool(config, credentials)
    services = Services(
        keys=ClientKeys(config.api_keys, clock=lambda: ledger.clock()),
        ledger=ledger,
        config=config,
        pool=pool,
        credentials=credentials,
        shared=shared_state(engine, pool, config.database, clock=lambda: ledger.clock()),
        store=SnapshotStore(engine),
        upstream=Upstream(
            config.timeouts, websocket_compression=config.upstream.websocket_compression
        ),
    )
    app[SERVICES] = services
    app[ENGINE] = engine
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_credentials)  # after both: closed before the session and engine
    app.cleanup_ctx.append(_replicas)
    app.cleanup_ctx.append(_background("codexlb-prune", _prune_forever))
    if config_path is not None:
        app[RELOADER] = Reloader(
            config_path,
            config,
            services.pool,
            services.credentials,
            interval=watch_interval,
            keys=services.keys,
        )
        app.cleanup_ctx.append(_background("codexlb-config-watch", _watch_config))

    keys = services.keys
    admin = AdminAccess(config.admin, keys, loopback=config.server.is_loopback)
    app[ADMIN] = admin
    proxy = HttpProxy(services, keys)
    websockets = WsProxy(services, keys)
    app.on_shutdown.append(websockets.shutdown)
    started = config

    def models() -> ModelsConfig:  # [models] as last (re)loaded (S11)
        reloader = app.get(RELOADER)
        return (reloader.config if reloader is not None else started).models

    catalog = ModelCatalog(services, keys, models)
    for prefix in ("/backend-api/codex", "/v1"):
        app.router.add_post(f"{prefix}/responses", proxy.create_response)
        app.router.add_get(f"{prefix}/responses", websockets.handle)
        app.router.add_post(f"{prefix}/responses/compact", proxy.compact)
        app.router.add_get(f"{prefix}/models", catalog.handle)
    translated = TranslatedApis(proxy, keys, models)
    app.router.add_post("/v1/chat/completions", translated.chat_completions)
    app.router.add_post("/v1/messages", translated.messages)
    app.router.add_post("/v1/messages/count_tokens", translated.count_tokens)
    CodexSurface(services, keys).add_routes(app)
    app.router.add_get("/v1/responses/{response_id}", StoredResponses(services.store, keys).handle)
    app.router.add_get("/status", StatusView(services.pool, admin).handle)
    app.router.add_get("/v1/usage", UsageView(services.limits).handle)
    Dashboard(services.pool, services.metrics.activity, admin, services.limits).add_routes(
        app.router
    )
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    # Registered last: they take what no route above does under the two prefixes (S13).
    for prefix in ("/backend-api/codex", "/v1"):
        app.router.add_route("*", prefix + "/{tail:.+}", proxy.side_call)
    return app


def make_runner(
    config: Config,
    *,
    config_path: Path | None = None,
    shutdown_timeout: float = 30.0,
    watch_interval: float = WATCH_INTERVAL_SECONDS,
) -> web.AppRunner:
    """The runner for ``create_app(config, config_path)``, with the client-facing limits of
    ``edge`` (connection cap, request-head and keep-alive timeouts).

    Handler cancellation is on: a client that disconnects cancels the handler, which closes
    the upstream request it owns and releases its account lease (SPEC S8).
    """
    return EdgeRunner(
        create_app(config, config_path, watch_interval=watch_interval),
        config,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
    )


async def _database(app: web.Application) -> AsyncIterator[None]:
    engine, store = app[ENGINE], app[SERVICES].store
    try:
        await db.upgrade(engine)
        await store.start()
        try:
            await app[SERVICES].ledger.start()
            try:
                yield
            finally:
                await app[SERVICES].ledger.close()
        finally:
            await store.close()
    finally:
        await engine.dispose()


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    await app[SERVICES].upstream.start()
    try:
        yield
    finally:
        await app[SERVICES].upstream.close()


async def _credentials(app: web.Application) -> AsyncIterator[None]:
    """Token refresh (S5): rotated tokens from the database, the app's client session."""
    services = app[SERVICES]
    await services.credentials.start(services.upstream.session)
    try:
        yield
    finally:
        await services.credentials.close()


async def _replicas(app: web.Application) -> AsyncIterator[None]:
    """What the replicas share (S12), read before serving, once credentials are loaded."""
    shared = app[SERVICES].shared
    await shared.start()
    try:
        yield
    finally:
        await shared.close()


def _background(
    name: str, work: Callable[[web.Application], Coroutine[Any, Any, None]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs ``work(app)`` as a named task, cancelled and awaited at
    shutdown."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(work(app), name=name)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return context


async def _watch_config(app: web.Application) -> None:
    await app[RELOADER].run()


async def _prune_forever(app: web.Application) -> None:
    settings = app[SERVICES].config.snapshots
    while True:
        cutoff = datetime.now(UTC) - timedelta(days=settings.retention_days)
        try:
            deleted = await app[SERVICES].store.prune(cutoff, settings.prune_batch_size)
        except Exception:
            log.exception("pruning snapshots failed; will try again")
        else:
            if deleted:
                log.info("pruned %d snapshots older than %s", deleted, cutoff.isoformat())
        await asyncio.sleep(settings.prune_interval_seconds)


async def _metrics(request: web.Request) -> web.Response:
    request.app[ADMIN].check_metrics(request.headers.get("Authorization"))
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    app = request.app
    problems: list[str] = []
    try:
        await app[SERVICES].store.ping()
    except Exception as exc:
        problems.append(f"database unreachable: {type(exc).__name__}")
    if not any(a.config.enabled and a.usable for a in app[SERVICES].pool.accounts):
        problems.append("no usable upstream account")
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error a client can see in the OpenAI shape (SPEC S1.4); in Anthropic's
    under ``/v1/messages`` (S11)."""
    try:
        return await handler(request)
    except CodexLBError as exc:
        return _error_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            error: CodexLBError = NotFound(f"Unknown path: {request.path}")
        else:
            error = InvalidRequest(exc.reason)
            error.status = exc.status
        return _error_response(error, request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(CodexLBError("Internal error in codexlb."), request)


def _error_response(error: CodexLBError, request: web.Request) -> web.Response:
    path = request.path
    anthropic = path == "/v1/messages" or path.startswith("/v1/messages/")
    return web.Response(
        status=error.status,
        body=error.anthropic_body() if anthropic else error.body(),
        content_type="application/json",
        headers=error.headers(),
    )
