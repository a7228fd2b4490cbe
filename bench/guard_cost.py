"""What the determinism guard costs: a workflow activation (a reply applied, the code resumed,
the next command recorded) with the guard on and off, on the pure engine; and a guarded
``time.time()`` call outside workflow code.

    PYTHONPATH=. python bench/guard_cost.py
"""

from __future__ import annotations

import statistics
import time
import timeit

from contracts.activity import ActivityContract
from contracts.envelopes import ActivityReply, ActivityScheduled, ReplyOutcome, StartWorkflow
from orchestrator import workflow
from orchestrator._engine import determinism
from orchestrator._engine.instance import WorkflowRun
from orchestrator._payloads import to_payload
from orchestrator.workflow import WorkflowContext, WorkflowRegistry
from tests.unit.sagas import Done, Step

STEPS = 50
step = ActivityContract("a.do", "svc-a", Step, Done)


@workflow.defn(name="steps")
class Steps:
    @workflow.run
    async def run(self, ctx: WorkflowContext, n: Step) -> Done:
        total = 0
        for i in range(n.n):
            total += (await ctx.call(step, Step(n=i))).n
        return Done(n=total)


REGISTRY = WorkflowRegistry([Steps])


def one_workflow(i: int) -> None:
    run = WorkflowRun(f"wf-{i}", REGISTRY)
    start = StartWorkflow(
        workflow_id=run.state.workflow_id,
        workflow_type="steps",
        request_id="r",
        input=to_payload(Step(n=STEPS)),
        sent_at_ms=0,
    )
    new = run.start(start, 1, None)
    while new:
        body = new[-1].event
        if not isinstance(body, ActivityScheduled):
            break
        reply = ActivityReply(
            workflow_id=run.state.workflow_id,
            seq=body.seq,
            attempt=1,
            idempotency_key=body.idempotency_key,
            outcome=ReplyOutcome.SUCCESS,
            sent_at_ms=0,
            result=to_payload(Done(n=1)),
        )
        new = run.on_reply(reply, 2)


def per_activation_us(enabled: bool, rounds: int = 7, workflows: int = 40) -> float:
    determinism.set_enabled(enabled)
    samples = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(workflows):
            one_workflow(r * workflows + i)
        samples.append((time.perf_counter() - t0) / (workflows * (STEPS + 1)) * 1e6)
    return statistics.median(samples)


def main() -> None:
    determinism.install()
    per_activation_us(True, rounds=1)  # warm up
    off = per_activation_us(False)
    on = per_activation_us(True)
    off2 = per_activation_us(False)
    on2 = per_activation_us(True)
    base = min(off, off2)
    guarded = min(on, on2)
    print(f"activation (reply applied, code resumed, next command), guard off: {base:.2f} us")
    print(
        f"activation, guard on:  {guarded:.2f} us  ({guarded - base:+.2f} us, "
        f"{(guarded - base) / base * 100:+.1f} %)"
    )
    calls = 1_000_000
    wrapped = min(timeit.repeat(time.time, number=calls, repeat=5)) / calls * 1e9
    raw = min(timeit.repeat(time.time.__wrapped__, number=calls, repeat=5)) / calls * 1e9  # type: ignore[attr-defined]
    print(f"time.time() outside workflows: {raw:.0f} ns unwrapped, {wrapped:.0f} ns wrapped")


if __name__ == "__main__":
    main()
