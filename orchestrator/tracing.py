"""OpenTelemetry tracing: one trace per workflow, across the orchestrator and the services.

Tracing is an interceptor: the processor and the services call :class:`WorkflowTracer` and
:func:`handler_span` at a few points of their live path, and nothing else knows about spans. No
tracer is process-wide: every node and service gets its ``TracerProvider`` passed in
(:func:`setup` makes one the standard way, from the ``OTEL_*`` environment variables).

The trace's identity is durable: the workflow's context is recorded in its first history event
(``WorkflowStarted.trace``), so a workflow that sleeps for days, or whose orchestrator restarts,
stays one trace. Spans are made only for *new* events (``Processor._record``); replaying a history
never reaches it, so a restart emits no duplicate spans.

The tree of a workflow (see ``docs/observability.md``)::

    start <type>                      client (or "workflow <type>" made by the orchestrator)
    ├── step <type> <EventKind>       each decision the orchestrator takes, with span events
    ├── send <activity>               each activity command (PRODUCER), attempt, key, topic
    │   └── process <activity>        the service handler (CONSUMER), through ``traceparent``
    └── compensate <activity>         a compensation command, ``saga.compensation=true``
        └── process <activity>
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from contracts.envelopes import (
    ActivityCommand,
    ActivityParked,
    ActivityReply,
    HistoryEvent,
    OperatorActed,
    ReplyOutcome,
    SignalReceived,
    TimerFired,
    TimerStarted,
    TraceContext,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStatus,
)

__all__ = [
    "JsonLinesSpanExporter",
    "SpanRow",
    "WorkflowTracer",
    "context_of",
    "format_trace_tree",
    "handler_span",
    "load_spans",
    "print_trace_tree",
    "setup",
    "trace_context_of",
]

INSTRUMENTATION = "kafka-saga-orchestrator"
_PROPAGATOR = TraceContextTextMapPropagator()

# Attribute names: OTel messaging semantic conventions where they apply, ``saga.*`` for ours.
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
MESSAGE_KEY = "messaging.kafka.message.key"
PARTITION = "messaging.destination.partition.id"
OFFSET = "messaging.kafka.offset"
CONSUMER_GROUP = "messaging.consumer.group.name"
WORKFLOW_ID = "saga.workflow.id"
WORKFLOW_TYPE = "saga.workflow.type"
ACTIVITY = "saga.activity.name"
SEQ = "saga.activity.seq"
ATTEMPT = "saga.activity.attempt"
IDEMPOTENCY_KEY = "saga.activity.idempotency_key"
COMPENSATION = "saga.compensation"
EVENTS = "saga.step.events"
STATUS = "saga.workflow.status"
OUTCOME = "saga.activity.outcome"


# --------------------------------------------------------------------------- context <-> W3C


def trace_context_of(span_or_context: Span | Context | None = None) -> TraceContext | None:
    """The W3C ``traceparent``/``tracestate`` of a span (or context; default: the current one)."""
    if isinstance(span_or_context, Span):
        # The hot path (one per span the processor makes): format it, no propagator round trip.
        sc = span_or_context.get_span_context()
        if not sc.is_valid:
            return None
        state = sc.trace_state.to_header() if sc.trace_state else ""
        return TraceContext(
            traceparent=f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}",
            tracestate=state or None,
        )
    ctx = (
        trace.set_span_in_context(span_or_context)
        if isinstance(span_or_context, Span)
        else span_or_context
    )
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    if "traceparent" not in carrier:
        return None
    return TraceContext(traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate"))


def context_of(
    trace_ctx: TraceContext | None, headers: Sequence[tuple[str, bytes | str | None]] = ()
) -> Context:
    """The parent context of a record: its ``traceparent`` header, else its envelope's trace."""
    carrier: dict[str, str] = {}
    for key, value in headers:
        if key in ("traceparent", "tracestate") and value is not None:
            carrier[key] = value.decode() if isinstance(value, bytes) else value
    if "traceparent" not in carrier and trace_ctx is not None:
        carrier["traceparent"] = trace_ctx.traceparent
        if trace_ctx.tracestate:
            carrier["tracestate"] = trace_ctx.tracestate
    return _PROPAGATOR.extract(carrier)


def headers_of(trace_ctx: TraceContext | None) -> list[tuple[str, str | bytes | None]] | None:
    """Kafka headers carrying ``trace_ctx``."""
    if trace_ctx is None:
        return None
    headers: list[tuple[str, str | bytes | None]] = [
        ("traceparent", trace_ctx.traceparent.encode())
    ]
    if trace_ctx.tracestate:
        headers.append(("tracestate", trace_ctx.tracestate.encode()))
    return headers


def _ns(ms: int) -> int:
    return ms * 1_000_000


# --------------------------------------------------------------------------- the orchestrator


class WorkflowTracer:
    """The processor's tracing interceptor. Called only from the live path, never in replay."""

    def __init__(self, provider: trace.TracerProvider, *, inbox: str = "") -> None:
        self._tracer: Tracer = provider.get_tracer(INSTRUMENTATION)
        self._inbox = inbox
        # Spans of the batch being decided, ended (exported) only once its transaction commits:
        # an aborted batch is decided again, and must not leave a second set of spans behind.
        self._pending: list[tuple[Span, int]] = []
        self._parents: dict[tuple[str, str | None], Context] = {}

    def _parent(self, trace_ctx: TraceContext | None) -> Context:
        """``context_of`` for a workflow's or command's trace, parsed once per trace."""
        if trace_ctx is None:
            return context_of(None)
        key = (trace_ctx.traceparent, trace_ctx.tracestate)
        found = self._parents.get(key)
        if found is None:
            if len(self._parents) >= 10_000:
                self._parents.clear()
            found = self._parents[key] = context_of(trace_ctx)
        return found

    def _hold(self, span: Span, end_ns: int | None = None) -> None:
        self._pending.append((span, end_ns if end_ns is not None else time.time_ns()))

    def committed(self) -> None:
        """The batch's transaction committed: its spans happened."""
        pending, self._pending = self._pending, []
        for span, end_ns in pending:
            span.end(end_time=end_ns)

    def aborted(self) -> None:
        """The batch's transaction aborted: its spans are dropped unended, so never exported."""
        self._pending = []

    def root(
        self, workflow_type: str, workflow_id: str, trace_ctx: TraceContext | None, now_ms: int
    ) -> TraceContext | None:
        """The workflow's trace: the client's, or a new root span ``workflow <type>``."""
        if trace_ctx is not None:
            return trace_ctx
        span = self._tracer.start_span(
            f"workflow {workflow_type}",
            context=Context(),  # a new trace, whatever is current in this thread
            kind=SpanKind.INTERNAL,
            start_time=_ns(now_ms),
            attributes={WORKFLOW_ID: workflow_id, WORKFLOW_TYPE: workflow_type},
        )
        self._hold(span, _ns(now_ms))
        return trace_context_of(span)

    def step(
        self,
        workflow_type: str,
        workflow_id: str,
        trace_ctx: TraceContext | None,
        events: Sequence[HistoryEvent],
        started_ns: int,
    ) -> None:
        """One decision: the new events, as a span ``step <type> <first event kind>``."""
        if not events:
            return
        span = self._tracer.start_span(
            f"step {workflow_type} {events[0].event.kind}",
            context=self._parent(trace_ctx),
            kind=SpanKind.INTERNAL,
            start_time=started_ns,
        )
        if not span.is_recording():
            return  # unsampled: nothing of it is kept, so nothing is worth computing
        span.set_attributes(
            {
                WORKFLOW_ID: workflow_id,
                WORKFLOW_TYPE: workflow_type,
                EVENTS: ",".join(e.event.kind for e in events),  # sequences cost more
                "saga.step.first_seq": events[0].event_seq,
            }
        )
        for event in events:
            self._event(span, event)
        self._hold(span)

    @staticmethod
    def _event(span: Span, event: HistoryEvent) -> None:
        body = event.event
        at = _ns(event.recorded_at_ms)
        if isinstance(body, TimerStarted):
            timer = {"saga.timer.seq": body.seq, "saga.timer.fire_at_ms": body.fire_at_ms}
            span.add_event("timer started", timer, timestamp=at)
        elif isinstance(body, TimerFired):
            span.add_event("timer fired", {"saga.timer.seq": body.seq}, timestamp=at)
        elif isinstance(body, SignalReceived):
            span.add_event("signal received", {"saga.signal.name": body.signal_name}, timestamp=at)
        elif isinstance(body, WorkflowCompleted | WorkflowFailed):
            status = (
                WorkflowStatus.COMPLETED if isinstance(body, WorkflowCompleted) else body.status
            )
            span.set_attribute(STATUS, status.value)
            if status is not WorkflowStatus.COMPLETED:
                span.set_status(Status(StatusCode.ERROR, f"workflow {status.value.lower()}"))
            span.add_event(f"workflow {status.value.lower()}", timestamp=at)
        elif isinstance(body, ActivityParked):
            parked: dict[str, str | int] = {SEQ: body.seq, "saga.error.type": body.error.type}
            span.add_event("compensation parked", parked, timestamp=at)
            span.set_status(Status(StatusCode.ERROR, "a compensation waits for an operator"))
        elif isinstance(body, OperatorActed):
            acted: dict[str, str | int] = {
                "saga.operator": body.operator,
                "saga.operator.reason": body.reason,
            }
            if body.step_seq is not None:
                acted[SEQ] = body.step_seq
            span.add_event(f"operator {body.action}", acted, timestamp=at)
            if body.action == "terminate":
                span.set_attribute(STATUS, WorkflowStatus.TERMINATED.value)
                span.set_status(Status(StatusCode.ERROR, "workflow terminated"))

    def command(self, cmd: ActivityCommand, topic: str) -> TraceContext | None:
        """The PRODUCER span of one activity command, a child of the workflow's context.

        Its context is what the command carries (envelope and ``traceparent`` header), so the
        service's handler span is its child.
        """
        verb = "compensate" if cmd.is_compensation else "send"
        span = self._tracer.start_span(
            f"{verb} {cmd.activity_name}",
            context=self._parent(cmd.trace),
            kind=SpanKind.PRODUCER,
        )
        if span.is_recording():
            span.set_attributes(
                {
                    SYSTEM: "kafka",
                    DESTINATION: topic,
                    OPERATION_TYPE: "send",
                    OPERATION_NAME: "send",
                    MESSAGE_KEY: cmd.workflow_id,
                    WORKFLOW_ID: cmd.workflow_id,
                    ACTIVITY: cmd.activity_name,
                    SEQ: cmd.seq,
                    ATTEMPT: cmd.attempt,
                    IDEMPOTENCY_KEY: cmd.idempotency_key,
                    COMPENSATION: cmd.is_compensation,
                }
            )
            self._hold(span)
        return trace_context_of(span)


# --------------------------------------------------------------------------- the client


def client_start_span(
    tracer: Tracer, workflow_type: str, workflow_id: str, inbox: str
) -> tuple[Span, TraceContext | None]:
    """The client's PRODUCER span ``start <type>`` (a child of the caller's current span) and
    the context the start request carries; the caller ends the span once the request is sent."""
    span = tracer.start_span(
        f"start {workflow_type}",
        kind=SpanKind.PRODUCER,
        attributes={
            SYSTEM: "kafka",
            DESTINATION: inbox,
            OPERATION_TYPE: "send",
            OPERATION_NAME: "send",
            MESSAGE_KEY: workflow_id,
            WORKFLOW_ID: workflow_id,
            WORKFLOW_TYPE: workflow_type,
        },
    )
    return span, trace_context_of(span)


# --------------------------------------------------------------------------- the services


@contextlib.contextmanager
def handler_span(
    tracer: Tracer,
    service: str,
    cmd: ActivityCommand,
    headers: Sequence[tuple[str, bytes | str | None]],
    *,
    topic: str,
    partition: int,
    offset: int,
) -> Iterator[Span]:
    """The CONSUMER span of a service handling one command: a child of the command's span."""
    with tracer.start_as_current_span(
        f"process {cmd.activity_name}",
        context=context_of(cmd.trace, headers),
        kind=SpanKind.CONSUMER,
        attributes={
            SYSTEM: "kafka",
            DESTINATION: topic,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            MESSAGE_KEY: cmd.workflow_id,
            PARTITION: str(partition),
            OFFSET: offset,
            CONSUMER_GROUP: service,
            WORKFLOW_ID: cmd.workflow_id,
            ACTIVITY: cmd.activity_name,
            SEQ: cmd.seq,
            ATTEMPT: cmd.attempt,
            IDEMPOTENCY_KEY: cmd.idempotency_key,
            COMPENSATION: cmd.is_compensation,
        },
    ) as span:
        yield span


def record_reply(span: Span, reply: ActivityReply) -> None:
    """Mark the handler span with the reply's outcome."""
    span.set_attribute(OUTCOME, reply.outcome.value)
    if reply.outcome is not ReplyOutcome.SUCCESS and reply.error is not None:
        span.set_status(Status(StatusCode.ERROR, f"{reply.error.type}: {reply.error.message}"))


# --------------------------------------------------------------------------- exporters


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (``ReadableSpan.to_json``).

    Several processes may share one file: each batch is one ``write`` on an ``O_APPEND`` file
    descriptor, so lines of different processes never interleave.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            os.write(self._fd, data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _exporter(name: str) -> SpanExporter | None:
    """An exporter named as in ``OTEL_TRACES_EXPORTER``: otlp (over HTTP), console, none, or an
    ``opentelemetry_traces_exporter`` entry point."""
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name in ("otlp", "otlp_proto_http"):
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        )
        if protocol != "http/protobuf":
            raise ValueError(f"OTLP protocol {protocol!r}: only http/protobuf is installed")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, HEADERS, ...
    found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
    for entry in found:
        exporter: SpanExporter = entry.load()()
        return exporter
    raise ValueError(f"OTEL_TRACES_EXPORTER names an unknown exporter {name!r}")


def setup(
    service_name: str,
    *,
    span_file: str | os.PathLike[str] | None = None,
    exporters: Iterable[SpanExporter] = (),
    sampler: Sampler | None = None,
) -> TracerProvider:
    """A ``TracerProvider`` for one process, configured the standard way.

    ``OTEL_TRACES_EXPORTER`` (comma separated: ``otlp`` over HTTP, ``console``, ``none``; default
    ``none`` here, so a process without a collector logs no export errors),
    ``OTEL_EXPORTER_OTLP_*``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_SERVICE_NAME`` and ``OTEL_BSP_*`` are read by the SDK. ``span_file`` adds a JSON-lines
    file of spans (what ``print_trace_tree`` reads). ``sampler`` overrides
    ``OTEL_TRACES_SAMPLER``. Pass the provider to the node or service (see :func:`recording`);
    call ``shutdown()`` on it at exit to flush.
    """
    attributes: dict[str, Any] = {SERVICE_NAME: service_name}
    if os.environ.get("OTEL_SERVICE_NAME"):
        attributes = {}  # Resource.create takes the name from the environment
    chosen = list(exporters)
    names = os.environ.get("OTEL_TRACES_EXPORTER", "none")
    for name in (n.strip() for n in names.split(",")):
        exporter = _exporter(name) if name else None
        if exporter is not None:
            chosen.append(exporter)
    if span_file is not None:
        chosen.append(JsonLinesSpanExporter(span_file))
    # With nowhere to send spans, recording them is pure cost (half of a node's throughput,
    # docs/performance.md): they are not sampled. Their W3C context still travels on, marked
    # unsampled, and parent-based samplers downstream follow that decision, as OTel intends.
    if sampler is None and not chosen and not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    for exporter in chosen:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def recording(provider: TracerProvider) -> bool:
    """False for a provider from :func:`setup` that has nowhere to send spans.

    A node given no provider still carries each workflow's trace context to its commands, so the
    services' spans join the client's trace; it only skips making spans of its own, which cost a
    third of its throughput even unsampled (docs/performance.md).
    """
    return provider.sampler is not ALWAYS_OFF


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class SpanRow:
    """What the tree needs of a span, from a ``ReadableSpan`` or a JSON line."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    service: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, span: ReadableSpan | Mapping[str, Any] | SpanRow) -> SpanRow:
        if isinstance(span, SpanRow):
            return span
        if isinstance(span, ReadableSpan):
            ctx = span.context
            assert ctx is not None
            return cls(
                trace_id=f"0x{ctx.trace_id:032x}",
                span_id=f"0x{ctx.span_id:016x}",
                parent_id=f"0x{span.parent.span_id:016x}" if span.parent else None,
                name=span.name,
                start_ns=span.start_time or 0,
                end_ns=span.end_time or span.start_time or 0,
                service=str(span.resource.attributes.get(SERVICE_NAME, "")),
                attributes=dict(span.attributes or {}),
            )
        return cls(
            trace_id=span["context"]["trace_id"],
            span_id=span["context"]["span_id"],
            parent_id=span.get("parent_id"),
            name=span["name"],
            start_ns=_iso_ns(span["start_time"]),
            end_ns=_iso_ns(span.get("end_time") or span["start_time"]),
            service=str(span.get("resource", {}).get("attributes", {}).get(SERVICE_NAME, "")),
            attributes=span.get("attributes") or {},
        )


def _iso_ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def load_spans(path: str | os.PathLike[str]) -> list[SpanRow]:
    """The spans of a JSON-lines file written by :class:`JsonLinesSpanExporter`."""
    rows: list[SpanRow] = []
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                rows.append(SpanRow.of(json.loads(line)))
    return rows


def format_trace_tree(
    spans: Iterable[ReadableSpan | Mapping[str, Any] | SpanRow],
    *,
    workflow_id: str | None = None,
    timings: bool = True,
) -> list[str]:
    """The spans as trees, one per trace, children ordered by start time, with timings.

    ``workflow_id`` keeps only the trace(s) with a span of that workflow.
    """
    rows = [SpanRow.of(s) for s in spans]
    if workflow_id is not None:
        wanted = {r.trace_id for r in rows if r.attributes.get(WORKFLOW_ID) == workflow_id}
        rows = [r for r in rows if r.trace_id in wanted]
    ids = {(r.trace_id, r.span_id) for r in rows}
    children: dict[tuple[str, str] | None, list[SpanRow]] = {}
    for r in rows:
        parent = (r.trace_id, r.parent_id) if r.parent_id else None
        children.setdefault(parent if parent in ids else None, []).append(r)
    for group in children.values():
        group.sort(key=lambda r: (r.start_ns, r.name))
    lines: list[str] = []

    def walk(row: SpanRow, prefix: str, last: bool, origin: int, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        text = row.name
        if timings:
            offset = (row.start_ns - origin) / 1e6
            text += f"  +{offset:.1f} ms  {(row.end_ns - row.start_ns) / 1e6:.1f} ms"
        if row.service:
            text += f"  [{row.service}]"
        lines.append(prefix + branch + text)
        kids = children.get((row.trace_id, row.span_id), [])
        inner = prefix + ("" if top else ("    " if last else "│   "))
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, origin, False)

    for root in children.get(None, []):
        if timings:
            lines.append(f"trace {root.trace_id}")
        walk(root, "", True, root.start_ns, True)
    return lines


def print_trace_tree(
    spans: Iterable[ReadableSpan | Mapping[str, Any] | SpanRow],
    *,
    workflow_id: str | None = None,
    out: IO[str] | None = None,
) -> None:
    """Print a workflow's trace as a tree with timings (for ``orchestrator trace``)."""
    stream = out if out is not None else sys.stdout
    for line in format_trace_tree(spans, workflow_id=workflow_id):
        print(line, file=stream)
