"""Live configuration (SPEC S6): the TOML file is read again on SIGHUP and when it changes.

One ``Reloader`` per served file. Its ``run`` task (owned by the app's cleanup context) is the
only code that reloads, so reloads never overlap: ``request`` (the SIGHUP handler) only wakes
it. The file is watched by polling its signature (mtime, size, inode, device) about once a
second, which also sees an editor's save-by-rename; a change is loaded once the signature has
held still for a moment, so a half-written file is not read.

What a reload changes at once:

- the accounts' credentials and ``[upstream].token_url`` (``CredentialManager.reconfigure``,
  first: the pool's accounts read the manager's records);
- the accounts (``Pool.reconfigure``: added, removed, enabled, weight, max_inflight, base URL,
  credentials), including ``[upstream].base_url`` as the accounts' default;
- ``[routing]`` (``Pool.routing``);
- the client keys and their settings (``ClientKeys.reconfigure``): keys added and removed,
  limits changed; a removed key's requests already running finish;
- ``[logging].level``;
- ``[models]`` (the translated APIs read it per request from ``Reloader.config``).

Everything else was wired into a resource at start (the listening socket, the database engine,
the admin key, the upstream session's timeouts, the body limit, the pruning task, the log
format) and keeps its running value; a reload that changes it says so in one warning line.

A file that does not load (unreadable, bad TOML, a validation error) is rejected as a whole with
one error line naming the file and the key paths; the running configuration stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from codexlb.auth import ClientKeys
from codexlb.config import Config, ConfigError, load_config
from codexlb.pool import Pool
from codexlb.refresh import CredentialManager

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 1.0
SETTLE_SECONDS = 0.1
"""How long a changed file's signature must hold before it is read."""

RESTART_ONLY = (
    "server",
    "database",
    "admin",
    "upstream.websocket_compression",
    "timeouts",
    "limits",
    "snapshots",
    "logging.format",
)
"""Settings a reload cannot apply (dotted paths into ``Config``)."""

Signature = tuple[int, int, int, int] | None


class Reloader:
    """Reloads ``path`` into ``credentials`` and ``pool``: on ``request()`` and when the file
    changes."""

    def __init__(
        self,
        path: Path,
        config: Config,
        pool: Pool,
        credentials: CredentialManager,
        *,
        interval: float = WATCH_INTERVAL_SECONDS,
        keys: ClientKeys | None = None,
    ) -> None:
        self.path = path
        self._keys = keys
        self._started = config
        self._config = config
        self._pool = pool
        self._credentials = credentials
        self._interval = interval
        self._signature = _signature(path)
        self._requested = asyncio.Event()
        self._reason = ""
        self._done = asyncio.Event()
        self.generation = 0
        """Reloads attempted so far (applied or rejected)."""

    @property
    def config(self) -> Config:
        """The configuration last loaded successfully (the one at start until then).

        Its restart-only settings may differ from the running ones; see ``RESTART_ONLY``.
        """
        return self._config

    def request(self, reason: str = "SIGHUP") -> None:
        """Ask ``run`` for a reload now, whether or not the file looks changed.

        Only sets an event, so it is safe as a ``loop.add_signal_handler`` callback.
        """
        self._reason = reason
        self._requested.set()

    async def wait_generation(self, generation: int) -> None:
        """Return once ``generation`` reloads have been attempted."""
        while self.generation < generation:
            await self._done.wait()

    async def run(self) -> None:
        """Watch the file and serve ``request``s until cancelled; a bug in one reload is
        logged and the watch goes on."""
        while True:
            try:
                await self._next()
            except Exception:
                log.exception("configuration reload of %s failed", self.path)
                await asyncio.sleep(self._interval)

    async def reload(self, reason: str) -> bool:
        """Load the file and apply it; returns whether it was applied.

        Failures are logged, never raised: the running configuration stays.
        """
        signature = _signature(self.path)  # before reading: a later write is seen as a change
        try:
            config = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            prefix = f"{self.path}: "
            problems = "; ".join(line.removeprefix(prefix) for line in str(exc).splitlines())
            log.error(
                "configuration reload rejected, still serving the previous one: %s: %s",
                self.path,
                problems,
            )
            applied = False
        else:
            applied = self._keeps_keys(config)
            if applied:
                await self._apply(config, reason)
        self._signature = signature
        self.generation += 1
        self._done.set()
        self._done = asyncio.Event()
        return applied

    def _keeps_keys(self, config: Config) -> bool:
        """Whether ``config`` may serve: a reload that removes every client key would open
        access, which a non-loopback bind allows only with ``allow_open_access``."""
        server = self._started.server
        if config.api_keys or server.is_loopback or server.allow_open_access:
            return True
        log.error(
            "configuration reload rejected, still serving the previous one: %s: it has no "
            "[[api_keys]], which would open access on %s; set [server] allow_open_access "
            "(takes a restart) to allow it",
            self.path,
            server.host,
        )
        return False

    async def _apply(self, config: Config, reason: str) -> None:
        try:
            await self._credentials.reconfigure(config)
        except Exception:  # its records are in place; only the database's tokens are missing
            log.exception("the credential manager failed to apply the reloaded configuration")
        changes = self._pool.reconfigure(config)
        if self._keys is not None:
            self._keys.reconfigure(config.api_keys)
        if config.logging.level != self._config.logging.level:
            logging.getLogger().setLevel(config.logging.level)
        if config.models != self._config.models:
            log.info("[models] changed: the next requests use the new aliases and default")
        self._config = config
        log.info("configuration reloaded from %s (%s): %s", self.path, reason, changes.describe())
        pending = restart_only_changes(self._started, config)
        if pending:
            log.warning(
                "%s: %s changed but take effect only after a restart; still running with the "
                "values from start",
                self.path,
                ", ".join(pending),
            )

    async def _next(self) -> None:
        if await self._wait_for_request():
            await self.reload(self._reason)
            return
        signature = _signature(self.path)
        if signature == self._signature:
            return
        await asyncio.sleep(SETTLE_SECONDS)
        if _signature(self.path) == signature:
            await self.reload("file changed")

    async def _wait_for_request(self) -> bool:
        try:
            async with asyncio.timeout(self._interval):
                await self._requested.wait()
        except TimeoutError:
            return False
        self._requested.clear()
        return True


def restart_only_changes(running: Config, loaded: Config) -> list[str]:
    """The ``RESTART_ONLY`` settings that differ between ``running`` and ``loaded``, as key
    paths (``server.port``; a whole section when it is not a table, like ``api_keys``)."""
    changed: list[str] = []
    for path in RESTART_ONLY:
        old, new = _lookup(running, path), _lookup(loaded, path)
        if old == new:
            continue
        if isinstance(old, BaseModel) and type(new) is type(old):
            changed += [
                f"{path}.{name}"
                for name in type(old).model_fields
                if getattr(old, name) != getattr(new, name)
            ]
        else:
            changed.append(path)
    return changed


def _lookup(config: Config, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _signature(path: Path) -> Signature:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)
