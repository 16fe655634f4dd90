"""The relay of one attempt, sans I/O: upstream events in, steps and failures out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from codexlb.failover import Action, Phase, verdict
from codexlb.relay import (
    COMPLETED,
    FAILED,
    HOLD,
    PASS,
    PLAIN_OUTPUT,
    PLAIN_PREFIXES,
    ResponseRecorder,
    Step,
)

RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "model": "m"}


def event(kind: str | None, **payload: Any) -> tuple[str | None, bytes]:
    return kind, json.dumps({"type": kind, **payload}).encode()


def item(index: int, text: str) -> tuple[str | None, bytes]:
    message = {"type": "message", "role": "assistant", "content": [{"text": text}]}
    return event("response.output_item.done", output_index=index, item=message)


CREATED = event("response.created", response=RESPONSE)
IN_PROGRESS = event("response.in_progress", response=RESPONSE)
RATE_LIMITS = event("codex.rate_limits", rate_limits={})
DELTA = event("response.output_text.delta", delta="hi")
KEEP_ALIVE: tuple[str | None, bytes] = (None, b"")
COMPLETED_EVENT = event("response.completed", response={**RESPONSE, "status": "completed"})


def feed(recorder: ResponseRecorder, *events: tuple[str | None, bytes]) -> list[Step]:
    return [recorder.observe(kind, data) for kind, data in events]


def test_a_normal_stream_holds_until_output_and_commits_at_the_end() -> None:
    recorder = ResponseRecorder()
    steps = feed(
        recorder,
        CREATED,
        IN_PROGRESS,
        RATE_LIMITS,
        KEEP_ALIVE,
        DELTA,
        KEEP_ALIVE,
        item(1, "second"),
        item(0, "first"),
        COMPLETED_EVENT,
    )
    assert steps == [HOLD, HOLD, HOLD, HOLD, PASS, PASS, PASS, PASS, COMPLETED]
    assert recorder.visible
    assert [i["content"][0]["text"] for i in recorder.ordered_output()] == ["first", "second"]
    assert recorder.response is not None
    assert recorder.response["status"] == "completed"
    assert recorder.failure is None


@pytest.mark.parametrize("kind", PLAIN_OUTPUT)
def test_plain_output_is_passed_on_by_its_type_alone(kind: str) -> None:
    recorder = ResponseRecorder()
    assert feed(recorder, CREATED, (kind, b"not even JSON")) == [HOLD, PASS]
    assert recorder.visible
    assert recorder.failure is None
    assert recorder.response is None
    as_written = json.dumps({"type": kind, "delta": "x"}, separators=(",", ":")).encode()
    assert as_written.startswith(PLAIN_PREFIXES)


def test_output_comes_from_completed_when_no_item_was_done() -> None:
    recorder = ResponseRecorder()
    output = [{"type": "message", "content": []}]
    feed(recorder, event("response.completed", response={**RESPONSE, "output": output}))
    assert recorder.ordered_output() == output


def test_an_assembled_response_shows_nothing_before_its_end() -> None:
    recorder = ResponseRecorder(streaming=False)
    feed(recorder, CREATED, DELTA, item(0, "x"))
    assert not recorder.visible
    assert feed(recorder, event("response.failed", response={"error": {"code": "server_error"}}))
    assert recorder.failure is not None
    assert not recorder.failure.visible


@pytest.mark.parametrize(
    ("terminal", "code", "status", "reported", "action"),
    [
        (
            event("response.failed", response={"error": {"code": "server_error"}}),
            "server_error",
            None,
            500,
            Action.COOL_DOWN,
        ),
        (
            event(
                "response.incomplete",
                response={"incomplete_details": {"reason": "max_output_tokens"}},
            ),
            "max_output_tokens",
            None,
            None,
            Action.PASS_ON,
        ),
        (
            event(
                "error",
                status=429,
                error={"code": "usage_limit_reached", "message": "slow down"},
                headers={"Retry-After": "30"},
            ),
            "usage_limit_reached",
            429,
            429,
            Action.RATE_LIMITED,
        ),
        (
            event("error", error={"type": "invalid_request_error", "message": "nope"}),
            "error",
            None,
            500,
            Action.PASS_ON,
        ),
    ],
    ids=["failed", "incomplete", "error-429", "error-without-code"],
)
def test_a_failure_before_output_is_a_value_for_the_verdict(
    terminal: tuple[str | None, bytes],
    code: str,
    status: int | None,
    reported: int | None,
    action: Action,
) -> None:
    recorder = ResponseRecorder()
    assert feed(recorder, CREATED, terminal) == [HOLD, FAILED]
    failure = recorder.failure
    assert failure is not None
    assert (failure.phase, failure.code, failure.status) == (Phase.EVENT, code, status)
    assert failure.reported_status == reported
    assert not failure.visible
    assert verdict(failure) is action


def test_an_error_event_keeps_its_headers_for_the_cooldown() -> None:
    recorder = ResponseRecorder()
    feed(recorder, event("error", status=429, error={}, headers={"X-Codex-Primary-Reset-At": "9"}))
    assert recorder.failure is not None
    assert recorder.failure.headers == {"x-codex-primary-reset-at": "9"}


def test_a_failure_after_output_is_passed_on() -> None:
    recorder = ResponseRecorder()
    feed(recorder, CREATED, DELTA, event("response.failed", response={"error": {}}))
    assert recorder.failure is not None
    assert recorder.failure.visible
    assert verdict(recorder.failure) is Action.PASS_ON


def test_a_stream_that_breaks_off_fails_over_before_output_and_ends_after() -> None:
    recorder = ResponseRecorder()
    feed(recorder, CREATED)
    assert verdict(recorder.broken("eof")) is Action.COOL_DOWN
    feed(recorder, DELTA)
    assert verdict(recorder.broken("eof")) is Action.BREAK

    ending = recorder.incomplete_event()
    assert ending["type"] == "response.failed"
    assert ending["response"]["id"] == "resp_1"  # from response.created
    assert ending["response"]["status"] == "failed"
    assert ending["response"]["error"]["code"] == "stream_incomplete"


def test_a_refused_snapshot_ends_as_failed_with_its_code() -> None:
    recorder = ResponseRecorder()
    feed(recorder, CREATED, DELTA, COMPLETED_EVENT)
    ending = recorder.failed_event("server_error", "not stored")
    assert ending["response"]["id"] == "resp_1"
    assert ending["response"]["error"] == {"code": "server_error", "message": "not stored"}


def test_unparsable_events_do_not_break_the_relay() -> None:
    recorder = ResponseRecorder()
    assert recorder.observe("response.output_item.done", b"{not json") is PASS
    assert recorder.observe("error", b"[1, 2]") is FAILED
    assert recorder.failure is not None
    assert recorder.failure.code == "error"
