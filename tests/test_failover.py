"""The failover verdict as a table: one row per upstream behaviour (PROTOCOL.md §5, SPEC S4),
run without sockets, the way tests/test_balancer.py tests the balancer."""

from __future__ import annotations

import pytest

from codexlb.failover import Action, Failure, Phase, status_for, verdict

A = Action
CONNECT, HANDSHAKE, STATUS, EVENT, BREAK = (
    Phase.CONNECT,
    Phase.HANDSHAKE,
    Phase.STATUS,
    Phase.EVENT,
    Phase.BREAK,
)

ROWS: list[tuple[str, Failure, Action]] = [
    # -- nothing visible yet: invisible to the client ----------------------------------------
    ("connect error or timeout", Failure(CONNECT, message="refused"), A.COOL_DOWN),
    ("socket dropped before any event", Failure(BREAK), A.COOL_DOWN),
    ("stream ended before its terminal event", Failure(BREAK, message="eof"), A.COOL_DOWN),
    ("handshake answered 500", Failure(HANDSHAKE, status=500), A.COOL_DOWN),
    ("handshake answered 426", Failure(HANDSHAKE, status=426), A.COOL_DOWN),
    ("handshake answered 429", Failure(HANDSHAKE, status=429), A.RATE_LIMITED),
    ("handshake answered 401", Failure(HANDSHAKE, status=401), A.REFRESH),
    ("HTTP 500", Failure(STATUS, status=500), A.COOL_DOWN),
    ("HTTP 503", Failure(STATUS, status=503, code="overloaded"), A.COOL_DOWN),
    ("HTTP 403", Failure(STATUS, status=403), A.COOL_DOWN),
    ("HTTP 408", Failure(STATUS, status=408), A.COOL_DOWN),
    ("HTTP 401", Failure(STATUS, status=401, code="invalid_api_key"), A.REFRESH),
    (
        "HTTP 401 after a refresh",
        Failure(STATUS, status=401, refreshed=True),
        A.UNUSABLE,
    ),
    (
        "HTTP 429 usage_limit_reached",
        Failure(STATUS, status=429, code="usage_limit_reached"),
        A.RATE_LIMITED,
    ),
    (
        "HTTP 429 rate_limit_exceeded",
        Failure(STATUS, status=429, code="rate_limit_exceeded"),
        A.RATE_LIMITED,
    ),
    ("HTTP 429 without a code", Failure(STATUS, status=429), A.RATE_LIMITED),
    (
        "insufficient_quota with another status",
        Failure(STATUS, status=400, code="insufficient_quota"),
        A.RATE_LIMITED,
    ),
    (
        "HTTP 400 invalid_encrypted_content",
        Failure(STATUS, status=400, code="invalid_encrypted_content"),
        A.WITHOUT_REASONING,
    ),
    (
        "invalid_encrypted_content once reasoning is gone",
        Failure(STATUS, status=400, code="invalid_encrypted_content", reasoning_stripped=True),
        A.PASS_ON,
    ),
    (
        "HTTP 400: the client's mistake",
        Failure(STATUS, status=400, code="invalid_request"),
        A.PASS_ON,
    ),
    ("HTTP 404", Failure(STATUS, status=404), A.PASS_ON),
    (
        "error event previous_response_not_found, live anchor",
        Failure(EVENT, status=400, code="previous_response_not_found", live_anchor=True),
        A.REPLAY,
    ),
    (
        "error event without status, older message, live anchor",
        Failure(EVENT, message="Invalid 'previous_response_id': 'resp_1'.", live_anchor=True),
        A.REPLAY,
    ),
    (
        "previous_response_not_found of a replayed request",
        Failure(EVENT, status=400, code="previous_response_not_found"),
        A.PASS_ON,
    ),
    (
        "error event websocket_connection_limit_reached",
        Failure(EVENT, status=400, code="websocket_connection_limit_reached"),
        A.RECONNECT,
    ),
    (
        "connection limit again on the new socket",
        Failure(EVENT, code="websocket_connection_limit_reached", reconnected=True),
        A.NEXT,
    ),
    ("error event status 500", Failure(EVENT, status=500, code="server_error"), A.COOL_DOWN),
    ("error event status 502", Failure(EVENT, status=502, code="bad_gateway"), A.COOL_DOWN),
    (
        "error event status 429 usage_limit_reached",
        Failure(EVENT, status=429, code="usage_limit_reached"),
        A.RATE_LIMITED,
    ),
    (
        "error event rate_limit_exceeded without status",
        Failure(EVENT, code="rate_limit_exceeded"),
        A.RATE_LIMITED,
    ),
    ("error event status 401", Failure(EVENT, status=401, code="token_expired"), A.REFRESH),
    (
        "error event without status, unknown code",
        Failure(EVENT, code="something_new"),
        A.PASS_ON,
    ),
    (
        "error event status 400 invalid_prompt",
        Failure(EVENT, status=400, code="invalid_prompt"),
        A.PASS_ON,
    ),
    ("response.failed server_error", Failure(EVENT, code="server_error"), A.COOL_DOWN),
    ("response.failed overloaded", Failure(EVENT, code="server_is_overloaded"), A.COOL_DOWN),
    (
        "response.failed usage_limit_reached",
        Failure(EVENT, code="usage_limit_reached"),
        A.RATE_LIMITED,
    ),
    (
        "response.failed context_length_exceeded",
        Failure(EVENT, code="context_length_exceeded"),
        A.PASS_ON,
    ),
    (
        "response.failed invalid_encrypted_content",
        Failure(EVENT, code="invalid_encrypted_content"),
        A.WITHOUT_REASONING,
    ),
    (
        "response.incomplete",
        Failure(EVENT, code="max_output_tokens", incomplete=True),
        A.PASS_ON,
    ),
    # -- a request that met a server failure on another account already ----------------------
    ("HTTP 500, suspect", Failure(STATUS, status=500, suspect=True), A.GIVE_UP),
    (
        "error event status 503, suspect",
        Failure(EVENT, status=503, code="server_error", suspect=True),
        A.GIVE_UP,
    ),
    (
        "response.failed server_error, suspect",
        Failure(EVENT, code="server_error", suspect=True),
        A.GIVE_UP,
    ),
    ("stream broke off, suspect", Failure(BREAK, message="eof", suspect=True), A.GIVE_UP),
    ("connect error, suspect", Failure(CONNECT, message="refused", suspect=True), A.COOL_DOWN),
    ("handshake answered 500, suspect", Failure(HANDSHAKE, status=500, suspect=True), A.COOL_DOWN),
    ("HTTP 403, suspect", Failure(STATUS, status=403, suspect=True), A.COOL_DOWN),
    ("HTTP 429, suspect", Failure(STATUS, status=429, suspect=True), A.RATE_LIMITED),
    ("HTTP 401, suspect", Failure(STATUS, status=401, suspect=True), A.REFRESH),
    (
        "HTTP 400, suspect",
        Failure(STATUS, status=400, code="invalid_request", suspect=True),
        A.PASS_ON,
    ),
    ("broke off after output, suspect", Failure(BREAK, visible=True, suspect=True), A.BREAK),
    # -- output already visible: nothing can move any more ------------------------------------
    (
        "response.failed server_error after output",
        Failure(EVENT, code="server_error", visible=True),
        A.PASS_ON,
    ),
    (
        "error event 429 after output",
        Failure(EVENT, status=429, code="usage_limit_reached", visible=True),
        A.PASS_ON,
    ),
    (
        "previous_response_not_found after output",
        Failure(EVENT, code="previous_response_not_found", live_anchor=True, visible=True),
        A.PASS_ON,
    ),
    ("stream broke off after output", Failure(BREAK, visible=True), A.BREAK),
    ("socket dropped after output", Failure(BREAK, message="closed", visible=True), A.BREAK),
]


@pytest.mark.parametrize(("failure", "action"), [row[1:] for row in ROWS], ids=[r[0] for r in ROWS])
def test_verdict(failure: Failure, action: Action) -> None:
    assert verdict(failure) is action


def test_every_action_is_reached() -> None:
    assert {row[2] for row in ROWS} == set(Action)


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (Failure(STATUS, status=418), 418),
        (Failure(EVENT, status=503, code="server_error"), 503),
        (Failure(EVENT, code="usage_limit_reached"), 429),
        (Failure(EVENT, code="context_length_exceeded"), 400),
        (Failure(EVENT, code="server_error"), 500),
        (Failure(EVENT, code="something_new"), 500),
        (Failure(EVENT, code="max_output_tokens", incomplete=True), None),
    ],
)
def test_the_status_a_failure_is_counted_with(failure: Failure, status: int | None) -> None:
    assert failure.reported_status == status


@pytest.mark.parametrize(
    ("failure", "implicated"),
    [
        (Failure(STATUS, status=502), True),
        (Failure(EVENT, code="overloaded"), True),
        (Failure(BREAK), True),
        (Failure(CONNECT), False),
        (Failure(HANDSHAKE, status=503), False),
        (Failure(STATUS, status=403), False),
        (Failure(EVENT, code="max_output_tokens", incomplete=True), False),
    ],
)
def test_which_failures_the_request_may_have_caused(failure: Failure, implicated: bool) -> None:
    assert failure.implicates_request is implicated


def test_status_for_codes() -> None:
    assert status_for(None) == 500
    assert status_for("previous_response_not_found") == 400


def test_descriptions_name_the_failure_and_nothing_more() -> None:
    assert (
        Failure(STATUS, status=503, code="overloaded").describe() == "HTTP error (503, overloaded)"
    )
    assert Failure(CONNECT, message="timed out").describe() == "no answer (timed out)"
    assert Failure(BREAK).describe() == "stream broke off"
