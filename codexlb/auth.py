"""Client keys: ``Authorization: Bearer <key>`` → the scope a client's snapshots live in; and
the admin key, which alone opens the operator views (SPEC S10).

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured
key, so neither the comparison nor the lookup leaks timing. With no keys configured access is
open and every client shares one anonymous scope. A request carries at most one
``Authorization`` header (``one_authorization``): with two, which one counts would depend on
whoever reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

from multidict import MultiMapping

from codexlb.config import AdminConfig, ApiKeyConfig
from codexlb.errors import Forbidden, InvalidApiKey, InvalidRequest, KeyExpired

ANONYMOUS_SCOPE = ""


class ClientKeys:
    """The configured client keys and their settings (SPEC S9); ``reconfigure`` replaces them
    on a reload: a removed key is refused from then on, work it already began goes on."""

    def __init__(
        self, keys: Sequence[ApiKeyConfig], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self._digests: list[tuple[bytes, str]] = []
        self._settings: dict[str, ApiKeyConfig] = {}
        self._unlimited: frozenset[str] = frozenset()
        self.reconfigure(keys)

    def reconfigure(self, keys: Sequence[ApiKeyConfig]) -> None:
        self._digests = [(_digest_of(key), key.name) for key in keys]
        self._settings = {key.name: key for key in keys}
        self._unlimited = frozenset(key.name for key in keys if not key.limited)

    def names(self) -> list[str]:
        """The configured keys' names, in the file's order."""
        return list(self._settings)

    def unlimited(self, scope: str) -> bool:
        """Whether ``scope`` is a configured key with no settings beyond its key (or the
        open scope): nothing to check for its requests."""
        return scope in self._unlimited or (self.open and scope == ANONYMOUS_SCOPE)

    @property
    def open(self) -> bool:
        return not self._digests

    def settings(self, scope: str) -> ApiKeyConfig | None:
        """The key's settings; ``None`` in open access or for a key no longer configured."""
        return self._settings.get(scope)

    def check_current(self, scope: str) -> ApiKeyConfig | None:
        """Raise unless ``scope`` is still a key that may be used now (a reload may have
        removed it, its ``expires_at`` may have passed since it was presented); its settings,
        ``None`` in open access."""
        if self.open and scope == ANONYMOUS_SCOPE:
            return None
        settings = self._settings.get(scope)
        if settings is None:
            raise InvalidApiKey()
        if settings.expires_at is not None:
            expired = settings.expires_at.timestamp()
            if self.clock() >= expired:
                raise KeyExpired(scope, expired)
        return settings

    def scope_for(self, authorization: str | None) -> str:
        """The scope of the presented key; raises ``InvalidApiKey`` when it is not one of ours."""
        if self.open:
            return ANONYMOUS_SCOPE
        token = _bearer(authorization)
        if token is None:
            raise InvalidApiKey()
        presented = _digest_of_presented(token)
        found: str | None = None
        for digest, name in self._digests:
            if hmac.compare_digest(digest, presented):
                found = name
        if found is None:
            raise InvalidApiKey()
        self.check_current(found)
        return found


class AdminAccess:
    """Who may open the operator views (S10): ``/status``, ``/dashboard``, ``/admin/*`` and
    ``/metrics``.

    With ``[admin]`` configured, the admin key and nothing else (client keys get 401). Without
    it the views are open in open access (no client keys), where everything is, and refused
    (403, naming the setting) otherwise; ``/metrics`` is then served on a loopback bind only.
    """

    def __init__(self, admin: AdminConfig | None, keys: ClientKeys, *, loopback: bool) -> None:
        self._digest = _digest_of(admin) if admin is not None else None
        self._keys = keys
        self._loopback = loopback

    def check_view(self, authorization: str | None) -> None:
        """Raise unless ``authorization`` may open an operator view."""
        if self._digest is None:
            if self._keys.open:
                return
            raise Forbidden(
                "The operator views need an admin key: set [admin] key (or key_sha256) "
                "in the configuration.",
                code="invalid_api_key",
            )
        self._check_key(authorization)

    def check_metrics(self, authorization: str | None) -> None:
        """Raise unless ``authorization`` may read ``/metrics``."""
        if self._digest is None:
            if self._loopback:
                return
            raise Forbidden(
                "/metrics is served without a key on a loopback address only: set [admin] "
                "key (or key_sha256) and send it as a bearer token.",
                code="invalid_api_key",
            )
        self._check_key(authorization)

    def _check_key(self, authorization: str | None) -> None:
        assert self._digest is not None
        token = _bearer(authorization)
        if token is None or not hmac.compare_digest(self._digest, _digest_of_presented(token)):
            raise InvalidApiKey("admin key")


def one_authorization(headers: MultiMapping[str]) -> None:
    """Refuse a request with more than one ``Authorization`` header."""
    if len(headers.getall("Authorization", ())) > 1:
        raise InvalidRequest("Send one Authorization header; this request has several.")


def hash_key(key: str) -> str:
    """The ``key_sha256`` value for a client key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _digest_of(key: ApiKeyConfig | AdminConfig) -> bytes:
    if key.key is not None:
        return hashlib.sha256(key.key.get_secret_value().encode()).digest()
    assert key.key_sha256 is not None
    return bytes.fromhex(key.key_sha256)


def _digest_of_presented(token: str) -> bytes:
    # A header that was not UTF-8 arrives with its bytes escaped: hash those bytes, which
    # match no configured key, rather than fail to encode them.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
