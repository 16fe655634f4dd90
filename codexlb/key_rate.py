"""A client key's ``requests_per_minute`` (SPEC S9), counted across the replicas (S12).

The count goes through ``SharedState.take``: in memory with one process, one round trip to
PostgreSQL with several. Every request that is about to go upstream counts once
(``Exchange.run``), whichever door it came through; a refused one does not count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from codexlb.config import ApiKeyConfig
from codexlb.errors import CodexLBError
from codexlb.shared import SharedState

WINDOW_SECONDS = 60.0


class KeyRateLimited(CodexLBError):
    """429 ``requests`` / ``rate_limit_exceeded`` with ``Retry-After`` (S1.4)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, key: str, limit: int, retry_after: float) -> None:
        super().__init__(
            f"Client key {key!r} is over its limit of {limit} requests per minute; "
            f"retry in {math.ceil(retry_after)}s."
        )
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class RequestRate:
    """The ``requests_per_minute`` of each configured client key."""

    def __init__(self, keys: Sequence[ApiKeyConfig], shared: SharedState) -> None:
        self._limits = {k.name: k.requests_per_minute for k in keys if k.requests_per_minute}
        self._shared = shared

    async def admit(self, scope: str) -> None:
        """Count a request of ``scope``; ``KeyRateLimited`` when the key is over its limit."""
        limit = self._limits.get(scope)
        if limit is None:
            return
        taken = await self._shared.take(f"rpm:{scope}", limit=limit, window=WINDOW_SECONDS)
        if not taken.admitted:
            raise KeyRateLimited(scope, limit, taken.retry_after)
