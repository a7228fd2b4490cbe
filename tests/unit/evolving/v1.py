"""v1 of the ``evolving`` workflow: step a, then the signal, then step c."""

from __future__ import annotations

from orchestrator import workflow
from orchestrator.workflow import WorkflowContext

from ..sagas import Done, Step, TripResult, step_a, step_c, undo_a


@workflow.defn(name="evolving")
class EvolvingV1:
    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> TripResult:
        refs: list[str] = []
        async with ctx.saga() as saga:
            refs.append((await ctx.call(step_a, Step(n=1))).ref)
            saga.on_failure(undo_a, Step(n=1))
            await ctx.wait_signal("go", Done)
            refs.append((await ctx.call(step_c, Step(n=3))).ref)
        return TripResult(refs=refs, at="", token="v1")
