"""Heartbeats in the engine's state: they move an attempt's heartbeat deadline, record nothing,
and their details reach the next attempt; a silent attempt fails with HeartbeatTimeout."""

from __future__ import annotations

import random

from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityHeartbeat,
    ActivityScheduled,
    EventBody,
    HistoryEvent,
    Payload,
    RetryPolicy,
    WorkflowStarted,
)
from orchestrator._engine.state import (
    HEARTBEAT_TIMEOUT_ERROR,
    WorkflowState,
    decide_timers,
    heartbeat_grace,
    note_heartbeat,
)
from orchestrator.payloads import to_payload

WF = "wf-beat"
T0 = 1_000_000
RNG = random.Random(0)


def _state(heartbeat_timeout_ms: int | None = 3_000) -> WorkflowState:
    state = WorkflowState(WF)
    _apply(state, WorkflowStarted(workflow_type="t", request_id="r", input=to_payload(1),
                                  random_seed=1), T0)  # fmt: skip
    scheduled = ActivityScheduled(
        seq=1,
        activity_name="svc.long",
        topic="svc.commands",
        input=to_payload(1),
        idempotency_key=f"{WF}/1",
        is_compensation=False,
        retry=RetryPolicy(max_attempts=3, initial_interval_ms=100, jitter=0),
        attempt_timeout_ms=None,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )
    _apply(state, scheduled, T0)
    return state


def _apply(state: WorkflowState, body: EventBody, at: int) -> None:
    state.apply(
        HistoryEvent(workflow_id=WF, event_seq=state.last_seq + 1, recorded_at_ms=at, event=body)
    )


def _beat(attempt: int, details: object) -> ActivityHeartbeat:
    return ActivityHeartbeat(
        workflow_id=WF,
        seq=1,
        attempt=attempt,
        idempotency_key=f"{WF}/1",
        sent_at_ms=0,
        details=to_payload(details),
    )


def test_a_silent_attempt_fails_by_heartbeat_timeout() -> None:
    state = _state()
    assert state.next_due_ms() == T0 + 3_000
    assert decide_timers(state, T0 + 2_999, RNG) == []
    (failed,) = decide_timers(state, T0 + 3_000, RNG)
    assert isinstance(failed, ActivityAttemptFailed)
    assert failed.error.type == HEARTBEAT_TIMEOUT_ERROR
    assert failed.retry_at_ms is not None, "the retry policy decides: another attempt"


def test_heartbeats_move_the_deadline_and_their_details_reach_the_next_attempt() -> None:
    state = _state()
    assert note_heartbeat(state, _beat(1, {"done": 10}), T0 + 2_000)
    assert note_heartbeat(state, _beat(1, {"done": 20}), T0 + 4_000)
    assert state.next_due_ms() == T0 + 7_000
    assert decide_timers(state, T0 + 6_999, RNG) == []
    (failed,) = decide_timers(state, T0 + 7_000, RNG)
    assert isinstance(failed, ActivityAttemptFailed)
    _apply(state, failed, T0 + 7_000)
    assert failed.retry_at_ms is not None
    _apply(state, ActivityAttemptStarted(seq=1, attempt=2), failed.retry_at_ms)
    act = state.activities[1]
    assert act.heartbeat_details == to_payload({"done": 20}), "for the next attempt's command"
    assert state.next_due_ms() == failed.retry_at_ms + 3_000, "the new attempt's own deadline"


def test_heartbeats_of_an_ended_or_other_attempt_change_nothing() -> None:
    state = _state()
    assert not note_heartbeat(state, _beat(2, {"x": 1}), T0 + 1_000), "not the current attempt"
    stranger = _beat(1, {"x": 1}).model_copy(update={"idempotency_key": "other/1"})
    assert not note_heartbeat(state, stranger, T0 + 1_000)
    assert state.activities[1].heartbeat_details is None
    assert state.next_due_ms() == T0 + 3_000


def test_no_heartbeat_timeout_means_no_heartbeat_deadline() -> None:
    state = _state(heartbeat_timeout_ms=None)
    assert state.next_due_ms() is None
    assert note_heartbeat(state, _beat(1, {"x": 1}), T0 + 1_000)
    assert state.next_due_ms() is None


def test_a_rebuilt_workflow_gives_its_attempt_a_full_heartbeat_timeout() -> None:
    state = _state()  # as folded from the history an hour later: no heartbeat is known
    heartbeat_grace(state, T0 + 3_600_000)
    assert state.next_due_ms() == T0 + 3_600_000 + 3_000
    assert decide_timers(state, T0 + 3_600_000, RNG) == []


def test_details_are_kept_even_without_a_payload_change() -> None:
    state = _state()
    assert note_heartbeat(state, _beat(1, {"page": 3}), T0 + 1_000)
    nothing = _beat(1, None).model_copy(update={"details": None})
    assert note_heartbeat(state, nothing, T0 + 2_000)
    assert state.activities[1].heartbeat_details == to_payload({"page": 3})
    assert isinstance(state.activities[1].heartbeat_details, Payload)
