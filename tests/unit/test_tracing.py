"""Tracing helpers without a broker: W3C round trips, setup from OTEL_* variables, the JSON-lines
span file and the trace tree."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, get_current_span

from contracts.envelopes import ActivityCommand, Payload, TraceContext
from orchestrator import tracing


def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p, exporter


def command(trace: TraceContext | None, compensation: bool = False) -> ActivityCommand:
    return ActivityCommand(
        workflow_id="wf-1",
        activity_name="pay.charge",
        seq=2,
        attempt=3,
        idempotency_key="wf-1/2",
        is_compensation=compensation,
        input=Payload(),
        reply_topic="ns.inbox",
        sent_at_ms=1_000,
        trace=trace,
    )


def test_root_is_made_only_without_a_client_trace() -> None:
    p, exporter = provider()
    tracer = tracing.WorkflowTracer(p)
    given = TraceContext(traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert tracer.root("trip", "wf-1", given, 1_000) is given
    assert exporter.get_finished_spans() == ()
    made = tracer.root("trip", "wf-1", None, 1_000)
    assert made is not None
    assert exporter.get_finished_spans() == ()  # held until the transaction commits
    tracer.committed()
    (root,) = exporter.get_finished_spans()
    assert root.name == "workflow trip" and root.parent is None
    assert made.traceparent.split("-")[1] == f"{root.context.trace_id:032x}"


def test_command_span_is_a_child_of_the_workflow_and_the_handler_of_the_command() -> None:
    p, exporter = provider()
    tracer = tracing.WorkflowTracer(p)
    root = tracer.root("trip", "wf-1", None, 1_000)
    sent = tracer.command(command(root, compensation=True), "pay.commands")
    assert sent is not None
    headers = tracing.headers_of(sent)
    assert headers is not None
    with tracing.handler_span(
        p.get_tracer("svc"), "pay", command(root), headers, topic="pay.commands", partition=1,
        offset=7,
    ) as span:  # fmt: skip
        assert get_current_span() is span
    tracer.committed()
    process, workflow, send = exporter.get_finished_spans()
    assert send.name == "compensate pay.charge" and send.kind is SpanKind.PRODUCER
    assert (send.attributes or {})["saga.compensation"] is True
    assert send.parent is not None and send.parent.span_id == workflow.context.span_id
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert (process.attributes or {})["messaging.kafka.offset"] == 7


def test_spans_of_an_aborted_batch_are_never_exported() -> None:
    p, exporter = provider()
    tracer = tracing.WorkflowTracer(p)
    root = tracer.root("trip", "wf-1", None, 1_000)
    tracer.command(command(root), "pay.commands")
    tracer.aborted()  # the batch will be decided again, with new spans
    tracer.committed()
    assert exporter.get_finished_spans() == ()
    again = tracer.root("trip", "wf-1", None, 1_000)
    tracer.command(command(again), "pay.commands")
    tracer.committed()
    assert [s.name for s in exporter.get_finished_spans()] == ["workflow trip", "send pay.charge"]


def test_the_header_wins_over_the_envelope_and_the_envelope_is_a_fallback() -> None:
    a = TraceContext(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    b = TraceContext(traceparent="00-" + "c" * 32 + "-" + "d" * 16 + "-01")
    assert tracing.trace_context_of(tracing.context_of(a, tracing.headers_of(b) or [])) == b
    assert tracing.trace_context_of(tracing.context_of(a)) == a
    assert tracing.trace_context_of(tracing.context_of(None)) is None


def test_setup_reads_otel_traces_exporter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    p = tracing.setup("node-1", span_file=tmp_path / "spans.jsonl")
    assert p.resource.attributes["service.name"] == "node-1"
    p.get_tracer("t").start_span("hello").end()
    p.shutdown()
    (row,) = tracing.load_spans(tmp_path / "spans.jsonl")
    assert (row.name, row.service, row.parent_id) == ("hello", "node-1", None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    p = tracing.setup("node-2")
    p.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin-nope")
    with pytest.raises(ValueError, match="unknown exporter"):
        tracing.setup("node-3")


def test_trace_tree_from_a_span_file(tmp_path: Path) -> None:
    exporter = tracing.JsonLinesSpanExporter(tmp_path / "spans.jsonl")
    p = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    p.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = p.get_tracer("t")
    with tracer.start_as_current_span("start trip", attributes={tracing.WORKFLOW_ID: "wf-1"}):
        with tracer.start_as_current_span("send a"):
            tracer.start_span("process a").end()
        tracer.start_span("step trip ActivityCompleted").end()
    tracer.start_span("other trace").end()
    p.shutdown()
    rows = tracing.load_spans(tmp_path / "spans.jsonl")
    assert tracing.format_trace_tree(rows, workflow_id="wf-1", timings=False) == [
        "start trip  [svc]",
        "├── send a  [svc]",
        "│   └── process a  [svc]",
        "└── step trip ActivityCompleted  [svc]",
    ]
    out = io.StringIO()
    tracing.print_trace_tree(rows, workflow_id="wf-1", out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("trace 0x") and lines[1].startswith("start trip  +0.0 ms")
    assert len(lines) == 5 and all(" ms" in line for line in lines[1:])


def test_cli_trace_prints_the_tree(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main

    exporter = tracing.JsonLinesSpanExporter(tmp_path / "spans.jsonl")
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    with p.get_tracer("t").start_as_current_span(
        "start trip", attributes={"saga.workflow.id": "w"}
    ):
        p.get_tracer("t").start_span("send a").end()
    p.shutdown()
    out = CliRunner().invoke(main, ["trace", str(tmp_path / "spans.jsonl"), "--workflow", "w"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[1].startswith("start trip  +0.0 ms")
    assert out.output.splitlines()[2].startswith("└── send a  +")
