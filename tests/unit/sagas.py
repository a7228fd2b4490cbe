"""A small three-step saga and its contracts, shared by engine tests (no Kafka needed)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Literal

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
undo_c = ActivityContract("c.undo", "svc-c", Step, Done)


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


@workflow.defn(name="parallel-calls")
class ParallelCalls:
    """The pre-#11 way: a gather of calls whose compensations are registered after it returns
    (kept so that histories recorded with it still replay)."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
        async with ctx.saga() as saga:
            a = await ctx.call(step_a, Step(n=1))
            saga.on_failure(undo_a, Step(n=1))
            b, c = await ctx.gather(ctx.call(step_b, Step(n=2)), ctx.call(step_c, Step(n=3)))
            saga.on_failure(undo_b, Step(n=2))
        return TripResult(refs=[a.ref, b.ref, c.ref], at="", token="")


# --------------------------------------------------------------------------- #11: exact sagas

step_s = ActivityContract("s.do", "svc-s", Step, Done)
undo_s = ActivityContract("s.undo", "svc-s", Step, Done)


class PlanStep(BaseModel):
    n: int
    # How its compensation is registered: with the call (compensate=), by saga.on_failure in the
    # branch after the call returned, or not at all.
    undo: Literal["with-call", "after", "none"] = "with-call"


class Group(BaseModel):
    """Branches run in parallel (one branch: in sequence); ``calls``: gather the calls
    themselves (one step per branch) instead of branch coroutines."""

    branches: list[list[PlanStep]]
    calls: bool = False
    pivot: bool = False  # saga.pivot() once the group is done


class Plan(BaseModel):
    groups: list[Group]


def _undo_of(done: Done) -> workflow.Compensation:
    return workflow.Compensation(undo_s, Step(n=done.n))


@workflow.defn(name="planned")
class Planned:
    """Runs a plan of steps on ``s.do``, in sequence and in parallel groups, inside one saga."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, plan: Plan) -> Done:
        once = RetryPolicy(max_attempts=1)
        done = 0
        async with ctx.saga() as saga:

            async def branch(steps: list[PlanStep]) -> int:
                for s in steps:
                    if s.undo == "with-call":
                        await ctx.call(step_s, Step(n=s.n), retry=once, compensate=_undo_of)
                    else:
                        await ctx.call(step_s, Step(n=s.n), retry=once)
                        if s.undo == "after":
                            saga.on_failure(undo_s, Step(n=s.n))
                return len(steps)

            for group in plan.groups:
                if group.calls:
                    calls = [
                        ctx.call(
                            step_s,
                            Step(n=b[0].n),
                            retry=once,
                            compensate=workflow.Compensation(undo_s, Step(n=b[0].n)),
                        )
                        for b in group.branches
                    ]
                    done += len(await ctx.gather(*calls))
                elif len(group.branches) == 1:
                    done += await branch(group.branches[0])
                else:
                    done += sum(await ctx.gather(*(branch(b) for b in group.branches)))
                if group.pivot:
                    saga.pivot()
        return Done(n=done)


@workflow.defn(name="uses-asyncio")
class UsesAsyncio:
    """Workflow code that reaches for asyncio.gather instead of ctx.gather."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> Done:
        async with ctx.saga() as saga:
            await ctx.call(step_a, Step(n=1))
            saga.on_failure(undo_a, Step(n=1))
            b, _ = await asyncio.gather(ctx.call(step_b, Step(n=2)), ctx.call(step_c, Step(n=3)))
        return b


@workflow.defn(name="misuses")
class Misuses:
    """Workflow code that gets the API wrong in one of several ways, after one step."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> Done:
        async with ctx.saga() as saga:
            await ctx.call(step_a, Step(n=1))
            saga.on_failure(undo_a, Step(n=1))
            pending = ctx.call(step_b, Step(n=2))  # asked for just before the mistake
            if step.n == 1:
                await ctx.gather(pending, 42)  # type: ignore[arg-type]
            elif step.n == 2:
                await asyncio.sleep(1)
        if step.n == 3:
            await ctx.call(step_c, Step(n=3), compensate=workflow.Compensation(undo_c, Step(n=3)))
        return await pending


@workflow.defn(name="unbounded")
class Unbounded:
    """One call that opts out of any attempt timeout (``timeout=None``)."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, step: Step) -> Done:
        return await ctx.call(step_a, step, timeout=None)
