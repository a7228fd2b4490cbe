"""Exact compensation (#11): parallel branches, cancel with steps in flight, replies after the end.

The engine is driven by hand, without Kafka: ``Sim`` answers each command when the test says so,
so a test chooses exactly which steps are in flight when a failure or a cancel happens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.envelopes import (
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    ErrorInfo,
    HistoryEvent,
    LateReplyIgnored,
    ReplyOutcome,
    StartWorkflow,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStatus,
)
from orchestrator._engine.instance import WorkflowRun
from orchestrator._engine.state import fold
from orchestrator._payloads import from_payload, to_payload
from orchestrator.workflow import WorkflowRegistry

from .sagas import (
    Done,
    Group,
    Misuses,
    ParallelCalls,
    Plan,
    Planned,
    PlanStep,
    Step,
    ThreeSteps,
    Trip,
    UsesAsyncio,
)

REGISTRY = WorkflowRegistry([ThreeSteps, ParallelCalls, Planned, UsesAsyncio, Misuses])
OK, FAIL = ReplyOutcome.SUCCESS, ReplyOutcome.BUSINESS_FAILURE


class Sim:
    """One workflow and the commands it sent that no one has answered yet."""

    def __init__(self, kind: str, arg: object) -> None:
        self.run = WorkflowRun("wf", REGISTRY)
        self.history: list[HistoryEvent] = []
        self.waiting: dict[int, int] = {}  # activity seq -> attempt awaiting a reply
        self.now = 1_000
        start = StartWorkflow(
            workflow_id="wf", workflow_type=kind, request_id="r1", input=to_payload(arg),
            sent_at_ms=self.now,
        )  # fmt: skip
        self._note(self.run.start(start, self.now, None))

    def _note(self, events: list[HistoryEvent]) -> list[HistoryEvent]:
        for e in events:
            if isinstance(e.event, ActivityScheduled):
                self.waiting[e.event.seq] = 1
            elif isinstance(e.event, ActivityAttemptStarted):
                self.waiting[e.event.seq] = e.event.attempt
        self.history += events
        return events

    def seq_of(self, name: str, n: int) -> int:
        for seq, act in self.run.state.activities.items():
            if act.name == name and from_payload(act.input, Step).n == n:
                return seq
        raise AssertionError(f"{name}({n}) was never scheduled: {self.names()}")

    def answer(self, name: str, n: int, outcome: ReplyOutcome = OK) -> list[HistoryEvent]:
        return self.answer_seq(self.seq_of(name, n), outcome)

    def answer_seq(self, seq: int, outcome: ReplyOutcome = OK) -> list[HistoryEvent]:
        act = self.run.state.activities[seq]
        attempt = self.waiting.pop(seq, act.attempt)
        n = from_payload(act.input, Step).n
        self.now += 10
        reply = ActivityReply(
            workflow_id="wf", seq=seq, attempt=attempt, idempotency_key=act.idempotency_key,
            outcome=outcome, sent_at_ms=self.now,
            result=to_payload(Done(n=n, ref=f"{act.name}#{n}")) if outcome is OK else None,
            error=None if outcome is OK else ErrorInfo(type="Refused", message="no"),
        )  # fmt: skip
        return self._note(self.run.on_reply(reply, self.now))

    def cancel(self) -> list[HistoryEvent]:
        self.now += 10
        return self._note(self.run.on_cancel("changed my mind", "c1", self.now))

    def settle(self) -> None:
        """Answer every compensation (successfully) until none is waiting."""
        while comps := [s for s in self.waiting if self.run.state.activities[s].is_compensation]:
            self.answer_seq(comps[0])

    def names(self) -> list[str]:
        return [
            f"{e.event.activity_name}({from_payload(e.event.input, Step).n})"
            for e in self.history
            if isinstance(e.event, ActivityScheduled)
        ]

    def undone(self) -> list[int]:
        """The steps compensated, in the order their compensations were scheduled."""
        return [
            from_payload(e.event.input, Step).n
            for e in self.history
            if isinstance(e.event, ActivityScheduled) and e.event.is_compensation
        ]


def _step(n: int, undo: str = "with-call") -> PlanStep:
    return PlanStep.model_validate({"n": n, "undo": undo})


# --------------------------------------------------------------------------- 1. parallel branches


def test_a_gather_of_three_calls_compensates_every_call_that_completed() -> None:
    plan = Plan(
        groups=[
            Group(branches=[[_step(1)]]),
            Group(calls=True, branches=[[_step(2)], [_step(3)], [_step(4)]]),
        ]
    )
    sim = Sim("planned", plan)
    sim.answer("s.do", 1)
    sim.answer("s.do", 2)
    sim.answer("s.do", 3, FAIL)
    sim.answer("s.do", 4)
    sim.settle()
    assert sim.run.state.status is WorkflowStatus.COMPENSATED, sim.run.state.error
    assert sim.undone() == [4, 2, 1]  # reverse order of completion


def test_a_branch_still_in_flight_when_a_sibling_fails_is_awaited_then_compensated() -> None:
    plan = Plan(
        groups=[
            Group(branches=[[_step(1, "after"), _step(5)], [_step(2, "after")], [_step(3)]]),
        ]
    )
    sim = Sim("planned", plan)
    assert sim.names() == ["s.do(1)", "s.do(2)", "s.do(3)"]  # three branches, one step each
    sim.answer("s.do", 3, FAIL)
    assert sim.undone() == [] and not sim.run.finished  # 1 and 2 are still in flight
    sim.answer("s.do", 2)
    sim.answer("s.do", 1)  # its branch goes on to its second step
    sim.answer("s.do", 5)
    sim.settle()
    assert sim.run.state.status is WorkflowStatus.COMPENSATED, sim.run.state.error
    assert sim.undone() == [5, 1, 2]


def test_asyncio_gather_is_refused_before_anything_is_sent() -> None:
    sim = Sim("uses-asyncio", Step(n=0))
    sim.answer("a.do", 1)
    sim.settle()
    assert sim.names() == ["a.do(1)", "a.undo(1)"]  # b and c were never sent
    assert sim.run.state.status is WorkflowStatus.COMPENSATED
    error = sim.run.state.error
    assert error is not None and "ctx.gather" in error.message, error


@pytest.mark.parametrize(
    ("mistake", "sent", "error"),
    [
        (1, ["a.do(1)", "b.do(2)", "a.undo(1)"], "ctx.gather takes coroutines"),
        # asyncio.sleep: the determinism guard names ctx.sleep; b is dropped before it is sent
        (2, ["a.do(1)", "a.undo(1)"], "ctx.sleep"),
    ],
    ids=["gather-of-an-int", "asyncio-sleep"],
)
def test_misused_api_fails_in_the_code_and_the_saga_compensates(
    mistake: int, sent: list[str], error: str
) -> None:
    sim = Sim("misuses", Step(n=mistake))
    sim.answer("a.do", 1)
    sim.settle()
    assert sim.names() == sent
    assert sim.run.state.status is WorkflowStatus.COMPENSATED
    assert sim.run.state.error is not None and error in sim.run.state.error.message


def test_compensate_outside_a_saga_is_refused_before_the_call_is_sent() -> None:
    sim = Sim("misuses", Step(n=3))
    sim.answer("a.do", 1)
    sim.answer("b.do", 2)
    assert sim.names() == ["a.do(1)", "b.do(2)"]
    assert sim.run.state.status is WorkflowStatus.FAILED
    assert sim.run.state.error is not None and "outside `async with ctx.saga()`" in (
        sim.run.state.error.message
    )


# --------------------------------------------------------------------------- 2. cancel in flight


@pytest.mark.parametrize("outcome", [OK, FAIL], ids=["step-succeeds", "step-fails"])
def test_a_cancel_waits_for_the_step_in_flight_and_compensates_it_if_it_succeeded(
    outcome: ReplyOutcome,
) -> None:
    sim = Sim("planned", Plan(groups=[Group(branches=[[_step(1), _step(2)]])]))
    sim.answer("s.do", 1)
    sim.cancel()
    assert sim.undone() == [] and not sim.run.finished  # 2 is in flight: its outcome decides
    sim.answer("s.do", 2, outcome)
    sim.settle()
    assert sim.run.state.status is WorkflowStatus.CANCELLED
    assert sim.undone() == ([2, 1] if outcome is OK else [1])


def test_a_cancel_reaches_every_branch_and_waits_for_their_steps() -> None:
    plan = Plan(groups=[Group(branches=[[_step(1), _step(2)], [_step(3)]])])
    sim = Sim("planned", plan)
    sim.answer("s.do", 1)
    sim.cancel()
    sim.answer("s.do", 3)
    sim.answer("s.do", 2, FAIL)
    sim.settle()
    assert sim.run.state.status is WorkflowStatus.CANCELLED
    assert sim.undone() == [3, 1]
    assert "s.do(2)" in sim.names() and sim.names().count("s.do(2)") == 1


def test_after_a_pivot_a_failure_compensates_only_the_steps_after_it() -> None:
    plan = Plan(
        groups=[
            Group(branches=[[_step(1)], [_step(2, "after")]], pivot=True),
            Group(branches=[[_step(3), _step(4)]]),
        ]
    )
    sim = Sim("planned", plan)
    sim.answer("s.do", 1)
    sim.answer("s.do", 2)
    sim.answer("s.do", 3)
    sim.answer("s.do", 4, FAIL)
    sim.settle()
    assert sim.undone() == [3]
    assert sim.run.state.status is WorkflowStatus.COMPENSATED


# --------------------------------------------------------------------------- 3. after the end


def test_a_reply_after_the_workflow_ended_is_ignored() -> None:
    sim = Sim("three-steps", Trip())
    sim.answer("a.do", 1)
    sim.cancel()  # b.do is in flight; this (old style) saga registers b's undo after it returns
    sim.settle()
    assert sim.run.state.status is WorkflowStatus.CANCELLED
    before = sim.run.state.status, sim.run.state.finished_at_ms, sim.run.state.steps_done
    late = sim.answer("b.do", 2)
    assert [type(e.event) for e in late] == [LateReplyIgnored]
    assert (sim.run.state.status, sim.run.state.finished_at_ms, sim.run.state.steps_done) == before
    _assert_nothing_after_the_end(sim.history)


def _assert_nothing_after_the_end(history: list[HistoryEvent]) -> None:
    ends = [
        i for i, e in enumerate(history) if isinstance(e.event, WorkflowCompleted | WorkflowFailed)
    ]
    assert len(ends) == 1
    assert all(isinstance(e.event, LateReplyIgnored) for e in history[ends[0] + 1 :])


# --------------------------------------------------------------------------- old histories


def _pre11_histories() -> dict[str, list[HistoryEvent]]:
    cases: dict[str, list[HistoryEvent]] = {}
    path = Path(__file__).parent / "data" / "pre11_histories.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        cases.setdefault(record["case"], []).append(HistoryEvent.model_validate(record["event"]))
    return cases


@pytest.mark.parametrize("case", sorted(_pre11_histories()))
def test_histories_recorded_before_11_still_replay(case: str) -> None:
    """Recorded with the engine of c5aa91e (before #11): its own behaviour, bugs included."""
    history = _pre11_histories()[case]
    replayed = WorkflowRun.replay("wf", history, REGISTRY)
    assert replayed.state == fold("wf", history)
    ended = next(e.event for e in history if isinstance(e.event, WorkflowFailed))
    assert replayed.state.status is ended.status


# --------------------------------------------------------------------------- 5. the property


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Up to three groups in sequence; each one branch (a sequence), or parallel branches of
    one to three steps, or a gather of calls; steps numbered 1, 2, 3, ..."""
    numbers = iter(range(1, 100))
    groups: list[Group] = []
    for _ in range(draw(st.integers(1, 3))):
        calls = draw(st.booleans())
        branches = [
            [
                _step(next(numbers), "with-call" if calls else draw(st.sampled_from(UNDO_MODES)))
                for _ in range(1 if calls else draw(st.integers(1, 3)))
            ]
            for _ in range(draw(st.integers(1, 3)))
        ]
        groups.append(Group(branches=branches, calls=calls, pivot=draw(st.booleans())))
    return Plan(groups=groups)


UNDO_MODES = ["with-call", "after", "none"]


@settings(max_examples=300, deadline=None)
@given(plan=plans(), data=st.data())
def test_exactly_the_completed_steps_are_compensated_once_each_in_reverse_order(
    plan: Plan, data: st.DataObject
) -> None:
    """Any plan, any order of replies, any outcome of each step, a cancel at any moment."""
    modes = {s.n: s.undo for g in plan.groups for b in g.branches for s in b}
    sim = Sim("planned", plan)
    cancelled = False
    while not sim.run.finished:
        waiting = sorted(sim.waiting)
        assert waiting, f"stuck: {sim.run.state.current_step}"
        pick = data.draw(st.integers(0, len(waiting) - (1 if cancelled else 0)), label="pick")
        if pick == len(waiting):
            sim.cancel()
            cancelled = True
        elif sim.run.state.activities[waiting[pick]].is_compensation:
            sim.answer_seq(waiting[pick])
        else:
            outcome = data.draw(st.sampled_from([OK, OK, OK, FAIL]), label="outcome")
            sim.answer_seq(waiting[pick], outcome)

    state = sim.run.state
    cancel_at = next(
        (e.event_seq for e in sim.history if isinstance(e.event, CancelRequested)), None
    )
    completed = [
        (from_payload(state.activities[e.event.seq].input, Step).n, e.event_seq)
        for e in sim.history
        if isinstance(e.event, ActivityCompleted)
        and not state.activities[e.event.seq].is_compensation
    ]
    # A step's compensation is known once it completed if it came with the call; registered
    # after the call returned, it is known only if its branch went on (no cancel cut it first).
    # A pivot commits the steps before it, if the code got there: every step of the groups up to
    # it completed, and before a cancel (which stops the code at the gather or call it waits on).
    when = dict(completed)
    committed: set[int] = set()
    before: set[int] = set()
    for group in plan.groups:
        before |= {s.n for b in group.branches for s in b}
        reached = all(n in when and (cancel_at is None or when[n] < cancel_at) for n in before)
        if not reached:
            break
        if group.pivot:
            committed = set(before)
    known = [
        n
        for n, at in completed
        if n not in committed
        and (
            modes[n] == "with-call"
            or (modes[n] == "after" and (cancel_at is None or at < cancel_at))
        )
    ]
    if state.status is WorkflowStatus.COMPLETED:
        assert sim.undone() == []
        assert sorted(n for n, _ in completed) == sorted(modes)
    else:
        assert sim.undone() == known[::-1]
        if cancel_at is None:
            expected = WorkflowStatus.COMPENSATED if known else WorkflowStatus.FAILED
            assert state.status is expected
        elif not any(
            isinstance(e.event, ActivityFailed) and e.event_seq < cancel_at for e in sim.history
        ):
            assert state.status is WorkflowStatus.CANCELLED
        else:  # a cancel that comes while the saga compensates does not change its course
            assert state.status in (
                WorkflowStatus.CANCELLED, WorkflowStatus.COMPENSATED, WorkflowStatus.FAILED
            )  # fmt: skip

    # Steps still in flight at the end answer later: ignored, nothing changes.
    status, finished_at = state.status, state.finished_at_ms
    for seq in sorted(sim.waiting):
        assert [type(e.event) for e in sim.answer_seq(seq)] == [LateReplyIgnored]
    assert (state.status, state.finished_at_ms) == (status, finished_at)
    _assert_nothing_after_the_end(sim.history)

    replayed = WorkflowRun.replay("wf", sim.history, REGISTRY)
    assert replayed.state == state
    assert fold("wf", sim.history) == state
