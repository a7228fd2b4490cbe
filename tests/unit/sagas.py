"""A small three-step saga and its contracts, shared by engine tests (no Kafka needed)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import RetryPolicy
from orchestrator import workflow
from orchestrator.workflow import WorkflowContext


class Step(BaseModel):
    n: int


class Done(BaseModel):
    n: int
    ref: str = ""


class Trip(BaseModel):
    fail_at: int = 0
    sleep_ms: int = 0


class TripResult(BaseModel):
    refs: list[str]
    at: str
    token: str


step_a = ActivityContract("a.do", "svc-a", Step, Done)
step_b = ActivityContract("b.do", "svc-b", Step, Done)
step_c = ActivityContract("c.do", "svc-c", Step, Done)
undo_a = ActivityContract("a.undo", "svc-a", Step, Done)
undo_b = ActivityContract("b.undo", "svc-b", Step, Done)


@workflow.defn(name="three-steps")
class ThreeSteps:
    @workflow.run
    async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
        refs: list[str] = []
        async with ctx.saga() as saga:
            a = await ctx.call(step_a, Step(n=1), retry=RetryPolicy(max_attempts=3))
            refs.append(a.ref)
            saga.on_failure(undo_a, Step(n=1))
            b = await ctx.call(step_b, Step(n=2), timeout=timedelta(seconds=5))
            refs.append(b.ref)
            saga.on_failure(undo_b, Step(n=2))
            if trip.sleep_ms:
                await ctx.sleep(timedelta(milliseconds=trip.sleep_ms))
            c = await ctx.call(step_c, Step(n=3))
            refs.append(c.ref)
        return TripResult(refs=refs, at=ctx.now().isoformat(), token=str(ctx.uuid()))


@workflow.defn(name="waits-for-signal")
class WaitsForSignal:
    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> Done:
        approved = await ctx.wait_signal("approve", Step)
        return Done(n=approved.n + step.n)


@workflow.defn(name="unbounded")
class Unbounded:
    """One call that opts out of any attempt timeout (``timeout=None``)."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> Done:
        return await ctx.call(step_a, step, timeout=None)
