"""What one replica learned about an upstream account, as a value other replicas adopt (S12).

A ``Knowledge`` is published whole each time a replica learns something new about an account
(``Pool`` calls its ``Observer``), and ``merged`` into what the receiver knows by rules that
do not depend on the order messages arrive in, so every replica and the database row converge:

- cooldowns: the later ``until`` wins (a reset time only moves out), with its reason;
- usage windows: the later observation (``usage_at``) wins;
- refused credentials: the later verdict (``refused_at``) wins, a refusal or an acceptance.

Credentials never leave the process: an identity (API key, ChatGPT account id) and refused
credentials travel as short SHA-256 fingerprints, compared with the receiver's own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from codexlb.credentials import Credentials

FINGERPRINT_CHARS = 32


@dataclass(frozen=True, slots=True)
class Knowledge:
    """One account's shared state; field names are the ``account_knowledge`` columns."""

    identity: str
    cooldown_until: float = 0.0
    rate_limited_until: float = 0.0
    reason: str | None = None
    usage_at: float = 0.0
    primary_used: float = 0.0
    primary_resets_at: float = 0.0
    secondary_used: float = 0.0
    secondary_resets_at: float = 0.0
    refused: str | None = None
    """The fingerprint of the credentials the upstream refused, None when none are."""
    retry_at: float = 0.0
    refused_at: float = 0.0
    """When the last verdict on the credentials (refused or accepted again) was reached."""

    def row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Knowledge:
        """From a database row or a notification; ``ValueError`` when it is not one."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = row.get(f.name)
            if f.name in ("identity",):
                if not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string")
            elif f.name in ("reason", "refused"):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string or null")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number")
            elif not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite")
            values[f.name] = value
        return cls(**values)


def merged(old: Knowledge | None, new: Knowledge) -> Knowledge:
    """``new`` adopted into ``old`` (the rules of the module docstring). Another identity
    replaces what was known: it is another upstream account."""
    if old is None or old.identity != new.identity:
        return new
    result = old
    if new.cooldown_until > old.cooldown_until:
        result = replace(result, cooldown_until=new.cooldown_until, reason=new.reason)
    if new.rate_limited_until > old.rate_limited_until:
        result = replace(result, rate_limited_until=new.rate_limited_until)
    if new.usage_at > old.usage_at:
        result = replace(
            result,
            usage_at=new.usage_at,
            primary_used=new.primary_used,
            primary_resets_at=new.primary_resets_at,
            secondary_used=new.secondary_used,
            secondary_resets_at=new.secondary_resets_at,
        )
    if new.refused_at > old.refused_at:
        result = replace(
            result, refused=new.refused, retry_at=new.retry_at, refused_at=new.refused_at
        )
    return result


def identity_fingerprint(api_key: str | None, account_id: str | None) -> str:
    return _fingerprint("identity", api_key or "", account_id or "")


def credentials_fingerprint(credentials: Credentials) -> str:
    return _fingerprint("credentials", credentials.api_key or "", credentials.access_token or "")


def _fingerprint(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:FINGERPRINT_CHARS]
