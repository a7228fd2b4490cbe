"""The examples of docs/workflows.md, "Long-running workflows", run: every ``python`` block of
that section, in order, as one module; then this test drives them through the engine and checks
what the page says."""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.envelopes import (
    ActivityReply,
    ActivityScheduled,
    HistoryEvent,
    ReplyOutcome,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator._engine.instance import WorkflowRun
from orchestrator.client import Client
from orchestrator.payloads import from_payload, to_payload
from orchestrator.workflow import WorkflowRegistry

PAGE = Path(__file__).parents[2] / "docs" / "workflows.md"
T0 = 1_000_000


@pytest.fixture(scope="module")
def doc() -> Iterator[types.ModuleType]:
    section = PAGE.read_text().split("## Long-running workflows", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    module = types.ModuleType("docs_workflows_lifecycle")
    sys.modules[module.__name__] = module  # pydantic resolves the models' annotations there
    try:
        for block in blocks:
            exec(compile(block, str(PAGE), "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module.__name__]


def _start(cls: type, arg: Any, timeout_ms: int | None = None) -> tuple[WorkflowRun, list[Any]]:
    registry = WorkflowRegistry([cls])
    run = WorkflowRun("wf", registry)
    start = StartWorkflow(
        workflow_id="wf",
        workflow_type=registry.names()[0],
        request_id="r",
        input=to_payload(arg),
        sent_at_ms=0,
        execution_timeout_ms=timeout_ms,
    )
    return run, run.start(start, T0, None)


def _scheduled(events: list[HistoryEvent]) -> list[ActivityScheduled]:
    return [e.event for e in events if isinstance(e.event, ActivityScheduled)]


def _reply(body: ActivityScheduled, result: Any) -> ActivityReply:
    return ActivityReply(
        workflow_id="wf",
        seq=body.seq,
        attempt=1,
        idempotency_key=body.idempotency_key,
        outcome=ReplyOutcome.SUCCESS,
        sent_at_ms=0,
        result=to_payload(result),
    )


def test_an_unpaid_hold_is_released_when_the_timeout_passes(doc: types.ModuleType) -> None:
    run, events = _start(doc.HoldUntilPaid, doc.Seat(flight="LH 400"), timeout_ms=900_000)
    (hold,) = _scheduled(events)
    run.on_reply(_reply(hold, doc.Hold(hold_id="h1")), T0 + 10)
    assert run.state.next_due_ms() == T0 + 900_000
    fired = run.on_timers(T0 + 900_000)
    assert [e.event.kind for e in fired] == ["WorkflowTimedOut", "ActivityScheduled"]
    (release,) = _scheduled(fired)
    assert release.activity_name == "seats.release" and release.is_compensation
    run.on_reply(_reply(release, doc.Hold(hold_id="h1")), T0 + 900_010)
    assert run.state.status is WorkflowStatus.COMPENSATED
    assert run.state.error is not None and run.state.error.type == "WorkflowTimedOut"


def test_a_paid_hold_completes_before_its_timeout(doc: types.ModuleType) -> None:
    run, events = _start(doc.HoldUntilPaid, doc.Seat(flight="LH 400"), timeout_ms=900_000)
    (hold,) = _scheduled(events)
    run.on_reply(_reply(hold, doc.Hold(hold_id="h1")), T0 + 10)
    run.on_signal("paid", to_payload(doc.Payment(paid=True)), "s1", T0 + 20)
    assert run.state.status is WorkflowStatus.COMPLETED
    assert run.on_timers(T0 + 900_000) == []


def test_the_feed_loop_continues_as_new_with_a_fresh_history(doc: types.ModuleType) -> None:
    run, events = _start(doc.FollowFeed, doc.Cursor())
    for i in range(3):
        (fetch,) = _scheduled(events)
        assert fetch.idempotency_key == f"wf/{run.state.run_start_seq}"  # this run's own
        batch = doc.Batch(items=["a", "b"], next_position=(i + 1) * 10)
        events = run.on_reply(_reply(fetch, batch), T0 + i)
        kinds = [e.event.kind for e in events]
        assert kinds == [
            "ActivityCompleted",
            "WorkflowContinuedAsNew",
            "WorkflowStarted",
            "ActivityScheduled",
        ]
    assert run.state.input is not None
    assert from_payload(run.state.input, doc.Cursor) == doc.Cursor(position=30, handled=6)
    # The ended runs' events are what the node tombstones: 4 per run, in order.
    assert run.ended_runs == [(1, 5), (5, 9), (9, 13)]
    assert run.state.run_start_seq == 13 and run.state.status is WorkflowStatus.RUNNING


def test_the_id_reuse_example_fits_client_start(doc: types.ModuleType) -> None:
    inspect.signature(Client.start).bind(None, "report", {}, **doc.REPORT_START)


def test_the_schedule_example_ticks_every_five_minutes(doc: types.ModuleType) -> None:
    spec = doc.every_five_minutes
    assert spec.next_tick(0) == 300_000 and spec.next_tick(300_000) == 600_000
