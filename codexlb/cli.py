"""The ``codexlb`` command: serve, check-config, db upgrade, status, hash-key (SPEC S1.1).

``serve`` reloads its configuration file on SIGHUP and when the file changes (S6, see
``reload``); ``status`` prints the pool as a running server sees it (``GET /status``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from codexlb import db
from codexlb.auth import hash_key
from codexlb.config import Config, ConfigError, ServerConfig, load_config, load_server_config
from codexlb.credentials import CredentialsError, import_auth_snippet, load_credentials
from codexlb.logs import setup_logging
from codexlb.status import render_table

log = logging.getLogger("codexlb")

SHUTDOWN_TIMEOUT_SECONDS = 30.0
GC_YOUNG_THRESHOLD = 10_000
"""Container allocations (net of frees) between two collections of the youngest generation."""
STATUS_TIMEOUT_SECONDS = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "import-auth":
        try:
            print(import_auth_snippet(args.auth_file, name=args.name), end="")
        except CredentialsError as exc:
            print(f"codexlb: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "hash-key":
        key = args.key if args.key is not None else getpass.getpass("client key: ")
        print(hash_key(key))
        return 0
    config_path = args.config or os.environ.get("CODEXLB_CONFIG")
    if args.command == "status" and args.url:
        return _status(args.url, args.key, as_json=args.json)
    if not config_path:
        parser.error("--config is required (or set CODEXLB_CONFIG)")
    if args.command == "status":
        return _status_of_configured_server(config_path, args.key, as_json=args.json)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"codexlb: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    setup_logging(config)
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "db":
        return _db(args, config)
    return _serve(config, Path(config_path))


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
    db_actions = db_parser.add_subparsers(dest="action", required=True)
    upgrade_parser = db_actions.add_parser("upgrade", help="apply the migrations")
    upgrade_parser.add_argument("--config", help="TOML file (default: $CODEXLB_CONFIG)")
    backup_parser = db_actions.add_parser("backup", help="copy a live SQLite database")
    backup_parser.add_argument("destination", help="the file to write (must not exist)")
    backup_parser.add_argument("--config", help="TOML file (default: $CODEXLB_CONFIG)")
    status_parser = sub.add_parser("status", help="print the pool of a running server")
    status_parser.add_argument("--config", help="TOML file (default: $CODEXLB_CONFIG)")
    status_parser.add_argument(
        "--url", help="the server's base URL (default: from [server] host and port)"
    )
    status_parser.add_argument("--key", help="a client key (default: $CODEXLB_KEY)")
    status_parser.add_argument("--json", action="store_true", help="print the JSON document")
    import_parser = sub.add_parser(
        "import-auth", help="print an [[accounts]] entry that serves a Codex auth.json"
    )
    import_parser.add_argument("auth_file", nargs="?", default="~/.codex/auth.json")
    import_parser.add_argument("--name", help="the account name (default: from the login)")
    hash_parser = sub.add_parser("hash-key", help="print the key_sha256 of a client key")
    hash_parser.add_argument("key", nargs="?", help="the key (prompted for when omitted)")
    return parser


def _db(args: argparse.Namespace, config: Config) -> int:
    if args.action == "upgrade":
        db.upgrade_url(config.database.url)
        print("database is at the latest schema")
        return 0
    try:
        db.backup_sqlite(config.database.url, Path(args.destination))
    except db.BackupError as exc:
        print(f"codexlb: {exc}", file=sys.stderr)
        return 1
    print(f"backed up to {args.destination}")
    return 0


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


def _status_of_configured_server(config_path: str, key: str | None, *, as_json: bool) -> int:
    """``codexlb status --config``: asks the server the file's ``[server]`` section names.

    Only that section is read. The rest of the file is the server's business: an
    ``env:NAME`` secret the operator's shell does not hold, or an ``auth_file`` it cannot
    read, must not stop the question.
    """
    try:
        server = load_server_config(config_path)
    except ConfigError as exc:
        print(f"codexlb: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    url = _server_url(server)
    if url is None:
        print("codexlb: [server].port is 0 (chosen at start): give --url", file=sys.stderr)
        return 1
    return _status(url, key, as_json=as_json)


def _status(url: str, key: str | None, *, as_json: bool) -> int:
    """Fetch ``GET /status`` and print it; exit 1 when the server cannot be asked."""
    key = key or os.environ.get("CODEXLB_KEY")
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url.rstrip("/") + "/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=STATUS_TIMEOUT_SECONDS) as response:
            status = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"codexlb: {url} answered {exc.code}: {_error_message(exc)}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"codexlb: cannot get the status from {url}: {reason}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if as_json else render_table(status))
    return 0


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(error)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return error.reason or "error"


def _server_url(server: ServerConfig) -> str | None:
    """Where a server started with ``server`` listens (a wildcard bind: on loopback)."""
    if server.port == 0:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.port}"


def _serve(config: Config, config_path: Path) -> int:
    problem = _open_access_problem(config)
    if problem:
        log.error("%s", problem)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        _event_loop_runner()(_run(config, config_path))
    return 0


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop where it is installed: it takes a large share of the relay's CPU cost off."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def _settle_garbage_collector() -> None:
    """Tune CPython's cyclic collector for a relay, once start-up is done.

    A relayed request frees nearly all it allocates by reference counting, but with the
    default threshold (700) the collector still ran about 70 times per 1,000 requests at
    concurrency 64, each time over the young objects of every request in flight, and now and
    then over the whole heap: some 15% of codexlb's CPU (``bench/http_sse.py``). Objects made at
    start-up (modules, configuration, tables, the pool) live as long as the process, so they are
    frozen out of the collector's passes; the young generation may grow to
    ``GC_YOUNG_THRESHOLD`` before a pass, so passes become rare while true cycles are still
    collected.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _run(config: Config, config_path: Path) -> None:
    from codexlb.app import RELOADER, make_runner

    runner = make_runner(config, config_path=config_path, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    _settle_garbage_collector()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, runner.app[RELOADER].request)
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("codexlb listening on http://%s:%s", host, port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: draining requests in flight")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        started = time.monotonic()
        await runner.cleanup()
        log.info("codexlb stopped (shutdown took %.1f s)", time.monotonic() - started)


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"
    return url
