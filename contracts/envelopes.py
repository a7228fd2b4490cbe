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


class IdReusePolicy(StrEnum):
    """What a start does when a workflow with its id exists (docs/workflows.md, "Id reuse")."""

    REJECT_DUPLICATE = "REJECT_DUPLICATE"  # only the same start again, as a no-op
    ALLOW_DUPLICATE = "ALLOW_DUPLICATE"  # a new run once the previous one has closed
    TERMINATE_IF_RUNNING = "TERMINATE_IF_RUNNING"  # end a running one, then a new run


class ParentRef(_Envelope):
    """The parent of a child workflow: where the child reports how it ended."""

    workflow_id: str
    seq: int


class StartWorkflow(_Envelope):
    workflow_id: str
    workflow_type: str
    request_id: str
    input: Payload
    sent_at_ms: int
    trace: TraceContext | None = None
    parent: ParentRef | None = None  # set when a workflow starts this one as its child
    execution_timeout_ms: int | None = None
    id_reuse: IdReusePolicy = IdReusePolicy.REJECT_DUPLICATE


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


class OperatorAction(_Envelope):
    """An operator's request to act on a workflow (``orchestrator terminate|retry|skip``).

    ``action`` is ``terminate``, ``retry`` or ``skip`` (a string on the wire, so a new action
    does not change the schema); the node records it as :class:`OperatorActed`."""

    workflow_id: str
    request_id: str
    action: str
    reason: str
    operator: str
    step_seq: int | None = None
    input: Payload | None = None
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
    PARKED = "PARKED"  # old histories: a compensation gave up (now it waits, see ActivityParked)
    TERMINATED = "TERMINATED"  # ended by an operator; nothing was compensated


class WorkflowResult(_Envelope):
    """Written to ``<ns>.results`` when a workflow ends, or when a start is rejected."""

    workflow_id: str
    status: WorkflowStatus
    finished_at_ms: int
    result: Payload | None = None
    error: ErrorInfo | None = None
    request_id: str | None = None


class ChildWorkflowEnded(_Envelope):
    """A child workflow ended (or its start was refused): sent by the child's node to
    ``<ns>.inbox``, keyed by the parent's id, in the transaction that records the child's end."""

    workflow_id: str  # the parent's
    seq: int
    child_workflow_id: str
    status: WorkflowStatus
    sent_at_ms: int
    result: Payload | None = None
    error: ErrorInfo | None = None
    trace: TraceContext | None = None


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
    parent: ParentRef | None = None  # set for a child workflow: it reports its end there
    execution_timeout_ms: int | None = None


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


class ActivityParked(_Envelope):
    """A compensation gave up (out of attempts, or a business failure). The saga waits for an
    operator: ``retry`` (a new round of attempts) or ``skip`` (marked done); see OperatorActed."""

    kind: Literal["ActivityParked"] = "ActivityParked"
    seq: int
    attempt: int
    error: ErrorInfo


class OperatorActed(_Envelope):
    """An operator acted on the workflow: who, why, and on which step (see OperatorAction)."""

    kind: Literal["OperatorActed"] = "OperatorActed"
    action: str
    request_id: str
    reason: str
    operator: str
    step_seq: int | None = None
    input: Payload | None = None


class ChildWorkflowStarted(_Envelope):
    """The code started a child workflow: its StartWorkflow goes to the inbox (keyed by the
    child's id) in the same transaction."""

    kind: Literal["ChildWorkflowStarted"] = "ChildWorkflowStarted"
    seq: int
    child_workflow_id: str
    workflow_type: str
    input: Payload
    parent_close_policy: str = "REQUEST_CANCEL"


class ChildWorkflowCompleted(_Envelope):
    kind: Literal["ChildWorkflowCompleted"] = "ChildWorkflowCompleted"
    seq: int
    result: Payload


class ChildWorkflowFailed(_Envelope):
    """A child ended without a result (``status`` says how), or its start was refused."""

    kind: Literal["ChildWorkflowFailed"] = "ChildWorkflowFailed"
    seq: int
    status: WorkflowStatus
    error: ErrorInfo


class WorkflowTimedOut(_Envelope):
    """The execution timeout passed: the code gets ``WorkflowTimedOut`` at its current await
    (its saga compensates) and the workflow fails with it."""

    kind: Literal["WorkflowTimedOut"] = "WorkflowTimedOut"
    timeout_ms: int


class WorkflowContinuedAsNew(_Envelope):
    """The run ended by ``ctx.continue_as_new(input)``: the next event is the ``WorkflowStarted``
    of a new run of the same workflow; this run's events are tombstoned."""

    kind: Literal["WorkflowContinuedAsNew"] = "WorkflowContinuedAsNew"
    input: Payload


class WorkflowStartSent(_Envelope):
    """The workflow asked for another workflow to be started (a schedule's tick): a
    ``StartWorkflow`` went to the inbox in the same transaction."""

    kind: Literal["WorkflowStartSent"] = "WorkflowStartSent"
    target_id: str
    workflow_type: str
    input: Payload
    request_id: str


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
    | ActivityParked
    | OperatorActed
    | ChildWorkflowStarted
    | ChildWorkflowCompleted
    | ChildWorkflowFailed
    | WorkflowTimedOut
    | WorkflowContinuedAsNew
    | WorkflowStartSent
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
    | OperatorAction
    | ActivityCommand
    | ActivityReply
    | ActivityHeartbeat
    | WorkflowResult
    | DeadLetter
    | HistoryEvent
    | ChildWorkflowEnded
)
