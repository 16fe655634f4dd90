"""Loading the TOML configuration (SPEC S1.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from codexlb.auth import hash_key
from codexlb.config import (
    DEFAULT_CHATGPT_BASE_URL,
    DEFAULT_TOKEN_URL,
    MIB,
    Config,
    ConfigError,
    load_config,
)

ACCOUNT = '[[accounts]]\nname = "work-1"\naccess_token = "at-inline-secret"\n'


def write(tmp_path: Path, text: str, name: str = "codexlb.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "")

    assert (config.server.host, config.server.port) == ("127.0.0.1", 2455)
    assert config.server.is_loopback
    assert config.database.url == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'codexlb.db'}"
    assert config.upstream.base_url == DEFAULT_CHATGPT_BASE_URL
    assert config.upstream.token_url == DEFAULT_TOKEN_URL
    assert config.api_keys == ()
    assert config.accounts == ()
    assert config.routing.strategy == "least_used"
    assert config.snapshots.retention_days == 30
    assert config.limits.max_body_bytes >= 64 * MIB


def test_account_defaults(tmp_path: Path) -> None:
    [account] = load(tmp_path, ACCOUNT).accounts

    assert account.name == "work-1"
    assert account.access_token is not None
    assert account.access_token.get_secret_value() == "at-inline-secret"
    assert (account.enabled, account.weight, account.max_inflight) == (True, 1.0, 0)
    assert not account.is_platform


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        (
            ACCOUNT + ACCOUNT.replace("work-1", "work-2") + 'chatgpt_acount_id = "x"\n',
            "accounts[1].chatgpt_acount_id",
        ),
        ("[server]\nprot = 1\n", "server.prot"),
        ("[sever]\nport = 1\n", "sever"),
        ('[[api_keys]]\nname = "a"\nkey = "k"\nkye = "k"\n', "api_keys[0].kye"),
    ],
)
def test_unknown_key_is_rejected_with_its_path(tmp_path: Path, text: str, key_path: str) -> None:
    message = load_error(tmp_path, text)

    assert f": {key_path}: " in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ("[server]\nport = 70000\n", "server.port"),
        ('[server]\nport = "http"\n', "server.port"),
        (ACCOUNT + "weight = 0\n", "accounts[0].weight"),
        ('[routing]\nstrategy = "random"\n', "routing.strategy"),
        ("[limits]\nmax_body_bytes = 1024\n", "limits.max_body_bytes"),
    ],
)
def test_invalid_value_names_its_key_path(tmp_path: Path, text: str, key_path: str) -> None:
    assert f": {key_path}: " in load_error(tmp_path, text)


def test_env_secrets_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEXLB_TEST_TOKEN", "at-from-env")
    monkeypatch.setenv("CODEXLB_TEST_CLIENT_KEY", "sk-lb-from-env")
    config = load(
        tmp_path,
        '[[api_keys]]\nname = "alice"\nkey = "env:CODEXLB_TEST_CLIENT_KEY"\n'
        '[[accounts]]\nname = "w"\naccess_token = "env:CODEXLB_TEST_TOKEN"\n',
    )

    token = config.accounts[0].access_token
    key = config.api_keys[0].key
    assert token is not None
    assert token.get_secret_value() == "at-from-env"
    assert key is not None
    assert key.get_secret_value() == "sk-lb-from-env"


def test_unset_env_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODEXLB_TEST_UNSET", raising=False)

    message = load_error(
        tmp_path, '[[accounts]]\nname = "w"\nrefresh_token = "env:CODEXLB_TEST_UNSET"\n'
    )

    assert "accounts[0].refresh_token" in message
    assert "environment variable CODEXLB_TEST_UNSET is not set" in message


def test_secrets_are_not_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEXLB_TEST_SECRET", "rt-from-env-secret")
    config = load(
        tmp_path,
        '[[api_keys]]\nname = "alice"\nkey = "sk-lb-client-secret"\n'
        '[[accounts]]\nname = "a"\naccess_token = "at-inline-secret"\n'
        'refresh_token = "env:CODEXLB_TEST_SECRET"\n'
        '[[accounts]]\nname = "b"\napi_key = "sk-platform-secret"\n',
    )

    secrets = ("sk-lb-client-secret", "at-inline-secret", "rt-from-env-secret", "sk-platform")
    for text in (repr(config), str(config), repr(config.accounts), repr(config.api_keys[0])):
        assert [s for s in secrets if s in text] == []


def test_database_url_is_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEXLB_TEST_DB", "postgresql+asyncpg://lb:pg-password@db/lb")
    config = load(tmp_path, '[database]\nurl = "env:CODEXLB_TEST_DB"\n')

    assert config.database.url == "postgresql+asyncpg://lb:pg-password@db/lb"
    assert "pg-password" not in repr(config)
    assert "env:" not in repr(config.database)


@pytest.mark.parametrize(
    "credentials",
    [
        "",
        'api_key = "k"\naccess_token = "t"\n',
        'api_key = "k"\nauth_file = "auth.json"\n',
        'auth_file = "auth.json"\nrefresh_token = "r"\n',
        'chatgpt_account_id = "acc"\n',
    ],
    ids=["none", "api_key+token", "api_key+auth_file", "auth_file+refresh", "only-account-id"],
)
def test_exactly_one_kind_of_credentials(tmp_path: Path, credentials: str) -> None:
    message = load_error(tmp_path, f'[[accounts]]\nname = "w"\n{credentials}')

    assert "accounts[0]: " in message
    assert "exactly one kind of credentials" in message
    assert '"k"' not in message
    assert "'k'" not in message


@pytest.mark.parametrize(
    "credentials",
    [
        'api_key = "k"\n',
        'auth_file = "auth.json"\n',
        'access_token = "t"\nchatgpt_account_id = "acc"\n',
        'refresh_token = "r"\n',
        'access_token = "t"\nrefresh_token = "r"\n',
    ],
)
def test_one_kind_of_credentials_is_accepted(tmp_path: Path, credentials: str) -> None:
    [account] = load(tmp_path, f'[[accounts]]\nname = "w"\n{credentials}').accounts

    assert account.name == "w"


def test_duplicate_account_names(tmp_path: Path) -> None:
    message = load_error(tmp_path, ACCOUNT + ACCOUNT)

    assert "duplicate name 'work-1'" in message


def test_duplicate_api_key_names(tmp_path: Path) -> None:
    key = '[[api_keys]]\nname = "alice"\nkey = "k1"\n'

    assert "duplicate name 'alice'" in load_error(tmp_path, key + key.replace("k1", "k2"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite+aiosqlite:///data/lb.db", "sqlite+aiosqlite:///{base}/data/lb.db"),
        ("sqlite+aiosqlite:///../lb.db", "sqlite+aiosqlite:///{parent}/lb.db"),
        ("sqlite:///lb.db", "sqlite:///{base}/lb.db"),
        ("sqlite+aiosqlite:////abs/lb.db", "sqlite+aiosqlite:////abs/lb.db"),
        ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_relative_sqlite_path_is_anchored_to_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)

    config = load_config(write(conf_dir, f'[database]\nurl = "{url}"\n'))

    base = conf_dir.resolve()
    assert config.database.url == expected.format(base=base, parent=base.parent)


def test_relative_auth_file_is_anchored_to_the_config_directory(tmp_path: Path) -> None:
    [account] = load(tmp_path, '[[accounts]]\nname = "w"\nauth_file = "codex/auth.json"\n').accounts

    assert account.auth_file == tmp_path.resolve() / "codex" / "auth.json"


def test_invalid_toml(tmp_path: Path) -> None:
    assert "invalid TOML" in load_error(tmp_path, "[server\nport = 1\n")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError, match="file not found") as info:
        load_config(path)

    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (hash_key("sk-lb-alice"), True),
        (hash_key("sk-lb-alice").upper(), True),
        ("ab" * 31, False),
        ("ab" * 33, False),
        ("zz" * 32, False),
        ("", False),
    ],
)
def test_key_sha256_format(tmp_path: Path, value: str, valid: bool) -> None:
    text = f'[[api_keys]]\nname = "alice"\nkey_sha256 = "{value}"\n'

    if valid:
        assert load(tmp_path, text).api_keys[0].key_sha256 == value
    else:
        assert "api_keys[0].key_sha256: " in load_error(tmp_path, text)


@pytest.mark.parametrize(
    "fields", ["", f'key = "k"\nkey_sha256 = "{hash_key("k")}"\n'], ids=["neither", "both"]
)
def test_api_key_needs_exactly_one_of_key_or_digest(tmp_path: Path, fields: str) -> None:
    message = load_error(tmp_path, f'[[api_keys]]\nname = "alice"\n{fields}')

    assert "api_keys[0]: " in message
    assert "exactly one of key or key_sha256" in message


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, ACCOUNT)

    with pytest.raises(ValueError, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


def test_replica_settings_survive_loading_from_a_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[database]\nurl = "sqlite+aiosqlite:///lb.db"\n'
        "heartbeat_seconds = 0.5\nreplica_timeout_seconds = 3\n",
    )
    assert (config.database.heartbeat_seconds, config.database.replica_timeout_seconds) == (0.5, 3)


def test_a_replica_timeout_must_span_two_heartbeats(tmp_path: Path) -> None:
    message = load_error(
        tmp_path, "[database]\nheartbeat_seconds = 2\nreplica_timeout_seconds = 3\n"
    )
    assert "database" in message
    assert "replica_timeout_seconds must be at least twice heartbeat_seconds" in message
