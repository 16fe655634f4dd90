"""Client keys → scopes."""

from __future__ import annotations

import hashlib

import pytest

from codexlb.auth import ANONYMOUS_SCOPE, ClientKeys, hash_key
from codexlb.config import ApiKeyConfig
from codexlb.errors import InvalidApiKey


def keys() -> ClientKeys:
    return ClientKeys(
        [
            ApiKeyConfig.model_validate({"name": "alice", "key": "sk-lb-alice"}),
            ApiKeyConfig.model_validate({"name": "bob", "key_sha256": hash_key("sk-lb-bob")}),
            ApiKeyConfig.model_validate(
                {"name": "carol", "key_sha256": hash_key("sk-lb-carol").upper()}
            ),
        ]
    )


@pytest.mark.parametrize("authorization", [None, "", "Bearer anything", "Basic Zm9vOmJhcg=="])
def test_open_mode_gives_the_anonymous_scope(authorization: str | None) -> None:
    client_keys = ClientKeys([])

    assert client_keys.open
    assert client_keys.scope_for(authorization) == ANONYMOUS_SCOPE


@pytest.mark.parametrize(
    ("authorization", "scope"),
    [
        ("Bearer sk-lb-alice", "alice"),
        ("bearer sk-lb-alice", "alice"),
        ("BEARER   sk-lb-alice  ", "alice"),
        ("Bearer sk-lb-bob", "bob"),
        ("Bearer sk-lb-carol", "carol"),
    ],
)
def test_configured_key_gives_its_scope(authorization: str, scope: str) -> None:
    client_keys = keys()

    assert not client_keys.open
    assert client_keys.scope_for(authorization) == scope


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "sk-lb-alice",
        "Basic sk-lb-alice",
        "Bearer sk-lb-alic",
        "Bearer sk-lb-alice2",
        "Bearer SK-LB-ALICE",
        f"Bearer {hash_key('sk-lb-bob')}",
    ],
)
def test_missing_or_wrong_key_is_refused(authorization: str | None) -> None:
    with pytest.raises(InvalidApiKey) as info:
        keys().scope_for(authorization)

    error = info.value
    assert (error.status, error.type, error.code) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    assert error.param is None


def test_hash_key_is_hex_sha256() -> None:
    digest = hash_key("sk-lb-alice")

    assert digest == hashlib.sha256(b"sk-lb-alice").hexdigest()
    assert len(digest) == 64
    assert digest == digest.lower()
    assert hash_key("sk-lb-alice ") != digest
