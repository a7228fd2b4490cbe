"""One trace per workflow, on the real broker: the exact span tree of a saga, of a compensated
saga, and of a saga whose orchestrator restarts while it sleeps (replay emits no spans)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orchestrator import tracing
from orchestrator.client import Client, WorkflowHandle
from orchestrator.errors import WorkflowFailedError
from orchestrator.metrics import NodeMetrics, ServiceMetrics
from orchestrator.node import OrchestratorNode
from orchestrator.service import Service
from orchestrator.settings import Settings

from .kit import (
    Kit,
    ThreadStack,
    Trip,
    TripResult,
    build,
    create_topics,
    make_service,
    settings_for,
)

pytestmark = pytest.mark.broker


def provider_for(name: str, exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


class ObservedStack(ThreadStack):
    """Node and services in threads, each with its own TracerProvider and metrics registry; the
    providers share one in-memory exporter."""

    def __init__(
        self, kit: Kit, settings: Settings, service_metrics_port: int | None = None
    ) -> None:
        super().__init__(kit, settings)
        self.exporter = InMemorySpanExporter()
        self.node_provider = provider_for("orchestrator", self.exporter)
        self.service_provider = provider_for("services", self.exporter)
        self.client_provider = provider_for("client", self.exporter)
        self.node_metrics = NodeMetrics()
        self.service_metrics = ServiceMetrics()
        self.client = Client(settings, tracer_provider=self.client_provider)
        self.plain_client = Client(settings)
        self.handles: dict[str, WorkflowHandle] = {}
        # The three services share one registry: the first serves it, if a port is given.
        self._service_settings = [
            settings.model_copy(update={"metrics_port": service_metrics_port if i == 0 else None})
            for i in range(len(kit.services))
        ]

    def make_node(self) -> OrchestratorNode:
        return OrchestratorNode(
            self.settings,
            self.kit.registry,
            tracer_provider=self.node_provider,
            metrics=self.node_metrics,
        )

    def make_service(self, index: int, name: str) -> Service:
        return make_service(
            self.kit,
            name,
            self._service_settings[index],
            tracer_provider=self.service_provider,
            metrics=self.service_metrics,
        )

    def close(self) -> None:
        super().close()
        self.client.close()
        self.plain_client.close()

    def start(self, trip: Trip, workflow_id: str, *, client_span: bool = True) -> None:
        """With ``client_span``, the client's own span is the root; else the node makes one."""
        client = self.client if client_span else self.plain_client
        self.handles[workflow_id] = client.start("trip", trip, workflow_id=workflow_id)

    def result(self, workflow_id: str, timeout: float = 30.0) -> TripResult:
        try:
            return self.handles[workflow_id].result(TripResult, timeout=timeout)
        finally:
            # The node ends a batch's spans once its commit call has returned; a client sees the
            # result as soon as the broker has written the commit markers, which can be earlier.
            _wait_for(lambda: self._finished(workflow_id))

    def _finished(self, workflow_id: str) -> bool:
        return any(
            (s.attributes or {}).get(tracing.WORKFLOW_ID) == workflow_id
            and tracing.STATUS in (s.attributes or {})
            for s in self.exporter.get_finished_spans()
        )

    def tree(self, workflow_id: str) -> list[str]:
        return tracing.format_trace_tree(
            self.exporter.get_finished_spans(), workflow_id=workflow_id, timings=False
        )

    def spans(self, workflow_id: str) -> list[ReadableSpan]:
        return [
            s
            for s in self.exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id in self._trace_ids(workflow_id)
        ]

    def _trace_ids(self, workflow_id: str) -> set[int]:
        return {
            s.context.trace_id
            for s in self.exporter.get_finished_spans()
            if s.context is not None
            and (s.attributes or {}).get(tracing.WORKFLOW_ID) == workflow_id
        }


@pytest.fixture
def observed(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[ObservedStack]:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state")
    create_topics(kit, settings)
    stack = ObservedStack(kit, settings)
    stack.start_services()
    stack.start_node()
    try:
        yield stack
    finally:
        stack.close()


def _send(prefix: str, svc: str, verb: str, *, last: bool = False, comp: bool = False) -> list[str]:
    branch, inner = ("└── ", "    ") if last else ("├── ", "│   ")
    name = f"{prefix}-{svc}.{verb}"
    return [
        f"{branch}{'compensate' if comp else 'send'} {name}  [orchestrator]",
        f"{inner}└── process {name}  [services]",
    ]


def _step(kind: str, *, last: bool = False) -> str:
    return f"{'└── ' if last else '├── '}step trip {kind}  [orchestrator]"


def test_saga_is_one_trace_from_the_client_through_the_services(observed: ObservedStack) -> None:
    p = observed.kit.prefix
    observed.start(Trip(), "ok-1")
    observed.result("ok-1")
    assert observed.tree("ok-1") == [
        "start trip  [client]",
        _step("WorkflowStarted"),
        *_send(p, "a", "do"),
        _step("ActivityCompleted"),
        *_send(p, "b", "do"),
        _step("ActivityCompleted"),
        *_send(p, "c", "do"),
        _step("ActivityCompleted", last=True),
    ]
    spans = observed.spans("ok-1")
    assert len({s.context.trace_id for s in spans if s.context}) == 1
    send = next(s for s in spans if s.name == f"send {p}-b.do")
    assert send.kind is SpanKind.PRODUCER
    assert dict(send.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": f"{p}-b.commands",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.kafka.message.key": "ok-1",
        "saga.workflow.id": "ok-1",
        "saga.activity.name": f"{p}-b.do",
        "saga.activity.seq": 2,
        "saga.activity.attempt": 1,
        "saga.activity.idempotency_key": "ok-1/2",
        "saga.compensation": False,
    }
    process = next(s for s in spans if s.name == f"process {p}-b.do")
    attrs = process.attributes or {}
    assert process.kind is SpanKind.CONSUMER
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.consumer.group.name"] == f"{p}-b"
    assert attrs["saga.activity.outcome"] == "SUCCESS"
    last = next(s for s in spans if s.name == "step trip ActivityCompleted" and s is spans[-1])
    assert (last.attributes or {})["saga.workflow.status"] == "COMPLETED"


def test_compensations_are_marked_and_in_the_same_trace(observed: ObservedStack) -> None:
    p = observed.kit.prefix
    observed.start(Trip(fail_at=3), "fail-3")
    with pytest.raises(WorkflowFailedError):
        observed.result("fail-3")
    assert observed.tree("fail-3") == [
        "start trip  [client]",
        _step("WorkflowStarted"),
        *_send(p, "a", "do"),
        _step("ActivityCompleted"),
        *_send(p, "b", "do"),
        _step("ActivityCompleted"),
        *_send(p, "c", "do"),
        _step("ActivityFailed"),
        *_send(p, "b", "undo", comp=True),
        _step("ActivityCompleted"),
        *_send(p, "a", "undo", comp=True),
        _step("ActivityCompleted", last=True),
    ]
    spans = observed.spans("fail-3")
    undo = [s for s in spans if s.name.startswith("compensate ")]
    assert all((s.attributes or {})["saga.compensation"] is True for s in undo)
    refused = next(s for s in spans if s.name == f"process {p}-c.do")
    assert refused.status.status_code is trace.StatusCode.ERROR
    assert (refused.attributes or {})["saga.activity.outcome"] == "BUSINESS_FAILURE"
    final = max((s for s in spans if s.name.startswith("step ")), key=lambda s: s.start_time or 0)
    assert (final.attributes or {})["saga.workflow.status"] == "COMPENSATED"
    assert final.status.status_code is trace.StatusCode.ERROR


def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_restart_in_the_middle_is_still_one_trace_without_duplicates(
    observed: ObservedStack,
) -> None:
    """No client trace: the orchestrator makes the root. The node stops while the workflow
    sleeps; the next node restores (replays) the workflow and emits spans only for new events."""
    p = observed.kit.prefix
    observed.start(Trip(sleep_ms=3000), "nap-1", client_span=False)

    def sleeping() -> bool:
        return any(
            e.name == "timer started"
            for s in observed.exporter.get_finished_spans()
            for e in s.events
        )

    _wait_for(sleeping)
    observed.stop_node()
    before = len(observed.exporter.get_finished_spans())
    observed.start_node()
    observed.result("nap-1")
    assert len(observed.exporter.get_finished_spans()) > before
    assert observed.tree("nap-1") == [
        "workflow trip  [orchestrator]",
        _step("WorkflowStarted"),
        *_send(p, "a", "do"),
        _step("ActivityCompleted"),
        *_send(p, "b", "do"),
        _step("ActivityCompleted"),  # ... and TimerStarted, as a span event
        _step("TimerFired"),
        *_send(p, "c", "do"),
        _step("ActivityCompleted", last=True),
    ]
    spans = observed.spans("nap-1")
    fired = next(s for s in spans if s.name == "step trip TimerFired")
    assert [e.name for e in fired.events] == ["timer fired"]
    assert observed.nodes_started == 2
