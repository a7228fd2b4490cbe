"""The envelopes that cross process boundaries, as typed models.

Each model here has an Avro schema of the same name in ``contracts/schemas/`` (namespace
``saga.v1``); those ``.avsc`` files are the language-neutral contract, these models are how Python
code builds and reads them. ``contracts.codec`` turns a model into framed Avro bytes and back.

Timestamps are integers of milliseconds since the Unix epoch (``*_ms``) so that every language
reads them the same way.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Payload(_Envelope):
    """User data carried as bytes with an encoding tag (like Temporal's payload converters)."""

    encoding: str = "json/plain"
    data: bytes = b""


class TraceContext(_Envelope):
    """W3C trace context, so a workflow's spans stay one trace across processes and restarts."""

    traceparent: str
    tracestate: str | None = None


class ErrorInfo(_Envelope):
    type: str
    message: str
    details: str | None = None


class RetryPolicy(_Envelope):
    """Recorded in the history with each activity: retries replay the same after a code change."""

    max_attempts: int = 3  # 0 means unlimited
    initial_interval_ms: int = 200
    backoff_coefficient: float = 2.0
    max_interval_ms: int = 30_000
    jitter: float = 0.1  # fraction of the delay; the chosen delay is recorded in the history
    non_retryable_error_types: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- inbox envelopes


class StartWorkflow(_Envelope):
    workflow_id: str
    workflow_type: str
    request_id: str
    input: Payload
    sent_at_ms: int
    trace: TraceContext | None = None


class SignalWorkflow(_Envelope):
    workflow_id: str
    signal_name: str
    request_id: str
    payload: Payload
    sent_at_ms: int
    trace: TraceContext | None = None


class CancelWorkflow(_Envelope):
    workflow_id: str
    request_id: str
    reason: str
    sent_at_ms: int
    trace: TraceContext | None = None


class ReplyOutcome(StrEnum):
    SUCCESS = "SUCCESS"
    RETRYABLE_FAILURE = "RETRYABLE_FAILURE"
    BUSINESS_FAILURE = "BUSINESS_FAILURE"


class ActivityCommand(_Envelope):
    """What the orchestrator sends to a service's command topic, one per attempt."""

    workflow_id: str
    activity_name: str
    seq: int
    attempt: int
    # Names the logical operation (workflow id + activity seq); the same for every attempt.
    idempotency_key: str
    is_compensation: bool
    input: Payload
    reply_topic: str
    sent_at_ms: int
    deadline_ms: int | None = None
    trace: TraceContext | None = None
    heartbeat_timeout_ms: int | None = None
    heartbeat_details: Payload | None = None


class ActivityReply(_Envelope):
    """What a service sends back to ``<ns>.inbox``, keyed by the workflow id."""

    workflow_id: str
    seq: int
    attempt: int
    idempotency_key: str
    outcome: ReplyOutcome
    sent_at_ms: int
    result: Payload | None = None
    error: ErrorInfo | None = None
    service: str = ""
    trace: TraceContext | None = None


class ActivityHeartbeat(_Envelope):
    """What a service sends to ``<ns>.inbox`` while a long attempt runs: it is alive, and how
    far it got (``details``, given to the next attempt if this one fails)."""

    workflow_id: str
    seq: int
    attempt: int
    idempotency_key: str
    sent_at_ms: int
    details: Payload | None = None
    service: str = ""


class WorkflowStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"  # failed with nothing to compensate, or compensations all succeeded
    COMPENSATED = "COMPENSATED"  # failed and every registered compensation succeeded
    CANCELLED = "CANCELLED"  # cancelled, compensations all succeeded
    PARKED = "PARKED"  # a compensation gave up: needs an operator, never silently done


class WorkflowResult(_Envelope):
    """Written to ``<ns>.results`` when a workflow ends, or when a start is rejected."""

    workflow_id: str
    status: WorkflowStatus
    finished_at_ms: int
    result: Payload | None = None
    error: ErrorInfo | None = None
    request_id: str | None = None


class DeadLetter(_Envelope):
    """Written to ``<ns>.dlq``: the original record, untouched, and why it was not processed."""

    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    error_type: str
    failed_at_ms: int
    key: bytes | None = None
    value: bytes | None = None


# --------------------------------------------------------------------------- history events


class WorkflowStarted(_Envelope):
    kind: Literal["WorkflowStarted"] = "WorkflowStarted"
    workflow_type: str
    request_id: str
    input: Payload
    random_seed: int
    trace: TraceContext | None = None


class ActivityScheduled(_Envelope):
    kind: Literal["ActivityScheduled"] = "ActivityScheduled"
    seq: int
    activity_name: str
    topic: str
    input: Payload
    idempotency_key: str
    is_compensation: bool
    retry: RetryPolicy
    attempt_timeout_ms: int | None = None
    overall_timeout_ms: int | None = None
    heartbeat_timeout_ms: int | None = None


class ActivityAttemptStarted(_Envelope):
    """A retry: attempt ``attempt`` (2, 3, ...) of activity ``seq`` was sent."""

    kind: Literal["ActivityAttemptStarted"] = "ActivityAttemptStarted"
    seq: int
    attempt: int


class ActivityAttemptFailed(_Envelope):
    """One attempt failed; ``retry_at_ms`` is when the next starts (None: no more attempts)."""

    kind: Literal["ActivityAttemptFailed"] = "ActivityAttemptFailed"
    seq: int
    attempt: int
    error: ErrorInfo
    retry_at_ms: int | None = None


class ActivityCompleted(_Envelope):
    kind: Literal["ActivityCompleted"] = "ActivityCompleted"
    seq: int
    attempt: int
    result: Payload


class ActivityFailed(_Envelope):
    """The activity's final failure, as the workflow code sees it."""

    kind: Literal["ActivityFailed"] = "ActivityFailed"
    seq: int
    attempt: int
    error: ErrorInfo
    business: bool


class LateReplyIgnored(_Envelope):
    """A reply for an attempt that had already timed out or ended: recorded, changes nothing."""

    kind: Literal["LateReplyIgnored"] = "LateReplyIgnored"
    seq: int
    attempt: int
    outcome: ReplyOutcome


class TimerStarted(_Envelope):
    kind: Literal["TimerStarted"] = "TimerStarted"
    seq: int
    fire_at_ms: int


class TimerFired(_Envelope):
    kind: Literal["TimerFired"] = "TimerFired"
    seq: int


class SignalReceived(_Envelope):
    kind: Literal["SignalReceived"] = "SignalReceived"
    signal_name: str
    payload: Payload
    request_id: str


class CancelRequested(_Envelope):
    kind: Literal["CancelRequested"] = "CancelRequested"
    reason: str
    request_id: str


class WorkflowCompleted(_Envelope):
    kind: Literal["WorkflowCompleted"] = "WorkflowCompleted"
    result: Payload


class WorkflowFailed(_Envelope):
    """The workflow ended without a result; ``status`` says how (FAILED, COMPENSATED, ...)."""

    kind: Literal["WorkflowFailed"] = "WorkflowFailed"
    status: WorkflowStatus
    error: ErrorInfo


class MarkerRecorded(_Envelope):
    """Workflow code recorded a marker. ``marker="patch"``: the code that ran took the new
    branch of ``ctx.patched(change_id)``, so every replay of this history takes it too."""

    kind: Literal["MarkerRecorded"] = "MarkerRecorded"
    marker: str
    change_id: str


class WorkflowBlocked(_Envelope):
    """The code cannot go on with this history (non-determinism after a deploy): inputs are
    still recorded, the code waits for a node whose code accepts the history. Recorded again with
    ``error=None`` when that happens."""

    kind: Literal["WorkflowBlocked"] = "WorkflowBlocked"
    error: ErrorInfo | None = None
    at_seq: int
    code_version: str


class LocalActivityRecorded(_Envelope):
    """A local activity ran in the orchestrator (``ctx.run_local``): its result, or its error;
    every replay returns it instead of running the function again."""

    kind: Literal["LocalActivityRecorded"] = "LocalActivityRecorded"
    seq: int
    name: str
    result: Payload | None = None
    error: ErrorInfo | None = None


EventBody = Annotated[
    WorkflowStarted
    | ActivityScheduled
    | ActivityAttemptStarted
    | ActivityAttemptFailed
    | ActivityCompleted
    | ActivityFailed
    | LateReplyIgnored
    | TimerStarted
    | TimerFired
    | SignalReceived
    | CancelRequested
    | WorkflowCompleted
    | WorkflowFailed
    | MarkerRecorded
    | WorkflowBlocked
    | LocalActivityRecorded,
    Field(discriminator="kind"),
]


class HistoryEvent(_Envelope):
    """One event of one workflow's history; keyed ``<workflow id>/<seq>`` on ``<ns>.history``."""

    workflow_id: str
    event_seq: int  # 1, 2, 3, ... per workflow; replay is idempotent by it
    recorded_at_ms: int
    event: EventBody
    trace: TraceContext | None = None


Envelope = (
    StartWorkflow
    | SignalWorkflow
    | CancelWorkflow
    | ActivityCommand
    | ActivityReply
    | ActivityHeartbeat
    | WorkflowResult
    | DeadLetter
    | HistoryEvent
)
