"""Schema evolution: records written with an older schema version are read with the current one.

``legacy/HistoryEvent.v0.avsc`` is HistoryEvent before the ``MarkerRecorded`` kind (``ctx.patched``)
was appended to the ``event`` union: histories written before it must read unchanged.

``contracts/schemas/legacy/ActivityReply.v0.avsc`` is ActivityReply before ``service`` and ``trace``
were added. A service still on v0 frames its replies with the v0 fingerprint; the orchestrator must
read them as current ActivityReply models, with the new fields at their defaults.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import parse_schema
from hypothesis import assume, given
from hypothesis import strategies as st

from contracts import codec
from contracts.codec import (
    MAGIC,
    _history_to_avro,
    current_schema,
    decode,
    decode_as,
    encode,
    fingerprint,
)
from contracts.envelopes import (
    ActivityCommand,
    ActivityParked,
    ActivityReply,
    ActivityScheduled,
    ChildWorkflowCompleted,
    ChildWorkflowFailed,
    ChildWorkflowStarted,
    ErrorInfo,
    HistoryEvent,
    IdReusePolicy,
    LocalActivityRecorded,
    MarkerRecorded,
    OperatorActed,
    Payload,
    ReplyOutcome,
    StartWorkflow,
    WorkflowBlocked,
    WorkflowContinuedAsNew,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowStartSent,
    WorkflowStatus,
    WorkflowTimedOut,
)
from tests.unit.test_codec import ENVELOPES, history_events
from tests.unit.test_codec import EVENT_BODIES as ALL_EVENT_BODIES

# Local activities and heartbeat timeouts came last (HistoryEvent.v4 is the schema before
# them): every older schema's tests draw from the kinds they knew.
EVENT_BODIES = {t: s for t, s in ALL_EVENT_BODIES.items() if t is not LocalActivityRecorded}
LOCAL_KINDS = ["saga.v1.LocalActivityRecorded"]

LEGACY_V0 = Path(codec.__file__).parent / "schemas" / "legacy" / "ActivityReply.v0.avsc"


def _v0_schema() -> dict[str, Any]:
    parsed = parse_schema(json.loads(LEGACY_V0.read_text()))
    assert isinstance(parsed, dict)
    return parsed


def _frame_v0(record: dict[str, Any]) -> bytes:
    """Bytes as a v0 writer produces them, built here without the codec's encoder."""
    schema = _v0_schema()
    body = io.BytesIO()
    schemaless_writer(body, schema, record)
    return MAGIC + fingerprint(schema).to_bytes(8, "little") + body.getvalue()


def test_v0_is_an_older_activity_reply_without_service_and_trace() -> None:
    v0 = _v0_schema()
    current = current_schema(ActivityReply)
    assert v0["name"] == current.full_name == "saga.v1.ActivityReply"
    v0_fields = [f["name"] for f in v0["fields"]]
    current_fields = [f["name"] for f in current.schema["fields"]]
    assert v0_fields == [f for f in current_fields if f not in ("service", "trace")]
    assert "service" in current_fields
    assert "trace" in current_fields
    assert fingerprint(v0) != current.fingerprint
    (info,) = (i for i in codec.known_schemas() if i.fingerprint == fingerprint(v0))
    assert not info.current


def test_v0_record_decodes_as_current_activity_reply() -> None:
    data = _frame_v0(
        {
            "workflow_id": "order-17",
            "seq": 4,
            "attempt": 2,
            "idempotency_key": "order-17/4",
            "outcome": "SUCCESS",
            "sent_at_ms": 1_700_000_000_123,
            "result": {"encoding": "json/plain", "data": b'{"payment_id":"p-1"}'},
            "error": None,
        }
    )
    assert data[:2] == b"\xc3\x01"

    reply = decode(data)

    assert isinstance(reply, ActivityReply)
    assert reply.service == ""
    assert reply.trace is None
    assert reply == ActivityReply(
        workflow_id="order-17",
        seq=4,
        attempt=2,
        idempotency_key="order-17/4",
        outcome=ReplyOutcome.SUCCESS,
        sent_at_ms=1_700_000_000_123,
        result=Payload(data=b'{"payment_id":"p-1"}'),
    )
    assert decode_as(data, ActivityReply) == reply


def test_v0_failure_reply_decodes() -> None:
    data = _frame_v0(
        {
            "workflow_id": "order-18",
            "seq": 1,
            "attempt": 1,
            "idempotency_key": "order-18/1",
            "outcome": "BUSINESS_FAILURE",
            "sent_at_ms": 5,
            "result": None,
            "error": {"type": "OutOfStock", "message": "sku-9", "details": None},
        }
    )
    reply = decode_as(data, ActivityReply)
    assert reply.outcome is ReplyOutcome.BUSINESS_FAILURE
    assert reply.error == ErrorInfo(type="OutOfStock", message="sku-9")
    assert (reply.service, reply.trace) == ("", None)


@given(ENVELOPES[ActivityReply])
def test_any_v0_record_reads_as_the_current_model_with_defaults(reply: ActivityReply) -> None:
    v0_record = reply.model_dump(exclude={"service", "trace"})
    decoded = decode_as(_frame_v0(v0_record), ActivityReply)
    assert decoded == reply.model_copy(update={"service": "", "trace": None})
    # Re-encoding writes the current schema, never the legacy one.
    assert encode(decoded)[2:10] == current_schema(ActivityReply).fingerprint.to_bytes(8, "little")


@given(ENVELOPES[ActivityReply])
def test_a_v0_reader_can_read_current_records(reply: ActivityReply) -> None:
    """Forward compatibility: an old reader ignores the fields it does not know."""
    body = io.BytesIO(encode(reply)[10:])
    record = schemaless_reader(body, current_schema(ActivityReply).schema, _v0_schema())
    assert record == reply.model_dump(mode="python", exclude={"service", "trace"})


# --------------------------------------------------------------------------- HistoryEvent v0

CHILD_BODIES = (ChildWorkflowStarted, ChildWorkflowCompleted, ChildWorkflowFailed)
CHILD_KINDS = [f"saga.v1.{t.__name__}" for t in CHILD_BODIES]
LIFECYCLE = (WorkflowTimedOut, WorkflowContinuedAsNew, WorkflowStartSent)
LIFECYCLE_KINDS = [f"saga.v1.{t.__name__}" for t in LIFECYCLE]


def _without_timeout(event: HistoryEvent) -> HistoryEvent:
    """What a schema before the lifecycle kinds can hold: no execution timeout, no heartbeat
    timeout."""
    return _without_heartbeat(event, execution=True)


def _without_heartbeat(event: HistoryEvent, *, execution: bool = False) -> HistoryEvent:
    body = event.event
    if isinstance(body, WorkflowStarted) and execution:
        body = body.model_copy(update={"execution_timeout_ms": None})
    if isinstance(body, ActivityScheduled):
        body = body.model_copy(update={"heartbeat_timeout_ms": None})
    return event.model_copy(update={"event": body})


HISTORY_V0 = Path(codec.__file__).parent / "schemas" / "legacy" / "HistoryEvent.v0.avsc"


def _history_v0_schema() -> dict[str, Any]:
    parsed = parse_schema(json.loads(HISTORY_V0.read_text()))
    assert isinstance(parsed, dict)
    return parsed


def _branches(schema: dict[str, Any]) -> list[str]:
    (event,) = (f for f in schema["fields"] if f["name"] == "event")
    return [branch["name"] for branch in event["type"]]


def test_history_v0_is_the_current_schema_without_the_new_kinds() -> None:
    v0 = _history_v0_schema()
    current = current_schema(HistoryEvent).schema
    assert _branches(current) == [
        *_branches(v0),
        "saga.v1.MarkerRecorded",
        "saga.v1.WorkflowBlocked",
        "saga.v1.ActivityParked",
        "saga.v1.OperatorActed",
        *CHILD_KINDS,
        *LIFECYCLE_KINDS,
        *LOCAL_KINDS,
    ]
    assert fingerprint(v0) != current_schema(HistoryEvent).fingerprint


HISTORY_V1 = HISTORY_V0.with_name("HistoryEvent.v1.avsc")
_OPERATOR_KINDS = (ActivityParked, OperatorActed)


def _history_v1_schema() -> dict[str, Any]:
    parsed = parse_schema(json.loads(HISTORY_V1.read_text()))
    assert isinstance(parsed, dict)
    return parsed


def test_history_v1_is_the_current_schema_without_the_operator_kinds() -> None:
    assert _branches(current_schema(HistoryEvent).schema) == [
        *_branches(_history_v1_schema()),
        "saga.v1.ActivityParked",
        "saga.v1.OperatorActed",
        *CHILD_KINDS,
        *LIFECYCLE_KINDS,
        *LOCAL_KINDS,
    ]


def _old_status(event: HistoryEvent) -> bool:
    """TERMINATED came with the operator kinds: old writers never wrote it."""
    body = event.event
    return not (isinstance(body, WorkflowFailed) and body.status is WorkflowStatus.TERMINATED)


def _no_parent(event: HistoryEvent) -> bool:
    """WorkflowStarted.parent came with the child workflow kinds."""
    return not isinstance(event.event, WorkflowStarted) or event.event.parent is None


@given(
    history_events(
        st.one_of(
            *(
                s
                for t, s in EVENT_BODIES.items()
                if t not in (*_OPERATOR_KINDS, *CHILD_BODIES, *LIFECYCLE)
            )
        )
    )
)
def test_history_written_before_operator_actions_reads_as_the_current_model(
    event: HistoryEvent,
) -> None:
    assume(_old_status(event) and _no_parent(event))
    event = _without_timeout(event)
    v1 = _history_v1_schema()
    body = io.BytesIO()
    schemaless_writer(body, v1, _history_to_avro(event))
    framed = MAGIC + fingerprint(v1).to_bytes(8, "little") + body.getvalue()
    assert decode_as(framed, HistoryEvent) == event


@given(
    history_events(
        st.one_of(
            *(
                s
                for t, s in EVENT_BODIES.items()
                if t
                not in (
                    MarkerRecorded,
                    WorkflowBlocked,
                    *_OPERATOR_KINDS,
                    *CHILD_BODIES,
                    *LIFECYCLE,
                )
            )
        )
    )
)
def test_history_written_before_markers_reads_as_the_current_model(event: HistoryEvent) -> None:
    """A history written by nodes on the old code stays readable by nodes on the new one."""
    assume(_old_status(event) and _no_parent(event))
    event = _without_timeout(event)
    v0 = _history_v0_schema()
    record = _history_to_avro(event)
    body = io.BytesIO()
    schemaless_writer(body, v0, record)
    framed = MAGIC + fingerprint(v0).to_bytes(8, "little") + body.getvalue()
    assert decode_as(framed, HistoryEvent) == event


def test_a_marker_event_round_trips_with_the_current_schema() -> None:
    event = HistoryEvent(
        workflow_id="order-1",
        event_seq=4,
        recorded_at_ms=7,
        event=MarkerRecorded(marker="patch", change_id="add-fraud-check"),
    )
    data = encode(event)
    assert data[2:10] == current_schema(HistoryEvent).fingerprint.to_bytes(8, "little")
    assert decode_as(data, HistoryEvent) == event


# --------------------------------------------------------------------------- child workflows

LEGACY = Path(codec.__file__).parent / "schemas" / "legacy"


def _legacy(name: str) -> dict[str, Any]:
    parsed = parse_schema(json.loads((LEGACY / name).read_text()))
    assert isinstance(parsed, dict)
    return parsed


def _frame(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    body = io.BytesIO()
    schemaless_writer(body, schema, record)
    return MAGIC + fingerprint(schema).to_bytes(8, "little") + body.getvalue()


def test_history_v2_is_the_current_schema_before_child_workflows() -> None:
    v2 = _legacy("HistoryEvent.v2.avsc")
    assert _branches(current_schema(HistoryEvent).schema) == [
        *_branches(v2),
        *CHILD_KINDS,
        *LIFECYCLE_KINDS,
        *LOCAL_KINDS,
    ]


@given(
    history_events(
        st.one_of(*(s for t, s in EVENT_BODIES.items() if t not in (*CHILD_BODIES, *LIFECYCLE)))
    ).filter(lambda e: not isinstance(e.event, WorkflowStarted) or e.event.parent is None)
)
def test_history_written_before_child_workflows_reads_as_the_current_model(
    event: HistoryEvent,
) -> None:
    event = _without_timeout(event)
    record = _history_to_avro(event)
    if record["event"][0] == "saga.v1.WorkflowStarted":
        record["event"][1].pop("parent")
        record["event"][1].pop("execution_timeout_ms")
    assert decode_as(_frame(_legacy("HistoryEvent.v2.avsc"), record), HistoryEvent) == event


def _old_start(start: StartWorkflow) -> bool:
    return start.execution_timeout_ms is None and start.id_reuse is IdReusePolicy.REJECT_DUPLICATE


@given(ENVELOPES[StartWorkflow].filter(lambda s: s.parent is None and _old_start(s)))
def test_a_start_without_parent_written_by_an_older_client_reads(start: StartWorkflow) -> None:
    record = start.model_dump(exclude={"parent", "execution_timeout_ms", "id_reuse"})
    assert decode_as(_frame(_legacy("StartWorkflow.v0.avsc"), record), StartWorkflow) == start


# --------------------------------------------------------------------------- lifecycle kinds


def test_history_v3_is_the_current_schema_before_the_lifecycle_kinds() -> None:
    v3 = _legacy("HistoryEvent.v3.avsc")
    assert _branches(current_schema(HistoryEvent).schema) == [
        *_branches(v3),
        *LIFECYCLE_KINDS,
        *LOCAL_KINDS,
    ]


@given(history_events(st.one_of(*(s for t, s in EVENT_BODIES.items() if t not in LIFECYCLE))))
def test_history_written_before_the_lifecycle_kinds_reads_as_the_current_model(
    event: HistoryEvent,
) -> None:
    """Histories of nodes without timeouts / continue-as-new stay readable (timeout: None)."""
    event = _without_timeout(event)
    record = _history_to_avro(event)
    if record["event"][0] == "saga.v1.WorkflowStarted":
        record["event"][1].pop("execution_timeout_ms")
    assert decode_as(_frame(_legacy("HistoryEvent.v3.avsc"), record), HistoryEvent) == event


@given(ENVELOPES[StartWorkflow].filter(_old_start))
def test_a_start_without_timeout_or_id_reuse_from_an_older_client_reads(
    start: StartWorkflow,
) -> None:
    record = start.model_dump(mode="python", exclude={"execution_timeout_ms", "id_reuse"})
    assert decode_as(_frame(_legacy("StartWorkflow.v1.avsc"), record), StartWorkflow) == start


# --------------------------------------------------------------------------- heartbeats, local


def test_history_v4_is_the_current_schema_before_heartbeats_and_local_activities() -> None:
    v4 = _legacy("HistoryEvent.v4.avsc")
    current = current_schema(HistoryEvent).schema
    assert _branches(current) == [*_branches(v4), *LOCAL_KINDS]
    scheduled = [b for b in _event_branches(current) if b["name"].endswith("ActivityScheduled")]
    v4_scheduled = [b for b in _event_branches(v4) if b["name"].endswith("ActivityScheduled")]
    assert [f["name"] for f in v4_scheduled[0]["fields"]] == [
        f["name"] for f in scheduled[0]["fields"] if f["name"] != "heartbeat_timeout_ms"
    ]


def _event_branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    (event,) = (f for f in schema["fields"] if f["name"] == "event")
    return list(event["type"])


@given(history_events(st.one_of(*EVENT_BODIES.values())))
def test_history_written_before_heartbeats_reads_as_the_current_model(event: HistoryEvent) -> None:
    event = _without_heartbeat(event)
    framed = _frame(_legacy("HistoryEvent.v4.avsc"), _history_to_avro(event))
    assert decode_as(framed, HistoryEvent) == event


@given(ENVELOPES[ActivityCommand])
def test_a_command_written_before_heartbeats_reads_with_no_heartbeat_fields(
    command: ActivityCommand,
) -> None:
    """A node on the old code sends commands without heartbeat fields: a new service reads them
    with none (no heartbeat deadline, no details)."""
    old = command.model_copy(update={"heartbeat_timeout_ms": None, "heartbeat_details": None})
    record = old.model_dump(mode="python", exclude={"heartbeat_timeout_ms", "heartbeat_details"})
    assert decode_as(_frame(_legacy("ActivityCommand.v0.avsc"), record), ActivityCommand) == old
