"""ctx.run_local on the pure engine: the function runs once, live; its result (or error) is
recorded in the history, and a replay returns it without running the function."""

from __future__ import annotations

import time

import pytest
from pydantic import BaseModel

from contracts.envelopes import HistoryEvent, LocalActivityRecorded, StartWorkflow, WorkflowStatus
from orchestrator._engine.instance import WorkflowRun
from orchestrator.errors import ActivityError, NonDeterminismError
from orchestrator.payloads import from_payload, to_payload
from orchestrator.workflow import WorkflowContext, WorkflowRegistry, defn, run

CALLS: list[int] = []


class Quote(BaseModel):
    price: int
    at_ns: int


def quote(qty: int) -> Quote:
    CALLS.append(qty)
    # A side effect workflow code may not make itself: the guard lets a local activity do it.
    return Quote(price=qty * 7, at_ns=time.time_ns())


def refuse(qty: int) -> int:
    raise ValueError(f"cannot quote {qty}")


class Summary(BaseModel):
    price: int
    at_ns: int
    refused: str


@defn(name="local")
class Local:
    @run
    async def run(self, ctx: WorkflowContext, qty: int) -> Summary:
        first = await ctx.run_local(quote, qty)
        try:
            await ctx.run_local(refuse, qty)
            refused = ""
        except ActivityError as exc:
            refused = exc.error_type
        return Summary(price=first.price, at_ns=first.at_ns, refused=refused)


@defn(name="local")
class LocalRenamed:
    @run
    async def run(self, ctx: WorkflowContext, qty: int) -> Summary:
        first = await ctx.run_local(quote, qty, name="another-name")
        return Summary(price=first.price, at_ns=first.at_ns, refused="")


def _start() -> tuple[WorkflowRun, list[HistoryEvent]]:
    run_ = WorkflowRun("wf-local", WorkflowRegistry([Local]))
    start = StartWorkflow(
        workflow_id="wf-local",
        workflow_type="local",
        request_id="r",
        input=to_payload(3),
        sent_at_ms=0,
    )
    return run_, run_.start(start, 1_000, None)


def test_the_function_runs_once_and_its_outcome_is_recorded() -> None:
    CALLS.clear()
    run_, history = _start()
    assert CALLS == [3]
    bodies = [e.event for e in history]
    recorded = [b for b in bodies if isinstance(b, LocalActivityRecorded)]
    assert [(b.name, b.error is None) for b in recorded] == [("quote", True), ("refuse", False)]
    assert recorded[1].error is not None and recorded[1].error.type == "ValueError"
    assert run_.state.status is WorkflowStatus.COMPLETED
    result = from_payload(run_.state.result or to_payload(None), Summary)
    assert (result.price, result.refused) == (21, "ValueError")


def test_a_replay_returns_the_recorded_result_without_running_the_function() -> None:
    CALLS.clear()
    live, history = _start()
    live_result = from_payload(live.state.result or to_payload(None), Summary)
    time.sleep(0.001)  # a second run of quote() would read another clock
    replayed = WorkflowRun.replay("wf-local", history, WorkflowRegistry([Local]))
    assert CALLS == [3], "replay did not run the function"
    assert from_payload(replayed.state.result or to_payload(None), Summary) == live_result


def test_a_replay_with_another_local_activity_is_refused() -> None:
    _, history = _start()
    with pytest.raises(NonDeterminismError, match="local activity"):
        WorkflowRun.replay("wf-local", history, WorkflowRegistry([LocalRenamed]))
