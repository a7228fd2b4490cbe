"""Start, signal and cancel workflows, wait for their results, and describe them.

    from orchestrator.client import Client
    from orchestrator.settings import Settings

    with Client(Settings(namespace="shop")) as client:
        handle = client.start("place-order", Order(sku="A-1", qty=2), workflow_id="order-42")
        receipt = handle.result(Receipt, timeout=60)

What goes over the wire (see ``docs/client.md``):

* ``start``/``signal``/``cancel`` produce a ``StartWorkflow``/``SignalWorkflow``/``CancelWorkflow``
  to ``<ns>.inbox``, keyed by the workflow id (murmur2, so the record lands on the workflow's
  partition), with an idempotent producer, and return once the broker has acknowledged it. One
  thread serves the delivery reports of every caller (``_sender.py``): concurrent calls share
  batches and each waits only for its own acknowledgement.
* ``result`` waits on the client's one shared subscription to ``<ns>.results`` (``_results.py``:
  a background consumer, assigned, ``read_committed``, never committing offsets, with a cache of
  recent results), which wakes the waiters of a workflow id when its result arrives.
* ``describe`` asks the node that owns the workflow's partition (found on ``<ns>.nodes``) for
  its events, and when no node answers reads the workflow's partition of ``<ns>.history`` up to
  its end and folds the workflow's events (a whole partition: fine for operators and tests, not
  a hot path). It also looks for dead letters keyed by the workflow id on ``<ns>.dlq``.
* ``list`` and ``counts`` ask every node registered on ``<ns>.nodes`` (its query API,
  ``orchestrator._visibility``) and merge the answers.

confluent-kafka stays private to this module; callers deal in envelopes, payloads and our errors.
"""

from __future__ import annotations

import builtins
import dataclasses
import getpass
import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, overload

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from opentelemetry.trace import Span, Tracer, TracerProvider
from pydantic import BaseModel

from contracts.codec import CodecError, decode, decode_as, encode
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityParked,
    ActivityScheduled,
    CancelRequested,
    CancelWorkflow,
    ChildWorkflowCompleted,
    ChildWorkflowFailed,
    ChildWorkflowStarted,
    DeadLetter,
    ErrorInfo,
    HistoryEvent,
    IdReusePolicy,
    LateReplyIgnored,
    MarkerRecorded,
    OperatorActed,
    OperatorAction,
    Payload,
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
from contracts.limits import MAX_INBOX_RECORD_BYTES
from orchestrator._engine.state import OperatorActionKind, fold
from orchestrator._fanout import NodeAnswerError, merged_counts, merged_list, node_detail
from orchestrator._kafka_config import (
    SERVING_FETCH_WAIT_MS,
    consumer_config,
    producer_config,
    unreachable,
)
from orchestrator._nodes import node_url_for
from orchestrator._partitioner import partition_for
from orchestrator._payloads import JSON, NULL, from_payload, to_payload
from orchestrator._queries import query_path
from orchestrator._registration import parse_node_record
from orchestrator._results import (
    LOOKBACK_S,
    NEEDS_CONFIRM,
    ResultSubscription,
    Sent,
    Waiter,
    read_older,
)
from orchestrator._sender import Sender
from orchestrator._visibility import (
    DEFAULT_LIMIT,
    ListQuery,
    NodeRecord,
    WorkflowCounts,
    WorkflowPage,
)
from orchestrator.errors import (
    UNREACHABLE_HINT,
    KafkaUnavailable,
    OrchestratorError,
    QueryFailed,
    Rejection,
    UnknownQuery,
    UnknownWorkflow,
    WorkflowFailedError,
    WorkflowIdConflict,
)
from orchestrator.settings import Settings
from orchestrator.tracing import INSTRUMENTATION, client_start_span

__all__ = [
    "Client",
    "ClientError",
    "ClientUnreachable",
    "DeadLetterInfo",
    "DeliveryFailed",
    "EventSummary",
    "NoNodes",
    "WorkflowDescription",
    "WorkflowHandle",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFLICT = Rejection.WORKFLOW_ID_CONFLICT.value

_SUMMARY_MAX = 160
# Errors of a partition whose leadership is still settling (e.g. a topic created a moment ago).
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)
_PREVIEW_MAX = 60
_NODES_TTL_S = 5.0  # how long Client.nodes trusts what it read of <ns>.nodes
_SENT_AT_MAX = 100_000  # request ids whose send time result() remembers


class ClientError(OrchestratorError):
    """Kafka could not be reached, a topic is missing, or a request could not be made."""


class PayloadTooLarge(ClientError):
    """A start, signal or cancel over the inbox's record limit (``contracts.limits``): not sent."""


class ClientUnreachable(ClientError, KafkaUnavailable):
    """No broker answered at the bootstrap servers."""


class NoNodes(ClientError):
    """No orchestrator node of the namespace answered a list or count (none registered, or
    none reachable)."""


class DeliveryFailed(ClientError):
    """The broker did not acknowledge a start, signal or cancel.

    The record may still have been written (a lost acknowledgement): sending the same start again,
    with the same workflow id and input, is safe, since the orchestrator ignores a duplicate start.
    """


# --------------------------------------------------------------------------- handle


@dataclass(frozen=True)
class WorkflowHandle:
    """A workflow started (or looked up) through a :class:`Client`.

    ``request_id`` is the id of the start that made this handle (``None`` for
    :meth:`Client.get_handle`); ``result`` uses it to tell this start's rejection
    (``WorkflowIdConflict``) from another client's.
    """

    client: Client = field(repr=False)
    workflow_id: str
    request_id: str | None = None
    workflow_type: str | None = None

    @overload
    def result(self, output_type: type[T], timeout: float = 30.0) -> T: ...
    @overload
    def result(self, output_type: Any = ..., timeout: float = 30.0) -> Any: ...
    def result(self, output_type: Any = Any, timeout: float = 30.0) -> Any:
        """Wait for the workflow's result; see :meth:`Client.result`."""
        return self.client.result(
            self.workflow_id, output_type, timeout=timeout, request_id=self.request_id
        )

    def signal(self, name: str, payload: object = None) -> str:
        return self.client.signal(self.workflow_id, name, payload)

    def cancel(self, reason: str = "") -> str:
        return self.client.cancel(self.workflow_id, reason)

    def query(self, name: str, arg: object = None, result_type: Any = Any) -> Any:
        """Ask the workflow query ``name``; see :meth:`Client.query`."""
        return self.client.query(self.workflow_id, name, arg, result_type=result_type)

    def describe(self, *, timeout: float = 10.0) -> WorkflowDescription:
        return self.client.describe(self.workflow_id, timeout=timeout)


# --------------------------------------------------------------------------- describe


class EventSummary(tuple[int, datetime, str, str]):
    """One history event in a few words: ``(seq, time, kind, summary)``."""

    __slots__ = ()

    def __new__(cls, seq: int, time: datetime, kind: str, summary: str) -> EventSummary:
        return super().__new__(cls, (seq, time, kind, summary))

    @property
    def seq(self) -> int:
        return self[0]

    @property
    def time(self) -> datetime:
        return self[1]

    @property
    def kind(self) -> str:
        return self[2]

    @property
    def summary(self) -> str:
        return self[3]


@dataclass(frozen=True)
class WorkflowDescription:
    """What the history of one workflow says, as :meth:`Client.describe` found it.

    ``status`` is ``None`` only if the events found do not include the start (which a complete
    history always does). ``events`` lists every event found, in sequence order; ``complete`` is
    false when their sequence numbers have a gap (the state is then folded up to the gap).
    """

    workflow_id: str
    workflow_type: str
    status: WorkflowStatus | None
    current_step: str
    started_at: datetime | None
    finished_at: datetime | None
    input: Payload | None
    result: Payload | None
    error: ErrorInfo | None
    request_id: str
    cancel_requested: bool
    events: tuple[EventSummary, ...]
    complete: bool = True
    blocked: ErrorInfo | None = None
    """Set while the workflow is BLOCKED: its code cannot go on with its history (a deploy that
    changed it); ``status`` stays RUNNING and its inputs are kept (docs/workflows.md)."""
    parked_steps: tuple[int, ...] = ()
    """The steps (activity seq) of compensations that gave up and wait for an operator
    (``retry`` or ``skip``); ``status`` stays RUNNING meanwhile (docs/operations.md)."""
    source: str = "history"
    """Where the events came from: ``node <id>`` (the owning node's state) or ``history`` (a
    scan of the history partition, when no node answered)."""
    dead_letters: tuple[DeadLetterInfo, ...] | None = None
    """Dead letters keyed by this workflow's id on ``<ns>.dlq`` (inputs the node could not
    apply: a signal before the start, a record it could not decode, ...); None when the
    dead-letter topic was not read."""

    @property
    def operator_status(self) -> str:
        """The status as operators count it: BLOCKED or PARKED while it waits for one of
        them, else the status (``unknown`` without a start)."""
        if self.status is None:
            return "unknown"
        if not self.finished and self.blocked is not None:
            return "BLOCKED"
        if not self.finished and self.parked_steps:
            return "PARKED"
        return self.status.value

    @property
    def finished(self) -> bool:
        return self.status is not None and self.status is not WorkflowStatus.RUNNING

    @overload
    def output(self, output_type: type[T]) -> T: ...
    @overload
    def output(self, output_type: Any = ...) -> Any: ...
    def output(self, output_type: Any = Any) -> Any:
        """The workflow's result decoded as ``output_type`` (``None`` while it has none)."""
        if self.result is None:
            return None
        return from_payload(self.result, output_type)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (payloads decoded when they are JSON)."""
        return {
            "workflow_id": self.workflow_id,
            "workflow_type": self.workflow_type,
            "status": self.status.value if self.status else None,
            "current_step": self.current_step,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "request_id": self.request_id,
            "cancel_requested": self.cancel_requested,
            "input": _payload_json(self.input),
            "result": _payload_json(self.result),
            "error": self.error.model_dump() if self.error else None,
            "blocked": self.blocked.model_dump() if self.blocked else None,
            "parked_steps": list(self.parked_steps),
            "complete": self.complete,
            "source": self.source,
            "dead_letters": None
            if self.dead_letters is None
            else [vars(letter) for letter in self.dead_letters],
            "events": [
                {"seq": e.seq, "time": _iso(e.time), "kind": e.kind, "summary": e.summary}
                for e in self.events
            ],
        }


@dataclass(frozen=True)
class DeadLetterInfo:
    """A dead letter addressed to a workflow: where it is (``orchestrator dlq show WHERE``),
    what it was, and why it could not be applied."""

    where: str  # PARTITION:OFFSET on the dead-letter topic
    error_type: str
    reason: str
    failed_at_ms: int
    source: str  # topic[partition]@offset of the original record
    kind: str  # the original record's type (StartWorkflow, SignalWorkflow, ...) or "?"


def _operator_name() -> str:
    """Who acts, for the history: ``SAGA_OPERATOR``, else the login name and host."""
    named = os.environ.get("SAGA_OPERATOR")
    if named:
        return named
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds") if moment else None


def _payload_json(payload: Payload | None) -> Any:
    if payload is None or payload.encoding == NULL:
        return None
    if payload.encoding == JSON:
        try:
            return json.loads(payload.data)
        except ValueError:
            pass
    return {"encoding": payload.encoding, "size": len(payload.data)}


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _preview(payload: Payload) -> str:
    if payload.encoding == NULL:
        return "null"
    if payload.encoding != JSON:
        return f"<{payload.encoding}, {len(payload.data)} bytes>"
    text = payload.data.decode("utf-8", errors="replace")
    return text if len(text) <= _PREVIEW_MAX else text[: _PREVIEW_MAX - 3] + "..."


def _err(error: ErrorInfo) -> str:
    return f"{error.type}: {error.message}"


def _summaries(events: list[HistoryEvent]) -> tuple[EventSummary, ...]:
    names: dict[int, str] = {}
    out: list[EventSummary] = []
    for event in events:
        body = event.event
        match body:
            case WorkflowStarted():
                text = f"{body.workflow_type} started with {_preview(body.input)}"
            case ActivityScheduled():
                names[body.seq] = body.activity_name
                text = f"{body.activity_name} #{body.seq} -> {body.topic}" + (
                    " (compensation)" if body.is_compensation else ""
                )
            case ActivityAttemptStarted():
                text = f"{names.get(body.seq, '?')} #{body.seq} attempt {body.attempt} sent"
            case ActivityAttemptFailed():
                text = (
                    f"{names.get(body.seq, '?')} #{body.seq} attempt {body.attempt} failed: "
                    f"{_err(body.error)}"
                )
                if body.retry_at_ms is not None:
                    delay = (body.retry_at_ms - event.recorded_at_ms) / 1000
                    text += f" (retry in {delay:.3g}s)"
            case ActivityCompleted():
                text = (
                    f"{names.get(body.seq, '?')} #{body.seq} completed "
                    f"(attempt {body.attempt}): {_preview(body.result)}"
                )
            case ActivityFailed():
                kind = "business failure" if body.business else "failed"
                text = f"{names.get(body.seq, '?')} #{body.seq} {kind}: {_err(body.error)}"
            case LateReplyIgnored():
                text = (
                    f"late {body.outcome.value} reply to {names.get(body.seq, '?')} #{body.seq} "
                    f"attempt {body.attempt} ignored"
                )
            case TimerStarted():
                fire = _time(body.fire_at_ms).isoformat(timespec="seconds")
                text = f"timer #{body.seq} until {fire}"
            case TimerFired():
                text = f"timer #{body.seq} fired"
            case SignalReceived():
                text = f"signal {body.signal_name}: {_preview(body.payload)}"
            case CancelRequested():
                text = f"cancel requested: {body.reason or '(no reason)'}"
            case WorkflowCompleted():
                text = f"completed: {_preview(body.result)}"
            case WorkflowFailed():
                text = f"{body.status.value}: {_err(body.error)}"
            case WorkflowBlocked():
                text = (
                    f"BLOCKED on code {body.code_version}: {_err(body.error)}"
                    if body.error is not None
                    else f"moves again on code {body.code_version}"
                )
            case MarkerRecorded():
                text = f"{body.marker} {body.change_id}"
            case ActivityParked():
                text = (
                    f"{names.get(body.seq, '?')} #{body.seq} PARKED after attempt {body.attempt}: "
                    f"{_err(body.error)} (retry or skip it)"
                )
            case OperatorActed():
                step = f" #{body.step_seq}" if body.step_seq is not None else ""
                edited = " with a new input" if body.input is not None else ""
                text = (
                    f"{body.action}{step}{edited} by {body.operator or '?'}: "
                    f"{body.reason or '(no reason)'}"
                )
            case ChildWorkflowStarted():
                names[body.seq] = body.child_workflow_id
                text = (
                    f"child {body.workflow_type} {body.child_workflow_id} #{body.seq} started "
                    f"with {_preview(body.input)} (parent close: {body.parent_close_policy})"
                )
            case ChildWorkflowCompleted():
                text = (
                    f"child {names.get(body.seq, '?')} #{body.seq} completed: "
                    f"{_preview(body.result)}"
                )
            case ChildWorkflowFailed():
                text = (
                    f"child {names.get(body.seq, '?')} #{body.seq} ended {body.status.value}: "
                    f"{_err(body.error)}"
                )
            case WorkflowTimedOut():
                text = f"execution timeout of {body.timeout_ms} ms passed"
            case WorkflowContinuedAsNew():
                text = f"continued as new with {_preview(body.input)}"
            case WorkflowStartSent():
                text = f"started {body.workflow_type} {body.target_id}"
        if len(text) > _SUMMARY_MAX:
            text = text[: _SUMMARY_MAX - 3] + "..."
        out.append(EventSummary(event.event_seq, _time(event.recorded_at_ms), body.kind, text))
    return tuple(out)


# --------------------------------------------------------------------------- client


class Client:
    """A connection to the orchestrator's topics; thread-safe, reuse it (one producer inside).

    ``send_timeout`` bounds how long ``start``/``signal``/``cancel`` wait for the broker's
    acknowledgement before raising :class:`DeliveryFailed`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        send_timeout: float = 15.0,
        tracer_provider: TracerProvider | None = None,
        results_lookback: float = LOOKBACK_S,
    ) -> None:
        """``tracer_provider``: ``start`` makes a span ``start <type>``, the workflow's root.

        ``results_lookback``: how many seconds back the shared results subscription starts
        reading when the first ``result()`` call opens it (see ``docs/client.md``).
        """
        self.settings = settings
        self._tracer: Tracer | None = (
            tracer_provider.get_tracer(INSTRUMENTATION) if tracer_provider else None
        )
        self._send_timeout = send_timeout
        self._lock = threading.Lock()
        self._producer: Sender | None = None
        self._partitions: dict[str, int] = {}
        self._closed = False
        self._nodes_cache: tuple[float, list[NodeRecord]] | None = None
        self._results_lookback = results_lookback
        self._results: ResultSubscription | None = None
        self._results_lock = threading.Lock()
        self._opening: Future[ResultSubscription] | None = None
        # When this client sent each recent start (by request id): a waiter on a start sent
        # after the results cache's coverage began needs no backfill (_results.py).
        self._sent_at: OrderedDict[str, Sent] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush what is still queued, release the producer and the results subscription.
        Idempotent."""
        with self._lock:
            producer, self._producer = self._producer, None
            self._closed = True
        with self._results_lock:
            results, self._results = self._results, None
        if results is not None:
            results.close()
        if producer is not None:
            producer.close(self._send_timeout)

    # -- sending -------------------------------------------------------------------------

    def start(
        self,
        workflow_type: str,
        input: BaseModel | Any,
        *,
        workflow_id: str | None = None,
        trace: TraceContext | None = None,
        execution_timeout: timedelta | float | None = None,
        id_reuse: IdReusePolicy | str = IdReusePolicy.REJECT_DUPLICATE,
    ) -> WorkflowHandle:
        """Ask the orchestrator to start a workflow; return once the request is on the inbox.

        ``workflow_id`` defaults to a fresh UUID. With ``id_reuse=REJECT_DUPLICATE`` (the
        default), starting an id that exists with the same type and input is a no-op (the
        handle refers to that workflow); with another type or input the orchestrator rejects
        it, and the handle's ``result()`` raises
        :class:`~orchestrator.errors.WorkflowIdConflict`. ``ALLOW_DUPLICATE`` starts a new run
        once the previous one has closed (while it runs, as REJECT_DUPLICATE);
        ``TERMINATE_IF_RUNNING`` ends a running one (TERMINATED, as ``terminate`` does: nothing
        compensated) and starts a new run. The handle's ``result()`` is the result of the run
        this start made (or, after continue-as-new, of its last run).

        ``execution_timeout`` (a ``timedelta`` or seconds) bounds the whole workflow, all its
        continue-as-new runs included: when it passes, the code gets
        :class:`~orchestrator.errors.WorkflowTimedOut` at its current await, its saga
        compensates, and the workflow ends FAILED or COMPENSATED with error type
        ``WorkflowTimedOut``.
        """
        envelope, span = self._start_envelope(
            workflow_type, input, workflow_id, trace, execution_timeout, id_reuse
        )
        try:
            partition, offset = self._send(
                envelope.workflow_id,
                encode(envelope),
                envelope.trace,
                f"start of {envelope.workflow_id}",
            )
        finally:
            if span is not None:
                span.end()
        self._remember(envelope, partition, offset)
        return WorkflowHandle(self, envelope.workflow_id, envelope.request_id, workflow_type)

    def _remember(self, start: StartWorkflow, partition: int, offset: int) -> None:
        """Where this client's start went, for ``result()`` (``_results.py``)."""
        with self._lock:
            reuse = IdReusePolicy(start.id_reuse)
            self._sent_at[start.request_id] = Sent(start.sent_at_ms, partition, offset, reuse)
            while len(self._sent_at) > _SENT_AT_MAX:
                self._sent_at.popitem(last=False)

    def _start_envelope(
        self,
        workflow_type: str,
        input: BaseModel | Any,
        workflow_id: str | None,
        trace: TraceContext | None,
        execution_timeout: timedelta | float | None = None,
        id_reuse: IdReusePolicy | str = IdReusePolicy.REJECT_DUPLICATE,
    ) -> tuple[StartWorkflow, Span | None]:
        """The start to send, and the span to end once it is sent."""
        if not workflow_type:
            raise ValueError("workflow_type must not be empty")
        timeout_ms = _timeout_ms(execution_timeout)
        policy = IdReusePolicy(id_reuse)
        workflow_id = str(uuid.uuid4()) if workflow_id is None else workflow_id
        _check_id(workflow_id)
        request_id = uuid.uuid4().hex
        payload = input if isinstance(input, Payload) else to_payload(input)
        span: Span | None = None
        if trace is None and self._tracer is not None:
            span, trace = client_start_span(
                self._tracer, workflow_type, workflow_id, self.settings.inbox
            )
        envelope = StartWorkflow(
            workflow_id=workflow_id,
            workflow_type=workflow_type,
            request_id=request_id,
            input=payload,
            sent_at_ms=_now_ms(),
            trace=trace,
            execution_timeout_ms=timeout_ms,
            id_reuse=policy,
        )
        return envelope, span

    def signal(
        self,
        workflow_id: str,
        name: str,
        payload: object = None,
        *,
        trace: TraceContext | None = None,
    ) -> str:
        """Send signal ``name`` with ``payload`` to a workflow; returns the request id."""
        envelope = self._signal_envelope(workflow_id, name, payload, trace)
        self._send(workflow_id, encode(envelope), trace, f"signal {name} to {workflow_id}")
        return envelope.request_id

    def _signal_envelope(
        self, workflow_id: str, name: str, payload: object, trace: TraceContext | None
    ) -> SignalWorkflow:
        _check_id(workflow_id)
        if not name:
            raise ValueError("signal name must not be empty")
        request_id = uuid.uuid4().hex
        return SignalWorkflow(
            workflow_id=workflow_id,
            signal_name=name,
            request_id=request_id,
            payload=payload if isinstance(payload, Payload) else to_payload(payload),
            sent_at_ms=_now_ms(),
            trace=trace,
        )

    def cancel(
        self, workflow_id: str, reason: str = "", *, trace: TraceContext | None = None
    ) -> str:
        """Ask the orchestrator to cancel a workflow (compensations run); returns the request id."""
        _check_id(workflow_id)
        request_id = uuid.uuid4().hex
        envelope = CancelWorkflow(
            workflow_id=workflow_id,
            request_id=request_id,
            reason=reason,
            sent_at_ms=_now_ms(),
            trace=trace,
        )
        self._send(workflow_id, encode(envelope), trace, f"cancel of {workflow_id}")
        return request_id

    def query(
        self,
        workflow_id: str,
        name: str,
        arg: object = None,
        *,
        result_type: Any = Any,
        timeout: float = 10.0,
        url: str | None = None,
    ) -> Any:
        """Ask a workflow's ``@workflow.query`` method ``name`` (with ``arg``, JSON-able) and
        return its answer decoded as ``result_type``. The node that owns the workflow answers
        from its state; nothing is recorded in the history.

        ``url`` is that node's HTTP server (``http://host:port``); by default it is found
        (``orchestrator/_nodes.py``: the registrations on ``<ns>.nodes``). Raises
        :class:`~orchestrator.errors.UnknownWorkflow`,
        :class:`~orchestrator.errors.UnknownQuery`, or
        :class:`~orchestrator.errors.QueryFailed` (its method raised, a bad argument, a
        BLOCKED workflow, no node reachable; ``error_type`` says which).
        """
        _check_id(workflow_id)
        if not name:
            raise ValueError("query name must not be empty")
        body = None if arg is None else to_payload(arg).data
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            base = url
            if base is None:
                count = self._partition_count(self.settings.inbox, deadline)
                partition = partition_for(workflow_id, count)
                base = node_url_for(
                    self.settings, partition, timeout=max(deadline - time.monotonic(), 1.0)
                )
            status, data = _http_query(
                base + query_path(workflow_id, name), body, max(deadline - time.monotonic(), 1.0)
            )
            if status == 200:
                return from_payload(Payload(encoding=JSON, data=data), result_type)
            error_type, message = _query_error(status, data)
            # The partition moved (a rebalance) or is being restored: ask again, found anew.
            if error_type in ("NotOwner", "Unavailable") and url is None and attempt < 2:
                time.sleep(0.5)
                continue
            break
        if error_type == "UnknownWorkflow":
            raise UnknownWorkflow(message)
        if error_type == "UnknownQuery":
            raise UnknownQuery(message)
        raise QueryFailed(message, error_type=error_type)

    # -- operator actions (recorded in the workflow's history as OperatorActed) -----------

    def terminate(self, workflow_id: str, reason: str = "", *, operator: str = "") -> str:
        """End a running workflow now, without compensations (status TERMINATED); returns the
        request id. Terminating an ended workflow changes nothing."""
        return self._act(workflow_id, OperatorActionKind.TERMINATE, reason, operator)

    def retry(
        self,
        workflow_id: str,
        *,
        step: int | None = None,
        input: object = None,
        reason: str = "",
        operator: str = "",
    ) -> str:
        """Run a parked step (a new round of its retry policy) or a pending retry at once;
        without ``step``, every such step of the workflow; a BLOCKED workflow is re-run
        against this node's code. ``input`` (with ``step``) replaces the step's input (a
        redrive with an edited input). Returns the request id; one that does not apply is
        dead-lettered ``OperatorRefused`` with the reason."""
        if input is not None and step is None:
            raise ValueError("a new input needs the step it is for (step=N)")
        payload = (
            None if input is None else (input if isinstance(input, Payload) else to_payload(input))
        )
        return self._act(workflow_id, OperatorActionKind.RETRY, reason, operator, step, payload)

    def skip(self, workflow_id: str, step: int, *, reason: str = "", operator: str = "") -> str:
        """Mark a parked compensation done without running it (the saga goes on); returns the
        request id."""
        return self._act(workflow_id, OperatorActionKind.SKIP, reason, operator, step)

    def _act(
        self,
        workflow_id: str,
        action: OperatorActionKind,
        reason: str,
        operator: str,
        step: int | None = None,
        payload: Payload | None = None,
    ) -> str:
        _check_id(workflow_id)
        request_id = uuid.uuid4().hex
        envelope = OperatorAction(
            workflow_id=workflow_id,
            request_id=request_id,
            action=action.value,
            reason=reason,
            operator=operator or _operator_name(),
            step_seq=step,
            input=payload,
            sent_at_ms=_now_ms(),
        )
        self._send(workflow_id, encode(envelope), None, f"{action.value} of {workflow_id}")
        return request_id

    def get_handle(self, workflow_id: str) -> WorkflowHandle:
        """A handle to an existing workflow (its ``result()`` ignores every rejected start)."""
        _check_id(workflow_id)
        return WorkflowHandle(self, workflow_id)

    # -- reading -------------------------------------------------------------------------

    @overload
    def result(
        self,
        workflow_id: str,
        output_type: type[T],
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
    ) -> T: ...
    @overload
    def result(
        self,
        workflow_id: str,
        output_type: Any = ...,
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
    ) -> Any: ...
    def result(
        self,
        workflow_id: str,
        output_type: Any = Any,
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
    ) -> Any:
        """Wait up to ``timeout`` seconds for the workflow's result and return its output.

        The output is decoded as ``output_type`` (a pydantic model, ``int``, ``dict``, ...; with
        the default ``Any`` the JSON value). Raises
        :class:`~orchestrator.errors.WorkflowFailedError` if the workflow ended FAILED,
        COMPENSATED, CANCELLED or PARKED; :class:`~orchestrator.errors.WorkflowIdConflict` if the
        start with ``request_id`` was rejected; ``TimeoutError`` if no result came in time.

        A rejected start of *another* request is not this workflow's result and is skipped. When
        several results exist for the id (an id reused after the old workflow's history expired),
        the one of ``request_id`` wins, else the latest.
        """
        _check_id(workflow_id)
        found = self._wait_result(workflow_id, request_id, timeout)
        return _output(found, workflow_id, request_id, output_type)

    def describe(
        self, workflow_id: str, *, timeout: float = 10.0, dead_letters: bool = True
    ) -> WorkflowDescription:
        """The workflow's state and timeline, folded from its events.

        Asks the node that owns the workflow's partition first (its local state; ``source`` is
        ``node <id>``); when no node answers, reads the workflow's whole history partition from
        the beginning to the end it had when the call began (``source`` is ``history``). With
        ``dead_letters``, also reads ``<ns>.dlq`` for letters keyed by the workflow id (best
        effort: ``dead_letters`` is None if it could not be read in time). Raises
        :class:`~orchestrator.errors.UnknownWorkflow` if there is no event of ``workflow_id``
        (never started, or its history expired), ``TimeoutError`` if the partition could not be
        read within ``timeout`` seconds.
        """
        _check_id(workflow_id)
        deadline = time.monotonic() + timeout
        source = "history"
        ordered: list[HistoryEvent] | None = None
        asked = self._describe_via_node(workflow_id, deadline)
        if asked is not None:
            source, ordered = asked
            if ordered is None:
                raise UnknownWorkflow(
                    f"no workflow {workflow_id!r} in namespace {self.settings.namespace!r} "
                    f"({source} owns its partition and holds none; never started, or its "
                    "history has expired)"
                )
        if ordered is None:
            ordered = self.history(workflow_id, timeout=max(deadline - time.monotonic(), 1.0))
        letters = None
        if dead_letters:
            letters = self._dead_letters_of(workflow_id, deadline)
        return dataclasses.replace(
            describe_events(workflow_id, ordered), source=source, dead_letters=letters
        )

    def _describe_via_node(
        self, workflow_id: str, deadline: float
    ) -> tuple[str, list[HistoryEvent] | None] | None:
        """(``node <id>``, the events, or None if that node owns the partition and holds no
        such workflow), or None when no node answered."""
        if workflow_id == "counts":  # that path is the counts endpoint's
            return None
        try:
            nodes = self.nodes(timeout=max(min(deadline - time.monotonic(), 5.0), 0.5))
            count = self._partition_count(self.settings.inbox, deadline)
        except (ClientError, TimeoutError) as exc:
            log.info("describe %s: no node list (%s); reading the history", workflow_id, exc)
            return None
        partition = partition_for(workflow_id, count)
        owners = [n for n in nodes if partition in n.partitions and n.url is not None]
        for node in owners:
            try:
                detail = node_detail(
                    node, workflow_id, partition, max(min(deadline - time.monotonic(), 5.0), 0.5)
                )
            except NodeAnswerError as exc:
                log.info("describe %s: %s; trying elsewhere", workflow_id, exc)
                self._nodes_cache = None
                continue
            where = f"node {node.node_id}"
            return (where, None) if detail is None else (where, detail.history())
        return None

    def _dead_letters_of(
        self, workflow_id: str, deadline: float
    ) -> tuple[DeadLetterInfo, ...] | None:
        topic = self.settings.dlq
        key = workflow_id.encode()
        letters: list[DeadLetterInfo] = []
        consumer = self._consumer()
        try:
            wait = max(deadline - time.monotonic(), 2.0)
            count = self._partition_count(topic, time.monotonic() + wait, consumer)
            # Dead letters keep the original key: murmur2 puts them on the key's partition.
            tp = TopicPartition(topic, partition_for(workflow_id, count), OFFSET_BEGINNING)
            consumer.assign([tp])
            low, high = self._watermarks(consumer, tp, time.monotonic() + wait)
            if high > low:
                for msg in _read_to_end(consumer, tp, high, time.monotonic() + wait):
                    if msg.key() != key or not msg.value():
                        continue
                    try:
                        letter = decode_as(msg.value() or b"", DeadLetter)
                    except CodecError:
                        continue
                    letters.append(_letter_info(msg, letter))
        except (ClientError, TimeoutError, KafkaException) as exc:
            log.info("dead letters of %s not read: %s", workflow_id, exc)
            return None
        finally:
            consumer.close()
        return tuple(letters)

    # -- finding workflows (the nodes' query API) ----------------------------------------

    def nodes(self, *, timeout: float = 10.0, refresh: bool = False) -> list[NodeRecord]:
        """The nodes registered on ``<ns>.nodes`` (latest record per node id; a node that
        stopped cleanly is gone; one that died may still be listed). Cached for a few seconds
        unless ``refresh``."""
        cached = self._nodes_cache
        if not refresh and cached is not None and time.monotonic() - cached[0] < _NODES_TTL_S:
            return cached[1]
        topic = self.settings.topics.nodes
        deadline = time.monotonic() + timeout
        found: dict[bytes, NodeRecord] = {}
        consumer = self._consumer()
        try:
            count = self._partition_count(topic, deadline, consumer)
            for number in range(count):
                tp = TopicPartition(topic, number, OFFSET_BEGINNING)
                consumer.assign([tp])
                low, high = self._watermarks(consumer, tp, deadline)
                if high <= low:
                    continue
                for msg in _read_to_end(consumer, tp, high, deadline):
                    key, value = msg.key() or b"", msg.value()
                    record = parse_node_record(value) if value else None
                    if record is None:
                        found.pop(key, None)  # a tombstone: the node stopped
                    else:
                        found[key] = record
        finally:
            consumer.close()
        nodes = sorted(found.values(), key=lambda n: n.node_id)
        self._nodes_cache = (time.monotonic(), nodes)
        return nodes

    def history(self, workflow_id: str, *, timeout: float = 10.0) -> list[HistoryEvent]:
        """The events of one workflow on ``<ns>.history``, in sequence order (the same scan as
        :meth:`describe`). Raises :class:`~orchestrator.errors.UnknownWorkflow` if there are
        none."""
        _check_id(workflow_id)
        events = self._scan_history(workflow_id, time.monotonic() + timeout).get(workflow_id)
        if not events:
            raise UnknownWorkflow(
                f"no workflow {workflow_id!r} in namespace {self.settings.namespace!r} "
                f"(no events on {self.settings.history}; never started, or its history has "
                "expired)"
            )
        return [events[seq] for seq in sorted(events)]

    def histories(self, *, timeout: float = 60.0) -> dict[str, list[HistoryEvent]]:
        """Every workflow's events on ``<ns>.history`` (all partitions, up to the end they had
        when the call began), by workflow id, in sequence order: running workflows and finished
        ones whose history has not expired. For tools (``orchestrator replay``), not a hot
        path."""
        found = self._scan_history(None, time.monotonic() + timeout)
        return {wf: [events[seq] for seq in sorted(events)] for wf, events in found.items()}

    def _scan_history(
        self, workflow_id: str | None, deadline: float
    ) -> dict[str, dict[int, HistoryEvent]]:
        """Events on ``<ns>.history`` by workflow id and seq: of ``workflow_id`` (its partition
        only), or of every workflow (every partition). Tombstoned events are left out."""
        topic = self.settings.history
        prefix = f"{workflow_id}/".encode() if workflow_id is not None else b""
        found: dict[str, dict[int, HistoryEvent]] = {}
        consumer = self._consumer()
        try:
            # The writers hash the workflow id with murmur2 over the topic's partition count.
            count = self._partition_count(topic, deadline, consumer)
            numbers = range(count) if workflow_id is None else [partition_for(workflow_id, count)]
            for number in numbers:
                tp = TopicPartition(topic, number, OFFSET_BEGINNING)
                consumer.assign([tp])
                low, high = self._watermarks(consumer, tp, deadline)
                if high <= low:
                    continue
                for msg in _read_to_end(consumer, tp, high, deadline):
                    key = msg.key()
                    if not isinstance(key, bytes) or not key.startswith(prefix):
                        continue
                    owner, _, rest = key.decode(errors="replace").rpartition("/")
                    # another workflow whose id starts with ours + "/"
                    if not rest.isdigit() or (workflow_id is not None and owner != workflow_id):
                        continue
                    seq = int(rest)
                    value = msg.value()
                    if value is None:  # a tombstone: retention removed this event
                        found.get(owner, {}).pop(seq, None)
                        continue
                    try:
                        event = decode_as(value, HistoryEvent)
                    except CodecError as exc:
                        log.warning("%s: skipping undecodable %s: %s", topic, key, exc)
                        continue
                    if event.workflow_id == owner:
                        found.setdefault(owner, {})[seq] = event
        finally:
            consumer.close()
        return {wf: events for wf, events in found.items() if events}

    # -- private: producing --------------------------------------------------------------

    def _get_sender(self) -> Sender:
        with self._lock:
            if self._closed:
                raise ClientError("the client is closed")
            if self._producer is None:
                conf = producer_config(
                    self.settings.bootstrap_servers,
                    # A start is sent at once: librdkafka batches what queues while a
                    # request is in flight anyway, and 2 ms of linger were 2 of a C = 1
                    # saga's 30 (start ack 2.6 -> 0.6 ms).
                    linger_ms=0,
                    extra={
                        **self.settings.client_extra(),
                        # Never create a topic by producing to it: a missing inbox is an error.
                        "allow.auto.create.topics": False,
                        "message.timeout.ms": max(int(self._send_timeout * 1000), 1000),
                    },
                )
                self._producer = Sender(conf)
            return self._producer

    def _get_producer(self) -> Producer:
        return self._get_sender().producer

    def _submit(
        self,
        workflow_id: str,
        value: bytes,
        trace: TraceContext | None,
        what: str,
        on_done: Callable[[DeliveryFailed | None, int, int], None],
    ) -> None:
        """Queue one inbox record; ``on_done`` gets ``(None, partition, offset)`` once the broker
        acknowledged it, or the error (on the sender's thread). Raises at once what is known
        before sending."""
        if len(value) > MAX_INBOX_RECORD_BYTES:
            raise PayloadTooLarge(
                f"the {what} is {len(value)} bytes, over the {MAX_INBOX_RECORD_BYTES} bytes a "
                "node takes on its inbox: send less, e.g. a reference to the data"
            )
        sender = self._get_sender()
        topic = self.settings.inbox
        self._partition_count(topic, time.monotonic() + self._send_timeout)  # clear error if absent
        headers: list[tuple[str, str | bytes | None]] = []
        if trace is not None:
            headers.append(("traceparent", trace.traceparent.encode()))
            if trace.tracestate:
                headers.append(("tracestate", trace.tracestate.encode()))

        def on_delivery(err: KafkaError | None, partition: int, offset: int) -> None:
            if err is None:
                on_done(None, partition, offset)
            else:
                failed = f"could not send the {what} to {topic}: {_kafka_error(err)}"
                on_done(DeliveryFailed(failed), partition, offset)

        try:
            sender.send(topic, workflow_id.encode(), value, headers or None, on_delivery)
        except (KafkaException, BufferError) as exc:
            raise DeliveryFailed(f"could not send the {what} to {topic}: {exc}") from exc

    def _not_acknowledged(self, what: str) -> DeliveryFailed:
        return DeliveryFailed(
            f"the {what} was not acknowledged by {self.settings.bootstrap_servers} within "
            f"{self._send_timeout:g}s; it may still arrive (sending it again is safe)"
        )

    def _send(
        self, workflow_id: str, value: bytes, trace: TraceContext | None, what: str
    ) -> tuple[int, int]:
        """Send one inbox record and wait for its acknowledgement: its (partition, offset)."""
        outcome: list[tuple[DeliveryFailed | None, int, int]] = []
        done = threading.Event()

        def on_done(error: DeliveryFailed | None, partition: int, offset: int) -> None:
            outcome.append((error, partition, offset))
            done.set()

        self._submit(workflow_id, value, trace, what, on_done)
        # The sender's thread serves the report; this thread only waits for its own.
        if not done.wait(self._send_timeout + 5.0):
            raise self._not_acknowledged(what)
        error, partition, offset = outcome[0]
        if error is not None:
            raise error
        return partition, offset

    # -- private: consuming --------------------------------------------------------------

    def _consumer(self) -> Consumer:
        conf = consumer_config(
            self.settings.bootstrap_servers,
            # Required by librdkafka; never joined (assign) and never committed to.
            f"{self.settings.namespace}.client-{uuid.uuid4().hex}",
            fetch_wait_max_ms=SERVING_FETCH_WAIT_MS,
            extra={**self.settings.client_extra(), "enable.partition.eof": True},
        )
        return Consumer(conf)

    def _partition_count(
        self, topic: str, deadline: float, consumer: Consumer | None = None
    ) -> int:
        """Partitions of ``topic`` from the cluster metadata; ClientError if it is missing.

        With a ``consumer``, always asks (which also warms that consumer's metadata, saving its
        first fetch half a second); for the producer the answer is cached.
        """
        cached = self._partitions.get(topic)
        if cached is not None and consumer is None:
            return cached
        client: Consumer | Producer = consumer if consumer is not None else self._get_producer()
        try:
            metadata = client.list_topics(topic, timeout=max(deadline - time.monotonic(), 1.0))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and unreachable(err):
                raise ClientUnreachable(
                    f"cannot read metadata of {topic} from {self.settings.bootstrap_servers}: "
                    f"{err.str()}; {UNREACHABLE_HINT}"
                ) from exc
            raise ClientError(
                f"cannot read metadata of {topic} from {self.settings.bootstrap_servers}: "
                f"{_kafka_exception(exc)}"
            ) from exc
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            why = _kafka_error(info.error) if info is not None and info.error else "not found"
            raise ClientError(
                f"topic {topic} is not usable ({why}); create the topics of namespace "
                f"{self.settings.namespace!r} with `orchestrator topics create`"
            )
        count = len(info.partitions)
        if consumer is None:
            self._partitions[topic] = count
        return count

    def _watermarks(
        self, consumer: Consumer, tp: TopicPartition, deadline: float
    ) -> tuple[int, int]:
        """The partition's (low, high) offsets, retrying while its leader is not known yet."""
        while True:
            try:
                low, high = consumer.get_watermark_offsets(
                    tp, timeout=max(deadline - time.monotonic(), 0.5), cached=False
                )
                return int(low), int(high)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                transient = isinstance(err, KafkaError) and (
                    err.retriable() or err.code() in _TRANSIENT
                )
                if not transient or time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"could not read the offsets of {tp.topic} [{tp.partition}] from "
                        f"{self.settings.bootstrap_servers}: {_kafka_exception(exc)}"
                    ) from exc
            time.sleep(0.1)

    def _results_subscription(self, deadline: float | None = None) -> ResultSubscription:
        """The client's one subscription to ``<ns>.results``, opened at the first call (and
        again after one failed for good). Opening reads metadata and offsets, which a loaded
        broker may answer slowly: it runs in a thread of its own, and a caller with a
        ``deadline`` gets ``TimeoutError`` past it (the opening goes on for the next call)."""
        with self._results_lock:
            if self._closed:
                raise ClientError("the client is closed")
            sub = self._results
            if sub is not None and sub.failure is None:
                return sub
            opening = self._opening
            if opening is None or opening.done():
                opening = self._opening = Future()
                threading.Thread(
                    target=self._open_results, args=(opening,), name="results-open", daemon=True
                ).start()
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            return opening.result(timeout=remaining)
        except FutureTimeout:
            raise TimeoutError(
                f"could not open the reader of {self.settings.results} in time"
            ) from None

    def _open_results(self, opening: Future[ResultSubscription]) -> None:
        try:
            deadline = time.monotonic() + self._send_timeout
            topic = self.settings.results
            probe = self._consumer()
            try:
                count = self._partition_count(topic, deadline, probe)
            finally:
                probe.close()
            try:
                sub = ResultSubscription(
                    topic,
                    self._results_consumer,
                    partitions=count,
                    lookback=self._results_lookback,
                    metadata_timeout=self._send_timeout,
                )
            except KafkaException as exc:
                raise ClientError(
                    f"cannot read {topic} from {self.settings.bootstrap_servers}: "
                    f"{_kafka_exception(exc)}"
                ) from exc
        except BaseException as exc:  # handed to the caller waiting on it
            opening.set_exception(exc)
            return
        with self._results_lock:
            closed = self._closed
            if not closed:
                self._results = sub
        if closed:
            sub.close()
            opening.set_exception(ClientError("the client is closed"))
            return
        opening.set_result(sub)

    def _results_consumer(self, error_cb: Callable[[KafkaError], None] | None = None) -> Consumer:
        conf = consumer_config(
            self.settings.bootstrap_servers,
            # Required by librdkafka; never joined (assign) and never committed to.
            f"{self.settings.namespace}.client-{uuid.uuid4().hex}",
            # Only an idle fetch waits this long; a new record answers the fetch at once.
            fetch_wait_max_ms=SERVING_FETCH_WAIT_MS,
            extra={**self.settings.client_extra(), "enable.partition.eof": True},
        )
        if error_cb is not None:
            conf["error_cb"] = error_cb
        return Consumer(conf)

    def _register_waiter(
        self,
        workflow_id: str,
        request_id: str | None,
        deliver: Callable[[Any], None],
        deadline: float | None = None,
    ) -> tuple[ResultSubscription, Waiter]:
        sub = self._results_subscription(deadline)
        with self._lock:
            sent = self._sent_at.get(request_id) if request_id is not None else None
        return sub, sub.register(workflow_id, request_id, sent, deliver)

    def _confirm(self, sub: ResultSubscription, waiter: Waiter, deadline: float) -> None:
        """Wait until the node has processed the waiter's start and the subscription has read
        what the node wrote up to then; then a result of another request may answer it (a
        duplicate start gets none of its own). Returns at ``deadline`` without confirming."""
        sent = waiter.sent
        if sent is None or waiter.done:
            return
        # The node's consumer group (orchestrator/_engine/processor.py) commits its inbox offsets
        # in the transaction that writes what it decided, rejections included. Asking for its
        # committed offsets neither joins the group nor commits.
        probe = Consumer(
            consumer_config(
                self.settings.bootstrap_servers,
                f"{self.settings.namespace}.orchestrator",
                extra=self.settings.client_extra(),
            )
        )
        try:
            inbox = TopicPartition(self.settings.inbox, sent.partition)
            while time.monotonic() < deadline and not waiter.done:
                try:
                    (committed,) = probe.committed(
                        [inbox], timeout=max(deadline - time.monotonic(), 0.5)
                    )
                    if committed.offset > sent.offset:
                        break
                except KafkaException as exc:
                    log.debug("committed offsets of %s: %s", inbox, exc)
                time.sleep(0.05)
            else:
                return
            partition = sub.partition_of(waiter.workflow_id)
            _, high = self._watermarks(probe, TopicPartition(sub.topic, partition), deadline)
            while sub.position(partition) < high and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            probe.close()
        sub.confirm(waiter)

    def _backfill(self, sub: ResultSubscription, waiter: Waiter, deadline: float) -> None:
        """Read the results below the cache's floor for ``waiter`` (see ``_results.py``)."""
        if waiter.backfill is None or waiter.done:
            return
        partition, end = waiter.backfill
        try:
            older = read_older(
                self._results_consumer, sub.topic, waiter.workflow_id, partition, end, deadline
            )
        except KafkaException as exc:
            raise ClientError(
                f"cannot read {sub.topic} [{partition}]: {_kafka_exception(exc)}"
            ) from exc
        sub.offer_older(waiter, older)

    def _no_result(
        self, workflow_id: str, timeout: float, sub: ResultSubscription, waiter: Waiter
    ) -> TimeoutError:
        rejection = ""
        if waiter.rejection is not None and waiter.rejection.error is not None:
            error = waiter.rejection.error
            rejection = f" (a start with this id was refused: {error.type}: {error.message})"
        reader = ""
        if waiter.asked and not waiter.confirmed:
            reader = (
                "; a result of another start of this id is there, which answers this one once "
                "the node has processed this start (it has not yet)"
            )
        if not sub.ready:
            reader += f"; the results subscription has not caught up with {sub.topic} yet"
        if sub.last_error:
            ago = time.monotonic() - sub.last_error_at
            reader += f"; the results reader last reported ({ago:.0f}s ago): {sub.last_error}"
        return TimeoutError(
            f"no result for workflow {workflow_id!r} on {sub.topic} within {timeout:g}s: it is "
            f"still running, or no orchestrator serves namespace {self.settings.namespace!r}"
            f"{rejection}{reader}"
        )

    def _wait_result(
        self, workflow_id: str, request_id: str | None, timeout: float
    ) -> WorkflowResult:
        deadline = time.monotonic() + timeout
        outcomes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            sub, waiter = self._register_waiter(workflow_id, request_id, outcomes.put, deadline)
        except TimeoutError as exc:
            raise TimeoutError(
                f"no result for workflow {workflow_id} within {timeout}s: {exc}"
            ) from None
        try:
            self._backfill(sub, waiter, deadline)
            while True:
                try:
                    found = outcomes.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    raise self._no_result(workflow_id, timeout, sub, waiter) from None
                if found is not NEEDS_CONFIRM:
                    break
                self._confirm(sub, waiter, deadline)
        finally:
            sub.unregister(waiter)
        if isinstance(found, BaseException):
            raise ClientError(f"reading {sub.topic} failed: {found}") from found
        assert isinstance(found, WorkflowResult)
        return found

    # -- finding workflows: list and counts --------------------------------------------

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        type: str | Sequence[str] | None = None,
        since: datetime | int | None = None,
        until: datetime | int | None = None,
        prefix: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
        timeout: float = 10.0,
    ) -> WorkflowPage:
        """A page of workflows of every node, newest start first.

        ``status``/``type``: one or several (any of them matches); ``since``/``until``: bounds
        of the start time (a datetime or epoch ms, inclusive); ``prefix``: of the workflow id;
        ``cursor``: the ``next_cursor`` of the previous page (None on the last page). The page
        says which partitions it covers: ``missing_partitions`` lists those no node answered
        for, and ``errors`` why. Raises :class:`NoNodes` when no node answered at all,
        :class:`~orchestrator._visibility.QueryError` for a bad filter.
        """
        query = ListQuery.build(
            status=status,
            type=type,
            since_ms=_epoch_ms(since),
            until_ms=_epoch_ms(until),
            prefix=prefix,
            limit=limit,
            cursor=cursor,
        )
        nodes, partitions = self._query_targets(timeout)
        page = merged_list(nodes, query, partitions, timeout)
        if page.errors:
            self._nodes_cache = None  # a node moved or went: read the registrations again
        if not page.partitions and page.errors:
            raise NoNodes(self._no_nodes(page.errors))
        return page

    def counts(self, *, timeout: float = 10.0) -> WorkflowCounts:
        """How many workflows every node holds, by status, by type and by both."""
        nodes, partitions = self._query_targets(timeout)
        counts = merged_counts(nodes, partitions, timeout)
        if counts.errors:
            self._nodes_cache = None
        if not counts.partitions and counts.errors:
            raise NoNodes(self._no_nodes(counts.errors))
        return counts

    def _query_targets(self, timeout: float) -> tuple[builtins.list[NodeRecord], int]:
        try:
            nodes = self.nodes(timeout=timeout)
        except TimeoutError as exc:
            raise NoNodes(f"could not read {self.settings.topics.nodes}: {exc}") from exc
        if not nodes:
            raise NoNodes(
                f"no orchestrator node of namespace {self.settings.namespace!r} is registered "
                f"on {self.settings.topics.nodes}: is a node running?"
            )
        return nodes, self._partition_count(self.settings.inbox, time.monotonic() + timeout)

    def _no_nodes(self, errors: builtins.list[str]) -> str:
        return (
            f"no orchestrator node of namespace {self.settings.namespace!r} answered: "
            + "; ".join(errors)
        )


def _output(
    found: WorkflowResult, workflow_id: str, request_id: str | None, output_type: Any
) -> Any:
    """What ``result()`` returns for ``found``, or the error it raises."""
    if found.status is WorkflowStatus.COMPLETED:
        return from_payload(found.result or Payload(encoding=NULL), output_type)
    error = found.error or ErrorInfo(type="UnknownError", message="no error recorded")
    if error.type == CONFLICT and request_id is not None and found.request_id == request_id:
        raise WorkflowIdConflict(
            f"workflow {workflow_id} exists with another type or input: {error.message}"
        )
    raise WorkflowFailedError(workflow_id, found.status.value, error.type, error.message)


def describe_events(workflow_id: str, ordered: list[HistoryEvent]) -> WorkflowDescription:
    """A workflow's description from its events in sequence order: its newest run (after a
    continue-as-new), folded up to a gap."""
    ordered = _newest_run(ordered)
    prefix_run = []
    first = ordered[0].event_seq if ordered else 1
    for expected, event in enumerate(ordered, start=first):
        if event.event_seq != expected:
            break
        prefix_run.append(event)
    state = fold(workflow_id, prefix_run)
    return WorkflowDescription(
        workflow_id=workflow_id,
        workflow_type=state.workflow_type,
        status=state.status,
        current_step=state.current_step,
        started_at=_time(state.started_at_ms) if state.status is not None else None,
        finished_at=_time(state.finished_at_ms) if state.finished_at_ms is not None else None,
        input=state.input,
        result=state.result,
        error=state.error,
        request_id=state.request_id,
        cancel_requested=state.cancel_requested,
        events=_summaries(ordered),
        complete=len(prefix_run) == len(ordered),
        blocked=state.blocked if not state.finished else None,
        parked_steps=tuple(a.seq for a in state.parked) if not state.finished else (),
    )


def _letter_info(msg: Message, letter: DeadLetter) -> DeadLetterInfo:
    try:
        kind = type(decode(letter.value or b"")).__name__
    except CodecError:
        kind = "?"
    return DeadLetterInfo(
        where=f"{msg.partition()}:{msg.offset()}",
        error_type=letter.error_type,
        reason=letter.reason,
        failed_at_ms=letter.failed_at_ms,
        source=f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}",
        kind=kind,
    )


def _epoch_ms(moment: datetime | int | None) -> int | None:
    if moment is None or isinstance(moment, int):
        return moment
    return int(moment.timestamp() * 1000)


def _read_to_end(
    consumer: Consumer, tp: TopicPartition, high: int, deadline: float
) -> Iterator[Message]:
    """The records of the assigned partition up to offset ``high`` (or its end, if sooner)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"could not read {tp.topic} [{tp.partition}] to offset {high} in time"
            )
        batch = _batch(consumer, min(remaining, 0.5))
        for msg in batch:
            if msg.error() is not None:
                if _is_eof(msg):
                    return
                continue
            offset = msg.offset()
            if offset is not None and offset >= high:
                return
            yield msg
            if offset is not None and offset >= high - 1:
                return
        if not batch:
            # Past transaction markers and aborted records the position can reach the end
            # without a record or an EOF event in this poll.
            (position,) = consumer.position([tp])
            if position.offset >= high:
                return


def _batch(consumer: Consumer, wait: float) -> list[Message]:
    """What the consumer has fetched, waiting up to ``wait`` seconds only if it has nothing.

    (``Consumer.consume`` would wait for a full batch or the whole timeout.)
    """
    batch = consumer.consume(num_messages=1000, timeout=0)
    if batch:
        return batch
    msg = consumer.poll(wait)
    return [msg] if msg is not None else []


def _is_eof(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return False
    if err.code() == KafkaError._PARTITION_EOF:
        return True
    if err.fatal() or err.code() in (
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ):
        raise ClientError(f"reading {msg.topic()} failed: {_kafka_error(err)}")
    log.warning("consumer error on %s: %s", msg.topic(), _kafka_error(err))
    return False


def _newest_run(events: list[HistoryEvent]) -> list[HistoryEvent]:
    """The events of the workflow's newest run: from its last WorkflowStarted on (the earlier
    runs' events are tombstoned, but may still be read until the tombstones are)."""
    starts = [i for i, e in enumerate(events) if isinstance(e.event, WorkflowStarted)]
    return events[starts[-1] :] if starts else events


def _timeout_ms(value: timedelta | float | None) -> int | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0:
        raise ValueError(f"execution_timeout must be positive, got {value}")
    return int(seconds * 1000)


def _http_query(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """POST the query (a GET when it has no argument); (status, body), whatever the status."""
    request = urllib.request.Request(
        url, data=body, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read()
        finally:
            exc.close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QueryFailed(f"cannot reach the node at {url}: {reason}", error_type="NoNode") from exc


def _query_error(status: int, data: bytes) -> tuple[str, str]:
    try:
        found = json.loads(data)
        return str(found["error"]), str(found["message"])
    except (ValueError, KeyError, TypeError):
        text = data.decode(errors="replace").strip()[:200]
        return "QueryFailed", f"the node answered {status}: {text}"


def _check_id(workflow_id: str) -> None:
    if not workflow_id:
        raise ValueError("workflow_id must not be empty")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _kafka_error(err: KafkaError) -> str:
    return f"{err.str()} ({err.name()})"


def _kafka_exception(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return _kafka_error(err) if isinstance(err, KafkaError) else str(exc)
