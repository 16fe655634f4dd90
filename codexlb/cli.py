"""The ``codexlb`` command: argument parsing, logging set-up, and the commands themselves.

``serve`` runs the app (``app.make_runner``) until SIGTERM/SIGINT and reloads its configuration
file on SIGHUP and when the file changes (see ``reload``); ``status`` prints the pool as a
running server sees it (``GET /status``) and reads only ``[server]`` of the file.
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
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from codexlb import db, tls
from codexlb.auth import hash_key
from codexlb.config import Config, ConfigError, ServerConfig, load_config, load_server_config
from codexlb.credentials import CredentialsError, import_auth_snippet, load_credentials
from codexlb.logs import setup_logging
from codexlb.status import render_table
from codexlb.usage import Grouping, parse_since, render_report, usage_report

log = logging.getLogger("codexlb")

SHUTDOWN_TIMEOUT_SECONDS = 30.0
GC_YOUNG_THRESHOLD = 10_000
"""Container allocations (net of frees) between two collections of the youngest generation."""
STATUS_TIMEOUT_SECONDS = 10.0

DESCRIPTION = """\
One endpoint for several ChatGPT/Codex accounts or OpenAI API keys.

Point Codex CLI or an OpenAI SDK at codexlb as if it were the upstream: each
request goes to an account that can take it, preferring the one that served
the conversation so far, and every completed response is stored, so that a
conversation goes on after an account switch, an upstream disconnect or a
restart."""
EPILOG = """\
Commands that need the configuration file take --config FILE or read
$CODEXLB_CONFIG; start from config.example.toml. `codexlb COMMAND --help`
describes each command."""


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
    if args.command == "usage":
        return _usage(config, args.since, args.by, as_json=args.json)
    return _serve(config, Path(config_path))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codexlb",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the paragraphs
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = _command(
        sub,
        "serve",
        "run the server in the foreground",
        "Run the server in the foreground. It applies the database migrations at start, "
        "reloads the configuration file when it changes and on SIGHUP, and on SIGTERM or "
        "SIGINT lets the requests in flight finish before it exits.",
    )
    _config_option(serve)
    check = _command(
        sub,
        "check-config",
        "validate the configuration and print the pool it describes",
        "Validate the configuration file and print the pool it describes: the listen "
        "address, the database, the client keys' names and each account, with whether its "
        "credentials can be read. Secrets are never printed. Exits with status 1 when "
        "something is wrong.",
    )
    _config_option(check)
    db_parser = _command(sub, "db", "database maintenance", "Database maintenance.")
    db_actions = db_parser.add_subparsers(
        dest="action", required=True, title="actions", metavar="ACTION"
    )
    upgrade_parser = _command(
        db_actions,
        "upgrade",
        "bring the database schema up to date",
        "Bring the database schema up to date. serve does this at start too.",
    )
    _config_option(upgrade_parser)
    backup_parser = _command(
        db_actions,
        "backup",
        "copy the SQLite database, even while the server runs",
        "Copy the configured SQLite database to a new file, consistently, even while the "
        "server is writing to it. For PostgreSQL, use pg_dump.",
    )
    backup_parser.add_argument("destination", help="the file to write (must not exist yet)")
    _config_option(backup_parser)
    status_parser = _command(
        sub,
        "status",
        "show the accounts of a running server",
        "Ask a running server for its pool and print one row per account: its state, "
        "requests in flight, weight, the usage the upstream last reported, cooldown and "
        "last error. Only the [server] section of the configuration file is read, to find "
        "the server.",
    )
    _config_option(status_parser)
    status_parser.add_argument(
        "--url", help="the server's base URL, instead of the [server] address of the file"
    )
    status_parser.add_argument(
        "--key", help="the server's [admin] key, when it has one (default: $CODEXLB_ADMIN_KEY)"
    )
    status_parser.add_argument(
        "--json", action="store_true", help="print the server's JSON document instead of a table"
    )
    usage_parser = _command(
        sub,
        "usage",
        "print what the client keys used",
        "Print the requests and tokens the client keys used, from the database, grouped by "
        "key, account, model or UTC day.",
    )
    _config_option(usage_parser)
    usage_parser.add_argument(
        "--since", type=_since, default="7d", help="how far back: 30m, 12h, 7d, 2w (default 7d)"
    )
    usage_parser.add_argument(
        "--by", choices=("key", "account", "model", "day"), default="key", help="default: key"
    )
    usage_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    import_parser = _command(
        sub,
        "import-auth",
        "print an [[accounts]] entry that serves a Codex auth.json",
        "Check a Codex auth.json (as written by `codex login`) and print an [[accounts]] "
        "entry that uses it, ready to append to the configuration file, e.g. "
        "`codexlb import-auth --name laptop >> codexlb.toml`. No token is copied: the "
        "entry points at the file, and refreshed tokens are written back to it.",
    )
    import_parser.add_argument(
        "auth_file",
        nargs="?",
        default="~/.codex/auth.json",
        metavar="AUTH_JSON",
        help="the Codex login to serve (default: ~/.codex/auth.json)",
    )
    import_parser.add_argument(
        "--name", help="the account's name (default: taken from the login's e-mail address)"
    )
    hash_parser = _command(
        sub,
        "hash-key",
        "print the key_sha256 of a client key",
        "Print the SHA-256 of a client key, to put in [[api_keys]] as key_sha256 so the "
        "configuration file does not hold the key itself.",
    )
    hash_parser.add_argument("key", nargs="?", help="the client key (asked for when omitted)")
    return parser


def _command(
    parent: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    return parent.add_parser(name, help=summary, description=description)


def _config_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config", metavar="FILE", help="the TOML configuration file (default: $CODEXLB_CONFIG)"
    )


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


def _print_models(config: Config) -> None:
    """``[models]`` (S11): the names the translated APIs map, and the default."""
    models = config.models
    if not models.aliases and models.default is None:
        return
    print("models:")
    for name, upstream in models.aliases.items():
        print(f"  {name} -> {upstream}")
    if models.default is not None:
        print(f"  default {models.default} (on /v1/messages, for names no alias covers)")


def _check_config(config: Config) -> int:
    ok = True
    print(f"listen    {tls.scheme(config.server)}://{config.server.host}:{config.server.port}")
    try:
        tls.server_context(config.server)
    except ConfigError as exc:
        print(f"UNUSABLE: {exc}")
        ok = False
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
    _print_models(config)
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


def _since(value: str) -> int:
    try:
        return parse_since(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _usage(config: Config, since: int, by: Grouping, *, as_json: bool) -> int:
    try:
        report = asyncio.run(usage_report(config.database.url, since, by))
    except SQLAlchemyError as exc:
        print(
            f"codexlb: cannot read the usage from the database ({type(exc).__name__}); "
            "is it reachable, and upgraded (codexlb db upgrade)?",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(report, indent=2) if as_json else render_report(report))
    return 0


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
    key = key or os.environ.get("CODEXLB_ADMIN_KEY")
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
    return f"{tls.scheme(server)}://{host}:{server.port}"


def _serve(config: Config, config_path: Path) -> int:
    problem = _open_access_problem(config)
    if problem:
        log.error("%s", problem)
        return 1
    try:
        ssl_context = tls.server_context(config.server)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        _event_loop_runner()(_run(config, config_path, ssl_context))
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
    default threshold (700) the collector still runs often under load, each time over the young
    objects of every request in flight, and now and then over the whole heap (what it cost is in
    ``bench/RESULTS.md``). Objects made at start-up (modules, configuration, tables, the pool)
    live as long as the process, so they are frozen out of the collector's passes; the young
    generation may grow to ``GC_YOUNG_THRESHOLD`` before a pass, so passes become rare while
    true cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _run(
    config: Config, config_path: Path, ssl_context: ssl.SSLContext | None = None
) -> None:
    from codexlb.app import RELOADER, make_runner
    from codexlb.edge import raise_fd_limit

    raise_fd_limit()
    runner = make_runner(config, config_path=config_path, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    _settle_garbage_collector()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, runner.app[RELOADER].request)
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("codexlb listening on %s://%s:%s", tls.scheme(config.server), host, port)
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
