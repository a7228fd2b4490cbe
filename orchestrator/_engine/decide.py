"""What the node decides, apart from Kafka: for an inbox record or a timer tick, the history
events, activity commands, results, dead letters and forwards it leads to.

The processor (``processor.py``) polls, restores, runs the transaction and writes RocksDB; it
hands each record to :meth:`Decider.handle` and each turn to :meth:`Decider.fire_timers`,
:meth:`Decider.expire_finished` and :meth:`Decider.repair_history`, and commits the
:class:`Batch` they fill. Nothing here talks to a broker, so unit tests drive every path,
rejections included, with a partition store in a temporary directory
(``tests/unit/test_decide.py``); the only question to the outside world, whether a command
topic exists, is a function the processor passes in.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from contracts import codec
from contracts.codec import CodecError
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCommand,
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    CancelWorkflow,
    ChildWorkflowEnded,
    ChildWorkflowStarted,
    ErrorInfo,
    HistoryEvent,
    IdReusePolicy,
    OperatorActed,
    OperatorAction,
    ParentRef,
    Payload,
    ReplyOutcome,
    SignalWorkflow,
    StartWorkflow,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowResult,
    WorkflowStartSent,
    WorkflowStatus,
)
from contracts.limits import MAX_INBOX_RECORD_BYTES
from orchestrator._dead_letters import DEAD_LETTER_MAX_BYTES, SourceRecord, dead_letter_of
from orchestrator._metrics import NodeMetrics
from orchestrator._partitioner import partition_for
from orchestrator._payloads import PayloadError, from_payload
from orchestrator.errors import NonDeterminismError, Rejection
from orchestrator.settings import Settings
from orchestrator.tracing import WorkflowTracer, headers_of
from orchestrator.workflow import WorkflowRegistry

from .partition import Cached, Partition
from .restore import RestoreReport
from .state import OperatorActionKind, OperatorRefused, UnknownActivity, note_heartbeat
from .store import IndexQuery, StoreBatch

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = MAX_INBOX_RECORD_BYTES
MAX_WORKFLOW_ID = 256
_FORWARDED_HEADERS = frozenset({"traceparent", "tracestate"})
FORWARDED_FROM = "saga-forwarded-from"  # header of a record moved to its workflow's partition
_RETENTION_EVERY_MS = 5_000  # retention reads its index and the summaries due: not every turn
# Workflows replayed per turn after a restore: each costs a replay of its code, and inbox
# records wait behind them; a few hundred keep a turn in the tens of milliseconds.
_WAKE_PER_TURN = 200
_UNFINISHED = frozenset({"RUNNING", "BLOCKED", "PARKED"})

InboxRecord = SourceRecord
"""An inbox record as the decider reads it: a confluent-kafka ``Message`` or a test's stand-in."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Out:
    topic: str
    key: bytes
    value: bytes | None
    partition: int | None = None
    headers: list[tuple[str, str | bytes | None]] | None = None
    source: tuple[int, int] | None = None  # the inbox record (partition, offset) it answers


@dataclass
class Batch:
    """Everything one transaction carries, and what to write locally once it commits."""

    offsets: dict[int, int] = field(default_factory=dict)  # inbox partition -> next offset
    outputs: list[Out] = field(default_factory=list)
    stores: dict[int, StoreBatch] = field(default_factory=dict)
    touched: dict[tuple[int, str], Cached] = field(default_factory=dict)
    removed: list[tuple[int, str]] = field(default_factory=list)

    def store(self, partition: int) -> StoreBatch:
        return self.stores.setdefault(partition, StoreBatch())

    def __bool__(self) -> bool:
        return bool(self.offsets or self.outputs or self.stores)


@dataclass
class Counters:
    """Plain counts, read by the metrics exporter and by tests."""

    started: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    forwarded: int = 0  # inbox records moved to their workflow's partition
    blocked: int = 0  # workflows found BLOCKED (code that disagrees with their history)
    transactions: int = 0
    aborted_transactions: int = 0
    restores: list[RestoreReport] = field(default_factory=list)


def _header(msg: InboxRecord, name: str) -> bytes | None:
    found = msg.headers() or []
    pairs = found.items() if isinstance(found, dict) else found
    for key, value in pairs:
        if key == name:
            return value.encode() if isinstance(value, str) else value
    return None


def _as_start(value: bytes | None) -> StartWorkflow | None:
    try:
        envelope = codec.decode(value or b"")
    except CodecError:
        return None
    return envelope if isinstance(envelope, StartWorkflow) else None


class Decider:
    def __init__(
        self,
        settings: Settings,
        registry: WorkflowRegistry,
        counters: Counters,
        *,
        topic_exists: Callable[[str], bool],
        tracer: WorkflowTracer | None = None,
        metrics: NodeMetrics | None = None,
        letter_max: int = DEAD_LETTER_MAX_BYTES,
    ) -> None:
        """``topic_exists`` answers whether a command topic exists; ``letter_max`` caps a dead
        letter's copy of its record (what the node's producer may send)."""
        self.settings = settings
        self.registry = registry
        self.counters = counters
        self.tracer = tracer  # spans for new events only: replay never reaches _record
        self.metrics = metrics
        self._topic_exists = topic_exists
        self._letter_max = letter_max
        self._last_retention = 0
        # Inbox records (partition, offset) whose outputs the producer refused, with why: when
        # read again after the abort they are dead-lettered instead of handled again.
        self._refused: dict[tuple[int, int], str] = {}
        self._repairs: dict[int, list[bytes]] = {}  # partition -> history keys to repair
        self._code_version = registry.code_version
        self._to_wake: set[int] = set()  # restored partitions whose workflows to check
        self._to_check: deque[tuple[int, str]] = deque()  # (partition, workflow) to replay

    def _live(self, part: Partition, wf: str, batch: Batch, now: int) -> Cached | None:
        """The workflow, brought up to date with this node's code: a run whose code disagrees
        with its history is recorded BLOCKED (once); a blocked one whose history this code
        accepts moves again. Its inputs are recorded either way, never dropped."""
        cached = part.get(wf)
        if cached is None:
            return None
        run = cached.run
        if run.finished:
            return cached
        if run.broken is not None and run.state.blocked is None:
            log.error("workflow %s is BLOCKED: %s", wf, run.broken)
            self.counters.blocked += 1
            self._record(part, cached, run.block(now, self._code_version), batch, now)
        elif run.broken is None and run.state.blocked is not None:
            log.warning("workflow %s moves again on code %s", wf, self._code_version)
            self._record(part, cached, run.unblock(now, self._code_version), batch, now)
        return cached

    def wake_blocked(self, partitions: Mapping[int, Partition], batch: Batch, now: int) -> None:
        """After a restore (a deploy, a restart): replay every unfinished workflow of the
        restored partitions with this code, a budget per turn. A blocked one whose code is
        fixed moves again although it waits for nothing new; one this code cannot replay is
        recorded BLOCKED now (visible in describe, list and the metrics), not days later when
        its timer fires."""
        while self._to_wake:
            number = self._to_wake.pop()
            part = partitions.get(number)
            if part is not None:
                # From the status index: the unfinished ones only, no summary decoded.
                self._to_check.extend(
                    (number, found.workflow_id)
                    for found in part.store.positions(IndexQuery(statuses=_UNFINISHED))
                )
        budget = _WAKE_PER_TURN
        while self._to_check and budget > 0:
            number, wf = self._to_check.popleft()
            part = partitions.get(number)
            if part is None:
                continue
            budget -= 1
            self._live(part, wf, batch, now)

    def refuse(self, source: tuple[int, int], why: str) -> None:
        """The producer refused what the inbox record ``source`` led to."""
        self._refused[source] = why

    def restored(self, report: RestoreReport) -> None:
        self._to_wake.add(report.partition)
        if report.skipped_keys:
            self._repairs[report.partition] = list(report.skipped_keys)

    def handle(self, part: Partition, msg: InboxRecord, batch: Batch, now: int) -> None:
        """Decide what one inbox record of ``part`` does; everything goes into ``batch``."""
        number, offset = msg.partition() or 0, msg.offset() or 0
        batch.offsets[number] = offset + 1
        refused = self._refused.pop((number, offset), None)
        if refused is not None:
            # What this record led to was refused by the producer (batch aborted): park the
            # record itself, so the partition moves on and the input is not lost; a start gets
            # its FAILED result, so whoever waits for it is not left waiting.
            start = _as_start(msg.value())
            if start is not None:
                return self._reject(batch, msg, start, Rejection.PRODUCE_FAILED, refused)
            return self._dead_letter(batch, msg, refused, "ProduceFailed")
        first = len(batch.outputs)
        self._decide(part, msg, batch, now)
        for out in batch.outputs[first:]:
            out.source = (number, offset)

    def _decide(self, part: Partition, msg: InboxRecord, batch: Batch, now: int) -> None:
        value = msg.value()
        if value is None:
            return self._dead_letter(batch, msg, "the inbox record has no value", "EmptyRecord")
        if len(value) > MAX_RECORD_BYTES:
            return self._oversized(part, msg, value, batch, now)
        try:
            envelope = codec.decode(value)
        except CodecError as exc:
            return self._dead_letter(batch, msg, str(exc), type(exc).__name__)
        wf = getattr(envelope, "workflow_id", "")
        if not wf or len(wf) > MAX_WORKFLOW_ID or "\0" in wf:
            return self._dead_letter(batch, msg, f"invalid workflow id {wf[:80]!r}", "InvalidId")
        home = partition_for(wf, self.settings.partitions)
        if home != part.number:
            return self._forward(batch, msg, value, wf, home)
        try:
            if isinstance(envelope, StartWorkflow):
                self._on_start(part, envelope, batch, msg, now)
            elif isinstance(envelope, ActivityReply):
                self._on_reply(part, envelope, batch, msg, now)
            elif isinstance(envelope, SignalWorkflow | CancelWorkflow):
                self._on_existing(part, envelope, batch, msg, now)
            elif isinstance(envelope, OperatorAction):
                self._on_operator(part, envelope, batch, msg, now)
            elif isinstance(envelope, ChildWorkflowEnded):
                self._on_child_ended(part, envelope, batch, msg, now)
            elif isinstance(envelope, ActivityHeartbeat):
                self._on_heartbeat(part, envelope, now)
            else:
                self._dead_letter(
                    batch,
                    msg,
                    f"{type(envelope).__name__} does not belong on the inbox",
                    "WrongTopic",
                )
        except NonDeterminismError as exc:
            part.forget(wf)
            self._dead_letter(batch, msg, str(exc), "NonDeterminismError")

    def _on_start(
        self, part: Partition, msg_env: StartWorkflow, batch: Batch, msg: InboxRecord, now: int
    ) -> None:
        wf = msg_env.workflow_id
        existing = self._live(part, wf, batch, now)
        policy = msg_env.id_reuse
        if existing is not None:
            state = existing.run.state
            same_call = (
                state.workflow_type == msg_env.workflow_type and state.input == msg_env.input
            )
            same = same_call and (msg_env.parent is None or state.parent == msg_env.parent)
            if same and policy is IdReusePolicy.REJECT_DUPLICATE:
                return  # the same start again: the workflow that runs is the answer
            if policy is IdReusePolicy.REJECT_DUPLICATE or (
                policy is IdReusePolicy.ALLOW_DUPLICATE and not state.finished
            ):
                if same:
                    return  # a duplicate of the running workflow: it is the answer
                what = "with other input"
                if same_call:
                    owner = state.parent.workflow_id if state.parent else "a client"
                    what = f"started by {owner}"
                return self._reject(
                    batch, msg, msg_env, Rejection.WORKFLOW_ID_CONFLICT,
                    f"workflow {wf} exists as {state.workflow_type} {what}"
                    + (" and is still running" if not state.finished else ""),
                )  # fmt: skip
        definition = self.registry.get(msg_env.workflow_type)
        if definition is None:
            return self._reject(
                batch, msg, msg_env, Rejection.UNKNOWN_WORKFLOW_TYPE,
                f"unknown workflow type {msg_env.workflow_type!r}; this node runs: "
                + ", ".join(self.registry.names()),
            )  # fmt: skip
        try:
            from_payload(msg_env.input, definition.input_type)
        except PayloadError as exc:
            return self._reject(batch, msg, msg_env, Rejection.INVALID_INPUT, str(exc))
        if existing is not None:
            # id reuse: ALLOW_DUPLICATE after the old run closed, or TERMINATE_IF_RUNNING. The
            # new run's events follow the old run's under the same id; the old run's are
            # tombstoned (its result stays on the results topic).
            cached = existing
            if not cached.run.finished:
                reason = f"terminated by start {msg_env.request_id} (id reuse TERMINATE_IF_RUNNING)"
                terminated = cached.run.terminate(reason, msg_env.request_id, now)
                self._record(part, cached, terminated, batch, now)
            trace = msg_env.trace
            if self.tracer is not None:
                trace = self.tracer.root(msg_env.workflow_type, wf, trace, now)
            self.counters.started += 1
            if self.metrics is not None:
                self.metrics.workflows_started.inc()
            self._record(part, cached, cached.run.start(msg_env, now, trace), batch, now)
            return
        cached = part.new(wf)
        trace = msg_env.trace
        if self.tracer is not None:
            trace = self.tracer.root(msg_env.workflow_type, wf, trace, now)
        events = cached.run.start(msg_env, now, trace)
        self.counters.started += 1
        if self.metrics is not None:
            self.metrics.workflows_started.inc()
        self._record(part, cached, events, batch, now)

    def _oversized(
        self, part: Partition, msg: InboxRecord, value: bytes, batch: Batch, now: int
    ) -> None:
        """A record over the inbox limit is parked; whoever waits on it hears of it: a start
        gets its FAILED result, an activity reply fails its attempt (the saga moves on), a
        child's end fails the parent's await."""
        reason = f"record of {len(value)} bytes exceeds {MAX_RECORD_BYTES}"
        try:
            envelope = codec.decode(value)
        except CodecError:
            envelope = None
        if isinstance(envelope, StartWorkflow) and envelope.workflow_id:
            return self._reject(batch, msg, envelope, Rejection.OVERSIZED, reason)
        self._dead_letter(batch, msg, reason, Rejection.OVERSIZED)
        if isinstance(envelope, ActivityReply):
            if partition_for(envelope.workflow_id, self.settings.partitions) != part.number:
                return  # not this partition's workflow: parked, and nothing else to do here
            failure = envelope.model_copy(
                update={
                    "outcome": ReplyOutcome.BUSINESS_FAILURE,
                    "result": None,
                    "error": ErrorInfo(
                        type="PayloadTooLarge",
                        message=f"the reply was {reason}: return less, e.g. a reference",
                    ),
                }
            )
            cached = self._live(part, failure.workflow_id, batch, now)
            if cached is not None:
                with contextlib.suppress(UnknownActivity):
                    self._record(part, cached, cached.run.on_reply(failure, now), batch, now)
        if isinstance(envelope, ChildWorkflowEnded):
            # A child's result too large for the inbox: the parent's await fails instead of
            # waiting for ever (the child itself ended as it did; describe shows it).
            if partition_for(envelope.workflow_id, self.settings.partitions) != part.number:
                return
            ended = envelope.model_copy(
                update={
                    "status": WorkflowStatus.FAILED,
                    "result": None,
                    "error": ErrorInfo(
                        type="PayloadTooLarge",
                        message=f"the end of child {envelope.child_workflow_id} was {reason}: "
                        "return less from it, e.g. a reference",
                    ),
                }
            )
            cached = self._live(part, ended.workflow_id, batch, now)
            if cached is not None:
                with contextlib.suppress(UnknownActivity):
                    self._record(part, cached, cached.run.on_child_ended(ended, now), batch, now)

    def _reject(
        self, batch: Batch, msg: InboxRecord, start: StartWorkflow, error_type: str, reason: str
    ) -> None:
        self._dead_letter(batch, msg, reason, error_type)
        result = WorkflowResult(
            workflow_id=start.workflow_id,
            status=WorkflowStatus.FAILED,
            finished_at_ms=now_ms(),
            error=ErrorInfo(type=error_type, message=reason),
            request_id=start.request_id,
        )
        batch.outputs.append(
            Out(self.settings.results, start.workflow_id.encode(), codec.encode(result))
        )
        if start.parent is not None:  # the parent waits for this child: it hears of the refusal
            self._report_to_parent(
                start.parent, start.workflow_id, WorkflowStatus.FAILED, None,
                ErrorInfo(type=error_type, message=reason), batch,
            )  # fmt: skip

    def _on_child_ended(
        self, part: Partition, ended: ChildWorkflowEnded, batch: Batch, msg: InboxRecord, now: int
    ) -> None:
        cached = self._live(part, ended.workflow_id, batch, now)
        if cached is None:
            return self._dead_letter(
                batch, msg, f"child end for unknown workflow {ended.workflow_id}", "UnknownWorkflow"
            )
        try:
            events = cached.run.on_child_ended(ended, now)
        except UnknownActivity as exc:
            return self._dead_letter(batch, msg, str(exc), "UnknownChild")
        self._record(part, cached, events, batch, now)

    def _report_to_parent(
        self,
        parent: ParentRef,
        child_id: str,
        status: WorkflowStatus,
        result: Payload | None,
        error: ErrorInfo | None,
        batch: Batch,
    ) -> None:
        """A child's end goes to its parent's inbox (keyed by the parent's id) in the transaction
        that records it: the parent hears it exactly once."""
        ended = ChildWorkflowEnded(
            workflow_id=parent.workflow_id,
            seq=parent.seq,
            child_workflow_id=child_id,
            status=status,
            sent_at_ms=now_ms(),
            result=result,
            error=error,
        )
        batch.outputs.append(
            Out(self.settings.inbox, parent.workflow_id.encode(), codec.encode(ended))
        )

    def _start_child(self, cached: Cached, body: ChildWorkflowStarted, batch: Batch) -> None:
        state = cached.run.state
        start = StartWorkflow(
            workflow_id=body.child_workflow_id,
            workflow_type=body.workflow_type,
            request_id=f"{state.workflow_id}/{body.seq}",
            input=body.input,
            sent_at_ms=now_ms(),
            trace=state.trace,
            parent=ParentRef(workflow_id=state.workflow_id, seq=body.seq),
        )
        batch.outputs.append(
            Out(self.settings.inbox, body.child_workflow_id.encode(), codec.encode(start))
        )

    def _cancel_children(self, cached: Cached, batch: Batch, *, closing: bool) -> None:
        """A cancel of this workflow passes down to its running children (but ABANDON ones): they
        compensate. When it ends (``closing``) without having been cancelled, each child that
        still runs is cancelled (REQUEST_CANCEL), terminated (TERMINATE) or left alone
        (ABANDON); a cancelled one's children were cancelled already, and terminating them then
        would cut their compensations short."""
        state = cached.run.state
        for child in state.running_children():
            policy = child.parent_close_policy
            if policy == "ABANDON" or (closing and state.cancel_requested):
                continue
            request_id = f"{state.workflow_id}/{child.seq}/{'close' if closing else 'cancel'}"
            envelope: CancelWorkflow | OperatorAction
            if closing and policy == "TERMINATE":
                # The operators' terminate (status TERMINATED, nothing compensated), with the
                # parent as the operator so that the child's history says who ended it.
                envelope = OperatorAction(
                    workflow_id=child.workflow_id,
                    request_id=request_id,
                    action=OperatorActionKind.TERMINATE.value,
                    reason=f"parent {state.workflow_id} ended (parent-close policy TERMINATE)",
                    operator=f"parent {state.workflow_id}",
                    sent_at_ms=now_ms(),
                )
            else:
                ended = f"ended {state.status.value}" if closing and state.status else ""
                envelope = CancelWorkflow(
                    workflow_id=child.workflow_id,
                    request_id=request_id,
                    reason=f"parent {state.workflow_id} {ended or 'was cancelled'}",
                    sent_at_ms=now_ms(),
                )
            batch.outputs.append(
                Out(self.settings.inbox, child.workflow_id.encode(), codec.encode(envelope))
            )

    def _on_heartbeat(self, part: Partition, beat: ActivityHeartbeat, now: int) -> None:
        """A heartbeat records nothing: it moves the attempt's heartbeat deadline and keeps its
        details in memory (docs/services.md "Heartbeats"). One for an attempt that ended, or
        a workflow that is gone, is dropped quietly: heartbeats are sent without a transaction
        and may well come late."""
        cached = part.get(beat.workflow_id)
        if cached is None or not note_heartbeat(cached.run.state, beat, now):
            log.debug("heartbeat of %s attempt %d ignored", beat.idempotency_key, beat.attempt)

    def _on_reply(
        self, part: Partition, reply: ActivityReply, batch: Batch, msg: InboxRecord, now: int
    ) -> None:
        cached = self._live(part, reply.workflow_id, batch, now)
        if cached is None:
            return self._dead_letter(
                batch, msg, f"reply for unknown workflow {reply.workflow_id}", "UnknownWorkflow"
            )
        try:
            events = cached.run.on_reply(reply, now)
        except UnknownActivity as exc:
            return self._dead_letter(batch, msg, str(exc), "UnknownActivity")
        self._record(part, cached, events, batch, now)

    def _on_existing(
        self,
        part: Partition,
        envelope: SignalWorkflow | CancelWorkflow,
        batch: Batch,
        msg: InboxRecord,
        now: int,
    ) -> None:
        wf = envelope.workflow_id
        kind = "signal" if isinstance(envelope, SignalWorkflow) else "cancel"
        cached = self._live(part, wf, batch, now)
        if cached is None:
            return self._dead_letter(
                batch, msg, f"{kind} for unknown workflow {wf}", "UnknownWorkflow"
            )
        run = cached.run
        if isinstance(envelope, SignalWorkflow):
            if run.finished:
                return self._dead_letter(
                    batch, msg, f"signal {envelope.signal_name!r} for finished workflow {wf}",
                    "WorkflowFinished",
                )  # fmt: skip
            events = run.on_signal(envelope.signal_name, envelope.payload, envelope.request_id, now)
        else:
            events = run.on_cancel(envelope.reason, envelope.request_id, now)
        self._record(part, cached, events, batch, now)

    def _on_operator(
        self, part: Partition, action: OperatorAction, batch: Batch, msg: InboxRecord, now: int
    ) -> None:
        """terminate / retry / skip, recorded with who and why; one that does not apply (a skip
        of a step that is not parked, ...) is dead-lettered with the reason, changing nothing."""
        wf = action.workflow_id
        cached = self._live(part, wf, batch, now)
        if cached is None:
            return self._dead_letter(
                batch, msg, f"{action.action} for unknown workflow {wf}", "UnknownWorkflow"
            )
        state = cached.run.state
        if (
            action.action == OperatorActionKind.RETRY
            and state.blocked is not None
            and not state.finished
            and action.step_seq is None
        ):
            # Re-run the blocked code against its whole history (what the store holds and what
            # this batch has recorded): it moves again if this node's code accepts it.
            pending = [e for e, _ in batch.store(part.number).events if e.workflow_id == wf]
            part.rerun(wf, pending)
            cached = self._live(part, wf, batch, now) or cached
        try:
            events = cached.run.on_operator(action, now)
        except OperatorRefused as exc:
            return self._dead_letter(batch, msg, str(exc), Rejection.OPERATOR_REFUSED)
        log.warning(
            "operator %r: %s workflow %s%s: %s", action.operator, action.action, wf,
            f" step #{action.step_seq}" if action.step_seq is not None else "", action.reason,
        )  # fmt: skip
        self._record(part, cached, events, batch, now)

    # ----------------------------------------------------------------- timers and retention

    def fire_timers(self, partitions: Iterable[Partition], batch: Batch, now: int) -> None:
        """Due timers of every workflow in ``partitions`` (at most ``max_batch`` per turn)."""
        budget = self.settings.max_batch
        for part in list(partitions):
            while budget > 0 and (wf := part.pop_due(now)) is not None:
                budget -= 1
                try:
                    cached = self._live(part, wf, batch, now)
                    if cached is None:
                        continue
                    events = cached.run.on_timers(now)
                except NonDeterminismError as exc:
                    log.error("timer of %s not fired: %s", wf, exc)
                    part.forget(wf)
                    continue
                if not events:
                    # Nothing was due after all (heartbeats moved a deadline, which records
                    # nothing): summarising it again schedules its next due time.
                    batch.touched[(part.number, wf)] = cached
                    batch.store(part.number)  # so the batch is committed, summaries and all
                self._record(part, cached, events, batch, now)

    def repair_history(self, partitions: Mapping[int, Partition], batch: Batch) -> None:
        """Undo records on the history topic that no node wrote (restore skipped them): the key
        of an event we hold gets that event again (compaction keeps the latest value), any other
        key a tombstone, so compaction removes them and no later restore meets them."""
        for number in list(self._repairs):
            part = partitions.get(number)
            keys = self._repairs.pop(number)
            if part is None:
                continue
            for key in keys:
                workflow_id, _, seq = key.decode(errors="replace").rpartition("/")
                value = None
                if workflow_id and seq.isdigit():
                    value = part.store.event_bytes(workflow_id, int(seq))
                log.warning("history record %r on partition %d %s", key[:80], number,
                            "re-written from the store" if value else "tombstoned")  # fmt: skip
                batch.outputs.append(Out(self.settings.history, key, value, number))
            batch.store(number)  # the transaction carries this partition's fencing offset

    def expire_finished(self, partitions: Iterable[Partition], batch: Batch, now: int) -> None:
        """Tombstone the history of workflows that finished longer ago than the retention."""
        if now - self._last_retention < _RETENTION_EVERY_MS:
            return
        self._last_retention = now
        cutoff = now - self.settings.retention_ms
        for part in partitions:
            # The retention index: only the workflows that finished before the cutoff are
            # read, not every summary of the partition (a scan of all of them every 5 s grew
            # with the finished workflows kept: 100,000 took 1.3-8 s to decode).
            for finished_at, wf in part.store.finished_by(cutoff):
                summary = part.store.summary(wf)
                batch.store(part.number).drop_finished(finished_at, wf)
                if summary is None or summary.finished_at_ms != finished_at:
                    continue  # a stale key (a later run, an earlier removal): dropped only
                # Earlier runs' events were tombstoned when the next run began.
                for seq in range(summary.run_start_seq, summary.last_seq + 1):
                    batch.outputs.append(
                        Out(self.settings.history, f"{wf}/{seq}".encode(), None, part.number)
                    )
                batch.store(part.number).remove_workflow(wf, summary.last_seq, summary.next_due_ms)
                batch.removed.append((part.number, wf))
                if len(batch.outputs) > self.settings.max_batch:
                    return

    # ----------------------------------------------------------------- effects of events

    def _record(
        self, part: Partition, cached: Cached, events: list[HistoryEvent], batch: Batch, now: int
    ) -> None:
        if not events:
            return
        store = batch.store(part.number)
        run = cached.run
        if self.tracer is not None:
            state = run.state
            self.tracer.step(
                state.workflow_type, state.workflow_id, state.trace, events, time.time_ns()
            )
        for event in events:
            encoded = codec.encode(event)
            key = f"{event.workflow_id}/{event.event_seq}".encode()
            batch.outputs.append(Out(self.settings.history, key, encoded, part.number))
            store.add_event(event, encoded)
            body = event.event
            if isinstance(body, ActivityScheduled | ActivityAttemptStarted):
                self._send_command(part, cached, body.seq, batch, now)
            elif isinstance(body, WorkflowCompleted | WorkflowFailed) or (
                isinstance(body, OperatorActed) and body.action == OperatorActionKind.TERMINATE
            ):
                self._send_result(cached, batch)
                self._cancel_children(cached, batch, closing=True)
                parent = run.state.parent
                if parent is not None:
                    self._report_to_parent(
                        parent, run.state.workflow_id, run.state.status or WorkflowStatus.FAILED,
                        run.state.result, run.state.error, batch,
                    )  # fmt: skip
            elif isinstance(body, ChildWorkflowStarted):
                self._start_child(cached, body, batch)
            elif isinstance(body, CancelRequested):
                self._cancel_children(cached, batch, closing=False)
            elif isinstance(body, WorkflowStartSent):
                self._send_start(event, body, batch)
            elif self.metrics is not None and isinstance(
                body, ActivityCompleted | ActivityFailed | ActivityAttemptFailed
            ):
                act = run.state.activities.get(body.seq)
                if act is not None and act.attempt == body.attempt:
                    seconds = (event.recorded_at_ms - act.attempt_started_ms) / 1000
                    self.metrics.step(act.name, body.kind, seconds)
        while run.ended_runs:
            # A new run follows a closed one: the old run's events go (tombstones), so a
            # long-lived loop of continue-as-new keeps a bounded history. After the events:
            # the old run's last ones are in this batch, and the later record wins.
            first, next_start = run.ended_runs.pop(0)
            wf = run.state.workflow_id
            for seq in range(first, next_start):
                key = f"{wf}/{seq}".encode()
                batch.outputs.append(Out(self.settings.history, key, None, part.number))
            store.truncate(wf, next_start)
        batch.touched[(part.number, run.state.workflow_id)] = cached
        if run.broken is not None and run.state.blocked is None and not run.finished:
            # The code broke on what was just recorded (a bug in it): nothing it asked for in
            # that step was sent; the workflow waits, BLOCKED, for code that goes on.
            log.error("workflow %s is BLOCKED: %s", run.state.workflow_id, run.broken)
            self.counters.blocked += 1
            self._record(part, cached, run.block(now, self._code_version), batch, now)

    def _send_command(
        self, part: Partition, cached: Cached, seq: int, batch: Batch, now: int
    ) -> None:
        run = cached.run
        act = run.state.activities.get(seq)
        if act is None:
            return  # a step of a run that ended in this same step (continue-as-new): not sent
        if not self._topic_exists(act.topic):
            # Producing to a missing topic would fail the transaction again and again: the
            # attempt fails instead, and the retry policy decides what happens next.
            reply = ActivityReply(
                workflow_id=run.state.workflow_id,
                seq=seq,
                attempt=act.attempt,
                idempotency_key=act.idempotency_key,
                outcome=ReplyOutcome.RETRYABLE_FAILURE,
                sent_at_ms=now,
                error=ErrorInfo(type="UnknownTopic", message=f"topic {act.topic} does not exist"),
            )
            self._record(part, cached, run.on_reply(reply, now), batch, now)
            return
        deadline = (
            act.attempt_started_ms + act.attempt_timeout_ms if act.attempt_timeout_ms else None
        )
        command = ActivityCommand(
            workflow_id=run.state.workflow_id,
            activity_name=act.name,
            seq=seq,
            attempt=act.attempt,
            idempotency_key=act.idempotency_key,
            is_compensation=act.is_compensation,
            input=act.input,
            reply_topic=self.settings.inbox,
            sent_at_ms=now,
            deadline_ms=deadline,
            trace=run.state.trace,
            heartbeat_timeout_ms=act.heartbeat_timeout_ms,
            heartbeat_details=act.heartbeat_details,
        )
        if self.tracer is not None:  # the command's own span: the service's span is its child
            command = command.model_copy(update={"trace": self.tracer.command(command, act.topic)})
        if self.metrics is not None:
            self.metrics.attempt(act.name, act.is_compensation)
        headers = headers_of(command.trace)
        batch.outputs.append(
            Out(act.topic, run.state.workflow_id.encode(), codec.encode(command), None, headers)
        )

    def _send_result(self, cached: Cached, batch: Batch) -> None:
        state = cached.run.state
        status = state.status or WorkflowStatus.FAILED
        self.counters.finished[status.value] = self.counters.finished.get(status.value, 0) + 1
        if self.metrics is not None:
            self.metrics.finished(status.value)
        result = WorkflowResult(
            workflow_id=state.workflow_id,
            status=status,
            finished_at_ms=state.finished_at_ms or now_ms(),
            result=state.result,
            error=state.error,
            request_id=state.request_id,
        )
        batch.outputs.append(
            Out(self.settings.results, state.workflow_id.encode(), codec.encode(result))
        )

    def _send_start(self, event: HistoryEvent, body: WorkflowStartSent, batch: Batch) -> None:
        """A start the workflow asked for, to the inbox in this transaction: the event and the
        start are written together or not at all, so a schedule's tick starts once."""
        start = StartWorkflow(
            workflow_id=body.target_id,
            workflow_type=body.workflow_type,
            request_id=body.request_id,
            input=body.input,
            sent_at_ms=event.recorded_at_ms,
        )
        home = partition_for(body.target_id, self.settings.partitions)
        batch.outputs.append(
            Out(self.settings.inbox, body.target_id.encode(), codec.encode(start), home)
        )

    def _forward(self, batch: Batch, msg: InboxRecord, value: bytes, wf: str, home: int) -> None:
        """A record on another partition than its workflow's (a null key, or a key other than
        its workflow id): handled there would split the workflow's history from its replies,
        so it goes, in this transaction, to the partition that owns the workflow."""
        self.counters.forwarded += 1
        log.warning(
            "inbox record %s[%s]@%s for workflow %s belongs on partition %d (key %r): forwarded",
            msg.topic(), msg.partition(), msg.offset(), wf, home, (msg.key() or b"")[:80],
        )  # fmt: skip
        found = msg.headers() or []
        pairs = found.items() if isinstance(found, dict) else found
        headers: list[tuple[str, str | bytes | None]] = [
            (name, value) for name, value in pairs if name in _FORWARDED_HEADERS
        ]
        # Where it came from, so a dead letter of the moved copy names the original record.
        origin = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        headers.append((FORWARDED_FROM, origin))
        batch.outputs.append(Out(self.settings.inbox, wf.encode(), value, home, headers or None))

    def _dead_letter(self, batch: Batch, msg: InboxRecord, reason: str, error_type: str) -> None:
        origin = _header(msg, FORWARDED_FROM)
        if origin is not None:
            reason = f"{reason} (forwarded from {origin.decode(errors='replace')})"
        self.counters.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_letters.inc()
        log.warning(
            "dead letter from %s[%s]@%s: %s", msg.topic(), msg.partition(), msg.offset(), reason
        )
        record = dead_letter_of(msg, reason, error_type, max_bytes=self._letter_max)
        batch.outputs.append(Out(self.settings.dlq, record.key or b"", codec.encode(record)))
