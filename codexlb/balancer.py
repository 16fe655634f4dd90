"""The pure choice of an upstream account (SPEC S4).

``choose`` takes a snapshot of the pool as plain values and returns a name; it does no I/O and
keeps no state, so every routing rule is tested without sockets. Order of preference:

1. the account that served the conversation's parent (keeps the prompt cache warm and lets
   replay send reasoning verbatim);
2. the account a ``session-id``/``thread-id``/``prompt_cache_key`` was last served by;
3. the strategy: ``least_used`` (usage bucket, then in-flight per weight, then weight) or
   ``round_robin``.

A preferred account that is not eligible is skipped, never waited for. When no account is
eligible but some are only backing off after errors, the one whose back-off ends first is
tried rather than failing the request with nothing tried: a few transient faults must not
take the whole pool out (outlier detection's "panic mode" in production proxies).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal, NamedTuple, Protocol

Strategy = Literal["least_used", "round_robin"]

USAGE_BUCKET_PERCENT = 5.0
"""Usage figures within one bucket count as equal, so in-flight load can break the tie."""


class Contender(Protocol):
    """What the balancer reads of an account. ``Candidate`` holds it as plain values; the pool
    passes its live accounts, which read the same way, so a choice copies nothing."""

    @property
    def name(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def usable(self) -> bool: ...
    @property
    def cooldown_until(self) -> float: ...
    @property
    def rate_limited_until(self) -> float:
        """The part of ``cooldown_until`` owed to a rate limit; the rest is error back-off."""

    @property
    def inflight(self) -> int: ...
    @property
    def max_inflight(self) -> int:
        """0: no limit."""

    @property
    def used_percent(self) -> float:
        """The highest used percentage over the account's usage windows."""

    @property
    def usage_resets_at(self) -> float:
        """When the window that is at 100% resets (0 when unknown)."""

    @property
    def weight(self) -> float: ...


def eligible(candidate: Contender, now: float) -> bool:
    """Whether ``candidate`` may take a request at ``now``."""
    return (
        candidate.enabled
        and candidate.usable
        and candidate.cooldown_until <= now
        and (candidate.max_inflight == 0 or candidate.inflight < candidate.max_inflight)
        and not (candidate.used_percent >= 100.0 and candidate.usage_resets_at > now)
    )


class Candidate(NamedTuple):
    """A ``Contender`` as plain values."""

    name: str
    enabled: bool = True
    usable: bool = True
    cooldown_until: float = 0.0
    inflight: int = 0
    max_inflight: int = 0
    used_percent: float = 0.0
    """The highest used percentage over the account's usage windows."""
    usage_resets_at: float = 0.0
    """When the window that is at 100% resets (0 when unknown)."""
    weight: float = 1.0
    rate_limited_until: float = 0.0

    def eligible(self, now: float) -> bool:
        return eligible(self, now)


def choose(
    candidates: Sequence[Contender],
    now: float,
    *,
    prefer: str | None = None,
    affinity: str | None = None,
    exclude: Collection[str] = (),
    strategy: Strategy = "least_used",
    turn: int = 0,
) -> str | None:
    """The account for the next attempt, or ``None`` when no account is eligible.

    ``turn`` is a counter the caller advances per choice; ``round_robin`` rotates by it and
    ``least_used`` uses it only to break exact ties.
    """
    ready = [c for c in candidates if c.name not in exclude and eligible(c, now)]
    if not ready:
        probes = [c for c in candidates if c.name not in exclude and backing_off(c, now)]
        return min(probes, key=_cooldown).name if probes else None
    for wanted in (prefer, affinity):
        if wanted is not None:
            for candidate in ready:
                if candidate.name == wanted:
                    return wanted
    offset = turn % len(ready)
    rotated = ready[offset:] + ready[:offset]
    if strategy == "round_robin":
        return rotated[0].name
    return min(rotated, key=_load).name


def backing_off(candidate: Contender, now: float) -> bool:
    """Whether ``candidate`` is out only for an error back-off, and eligible once it ends."""
    return candidate.cooldown_until > now >= candidate.rate_limited_until and eligible(
        candidate, candidate.cooldown_until
    )


def _cooldown(candidate: Contender) -> float:
    return candidate.cooldown_until


def _load(candidate: Contender) -> tuple[int, float, float]:
    weight = candidate.weight
    return (
        int(candidate.used_percent // USAGE_BUCKET_PERCENT),
        candidate.inflight / weight,
        -weight,
    )


def earliest_recovery(candidates: Sequence[Contender], now: float) -> float | None:
    """When the first ineligible account becomes usable again by time alone, if ever."""
    times = [
        max(c.cooldown_until, c.usage_resets_at if c.used_percent >= 100.0 else 0.0)
        for c in candidates
        if c.enabled and c.usable
    ]
    future = [t for t in times if t > now]
    return min(future) if future else None
