"""Exact compensation (#11) against the real broker: parallel legs where one fails while another
is still in flight, and a cancel while a step is in flight. Every effect is undone exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import ActivityCompleted, ActivityScheduled, RetryPolicy, WorkflowStatus
from orchestrator import workflow
from orchestrator._payloads import from_payload
from orchestrator.errors import WorkflowFailedError
from orchestrator.workflow import Compensation, WorkflowContext

from .kit import Done, Step, TripResult, build, settings_for
from .stack import Stack, running_stack
from .test_engine_kafka import _wait_for

pytestmark = pytest.mark.broker


class Legs(BaseModel):
    parallel: bool
    fail_at: int = 0
    slow_at: int = 0
    slow_ms: int = 0


def _legs_workflow(prefix: str) -> type:
    names = (f"{prefix}-a", f"{prefix}-b", f"{prefix}-c")
    do = [ActivityContract(f"{s}.do", s, Step, Done) for s in names]
    undo = [ActivityContract(f"{s}.undo", s, Step, Done) for s in names]

    @workflow.defn(name="legs")
    class LegsSaga:
        @workflow.run
        async def run(self, ctx: WorkflowContext, legs: Legs) -> TripResult:
            retry = RetryPolicy(max_attempts=2, initial_interval_ms=50)

            async def leg(i: int) -> str:
                n = i + 1
                arg = Step(
                    n=n, fail=legs.fail_at == n, slow_ms=legs.slow_ms if legs.slow_at == n else 0
                )
                done = await ctx.call(
                    do[i],
                    arg,
                    retry=retry,
                    timeout=timedelta(seconds=10),
                    compensate=lambda d: Compensation(undo[i], Step(n=d.n)),
                )
                return done.ref

            async with ctx.saga():
                if legs.parallel:
                    refs = await ctx.gather(leg(0), leg(1), leg(2))
                else:
                    refs = [await leg(0), await leg(1), await leg(2)]
            return TripResult(refs=refs)

    return LegsSaga


@pytest.fixture
def stack(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    kit = build(namespace)
    kit.registry.add(_legs_workflow(namespace))
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state")
    with running_stack(kit, settings) as running:
        yield running


def _effects(stack: Stack, wf: str) -> dict[str, int]:
    return {
        k.split("|")[0].split("-")[-1]: v
        for k, v in stack.kit.effects.items()
        if k.split("|")[1].startswith(wf + "/")
    }


def _order(stack: Stack, wf: str) -> tuple[list[int], list[int]]:
    """The steps in the order they completed, and in the order they were compensated."""
    history = stack.history(wf)
    names = {
        e.event.seq: e.event
        for e in history
        if isinstance(e.event, ActivityScheduled) and not e.event.is_compensation
    }
    completed = [
        from_payload(names[e.event.seq].input, Step).n
        for e in history
        if isinstance(e.event, ActivityCompleted) and e.event.seq in names
    ]
    undone = [
        from_payload(e.event.input, Step).n
        for e in history
        if isinstance(e.event, ActivityScheduled) and e.event.is_compensation
    ]
    return completed, undone


def test_parallel_legs_one_fails_while_another_is_in_flight_all_completed_are_undone(
    stack: Stack,
) -> None:
    handle = stack.client.start(
        "legs", Legs(parallel=True, fail_at=2, slow_at=3, slow_ms=1500), workflow_id="par"
    )
    with pytest.raises(WorkflowFailedError) as info:
        handle.result(TripResult, timeout=40)
    assert (info.value.status, info.value.error_type) == (
        WorkflowStatus.COMPENSATED.value,
        "Refused",
    )
    # b refused; a and c (still working when b's refusal came) were applied, then undone once
    assert _effects(stack, "par") == {"a.do": 1, "c.do": 1, "a.undo": 1, "c.undo": 1}
    completed, undone = _order(stack, "par")
    assert completed == [1, 3]
    assert undone == [3, 1]  # reverse order of completion


def test_a_cancel_while_a_step_is_in_flight_waits_for_it_and_undoes_it(stack: Stack) -> None:
    handle = stack.client.start(
        "legs", Legs(parallel=False, slow_at=2, slow_ms=3000), workflow_id="cancel-mid"
    )
    b_started = f"{stack.kit.prefix}-b.do|cancel-mid/2"
    _wait_for(lambda: stack.kit.attempts[b_started] == 1)
    stack.client.cancel("cancel-mid", reason="customer changed their mind")
    with pytest.raises(WorkflowFailedError) as info:
        handle.result(TripResult, timeout=40)
    assert info.value.status == WorkflowStatus.CANCELLED.value
    assert _effects(stack, "cancel-mid") == {"a.do": 1, "b.do": 1, "b.undo": 1, "a.undo": 1}
    completed, undone = _order(stack, "cancel-mid")
    assert (completed, undone) == ([1, 2], [2, 1])
    kinds = [e.event.kind for e in stack.history("cancel-mid")]
    assert kinds.index("CancelRequested") < kinds.index(
        "ActivityCompleted", kinds.index("CancelRequested")
    )
    assert kinds[-1] == "WorkflowFailed"
