"""The pure account choice (SPEC S4)."""

from __future__ import annotations

from collections import Counter

import pytest

from codexlb.balancer import Candidate, choose, earliest_recovery

NOW = 1_750_000_000.0


@pytest.mark.parametrize(
    ("candidate", "eligible"),
    [
        (Candidate("a"), True),
        (Candidate("a", enabled=False), False),
        (Candidate("a", usable=False), False),
        (Candidate("a", cooldown_until=NOW + 1, rate_limited_until=NOW + 1), False),
        (Candidate("a", cooldown_until=NOW), True),
        (Candidate("a", inflight=2, max_inflight=2), False),
        (Candidate("a", inflight=1, max_inflight=2), True),
        (Candidate("a", inflight=500, max_inflight=0), True),
        (Candidate("a", used_percent=100.0, usage_resets_at=NOW + 60), False),
        (Candidate("a", used_percent=100.0, usage_resets_at=NOW), True),
        (Candidate("a", used_percent=99.9, usage_resets_at=NOW + 60), True),
    ],
    ids=[
        "plain",
        "disabled",
        "unusable",
        "rate-limited",
        "cooldown-ends-now",
        "max-inflight-reached",
        "under-max-inflight",
        "unlimited-inflight",
        "full-until-reset",
        "full-reset-passed",
        "almost-full",
    ],
)
def test_eligibility(candidate: Candidate, eligible: bool) -> None:
    assert candidate.eligible(NOW) is eligible
    assert choose([candidate], NOW) == ("a" if eligible else None)


def test_when_every_account_is_out_the_first_back_off_to_end_is_tried() -> None:
    backing_off = [
        Candidate("later", cooldown_until=NOW + 9),
        Candidate("sooner", cooldown_until=NOW + 2),
        Candidate("rate-limited", cooldown_until=NOW + 1, rate_limited_until=NOW + 1),
        Candidate("full", cooldown_until=NOW + 1, used_percent=100.0, usage_resets_at=NOW + 60),
        Candidate("busy", cooldown_until=NOW + 1, inflight=1, max_inflight=1),
        Candidate("disabled", cooldown_until=NOW + 1, enabled=False),
    ]
    assert not any(c.eligible(NOW) for c in backing_off)
    assert choose(backing_off, NOW) == "sooner"
    assert choose(backing_off, NOW, exclude={"sooner"}) == "later"
    assert choose(backing_off, NOW, exclude={"sooner", "later"}) is None
    # A rate limit that ended leaves the error back-off that outlasts it.
    assert choose([Candidate("a", cooldown_until=NOW + 5, rate_limited_until=NOW - 1)], NOW) == "a"
    # An eligible account always goes first.
    assert choose([*backing_off, Candidate("ready", inflight=50)], NOW) == "ready"


def test_full_account_is_eligible_again_after_its_reset() -> None:
    full = Candidate("a", used_percent=100.0, usage_resets_at=NOW + 60)

    assert choose([full], NOW + 59) is None
    assert choose([full], NOW + 60) == "a"


def test_prefer_beats_affinity_beats_strategy() -> None:
    candidates = [
        Candidate("idle"),
        Candidate("parent", inflight=3),
        Candidate("sticky", inflight=3),
    ]

    assert choose(candidates, NOW) == "idle"
    assert choose(candidates, NOW, affinity="sticky") == "sticky"
    assert choose(candidates, NOW, prefer="parent", affinity="sticky") == "parent"


@pytest.mark.parametrize(
    ("prefer", "affinity", "expected"),
    [
        ("down", "sticky", "sticky"),
        ("down", "down", "idle"),
        (None, "down", "idle"),
        ("unknown", None, "idle"),
    ],
)
def test_ineligible_preference_falls_through(
    prefer: str | None, affinity: str | None, expected: str
) -> None:
    candidates = [
        Candidate("down", cooldown_until=NOW + 10),
        Candidate("sticky", inflight=2),
        Candidate("idle"),
    ]

    assert choose(candidates, NOW, prefer=prefer, affinity=affinity) == expected


def test_exclude_applies_to_preferences_and_strategy() -> None:
    candidates = [Candidate("a"), Candidate("b", inflight=1), Candidate("c", inflight=2)]

    assert choose(candidates, NOW, prefer="a", affinity="a", exclude={"a"}) == "b"
    assert choose(candidates, NOW, exclude={"a", "b"}) == "c"
    assert choose(candidates, NOW, exclude={"a", "b", "c"}) is None


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        # a lower usage bucket wins even with more requests in flight
        (Candidate("a", used_percent=10, inflight=5), Candidate("b", used_percent=50), "a"),
        # within one bucket, fewer in flight wins
        (Candidate("a", used_percent=11, inflight=1), Candidate("b", used_percent=13), "b"),
        # in-flight counts per unit of weight
        (Candidate("a", inflight=3, weight=4), Candidate("b", inflight=1, weight=1), "a"),
        # equal load per weight: the heavier account wins
        (Candidate("a", inflight=1, weight=1), Candidate("b", inflight=2, weight=2), "b"),
    ],
    ids=["usage-bucket", "inflight", "inflight-per-weight", "weight"],
)
def test_least_used_order(a: Candidate, b: Candidate, winner: str) -> None:
    for turn in range(4):
        assert choose([a, b], NOW, turn=turn) == winner
        assert choose([b, a], NOW, turn=turn) == winner


def test_heavily_used_account_never_wins_against_a_lightly_used_one() -> None:
    candidates = [Candidate("busy", used_percent=95.0), Candidate("fresh", used_percent=10.0)]

    picks = {choose(candidates, NOW, turn=turn) for turn in range(100)}

    assert picks == {"fresh"}


def test_least_used_spreads_exact_ties_by_turn() -> None:
    candidates = [Candidate("a"), Candidate("b"), Candidate("c")]

    picks = Counter(choose(candidates, NOW, turn=turn) for turn in range(30))

    assert picks == {"a": 10, "b": 10, "c": 10}


def test_round_robin_rotates_evenly_over_eligible_accounts() -> None:
    candidates = [
        Candidate("a", used_percent=90.0),
        Candidate("off", enabled=False),
        Candidate("b"),
        Candidate("c", inflight=7),
    ]

    picks = [choose(candidates, NOW, strategy="round_robin", turn=turn) for turn in range(9)]

    assert picks == ["a", "b", "c"] * 3


def test_round_robin_still_honours_preferences() -> None:
    candidates = [Candidate("a"), Candidate("b")]

    assert choose(candidates, NOW, strategy="round_robin", turn=0, prefer="b") == "b"
    assert choose(candidates, NOW, strategy="round_robin", turn=1, affinity="a") == "a"


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([], None),
        ([Candidate("a")], None),
        ([Candidate("a", cooldown_until=NOW - 5)], None),
        (
            [Candidate("a", cooldown_until=NOW + 30), Candidate("b", cooldown_until=NOW + 10)],
            NOW + 10,
        ),
        ([Candidate("a", used_percent=100, usage_resets_at=NOW + 40)], NOW + 40),
        # the later of cooldown and usage reset is when the account recovers
        (
            [Candidate("a", cooldown_until=NOW + 5, used_percent=100, usage_resets_at=NOW + 40)],
            NOW + 40,
        ),
        (
            [Candidate("a", cooldown_until=NOW + 50, used_percent=100, usage_resets_at=NOW + 40)],
            NOW + 50,
        ),
        # a reset time of a window that is not full does not block anything
        ([Candidate("a", used_percent=80, usage_resets_at=NOW + 40)], None),
        # disabled and unusable accounts do not recover by time
        (
            [
                Candidate("a", enabled=False, cooldown_until=NOW + 1),
                Candidate("b", usable=False, cooldown_until=NOW + 2),
                Candidate("c", cooldown_until=NOW + 3),
            ],
            NOW + 3,
        ),
        ([Candidate("a", enabled=False, cooldown_until=NOW + 1)], None),
    ],
)
def test_earliest_recovery(candidates: list[Candidate], expected: float | None) -> None:
    assert earliest_recovery(candidates, NOW) == expected
