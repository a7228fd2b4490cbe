"""Durable sagas on Kafka. Import what you need from here; everything else is internal.

    from datetime import timedelta
    from orchestrator import ActivityContract, RetryPolicy, WorkflowContext, workflow

    @workflow.defn(name="place-order")
    class PlaceOrder:
        @workflow.run
        async def run(self, ctx: WorkflowContext, order: Order) -> Receipt:
            async with ctx.saga() as saga:
                hold = await ctx.call(reserve, Reserve(sku=order.sku, qty=order.qty))
                saga.on_failure(release, Release(hold_id=hold.hold_id))
                ...

Run it with ``orchestrator run --workflows my_module`` (or :class:`OrchestratorNode`), serve
activities with :class:`Service`, and start workflows with :class:`Client` (or
:class:`AsyncClient` from asyncio code).
"""

from contracts.activity import ActivityContract
from contracts.envelopes import RetryPolicy, WorkflowStatus
from orchestrator import workflow
from orchestrator.aio import AsyncClient, AsyncWorkflowHandle
from orchestrator.client import Client, WorkflowDescription, WorkflowHandle
from orchestrator.errors import (
    ActivityError,
    BusinessError,
    CompensationFailed,
    NonDeterminismError,
    RetryableError,
    UnknownWorkflow,
    WorkflowCancelled,
    WorkflowFailedError,
    WorkflowFailure,
    WorkflowIdConflict,
)
from orchestrator.node import OrchestratorNode
from orchestrator.service import CommandInfo, Service
from orchestrator.settings import Settings
from orchestrator.workflow import Compensation, Saga, WorkflowContext, WorkflowRegistry

__all__ = [
    "ActivityContract",
    "ActivityError",
    "AsyncClient",
    "AsyncWorkflowHandle",
    "BusinessError",
    "Client",
    "CommandInfo",
    "Compensation",
    "CompensationFailed",
    "NonDeterminismError",
    "OrchestratorNode",
    "RetryPolicy",
    "RetryableError",
    "Saga",
    "Service",
    "Settings",
    "UnknownWorkflow",
    "WorkflowCancelled",
    "WorkflowContext",
    "WorkflowDescription",
    "WorkflowFailedError",
    "WorkflowFailure",
    "WorkflowHandle",
    "WorkflowIdConflict",
    "WorkflowRegistry",
    "WorkflowStatus",
    "workflow",
]
