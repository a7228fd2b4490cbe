"""v2: adds step b (and its compensation) behind ``ctx.patched("add-b")``."""

from __future__ import annotations

from orchestrator import workflow
from orchestrator.workflow import WorkflowContext

from ..sagas import Done, Step, TripResult, step_a, step_b, step_c, undo_a, undo_b


@workflow.defn(name="evolving")
class EvolvingV2:
    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> TripResult:
        refs: list[str] = []
        async with ctx.saga() as saga:
            refs.append((await ctx.call(step_a, Step(n=1))).ref)
            saga.on_failure(undo_a, Step(n=1))
            if ctx.patched("add-b"):
                refs.append((await ctx.call(step_b, Step(n=2))).ref)
                saga.on_failure(undo_b, Step(n=2))
            await ctx.wait_signal("go", Done)
            refs.append((await ctx.call(step_c, Step(n=3))).ref)
        return TripResult(refs=refs, at="", token="v2")
