"""The waiters benchmark's workflow: a durable sleep, then its tag back (no activities, so no
services: the node does all of a workflow's work, and the client process only starts and waits).

Run by ``bench.waiters`` in a node process: ``orchestrator run --workflows bench._nap``.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

from orchestrator import WorkflowContext, workflow


class Nap(BaseModel):
    ms: int
    tag: str


class Woke(BaseModel):
    tag: str


@workflow.defn(name="nap")
class NapWorkflow:
    @workflow.run
    async def run(self, ctx: WorkflowContext, nap: Nap) -> Woke:
        if nap.ms:
            await ctx.sleep(timedelta(milliseconds=nap.ms))
        return Woke(tag=nap.tag)
