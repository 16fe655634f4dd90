"""The TOML configuration, parsed once into frozen, typed objects.

Unknown keys are errors. Every secret may be written inline or as ``"env:NAME"``; secrets are
``SecretStr`` so they never show in a ``repr`` or a log line. Errors name the file and the key
path (``accounts[2].chatgpt_account_id``).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

DEFAULT_CHATGPT_BASE_URL = "https://chatgpt.com/backend-api/codex"
DEFAULT_TOKEN_URL = "https://auth.openai.com/oauth/token"
MIB = 1024 * 1024


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the key path."""


def _resolve_env(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        resolved = os.environ.get(name)
        if resolved is None:
            raise ValueError(f"environment variable {name} is not set")
        return resolved
    return value


Secret = Annotated[SecretStr, BeforeValidator(_resolve_env)]


def _origin(value: Any) -> Any:
    """A browser origin, ``scheme://host[:port]``, in the lower case browsers send."""
    if not isinstance(value, str):
        return value
    origin = value.strip().rstrip("/").lower()
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ValueError(f"{value!r} is not an origin such as 'https://app.example:8443'")
    return origin


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=2455, ge=0, le=65535)
    allow_open_access: bool = False
    """Serve without client keys on a non-loopback address (refused unless set)."""
    websocket_compression: bool = False
    """Accept permessage-deflate from WebSocket clients. Off by default: for a client on the
    same host or LAN it only costs an inflate context (~9 KiB) per socket and CPU per frame."""
    allowed_origins: tuple[Annotated[str, BeforeValidator(_origin)], ...] = ()
    """Browser origins (``https://app.example``) whose pages may call codexlb. A request with
    any other ``Origin`` is refused; one without (Codex CLI, the SDKs) is not concerned."""
    tls_cert: Path | None = None
    """A PEM certificate chain: with ``tls_key``, codexlb listens with TLS (``tls``)."""
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give tls_cert and tls_key together, or neither")
        return self

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class DatabaseConfig(_Section):
    url: Annotated[str, BeforeValidator(_resolve_env)] = Field(
        default="sqlite+aiosqlite:///codexlb.db", repr=False
    )
    """May carry a password (PostgreSQL): resolved from ``env:NAME``, kept out of ``repr``."""
    heartbeat_seconds: float = Field(default=1.0, gt=0, le=60)
    """PostgreSQL replicas (S12): how often each one tells the others it is alive, and what
    it carries."""
    replica_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    """A replica silent this long is taken for dead: its in-flight requests stop counting."""

    @model_validator(mode="after")
    def _timeout_spans_heartbeats(self) -> DatabaseConfig:
        if self.replica_timeout_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("replica_timeout_seconds must be at least twice heartbeat_seconds")
        return self


class UpstreamConfig(_Section):
    base_url: str = DEFAULT_CHATGPT_BASE_URL
    token_url: str = DEFAULT_TOKEN_URL
    websocket_compression: bool = False
    """Offer permessage-deflate on upstream WebSockets. Off by default: each socket would hold
    an inflate context and pay CPU per event frame, for frames that are mostly small."""


def _utc(value: Any) -> Any:
    """A TOML datetime without an offset is taken as UTC; a date alone as its midnight UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return value


class ApiKeyConfig(_Section):
    """A client key and what it may use (SPEC S9); every limit is optional."""

    name: str = Field(min_length=1)
    key: Secret | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    models: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    """Models the key may ask for (after aliasing); ``None``: all."""
    accounts: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    """Accounts the key may draw from; ``None``: all."""
    expires_at: Annotated[datetime, BeforeValidator(_utc)] | None = None
    requests_per_minute: int | None = Field(default=None, ge=1)
    """Requests in any rolling 60 seconds."""
    max_inflight: int | None = Field(default=None, ge=1)
    """HTTP requests and WebSocket turns at once."""
    tokens_per_5h: int | None = Field(default=None, ge=1)
    """Input plus output tokens in any rolling 5 hours."""
    tokens_per_week: int | None = Field(default=None, ge=1)
    """Input plus output tokens in any rolling 7 days."""

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def limited(self) -> bool:
        """Whether any setting restricts what the key may use."""
        return any(
            value is not None
            for value in (
                self.models,
                self.accounts,
                self.expires_at,
                self.requests_per_minute,
                self.max_inflight,
                self.tokens_per_5h,
                self.tokens_per_week,
            )
        )


class AdminConfig(_Section):
    """The operator's key (S10): ``/status``, ``/metrics`` and the admin views."""

    key: Secret | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_key(self) -> AdminConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self


class AccountConfig(_Section):
    name: str = Field(min_length=1)
    access_token: Secret | None = None
    chatgpt_account_id: str | None = None
    refresh_token: Secret | None = None
    auth_file: Path | None = None
    api_key: Secret | None = None
    base_url: str | None = None
    enabled: bool = True
    weight: float = Field(default=1.0, gt=0)
    max_inflight: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _credentials(self) -> AccountConfig:
        kinds = [
            self.api_key is not None,
            self.auth_file is not None,
            self.access_token is not None or self.refresh_token is not None,
        ]
        if sum(kinds) != 1:
            raise ValueError(
                "give exactly one kind of credentials: api_key, auth_file, "
                "or access_token/refresh_token"
            )
        return self

    @property
    def is_platform(self) -> bool:
        return self.api_key is not None

    @property
    def credential_fields(self) -> tuple[object, ...]:
        """What decides the credentials an account presents: a change means new ones."""
        return (
            self.api_key,
            self.auth_file,
            self.access_token,
            self.refresh_token,
            self.chatgpt_account_id,
        )


class RoutingConfig(_Section):
    strategy: Literal["least_used", "round_robin"] = "least_used"
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Accounts tried for one request before the client gets an error."""
    affinity_ttl_seconds: float = Field(default=3600.0, ge=0)
    error_cooldown_seconds: float = Field(default=2.0, gt=0)
    """First cooldown after a 5xx or connect error; doubles per consecutive failure."""
    max_error_cooldown_seconds: float = Field(default=120.0, gt=0)
    default_rate_limit_cooldown_seconds: float = Field(default=60.0, gt=0)
    """Cooldown after a 429 that names no reset time."""
    unauthorized_retry_seconds: float = Field(default=600.0, ge=0)
    """After the upstream refused an account's credentials even fresh (a second 401), one
    request tries them again after this long, then after twice as long each time they are
    refused again; 0: never (unusable until the credentials change)."""
    max_unauthorized_retry_seconds: float = Field(default=86400.0, gt=0)
    early_websockets_per_key: int = Field(default=4, ge=0)
    """Upstream sockets one client key may have opened at its WebSocket handshakes that carry
    no request yet; past it a client socket connects upstream at its first request."""


class SnapshotsConfig(_Section):
    retention_days: float = Field(default=30.0, gt=0)
    prune_interval_seconds: float = Field(default=3600.0, gt=0)
    prune_batch_size: int = Field(default=500, ge=1)


class TimeoutsConfig(_Section):
    connect_seconds: float = Field(default=10.0, gt=0)
    first_byte_seconds: float = Field(default=120.0, gt=0)
    """Time allowed for the upstream's response headers."""
    idle_seconds: float = Field(default=300.0, gt=0)
    """Longest silence allowed inside an upstream stream."""
    client_header_seconds: float = Field(default=30.0, gt=0)
    """Time a client has to send a request's head: from connecting, or on a kept-alive
    connection from the request's first byte."""
    client_body_seconds: float = Field(default=60.0, gt=0)
    """Longest silence allowed while a request body arrives."""
    client_keepalive_seconds: float = Field(default=75.0, gt=0)
    """How long an idle kept-alive client connection stays open."""


class LimitsConfig(_Section):
    max_body_bytes: int = Field(default=64 * MIB, ge=64 * MIB)
    """Largest request body or WebSocket message accepted (at least 64 MiB)."""
    max_body_bytes_in_flight: int = Field(default=256 * MIB, ge=64 * MIB)
    """Request bodies and WebSocket messages held at once, in bytes; a request that would go
    over is refused with 503 and ``Retry-After``."""
    max_connections: int = Field(default=4096, ge=1)
    """Client connections open at once; more are answered 503 and closed. Lowered at start
    when the process's file-descriptor limit cannot hold them."""
    max_upstream_event_bytes: int = Field(default=64 * MIB, ge=MIB)
    """Largest single upstream event (an SSE event, a WebSocket frame) codexlb buffers; a
    larger one fails the attempt as a broken upstream."""
    max_upstream_response_bytes: int = Field(default=256 * MIB, ge=MIB)
    """Most bytes of one upstream response codexlb relays and observes; past it the attempt
    fails as a broken upstream, so that an endless stream cannot grow memory without bound."""

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> LimitsConfig:
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError("max_body_bytes_in_flight must be at least max_body_bytes")
        return self


class ModelsConfig(_Section):
    """Model names of the translated APIs (S11): ``aliases`` maps a name a client asks for
    onto an upstream model; ``default`` serves, on ``/v1/messages``, names no alias covers."""

    aliases: dict[Annotated[str, Field(min_length=1)], Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict
    )
    default: str | None = Field(default=None, min_length=1)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Config(_Section):
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    api_keys: tuple[ApiKeyConfig, ...] = ()
    admin: AdminConfig | None = None
    accounts: tuple[AccountConfig, ...] = ()
    routing: RoutingConfig = RoutingConfig()
    snapshots: SnapshotsConfig = SnapshotsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    logging: LoggingConfig = LoggingConfig()
    models: ModelsConfig = ModelsConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for section, items in (("accounts", self.accounts), ("api_keys", self.api_keys)):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ValueError(f"{section}: duplicate name {item.name!r}")
                seen.add(item.name)
        names = {account.name for account in self.accounts}
        for index, key in enumerate(self.api_keys):
            unknown = [name for name in key.accounts or () if name not in names]
            if unknown:
                raise ValueError(
                    f"api_keys[{index}].accounts: no account named {', '.join(map(repr, unknown))}"
                )
        return self

    def account_base_url(self, account: AccountConfig) -> str:
        return (account.base_url or self.upstream.base_url).rstrip("/")


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(("function-", "custom")):
            path += f".{part}" if path else part
    return path or "(top level)"


def parse_config(data: Mapping[str, Any], *, source: Path) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source) from None
    return _anchor_paths(config, source.parent)


def load_config(path: str | os.PathLike[str]) -> Config:
    source = Path(path)
    return parse_config(_read_toml(source), source=source)


def load_server_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Only the ``[server]`` section of the file, validated as ``load_config`` would.

    For commands that talk to a running server (``codexlb status``): the rest of the file
    (accounts, ``env:NAME`` secrets, the database) is not looked at, so an operator's shell
    need not hold the server's environment variables.
    """
    source = Path(path)
    section = _read_toml(source).get("server", {})
    try:
        return ServerConfig.model_validate(section)
    except ValidationError as exc:
        raise _config_error(exc, source, prefix=("server",)) from None


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        with source.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None


def _config_error(
    exc: ValidationError, source: Path, prefix: tuple[int | str, ...] = ()
) -> ConfigError:
    lines = [
        f"{source}: {_key_path((*prefix, *err['loc']))}: {err['msg']}"
        for err in exc.errors(include_url=False)
    ]
    return ConfigError("\n".join(lines))


def _anchor_paths(config: Config, base: Path) -> Config:
    """Make a relative SQLite path, ``auth_file`` and TLS paths relative to the config file."""
    url = config.database.url
    for prefix in ("sqlite+aiosqlite:///", "sqlite:///"):
        if url.startswith(prefix):
            db_path = url[len(prefix) :]
            if db_path and db_path != ":memory:" and not Path(db_path).is_absolute():
                url = prefix + str((base / db_path).resolve())
            break
    accounts = tuple(
        a.model_copy(update={"auth_file": _anchor(a.auth_file, base)}) if a.auth_file else a
        for a in config.accounts
    )
    server = config.server
    if server.tls_cert is not None and server.tls_key is not None:
        server = server.model_copy(
            update={
                "tls_cert": _anchor(server.tls_cert, base),
                "tls_key": _anchor(server.tls_key, base),
            }
        )
    return config.model_copy(
        update={
            "database": config.database.model_copy(update={"url": url}),
            "accounts": accounts,
            "server": server,
        }
    )


def _anchor(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()
