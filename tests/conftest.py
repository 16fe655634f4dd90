from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.db import create_engine, upgrade
from codexlb.store import SnapshotStore
from tests import codex_cli
from tests.harness import (
    ACCOUNTS,
    CHILD_LOGS,
    SECRETS,
    Balancer,
    Fake,
    config_data,
    make_config,
    running_fake,
    serve,
)

# --- Database fixtures (real SQLite and PostgreSQL; see tests/test_store.py) ----------------

POSTGRES_ADMIN_URL = os.environ.get(
    "CODEXLB_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}"
        return
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc!r}")
    name = f"codexlb_test_{uuid.uuid4().hex}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
        yield f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``database_url`` with the schema at head."""
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def store(engine: AsyncEngine) -> AsyncIterator[SnapshotStore]:
    store = SnapshotStore(engine)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


# --- End of database fixtures -------------------------------------------------------------


# --- No configured secret in any log line of the whole run ---------------------------------


class _AllRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


_RECORDS = _AllRecords()


def pytest_sessionstart(session: pytest.Session) -> None:
    logging.getLogger().addHandler(_RECORDS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    logging.getLogger().removeHandler(_RECORDS)
    lines = _RECORDS.lines + [line for log in CHILD_LOGS for line in log]
    leaked = sorted({secret for secret in SECRETS for line in lines if secret in line})
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"configured secrets found in log lines: {len(leaked)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- The event loop: uvloop, as ``codexlb serve`` runs --------------------------------------


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}


# --- The real Codex CLI (tests marked ``codex``) --------------------------------------------


@pytest.fixture(scope="session")
def codex() -> Path:
    """The Codex CLI binary, installed from npm on first use (``tests.codex_cli``), or a
    visible skip with the reason (no node or npm, the install failed)."""
    found = codex_cli.install_codex()
    if isinstance(found, str):
        pytest.skip(found)
    return found


# --- Servers on loopback: the fake upstream and codexlb in front of it ---------------------


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    async with running_fake(ACCOUNTS) as upstream:
        yield upstream


@pytest.fixture
async def lb(fake: Fake, tmp_path: Path) -> AsyncIterator[Balancer]:
    """codexlb on SQLite in front of three fake accounts, with client keys alice and bob."""
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    async with serve(make_config(data, tmp_path)) as balancer:
        yield balancer


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
