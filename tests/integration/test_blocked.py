"""A deploy whose workflow code disagrees with running sagas: they are BLOCKED, not failed or
lost; signals sent to them meanwhile are kept; rolling back (or fixing) the code resumes them."""

from __future__ import annotations

import time

import pytest

from contracts.activity import ActivityContract
from contracts.envelopes import RetryPolicy, WorkflowStatus
from orchestrator import workflow
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

from .kit import (
    Approval,
    Done,
    Kit,
    Step,
    ThreadStack,
    Trip,
    TripResult,
)
from .stack import Stack

pytestmark = pytest.mark.broker


def reordered(kit: Kit) -> WorkflowRegistry:
    """v2 of the kit's saga: it waits for the approval before step 2 instead of before step 3."""
    do = [ActivityContract(f"{s}.do", s, Step, Done) for s in kit.services]

    @workflow.defn(name="trip")
    class TripV2:
        @workflow.run
        async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
            retry = RetryPolicy(max_attempts=4, initial_interval_ms=50)
            first = await ctx.call(do[0], Step(n=1), retry=retry)
            approval = await ctx.wait_signal("approve", Approval)
            rest = [await ctx.call(do[n - 1], Step(n=n), retry=retry) for n in (2, 3)]
            return TripResult(refs=[first.ref, *(r.ref for r in rest)], approved_by=approval.by)

    return WorkflowRegistry([TripV2])


def _until(what: str, probe: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_a_deploy_that_breaks_running_sagas_blocks_them_and_keeps_their_signals(
    stack: Stack,
) -> None:
    v1 = stack.kit.registry
    handle = stack.client.start("trip", Trip(wait_signal=True), workflow_id="deployed")
    _until("steps 1 and 2 done", lambda: len(stack.kit.steps_of("deployed")) == 2)
    time.sleep(0.5)  # the wait for the signal is committed

    stack.stop_node()
    stack.kit.registry = reordered(stack.kit)  # the deploy
    ThreadStack.start_node(stack)
    # The next input decides with the new code: it cannot go on with the history.
    stack.client.signal("deployed", "approve", {"by": "ops"})
    _until("BLOCKED", lambda: stack.client.describe("deployed").blocked is not None)
    described = stack.client.describe("deployed")
    assert described.status == WorkflowStatus.RUNNING
    assert described.blocked is not None and described.blocked.type == "NonDeterminismError"
    assert "deployed" in described.blocked.message
    assert [e.kind for e in described.events][-2:] == ["WorkflowBlocked", "SignalReceived"]
    assert len(stack.kit.steps_of("deployed")) == 2  # the blocked code ran nothing
    assert not [d for d in stack.dead_letters() if "deployed" in d.reason]

    stack.stop_node()
    stack.kit.registry = v1  # roll back
    ThreadStack.start_node(stack)
    result = handle.result(TripResult, timeout=30)
    assert result.approved_by == "ops" and len(result.refs) == 3
    kinds = [e.kind for e in stack.client.describe("deployed").events]
    assert kinds.count("WorkflowBlocked") == 2  # blocked, then moving again
    assert set(stack.kit.effects.values()) == {1}
