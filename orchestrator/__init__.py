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

The public surface is what ``__all__`` lists, plus four submodules: ``orchestrator.workflow``
(the decorators), ``orchestrator.tracing`` (OpenTelemetry setup and the trace tree),
``orchestrator.testing`` (replaying exported histories in tests) and ``orchestrator.schedule``
(durable cron schedules). Every other module is internal
and may change in any release, with or without a leading underscore in its name.
"""

from contracts.activity import ActivityContract
from contracts.envelopes import IdReusePolicy, RetryPolicy, WorkflowStatus
from orchestrator import testing, tracing, workflow
from orchestrator.aio import AsyncClient, AsyncWorkflowHandle
from orchestrator.client import (
    Client,
    ClientError,
    ClientUnreachable,
    DeliveryFailed,
    EventSummary,
    PayloadTooLarge,
    WorkflowDescription,
    WorkflowHandle,
)
from orchestrator.errors import (
    ActivityError,
    AsyncioInWorkflow,
    BusinessError,
    ChildWorkflowError,
    CompensationFailed,
    ConfigurationError,
    ContinueAsNew,
    DeterminismViolation,
    KafkaUnavailable,
    NodeStopped,
    NonDeterminismError,
    OrchestratorError,
    QueryFailed,
    Rejection,
    RetryableError,
    StateDirError,
    StateDirLocked,
    UnknownQuery,
    UnknownWorkflow,
    WorkflowCancelled,
    WorkflowFailedError,
    WorkflowFailure,
    WorkflowIdConflict,
    WorkflowTimedOut,
)
from orchestrator.node import OrchestratorNode
from orchestrator.service import CommandInfo, Service, ServiceError, run_in_thread, serving
from orchestrator.settings import Settings
from orchestrator.topics import TopicError, ensure_service_topic, ensure_topics, verify_topics
from orchestrator.workflow import (
    ChildHandle,
    Compensation,
    ParentClosePolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
)

__all__ = [
    "ActivityContract",
    "ActivityError",
    "AsyncClient",
    "AsyncWorkflowHandle",
    "AsyncioInWorkflow",
    "BusinessError",
    "ChildHandle",
    "ChildWorkflowError",
    "Client",
    "ClientError",
    "ClientUnreachable",
    "CommandInfo",
    "Compensation",
    "CompensationFailed",
    "ConfigurationError",
    "ContinueAsNew",
    "DeliveryFailed",
    "DeterminismViolation",
    "EventSummary",
    "IdReusePolicy",
    "KafkaUnavailable",
    "NodeStopped",
    "NonDeterminismError",
    "OrchestratorError",
    "OrchestratorNode",
    "ParentClosePolicy",
    "PayloadTooLarge",
    "QueryFailed",
    "Rejection",
    "RetryPolicy",
    "RetryableError",
    "Saga",
    "Service",
    "ServiceError",
    "Settings",
    "StateDirError",
    "StateDirLocked",
    "TopicError",
    "UnknownQuery",
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
    "WorkflowTimedOut",
    "ensure_service_topic",
    "ensure_topics",
    "run_in_thread",
    "serving",
    "testing",
    "tracing",
    "verify_topics",
    "workflow",
]
