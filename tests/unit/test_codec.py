"""The Avro single-object codec: round trips, framing, errors, and the .avsc <-> model contract."""

from __future__ import annotations

import contextlib
import io
import json
import types
import typing
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_writer
from fastavro.schema import expand_schema, to_parsing_canonical_form
from fastavro.schema import fingerprint as fastavro_fingerprint
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from contracts import codec
from contracts.codec import (
    MAGIC,
    BadMagic,
    CodecError,
    MalformedRecord,
    TruncatedRecord,
    UnencodableEnvelope,
    UnexpectedEnvelope,
    UnknownSchema,
    current_schema,
    decode,
    decode_as,
    encode,
    fingerprint,
    known_schemas,
)
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCommand,
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityParked,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    CancelWorkflow,
    ChildWorkflowCompleted,
    ChildWorkflowEnded,
    ChildWorkflowFailed,
    ChildWorkflowStarted,
    DeadLetter,
    Envelope,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    IdReusePolicy,
    LateReplyIgnored,
    LocalActivityRecorded,
    MarkerRecorded,
    OperatorActed,
    OperatorAction,
    ParentRef,
    Payload,
    ReplyOutcome,
    RetryPolicy,
    SignalReceived,
    SignalWorkflow,
    StartWorkflow,
    TimerFired,
    TimerStarted,
    TraceContext,
    WorkflowBlocked,
    WorkflowCompleted,
    WorkflowContinuedAsNew,
    WorkflowFailed,
    WorkflowResult,
    WorkflowStarted,
    WorkflowStartSent,
    WorkflowStatus,
    WorkflowTimedOut,
)

SCHEMA_DIR = Path(codec.__file__).parent / "schemas"

# --------------------------------------------------------------------------- strategies

longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
texts = st.text(max_size=24)
doubles = st.floats(allow_nan=False)


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


payloads = st.builds(Payload, encoding=texts, data=st.binary(max_size=64))
traces = st.builds(TraceContext, traceparent=texts, tracestate=opt(texts))
errors = st.builds(ErrorInfo, type=texts, message=texts, details=opt(texts))
parents = st.builds(ParentRef, workflow_id=texts, seq=longs)
retries = st.builds(
    RetryPolicy,
    max_attempts=longs,
    initial_interval_ms=longs,
    backoff_coefficient=doubles,
    max_interval_ms=longs,
    jitter=doubles,
    non_retryable_error_types=st.lists(texts, max_size=3),
)
outcomes = st.sampled_from(ReplyOutcome)
statuses = st.sampled_from(WorkflowStatus)

EVENT_BODIES: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    WorkflowStarted: st.builds(
        WorkflowStarted,
        workflow_type=texts,
        request_id=texts,
        input=payloads,
        random_seed=longs,
        trace=opt(traces),
        parent=opt(parents),
        execution_timeout_ms=opt(longs),
    ),
    ActivityScheduled: st.builds(
        ActivityScheduled,
        seq=longs,
        activity_name=texts,
        topic=texts,
        input=payloads,
        idempotency_key=texts,
        is_compensation=st.booleans(),
        retry=retries,
        attempt_timeout_ms=opt(longs),
        overall_timeout_ms=opt(longs),
        heartbeat_timeout_ms=opt(longs),
    ),
    ActivityAttemptStarted: st.builds(ActivityAttemptStarted, seq=longs, attempt=longs),
    ActivityAttemptFailed: st.builds(
        ActivityAttemptFailed, seq=longs, attempt=longs, error=errors, retry_at_ms=opt(longs)
    ),
    ActivityCompleted: st.builds(ActivityCompleted, seq=longs, attempt=longs, result=payloads),
    ActivityFailed: st.builds(
        ActivityFailed, seq=longs, attempt=longs, error=errors, business=st.booleans()
    ),
    LateReplyIgnored: st.builds(LateReplyIgnored, seq=longs, attempt=longs, outcome=outcomes),
    TimerStarted: st.builds(TimerStarted, seq=longs, fire_at_ms=longs),
    TimerFired: st.builds(TimerFired, seq=longs),
    SignalReceived: st.builds(
        SignalReceived, signal_name=texts, payload=payloads, request_id=texts
    ),
    CancelRequested: st.builds(CancelRequested, reason=texts, request_id=texts),
    WorkflowCompleted: st.builds(WorkflowCompleted, result=payloads),
    WorkflowFailed: st.builds(WorkflowFailed, status=statuses, error=errors),
    WorkflowBlocked: st.builds(
        WorkflowBlocked, error=st.none() | errors, at_seq=longs, code_version=st.text(max_size=20)
    ),
    MarkerRecorded: st.builds(MarkerRecorded, marker=texts, change_id=texts),
    ActivityParked: st.builds(ActivityParked, seq=longs, attempt=longs, error=errors),
    OperatorActed: st.builds(
        OperatorActed,
        action=texts,
        request_id=texts,
        reason=texts,
        operator=texts,
        step_seq=opt(longs),
        input=opt(payloads),
    ),
    ChildWorkflowStarted: st.builds(
        ChildWorkflowStarted,
        seq=longs,
        child_workflow_id=texts,
        workflow_type=texts,
        input=payloads,
        parent_close_policy=texts,
    ),
    ChildWorkflowCompleted: st.builds(ChildWorkflowCompleted, seq=longs, result=payloads),
    ChildWorkflowFailed: st.builds(ChildWorkflowFailed, seq=longs, status=statuses, error=errors),
    WorkflowTimedOut: st.builds(WorkflowTimedOut, timeout_ms=longs),
    WorkflowContinuedAsNew: st.builds(WorkflowContinuedAsNew, input=payloads),
    WorkflowStartSent: st.builds(
        WorkflowStartSent, target_id=texts, workflow_type=texts, input=payloads, request_id=texts
    ),
    LocalActivityRecorded: st.builds(
        LocalActivityRecorded, seq=longs, name=texts, result=opt(payloads), error=opt(errors)
    ),
}


def history_events(body: st.SearchStrategy[Any]) -> st.SearchStrategy[HistoryEvent]:
    return st.builds(
        HistoryEvent,
        workflow_id=texts,
        event_seq=longs,
        recorded_at_ms=longs,
        event=body,
        trace=opt(traces),
    )


ENVELOPES: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    StartWorkflow: st.builds(
        StartWorkflow,
        workflow_id=texts,
        workflow_type=texts,
        request_id=texts,
        input=payloads,
        sent_at_ms=longs,
        trace=opt(traces),
        parent=opt(parents),
        execution_timeout_ms=opt(longs),
        id_reuse=st.sampled_from(IdReusePolicy),
    ),
    SignalWorkflow: st.builds(
        SignalWorkflow,
        workflow_id=texts,
        signal_name=texts,
        request_id=texts,
        payload=payloads,
        sent_at_ms=longs,
        trace=opt(traces),
    ),
    CancelWorkflow: st.builds(
        CancelWorkflow,
        workflow_id=texts,
        request_id=texts,
        reason=texts,
        sent_at_ms=longs,
        trace=opt(traces),
    ),
    OperatorAction: st.builds(
        OperatorAction,
        workflow_id=texts,
        request_id=texts,
        action=texts,
        reason=texts,
        operator=texts,
        sent_at_ms=longs,
        step_seq=opt(longs),
        input=opt(payloads),
        trace=opt(traces),
    ),
    ActivityCommand: st.builds(
        ActivityCommand,
        workflow_id=texts,
        activity_name=texts,
        seq=longs,
        attempt=longs,
        idempotency_key=texts,
        is_compensation=st.booleans(),
        input=payloads,
        reply_topic=texts,
        sent_at_ms=longs,
        deadline_ms=opt(longs),
        trace=opt(traces),
        heartbeat_timeout_ms=opt(longs),
        heartbeat_details=opt(payloads),
    ),
    ActivityHeartbeat: st.builds(
        ActivityHeartbeat,
        workflow_id=texts,
        seq=longs,
        attempt=longs,
        idempotency_key=texts,
        sent_at_ms=longs,
        details=opt(payloads),
        service=texts,
    ),
    ActivityReply: st.builds(
        ActivityReply,
        workflow_id=texts,
        seq=longs,
        attempt=longs,
        idempotency_key=texts,
        outcome=outcomes,
        sent_at_ms=longs,
        result=opt(payloads),
        error=opt(errors),
        service=texts,
        trace=opt(traces),
    ),
    WorkflowResult: st.builds(
        WorkflowResult,
        workflow_id=texts,
        status=statuses,
        finished_at_ms=longs,
        result=opt(payloads),
        error=opt(errors),
        request_id=opt(texts),
    ),
    DeadLetter: st.builds(
        DeadLetter,
        source_topic=texts,
        source_partition=longs,
        source_offset=longs,
        reason=texts,
        error_type=texts,
        failed_at_ms=longs,
        key=opt(st.binary(max_size=32)),
        value=opt(st.binary(max_size=64)),
    ),
    HistoryEvent: history_events(st.one_of(*EVENT_BODIES.values())),
    ChildWorkflowEnded: st.builds(
        ChildWorkflowEnded,
        workflow_id=texts,
        seq=longs,
        child_workflow_id=texts,
        status=statuses,
        sent_at_ms=longs,
        result=opt(payloads),
        error=opt(errors),
        trace=opt(traces),
    ),
}

any_envelope = st.one_of(*ENVELOPES.values())


def _union_members(union: Any) -> tuple[Any, ...]:
    return typing.get_args(union)


def _event_body_types() -> tuple[type[BaseModel], ...]:
    (union, *_) = typing.get_args(EventBody)
    return _union_members(union)


def test_strategies_cover_every_envelope_and_event_kind() -> None:
    assert set(ENVELOPES) == set(_union_members(Envelope))
    assert set(EVENT_BODIES) == set(_event_body_types())
    assert len(EVENT_BODIES) == 24


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_type", list(ENVELOPES), ids=lambda t: t.__name__)
@given(data=st.data())
def test_round_trip_every_envelope(model_type: type[BaseModel], data: st.DataObject) -> None:
    model = data.draw(ENVELOPES[model_type])
    encoded = encode(model)
    decoded = decode(encoded)
    assert type(decoded) is model_type
    assert decoded == model
    assert decode_as(encoded, model_type) == model


@pytest.mark.parametrize("body_type", list(EVENT_BODIES), ids=lambda t: t.__name__)
@given(data=st.data())
def test_round_trip_every_history_event_kind(
    body_type: type[BaseModel], data: st.DataObject
) -> None:
    event = data.draw(history_events(EVENT_BODIES[body_type]))
    decoded = decode_as(encode(event), HistoryEvent)
    assert type(decoded.event) is body_type
    assert decoded == event


@given(any_envelope)
def test_encoding_is_deterministic(model: Envelope) -> None:
    assert encode(model) == encode(decode(encode(model)))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    reply = ActivityReply(
        workflow_id="wf-1",
        seq=2,
        attempt=1,
        idempotency_key="wf-1/2",
        outcome=ReplyOutcome.SUCCESS,
        sent_at_ms=1_700_000_000_000,
        result=Payload(data=b'{"ok":true}'),
    )
    encoded = encode(reply)
    assert decode(bytearray(encoded)) == reply  # type: ignore[arg-type]
    assert decode(memoryview(encoded)) == reply  # type: ignore[arg-type]


def test_decode_as_rejects_another_envelope_type() -> None:
    cancel = CancelWorkflow(workflow_id="wf", request_id="r", reason="user", sent_at_ms=1)
    with pytest.raises(UnexpectedEnvelope, match="expected a StartWorkflow record, got a Cancel"):
        decode_as(encode(cancel), StartWorkflow)
    try:
        decode_as(encode(cancel), StartWorkflow)
    except UnexpectedEnvelope as exc:
        assert exc.envelope == cancel
        assert isinstance(exc, CodecError)


def test_encode_rejects_values_avro_cannot_hold() -> None:
    too_big = TimerFired(seq=2**63)
    event = HistoryEvent(workflow_id="wf", event_seq=1, recorded_at_ms=0, event=too_big)
    with pytest.raises(UnencodableEnvelope, match=r"saga\.v1\.HistoryEvent"):
        encode(event)


def test_encode_rejects_non_envelopes() -> None:
    with pytest.raises(TypeError, match="Payload is not an envelope type"):
        encode(Payload())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- framing


def test_fingerprint_matches_the_avro_spec_vectors() -> None:
    # apache/avro share/test/data/schema-tests.txt (signed longs there; unsigned here).
    assert fingerprint("int") == 0x7275D51A3F395C8F == 8247732601305521295
    assert fingerprint("null") == 7195948357588979594
    assert fingerprint({"type": "record", "name": "foo", "fields": []}) == (
        -4824392279771201922 % 2**64
    )


@pytest.mark.parametrize("info", known_schemas(), ids=lambda i: i.path.name)
def test_fingerprint_matches_fastavro(info: codec.SchemaInfo) -> None:
    raw = json.loads(info.path.read_text())
    canonical = to_parsing_canonical_form(raw)
    expected = int.from_bytes(
        bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO")), "little"
    )
    assert info.fingerprint == expected == fingerprint(raw)


@given(any_envelope)
def test_framing_is_avro_single_object_encoding(model: Envelope) -> None:
    encoded = encode(model)
    info = current_schema(type(model))
    assert encoded[:2] == b"\xc3\x01" == MAGIC
    assert encoded[2:10] == info.fingerprint.to_bytes(8, "little")
    assert info.current
    assert info.full_name == f"saga.v1.{type(model).__name__}"


def test_body_is_plain_avro_binary_of_the_current_schema() -> None:
    start = StartWorkflow(
        workflow_id="wf-7",
        workflow_type="place-order",
        request_id="req-1",
        input=Payload(data=b"{}"),
        sent_at_ms=42,
    )
    body = io.BytesIO()
    schemaless_writer(body, current_schema(StartWorkflow).schema, start.model_dump())
    assert encode(start)[10:] == body.getvalue()


def test_known_schemas_has_one_current_schema_per_envelope() -> None:
    current = [i for i in known_schemas() if i.current]
    assert sorted(i.full_name for i in current) == sorted(
        f"saga.v1.{t.__name__}" for t in _union_members(Envelope)
    )
    assert len({i.fingerprint for i in known_schemas()}) == len(known_schemas())


# --------------------------------------------------------------------------- errors


def _reply_bytes() -> bytes:
    return encode(
        ActivityReply(
            workflow_id="wf-é",
            seq=3,
            attempt=2,
            idempotency_key="wf/3",
            outcome=ReplyOutcome.BUSINESS_FAILURE,
            sent_at_ms=1,
            error=ErrorInfo(type="CardDeclined", message="no"),
            service="payments",
            trace=TraceContext(traceparent="00-abc-def-01"),
        )
    )


@pytest.mark.parametrize(
    "data", [b"", b"\xc3", b"\xc3\x01", b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00"]
)
def test_short_header_is_truncated(data: bytes) -> None:
    with pytest.raises(TruncatedRecord, match="shorter than the 10-byte header"):
        decode(data)


def test_tombstone_is_truncated() -> None:
    with pytest.raises(TruncatedRecord, match="tombstone"):
        decode(None)  # type: ignore[arg-type]


@given(any_envelope, st.data())
def test_body_cut_anywhere_is_truncated(model: Envelope, data: st.DataObject) -> None:
    encoded = encode(model)
    cut = data.draw(st.integers(min_value=10, max_value=len(encoded) - 1))
    with pytest.raises(TruncatedRecord, match="ends before the record is complete"):
        decode(encoded[:cut])


def test_every_cut_of_a_record_is_truncated() -> None:
    encoded = _reply_bytes()
    for cut in range(len(encoded)):
        with pytest.raises(TruncatedRecord):
            decode(encoded[:cut])


@pytest.mark.parametrize(
    "data",
    [
        b'{"workflow_id": "wf"}',
        b"\x00\x00\x00\x00\x07" + b"\x02" * 20,  # Confluent wire format, not single-object
        b"\xc3\x02" + b"\x00" * 20,
        b"\x01\xc3" + b"\x00" * 20,
    ],
)
def test_wrong_magic(data: bytes) -> None:
    with pytest.raises(BadMagic, match=f"starts with 0x{data[:2].hex()}, not .* 0xc301") as info:
        decode(data)
    assert info.value.got == data[:2]


def test_unknown_fingerprint_names_it_in_hex() -> None:
    body = _reply_bytes()[10:]
    data = MAGIC + (0x0123456789ABCDEF).to_bytes(8, "little") + body
    with pytest.raises(UnknownSchema, match="0x0123456789abcdef") as info:
        decode(data)
    assert info.value.fingerprint == 0x0123456789ABCDEF


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x02\xff" + b"\x00" * 30, "UnicodeDecodeError"),  # workflow_id is not UTF-8
        (b"\x00\x00\x00\x00\x0a" + b"\x00" * 30, "does not decode"),  # outcome index 5 of 3
        (b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" + b"\x99", "1 unread trailing byte"),
    ],
)
def test_garbage_body_is_malformed(body: bytes, reason: str) -> None:
    header = _reply_bytes()[:10]
    with pytest.raises(MalformedRecord, match=reason) as info:
        decode(header + body)
    assert "saga.v1.ActivityReply" in str(info.value)


def test_extra_bytes_after_a_valid_record_are_malformed() -> None:
    with pytest.raises(MalformedRecord, match="trailing"):
        decode(_reply_bytes() + b"\x00")


@given(st.sampled_from(known_schemas()), st.binary(max_size=200))
def test_any_body_decodes_or_raises_a_codec_error(info: codec.SchemaInfo, body: bytes) -> None:
    data = MAGIC + info.fingerprint.to_bytes(8, "little") + body
    try:
        decoded = decode(data)
    except CodecError:
        return
    assert type(decoded).__name__ == info.full_name.rsplit(".", 1)[1]


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_a_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode(data)


def test_error_hierarchy() -> None:
    for exc_type in (
        TruncatedRecord,
        BadMagic,
        UnknownSchema,
        MalformedRecord,
        UnexpectedEnvelope,
        UnencodableEnvelope,
    ):
        assert issubclass(exc_type, CodecError)
    assert issubclass(CodecError, Exception)


# --------------------------------------------------------------------------- .avsc <-> models

_PRIMITIVES: dict[Any, str] = {
    str: "string",
    int: "long",
    float: "double",
    bool: "boolean",
    bytes: "bytes",
}


def _expanded(path: Path) -> dict[str, Any]:
    schema = expand_schema(json.loads(path.read_text()))
    assert isinstance(schema, dict)
    return schema


def _check_type(annotation: Any, avro: Any, where: str) -> None:
    origin = typing.get_origin(annotation)
    if annotation in _PRIMITIVES:
        assert avro == _PRIMITIVES[annotation], where
    elif origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if type(None) in members:
            (inner,) = (m for m in members if m is not type(None))
            assert isinstance(avro, list), where
            assert len(avro) == 2, where
            assert avro[0] == "null", where
            _check_type(inner, avro[1], where)
        else:  # the history event body union: one record per body, in order
            assert isinstance(avro, list), where
            assert len(avro) == len(members), where
            for member, branch in zip(members, avro, strict=True):
                _check_type(member, branch, where)
    elif origin is list:
        (item,) = typing.get_args(annotation)
        assert isinstance(avro, dict), where
        assert avro["type"] == "array", where
        _check_type(item, avro["items"], f"{where}[]")
    elif isinstance(annotation, type) and issubclass(annotation, StrEnum):
        assert avro["type"] == "enum", where
        assert avro["name"] == f"saga.v1.{annotation.__name__}", where
        assert avro["symbols"] == [m.value for m in annotation], where
        assert avro.get("doc"), where
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        _check_record(annotation, avro)
    else:  # pragma: no cover
        raise AssertionError(f"{where}: no Avro mapping for {annotation!r}")


def _check_record(model: type[BaseModel], avro: Any) -> None:
    assert isinstance(avro, dict)
    assert avro["type"] == "record"
    assert avro["name"] == f"saga.v1.{model.__name__}"
    assert avro.get("doc"), f"{model.__name__} has no doc"
    wanted = [name for name in model.model_fields if name != "kind"]
    assert [f["name"] for f in avro["fields"]] == wanted, model.__name__
    for avro_field in avro["fields"]:
        name = avro_field["name"]
        where = f"{model.__name__}.{name}"
        field = model.model_fields[name]
        assert avro_field.get("doc"), f"{where} has no doc"
        _check_type(field.annotation, avro_field["type"], where)
        if field.is_required():
            assert "default" not in avro_field, where
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, bytes):
                default = default.decode("latin-1")  # Avro JSON encodes bytes defaults this way
            assert "default" in avro_field, f"{where} has a Python default but no Avro default"
            assert avro_field["default"] == default, where


@pytest.mark.parametrize("model_type", list(ENVELOPES), ids=lambda t: t.__name__)
def test_avsc_matches_the_pydantic_model(model_type: type[BaseModel]) -> None:
    path = SCHEMA_DIR / f"{model_type.__name__}.avsc"
    assert json.loads(path.read_text())["namespace"] == "saga.v1"
    _check_record(model_type, _expanded(path))


def test_history_event_union_branch_names_are_the_event_kinds() -> None:
    raw = _expanded(SCHEMA_DIR / "HistoryEvent.avsc")
    (event,) = (f for f in raw["fields"] if f["name"] == "event")
    names = [branch["name"] for branch in event["type"]]
    kinds = [t.model_fields["kind"].default for t in _event_body_types()]
    assert names == [f"saga.v1.{kind}" for kind in kinds]
    assert all("kind" not in [f["name"] for f in branch["fields"]] for branch in event["type"])


def test_every_schema_file_is_known() -> None:
    files = {p.resolve() for p in SCHEMA_DIR.glob("*.avsc")} | {
        p.resolve() for p in (SCHEMA_DIR / "legacy").glob("*.avsc")
    }
    assert files == {i.path.resolve() for i in known_schemas()}
