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
from hypothesis import given
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
    ActivityReply,
    ActivityScheduled,
    ErrorInfo,
    HistoryEvent,
    LocalActivityRecorded,
    MarkerRecorded,
    Payload,
    ReplyOutcome,
    WorkflowBlocked,
)
from tests.unit.test_codec import ENVELOPES, EVENT_BODIES, history_events

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
        "saga.v1.LocalActivityRecorded",
    ]
    assert fingerprint(v0) != current_schema(HistoryEvent).fingerprint


@given(
    history_events(
        st.one_of(
            *(
                s
                for t, s in EVENT_BODIES.items()
                if t not in (MarkerRecorded, WorkflowBlocked, LocalActivityRecorded)
            )
        )
    )
)
def test_history_written_before_markers_reads_as_the_current_model(event: HistoryEvent) -> None:
    """A history written by nodes on the old code stays readable by nodes on the new one."""
    event = _without_v1_fields(event)
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


# --------------------------------------------------------------------------- HistoryEvent v1

HISTORY_V1 = Path(codec.__file__).parent / "schemas" / "legacy" / "HistoryEvent.v1.avsc"


def _legacy(path: Path) -> dict[str, Any]:
    parsed = parse_schema(json.loads(path.read_text()))
    assert isinstance(parsed, dict)
    return parsed


def _without_v1_fields(event: HistoryEvent) -> HistoryEvent:
    """The event as a v1 (or older) writer could hold it: no heartbeat timeout."""
    if isinstance(event.event, ActivityScheduled):
        body = event.event.model_copy(update={"heartbeat_timeout_ms": None})
        return event.model_copy(update={"event": body})
    return event


def test_history_v1_is_the_current_schema_before_heartbeats_and_local_activities() -> None:
    v1 = _legacy(HISTORY_V1)
    current = current_schema(HistoryEvent).schema
    assert _branches(current) == [*_branches(v1), "saga.v1.LocalActivityRecorded"]
    scheduled = [b for b in _event_branches(current) if b["name"].endswith("ActivityScheduled")]
    v1_scheduled = [b for b in _event_branches(v1) if b["name"].endswith("ActivityScheduled")]
    assert [f["name"] for f in v1_scheduled[0]["fields"]] == [
        f["name"] for f in scheduled[0]["fields"] if f["name"] != "heartbeat_timeout_ms"
    ]


def _event_branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    (event,) = (f for f in schema["fields"] if f["name"] == "event")
    return list(event["type"])


@given(
    history_events(
        st.one_of(*(s for t, s in EVENT_BODIES.items() if t is not LocalActivityRecorded))
    )
)
def test_history_written_before_heartbeats_reads_as_the_current_model(event: HistoryEvent) -> None:
    event = _without_v1_fields(event)
    v1 = _legacy(HISTORY_V1)
    body = io.BytesIO()
    schemaless_writer(body, v1, _history_to_avro(event))
    framed = MAGIC + fingerprint(v1).to_bytes(8, "little") + body.getvalue()
    assert decode_as(framed, HistoryEvent) == event


# --------------------------------------------------------------------------- ActivityCommand v0

COMMAND_V0 = Path(codec.__file__).parent / "schemas" / "legacy" / "ActivityCommand.v0.avsc"


@given(ENVELOPES[ActivityCommand])
def test_a_command_written_before_heartbeats_reads_with_no_heartbeat_fields(
    command: ActivityCommand,
) -> None:
    """A node on the old code sends commands without heartbeat fields: a new service reads them
    with none (no heartbeat deadline, no details)."""
    v0 = _legacy(COMMAND_V0)
    old = command.model_copy(update={"heartbeat_timeout_ms": None, "heartbeat_details": None})
    body = io.BytesIO()
    schemaless_writer(
        body,
        v0,
        old.model_dump(mode="python", exclude={"heartbeat_timeout_ms", "heartbeat_details"}),
    )
    framed = MAGIC + fingerprint(v0).to_bytes(8, "little") + body.getvalue()
    assert decode_as(framed, ActivityCommand) == old
