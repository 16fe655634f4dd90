"""The ``codexlb`` command: serve, check-config, db upgrade, hash-key (SPEC S1.1)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web

from codexlb import db
from codexlb.auth import hash_key
from codexlb.config import Config, ConfigError, load_config
from codexlb.credentials import CredentialsError, load_credentials

log = logging.getLogger("codexlb")

SHUTDOWN_TIMEOUT_SECONDS = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "hash-key":
        key = args.key if args.key is not None else getpass.getpass("client key: ")
        print(hash_key(key))
        return 0
    config_path = args.config or os.environ.get("CODEXLB_CONFIG")
    if not config_path:
        parser.error("--config is required (or set CODEXLB_CONFIG)")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"codexlb: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    _setup_logging(config)
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "db":
        db.upgrade_url(config.database.url)
        print("database is at the latest schema")
        return 0
    return _serve(config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codexlb", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    for name, help_text in (
        ("serve", "run the server in the foreground"),
        ("check-config", "validate the configuration and print the effective pool"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", help="TOML file (default: $CODEXLB_CONFIG)")
    db_parser = sub.add_parser("db", help="database maintenance")
    db_parser.add_argument("action", choices=["upgrade"], help="apply the migrations")
    db_parser.add_argument("--config", help="TOML file (default: $CODEXLB_CONFIG)")
    hash_parser = sub.add_parser("hash-key", help="print the key_sha256 of a client key")
    hash_parser.add_argument("key", nargs="?", help="the key (prompted for when omitted)")
    return parser


def _check_config(config: Config) -> int:
    ok = True
    print(f"listen    http://{config.server.host}:{config.server.port}")
    print(f"database  {_redact_url(config.database.url)}")
    print(f"client keys: {', '.join(k.name for k in config.api_keys) or '(none: open access)'}")
    print("accounts:")
    for account in config.accounts:
        kind = "platform" if account.is_platform else "chatgpt"
        source = f"auth_file {account.auth_file}" if account.auth_file else "inline"
        try:
            load_credentials(account)
            state = "enabled" if account.enabled else "disabled"
        except CredentialsError as exc:
            state, ok = f"UNUSABLE: {exc}", False
        print(
            f"  {account.name:<16} {kind:<9} {source:<28} {config.account_base_url(account)}"
            f"  weight={account.weight:g} max_inflight={account.max_inflight} {state}"
        )
    if not config.accounts:
        print("  (none)")
    problem = _open_access_problem(config)
    if problem:
        print(problem, file=sys.stderr)
        ok = False
    return 0 if ok else 1


def _open_access_problem(config: Config) -> str | None:
    if config.api_keys or config.server.is_loopback or config.server.allow_open_access:
        return None
    return (
        f"refusing to serve {config.server.host} without client keys: add [[api_keys]] "
        "or set [server].allow_open_access = true"
    )


def _serve(config: Config) -> int:
    problem = _open_access_problem(config)
    if problem:
        log.error("%s", problem)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        _event_loop_runner()(_run(config))
    return 0


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop where it is installed: it takes a large share of the relay's CPU cost off."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _run(config: Config) -> None:
    from codexlb.app import make_runner

    runner = make_runner(config, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("codexlb listening on http://%s:%s", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: draining requests in flight")
    finally:
        await runner.cleanup()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    if config.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.logging.level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"
    return url
