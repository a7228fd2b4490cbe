"""The engine without Kafka: a workflow's code driven by events, and replay of its history."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityParked,
    ActivityReply,
    ActivityScheduled,
    ErrorInfo,
    HistoryEvent,
    LateReplyIgnored,
    OperatorActed,
    OperatorAction,
    ReplyOutcome,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator._engine.instance import WorkflowRun
from orchestrator._engine.state import OperatorRefused, fold
from orchestrator._engine.store import WorkflowSummary
from orchestrator._payloads import from_payload, to_payload
from orchestrator.errors import NonDeterminismError
from orchestrator.workflow import WorkflowRegistry

from .sagas import Done, Step, ThreeSteps, Trip, TripResult, Unbounded, WaitsForSignal

REGISTRY = WorkflowRegistry([ThreeSteps, WaitsForSignal])
Behaviour = Callable[[ActivityScheduled, int], ActivityReply | None]


def _start(
    wf: str,
    trip: object,
    kind: str = "three-steps",
    now: int = 1_000,
    registry: WorkflowRegistry = REGISTRY,
) -> tuple[WorkflowRun, list[HistoryEvent]]:
    run = WorkflowRun(wf, registry)
    msg = StartWorkflow(
        workflow_id=wf, workflow_type=kind, request_id="r1", input=to_payload(trip), sent_at_ms=now
    )
    return run, run.start(msg, now, None)


def _reply(
    act: ActivityScheduled, attempt: int, outcome: ReplyOutcome, error: str = ""
) -> ActivityReply:
    return ActivityReply(
        workflow_id="wf",
        seq=act.seq,
        attempt=attempt,
        idempotency_key=act.idempotency_key,
        outcome=outcome,
        sent_at_ms=0,
        result=to_payload(Done(n=act.seq, ref=f"{act.activity_name}:{attempt}"))
        if outcome is ReplyOutcome.SUCCESS
        else None,
        error=ErrorInfo(type=error or "Boom", message="no")
        if error or outcome is not ReplyOutcome.SUCCESS
        else None,
    )


def _drive(
    run: WorkflowRun, events: list[HistoryEvent], behave: Behaviour, now: int = 1_000
) -> list[HistoryEvent]:
    """Answer every command like a service would until the workflow ends or nothing moves."""
    history = list(events)
    inbox = list(events)
    for _ in range(200):
        if run.finished:
            break
        new: list[HistoryEvent] = []
        for ev in inbox:
            body = ev.event
            if isinstance(body, ActivityScheduled | ActivityAttemptStarted):
                act = run.state.activities[body.seq]
                scheduled = ActivityScheduled(
                    seq=act.seq,
                    activity_name=act.name,
                    topic=act.topic,
                    input=act.input,
                    idempotency_key=act.idempotency_key,
                    is_compensation=act.is_compensation,
                    retry=act.retry,
                )
                reply = behave(scheduled, act.attempt)
                if reply is not None:
                    new.extend(run.on_reply(reply, now))
        if not new:
            due = run.state.next_due_ms()
            if due is None:
                break
            now = max(now, due)
            new = run.on_timers(now)
        history.extend(new)
        inbox = new
    return history


def _names(history: list[HistoryEvent]) -> list[str]:
    return [
        f"{'undo' if e.event.is_compensation else 'do'}:{e.event.activity_name}"
        for e in history
        if isinstance(e.event, ActivityScheduled)
    ]


def ok(act: ActivityScheduled, attempt: int) -> ActivityReply:
    return _reply(act, attempt, ReplyOutcome.SUCCESS)


def test_three_steps_complete_with_typed_results() -> None:
    run, events = _start("wf", Trip())
    history = _drive(run, events, ok)
    assert run.state.status is WorkflowStatus.COMPLETED
    assert run.state.result is not None
    result = from_payload(run.state.result, TripResult)
    assert result.refs == ["a.do:1", "b.do:1", "c.do:1"]
    assert _names(history) == ["do:a.do", "do:b.do", "do:c.do"]
    assert [e.event_seq for e in history] == list(range(1, len(history) + 1))


def test_failure_at_step_three_compensates_two_then_one() -> None:
    def fail_c(act: ActivityScheduled, attempt: int) -> ActivityReply:
        if act.activity_name == "c.do":
            return _reply(act, attempt, ReplyOutcome.BUSINESS_FAILURE, "Declined")
        return ok(act, attempt)

    run, events = _start("wf", Trip())
    history = _drive(run, events, fail_c)
    assert run.state.status is WorkflowStatus.COMPENSATED
    assert run.state.error is not None and run.state.error.type == "Declined"
    assert _names(history) == ["do:a.do", "do:b.do", "do:c.do", "undo:b.undo", "undo:a.undo"]


def test_retryable_failures_back_off_then_succeed() -> None:
    def flaky_a(act: ActivityScheduled, attempt: int) -> ActivityReply:
        if act.activity_name == "a.do" and attempt < 3:
            return _reply(act, attempt, ReplyOutcome.RETRYABLE_FAILURE)
        return ok(act, attempt)

    run, events = _start("wf", Trip())
    _drive(run, events, flaky_a)
    assert run.state.status is WorkflowStatus.COMPLETED
    assert run.state.activities[1].attempt == 3


def test_retries_exhausted_fail_without_compensation_when_nothing_registered() -> None:
    def broken_a(act: ActivityScheduled, attempt: int) -> ActivityReply:
        return _reply(act, attempt, ReplyOutcome.RETRYABLE_FAILURE)

    run, events = _start("wf", Trip())
    history = _drive(run, events, broken_a)
    assert run.state.status is WorkflowStatus.FAILED
    assert _names(history) == ["do:a.do"]
    assert run.state.activities[1].attempt == 3


def test_attempt_timeout_retries_and_a_late_reply_changes_nothing() -> None:
    silent_once: dict[int, int] = {}

    def slow_b(act: ActivityScheduled, attempt: int) -> ActivityReply | None:
        if act.activity_name == "b.do" and attempt == 1:
            silent_once[act.seq] = attempt
            return None  # no reply: the 5 s attempt timeout fires
        return ok(act, attempt)

    run, events = _start("wf", Trip())
    _drive(run, events, slow_b)
    assert run.state.status is WorkflowStatus.COMPLETED
    b = run.state.activities[2]
    assert b.attempt == 2
    late = run.on_reply(
        ok(
            ActivityScheduled(
                seq=2,
                activity_name="b.do",
                topic="svc-b.commands",
                input=b.input,
                idempotency_key=b.idempotency_key,
                is_compensation=False,
                retry=b.retry,
            ),
            1,
        ),
        10**9,
    )
    assert [type(e.event) for e in late] == [LateReplyIgnored]
    assert run.state.status is WorkflowStatus.COMPLETED


def test_replay_rebuilds_the_same_state_and_detects_changed_code() -> None:
    run, events = _start("wf", Trip(sleep_ms=1000))
    history = _drive(run, events, ok)
    replayed = WorkflowRun.replay("wf", history, REGISTRY)
    assert replayed.state == run.state
    assert replayed.state.result == run.state.result  # same ctx.now() and ctx.uuid()

    tampered = [
        e for e in history if not (isinstance(e.event, ActivityScheduled) and e.event.seq == 2)
    ]
    renumbered = [e.model_copy(update={"event_seq": i}) for i, e in enumerate(tampered, 1)]
    with pytest.raises(NonDeterminismError, match="wf"):
        WorkflowRun.replay("wf", renumbered, REGISTRY)


def test_cancel_compensates_what_was_done() -> None:
    run, events = _start("wf", Trip(sleep_ms=3_600_000))
    history = list(events)
    # a and b succeed, then the workflow sleeps for an hour
    history += run.on_reply(ok(events[-1].event, 1), 1_000)  # type: ignore[arg-type]
    b = history[-1].event
    assert isinstance(b, ActivityScheduled)
    history += run.on_reply(ok(b, 1), 1_000)
    assert run.state.timers
    history += run.on_cancel("customer changed their mind", "c1", 2_000)
    history = _drive(run, history[-2:], ok, now=2_000)
    assert run.state.status is WorkflowStatus.CANCELLED
    assert [n for n in _names(history) if n.startswith("undo")] == ["undo:b.undo", "undo:a.undo"]


def test_signal_resumes_a_waiting_workflow_and_duplicates_are_ignored() -> None:
    run, _ = _start("wf", Step(n=1), kind="waits-for-signal")
    statuses = [run.state.status]
    first = run.on_signal("approve", to_payload(Step(n=41)), "s1", 2_000)
    assert run.on_signal("approve", to_payload(Step(n=99)), "s1", 2_000) == []
    statuses.append(run.state.status)
    assert first
    assert statuses == [WorkflowStatus.RUNNING, WorkflowStatus.COMPLETED]
    assert run.state.result is not None
    assert from_payload(run.state.result, Done).n == 42


def _refuse_c_and_undo_a(act: ActivityScheduled, attempt: int) -> ActivityReply:
    if act.activity_name == "c.do":
        return _reply(act, attempt, ReplyOutcome.BUSINESS_FAILURE, "Declined")
    if act.activity_name == "a.undo":
        return _reply(act, attempt, ReplyOutcome.RETRYABLE_FAILURE, "Down")
    return ok(act, attempt)


def _parked_trip() -> tuple[WorkflowRun, list[HistoryEvent]]:
    """c fails, b is undone, a's compensation gives up: the saga waits for an operator."""
    run, events = _start("wf", Trip())
    history = _drive(run, events, _refuse_c_and_undo_a)
    return run, history


def _operator(
    action: str, step: int | None = None, request: str = "op-1", **kw: object
) -> OperatorAction:
    return OperatorAction(
        workflow_id="wf", request_id=request, action=action, reason="on call: ticket 7",
        operator="alice", step_seq=step, sent_at_ms=0, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_compensation_that_gives_up_parks_and_waits_for_an_operator() -> None:
    run, history = _parked_trip()
    assert not run.finished and run.state.status is WorkflowStatus.RUNNING
    # b was undone, a was tried until its policy gave up (20 attempts by default), then parked
    assert _names(history)[-2:] == ["undo:b.undo", "undo:a.undo"]
    (parked,) = run.state.parked
    assert (parked.seq, parked.attempt, parked.name) == (5, 20, "a.undo")
    assert isinstance(history[-1].event, ActivityParked)
    assert run.state.next_due_ms() is None  # no timer spins while it waits
    assert "parked: a.undo #5" in run.state.current_step
    assert WorkflowSummary.of(run.state).status == "PARKED"


def test_an_operator_retry_of_a_parked_compensation_gives_it_a_new_round() -> None:
    run, history = _parked_trip()
    retried = run.on_operator(_operator("retry"), 5_000)
    assert [type(e.event).__name__ for e in retried] == ["OperatorActed", "ActivityAttemptStarted"]
    assert retried[1].event == ActivityAttemptStarted(seq=5, attempt=21)
    history += retried
    # the service works again: the compensation succeeds, the saga ends COMPENSATED
    # a new operation for the service (its dedupe store holds the failure under the old key)
    undo = run.state.activities[5]
    assert undo.idempotency_key == _scheduled(history, "a.undo").idempotency_key + "/retry1"
    again = _scheduled(history, "a.undo").model_copy(
        update={"idempotency_key": undo.idempotency_key}
    )
    history += run.on_reply(ok(again, 21), 5_001)
    assert run.state.status is WorkflowStatus.COMPENSATED
    assert run.state.error is not None and run.state.error.type == "Declined"
    assert WorkflowRun.replay("wf", history, REGISTRY).state == run.state
    # the same request again changes nothing; a retry of a finished workflow is refused
    assert run.on_operator(_operator("retry"), 5_002) == []
    with pytest.raises(OperatorRefused, match="has ended"):
        run.on_operator(_operator("retry", request="op-2"), 5_003)


def test_a_retry_that_fails_again_parks_again_after_a_new_round() -> None:
    run, history = _parked_trip()
    history += run.on_operator(_operator("retry", step=5), 5_000)
    history = _drive(run, history[-1:], _refuse_c_and_undo_a, now=5_000)
    (parked,) = run.state.parked
    assert parked.attempt == 40  # another 20 attempts, then parked again


def test_an_operator_skip_marks_the_compensation_done_and_the_saga_goes_on() -> None:
    run, history = _parked_trip()
    with pytest.raises(OperatorRefused, match="--step"):
        run.on_operator(_operator("skip"), 5_000)
    with pytest.raises(OperatorRefused, match="not a parked compensation"):
        run.on_operator(_operator("skip", step=1), 5_000)
    skipped = run.on_operator(_operator("skip", step=5), 5_000)
    history += skipped
    acted = skipped[0].event
    assert isinstance(acted, OperatorActed)
    assert (acted.action, acted.operator, acted.reason, acted.step_seq) == (
        "skip", "alice", "on call: ticket 7", 5,
    )  # fmt: skip
    assert run.state.status is WorkflowStatus.COMPENSATED
    assert run.state.activities[5].skipped
    assert WorkflowRun.replay("wf", history, REGISTRY).state == run.state


def test_terminate_ends_the_workflow_without_compensating() -> None:
    run, events = _start("wf", Trip(sleep_ms=3_600_000))
    history = list(events)
    history += run.on_reply(ok(_scheduled(history, "a.do"), 1), 1_000)
    history += run.on_reply(ok(_scheduled(history, "b.do"), 1), 1_000)
    assert run.state.timers
    ended = run.on_operator(_operator("terminate"), 2_000)
    history += ended
    assert [type(e.event).__name__ for e in ended] == ["OperatorActed"]
    assert run.state.status is WorkflowStatus.TERMINATED and run.finished
    assert run.state.error is not None and run.state.error.type == "Terminated"
    assert run.state.next_due_ms() is None
    assert WorkflowRun.replay("wf", history, REGISTRY).state == run.state
    # terminating it again is no error (idempotent); a reply that comes later changes nothing
    assert run.on_operator(_operator("terminate", request="op-2"), 2_001) == []


def test_a_retry_now_starts_a_pending_retry_at_once() -> None:
    def down_once(act: ActivityScheduled, attempt: int) -> ActivityReply:
        if act.activity_name == "a.do" and attempt == 1:
            return _reply(act, attempt, ReplyOutcome.RETRYABLE_FAILURE, "Down")
        return ok(act, attempt)

    run, events = _start("wf", Trip())
    run.on_reply(down_once(_scheduled(events, "a.do"), 1), 1_000)
    assert run.state.activities[1].retry_at_ms is not None
    retried = run.on_operator(_operator("retry"), 1_001)
    assert retried[-1].event == ActivityAttemptStarted(seq=1, attempt=2)
    assert run.state.activities[1].retry_at_ms is None
    with pytest.raises(OperatorRefused, match="nothing to retry"):
        run.on_operator(_operator("retry", request="op-2"), 1_002)
    with pytest.raises(OperatorRefused, match="unknown action"):
        run.on_operator(_operator("explode", request="op-3"), 1_002)


def silent(act: ActivityScheduled, attempt: int) -> None:
    return None  # a service that is not running


def _scheduled(history: list[HistoryEvent], name: str) -> ActivityScheduled:
    return next(
        e.event
        for e in history
        if isinstance(e.event, ActivityScheduled) and e.event.activity_name == name
    )


def test_a_call_without_timeout_times_out_after_the_default_and_its_retries_fail_it() -> None:
    registry = WorkflowRegistry([ThreeSteps], activity_timeout=timedelta(seconds=2))
    run, events = _start("wf", Trip(), registry=registry)
    history = _drive(run, events, silent)
    assert _scheduled(history, "a.do").attempt_timeout_ms == 2_000  # recorded in the history
    assert run.state.status is WorkflowStatus.FAILED
    assert run.state.error is not None and run.state.error.type == "ActivityTimeout"
    failed = [e.event for e in history if isinstance(e.event, ActivityAttemptFailed)]
    assert [(f.attempt, f.error.type) for f in failed] == [
        (1, "ActivityTimeout"),
        (2, "ActivityTimeout"),
        (3, "ActivityTimeout"),
    ]
    # three 2 s attempts and two backoffs (200 ms, 400 ms, jitter at most 10 %)
    assert run.state.finished_at_ms is not None
    assert 6_000 <= run.state.finished_at_ms - run.state.started_at_ms <= 6_000 + 660


def test_a_compensation_without_timeout_times_out_too_and_parks_the_workflow() -> None:
    def refuse_c_dead_undo_a(act: ActivityScheduled, attempt: int) -> ActivityReply | None:
        if act.activity_name == "c.do":
            return _reply(act, attempt, ReplyOutcome.BUSINESS_FAILURE, "Declined")
        return None if act.activity_name == "a.undo" else ok(act, attempt)

    registry = WorkflowRegistry([ThreeSteps], activity_timeout=timedelta(seconds=1))
    run, events = _start("wf", Trip(), registry=registry)
    history = _drive(run, events, refuse_c_dead_undo_a)
    undo_a = _scheduled(history, "a.undo")
    assert undo_a.is_compensation and undo_a.attempt_timeout_ms == 1_000
    assert WorkflowSummary.of(run.state).status == "PARKED"
    assert [a.seq for a in run.state.parked] == [undo_a.seq]
    assert run.state.activities[undo_a.seq].attempt == 20  # the compensation retry policy
    last = [e.event for e in history if isinstance(e.event, ActivityAttemptFailed)][-1]
    assert last.seq == undo_a.seq and last.error.type == "ActivityTimeout"


def test_timeout_none_means_the_attempt_waits_for_its_reply_however_long() -> None:
    registry = WorkflowRegistry([Unbounded], activity_timeout=timedelta(seconds=1))
    run, events = _start("wf", Step(n=1), kind="unbounded", registry=registry)
    call = _scheduled(events, "a.do")
    assert call.attempt_timeout_ms is None
    assert run.state.next_due_ms() is None
    assert run.on_timers(1_000 + 365 * 24 * 3600 * 1000) == []  # a year later: still waiting
    run.on_reply(ok(call, 1), 2_000)
    assert run.state.status is WorkflowStatus.COMPLETED


def test_replay_keeps_the_recorded_timeout_after_the_default_changed() -> None:
    """A deploy that changes activity_timeout_ms: activities in flight keep the timeout they were
    scheduled with (no NonDeterminismError), new calls get the new one."""
    _, events = _start("wf", Trip(), registry=WorkflowRegistry([ThreeSteps]))
    assert _scheduled(events, "a.do").attempt_timeout_ms == 5 * 60 * 1000

    shorter = WorkflowRegistry([ThreeSteps], activity_timeout=timedelta(seconds=1))
    replayed = WorkflowRun.replay("wf", events, shorter)
    assert replayed.state.activities[1].attempt_timeout_ms == 5 * 60 * 1000
    assert replayed.state.next_due_ms() == 1_000 + 5 * 60 * 1000
    assert replayed.on_timers(1_000 + 1_000) == []  # the new 1 s default does not apply to it

    history = list(events)
    history += replayed.on_reply(ok(_scheduled(history, "a.do"), 1), 2_000)
    history += replayed.on_reply(ok(_scheduled(history, "b.do"), 1), 3_000)
    assert _scheduled(history, "b.do").attempt_timeout_ms == 5_000  # the code's own timeout
    assert _scheduled(history, "c.do").attempt_timeout_ms == 1_000  # the new default
    again = WorkflowRun.replay("wf", history, WorkflowRegistry([ThreeSteps]))
    assert again.state == replayed.state


def test_non_determinism_names_the_workflow_the_event_and_the_code_line() -> None:
    run, events = _start("wf", Trip())
    history = _drive(run, events, ok)
    renamed = [
        e.model_copy(update={"event": e.event.model_copy(update={"activity_name": "x.do"})})
        if isinstance(e.event, ActivityScheduled) and e.event.seq == 2
        else e
        for e in history
    ]
    with pytest.raises(NonDeterminismError) as info:
        WorkflowRun.replay("wf", renamed, REGISTRY)
    message = str(info.value)
    assert "workflow wf (three-steps)" in message
    assert "activity x.do #2" in message and "activity b.do #2" in message
    assert "sagas.py:" in message  # the line of workflow code that asked


@settings(max_examples=60, deadline=None)
@given(
    outcomes=st.lists(
        st.sampled_from(["ok", "retry", "business", "silent"]), min_size=1, max_size=30
    ),
    sleep_ms=st.integers(min_value=0, max_value=5_000),
)
def test_replaying_any_history_rebuilds_the_live_state(outcomes: list[str], sleep_ms: int) -> None:
    script = iter(outcomes)

    def scripted(act: ActivityScheduled, attempt: int) -> ActivityReply | None:
        choice = next(script, "ok")
        if choice == "silent":
            return None
        if choice == "retry":
            return _reply(act, attempt, ReplyOutcome.RETRYABLE_FAILURE)
        if choice == "business":
            return _reply(act, attempt, ReplyOutcome.BUSINESS_FAILURE, "No")
        return ok(act, attempt)

    run, events = _start("wf", Trip(sleep_ms=sleep_ms))
    history = _drive(run, events, scripted)
    assert [e.event_seq for e in history] == list(range(1, len(history) + 1))
    replayed = WorkflowRun.replay("wf", history, REGISTRY)
    assert replayed.state == run.state
    assert fold("wf", history) == run.state
