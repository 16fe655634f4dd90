"""Client keys: ``Authorization: Bearer <key>`` → the scope a client's snapshots live in.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured
key, so neither the comparison nor the lookup leaks timing. With no keys configured access is
open and every client shares one anonymous scope.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from codexlb.config import ApiKeyConfig
from codexlb.errors import InvalidApiKey

ANONYMOUS_SCOPE = ""


class ClientKeys:
    def __init__(self, keys: Sequence[ApiKeyConfig]) -> None:
        self._digests: list[tuple[bytes, str]] = [(_digest_of(key), key.name) for key in keys]

    @property
    def open(self) -> bool:
        return not self._digests

    def scope_for(self, authorization: str | None) -> str:
        """The scope of the presented key; raises ``InvalidApiKey`` when it is not one of ours."""
        if self.open:
            return ANONYMOUS_SCOPE
        token = _bearer(authorization)
        if token is None:
            raise InvalidApiKey()
        presented = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for digest, name in self._digests:
            if hmac.compare_digest(digest, presented):
                found = name
        if found is None:
            raise InvalidApiKey()
        return found


def hash_key(key: str) -> str:
    """The ``key_sha256`` value for a client key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _digest_of(key: ApiKeyConfig) -> bytes:
    if key.key is not None:
        return hashlib.sha256(key.key.get_secret_value().encode()).digest()
    assert key.key_sha256 is not None
    return bytes.fromhex(key.key_sha256)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
