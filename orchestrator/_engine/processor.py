"""The processing loop of one orchestrator node, for the inbox partitions it is assigned.

poll inbox records -> decide (new history events, commands, results, dead letters) ->
one Kafka transaction with the consumed offsets -> one RocksDB batch per partition.
See :meth:`Processor._commit` for the order that makes a crash anywhere lose and duplicate nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from contracts import codec
from contracts.codec import CodecError
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCommand,
    ActivityCompleted,
    ActivityFailed,
    ActivityReply,
    ActivityScheduled,
    CancelWorkflow,
    ErrorInfo,
    HistoryEvent,
    ReplyOutcome,
    SignalWorkflow,
    StartWorkflow,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowResult,
    WorkflowStatus,
)
from orchestrator._deadline import DeadlineCaller, Stopping, Wedged, drop_in_background
from orchestrator.dead_letters import DEAD_LETTER_MAX_BYTES, dead_letter_of
from orchestrator.errors import NodeStopped, NonDeterminismError
from orchestrator.health import Health
from orchestrator.kafka_config import admin_config, consumer_config, producer_config
from orchestrator.metrics import NodeMetrics
from orchestrator.partitioner import partition_for
from orchestrator.payloads import PayloadError, from_payload
from orchestrator.settings import Settings
from orchestrator.tracing import WorkflowTracer, headers_of
from orchestrator.workflow import WorkflowRegistry

from .membership import NodeClaim
from .partition import Cached, Partition
from .restore import RestoreReport, restore_partitions
from .state import UnknownActivity
from .store import StoreBatch

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 512 * 1024
_IDLE_POLL_MS = 100  # an idle node looks at its timers and retention at least this often
MAX_WORKFLOW_ID = 256
_FORWARDED_HEADERS = frozenset({"traceparent", "tracestate"})


T = TypeVar("T")

# A producer with this node's transactional id started elsewhere: the same SAGA_NODE_ID twice.
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED}


# Transactional calls: librdkafka's timeout, and the deadline past which a call is taken to be
# stuck. A commit slower than transaction.timeout.ms (10 s) is aborted by the coordinator anyway;
# the deadline bounds how long a node sits in a call that ignores its timeout (issue 5456).
_TXN_CALL_S = 10.0
_CALL_DEADLINE_S = 15.0
_INIT_CALL_S = 30.0  # init_transactions on a new broker may wait for its transaction log


# A test seam, not a setting: SIGKILL this process inside its N-th transaction, after its records
# and offsets were sent and before the commit, so fault tests can kill a node with a transaction
# open every time rather than by chance (tests/faults/test_node_faults.py).
_CRASH_IN_TXN = int(os.environ.get("SAGA_TEST_CRASH_IN_TXN", "0"))


def _crash_point(committed: int) -> None:
    if _CRASH_IN_TXN and committed + 1 >= _CRASH_IN_TXN:
        os.kill(os.getpid(), signal.SIGKILL)


def _as_start(value: bytes | None) -> StartWorkflow | None:
    try:
        envelope = codec.decode(value or b"")
    except CodecError:
        return None
    return envelope if isinstance(envelope, StartWorkflow) else None


def _fatal_reason(error: KafkaError) -> str:
    if error.code() in _FENCED or "fenced" in error.str().lower():
        return (
            f"fenced by another process with the same node id ({error.str()}); "
            "give every node its own SAGA_NODE_ID"
        )
    return f"unrecoverable Kafka error: {error.str()}"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Out:
    topic: str
    key: bytes
    value: bytes | None
    partition: int | None = None
    headers: list[tuple[str, str | bytes | None]] | None = None
    source: tuple[int, int] | None = None  # the inbox record (partition, offset) it answers


class _Refused(Exception):
    """The producer refused one record outright (e.g. MSG_SIZE_TOO_LARGE): redoing the batch
    as it is would fail the same way for ever."""

    def __init__(self, out: _Out, error: KafkaException) -> None:
        super().__init__(str(error))
        self.out = out
        self.error = error


@dataclass
class Batch:
    """Everything one transaction carries, and what to write locally once it commits."""

    offsets: dict[int, int] = field(default_factory=dict)  # inbox partition -> next offset
    outputs: list[_Out] = field(default_factory=list)
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
    transactions: int = 0
    aborted_transactions: int = 0
    restores: list[RestoreReport] = field(default_factory=list)


class Processor:
    def __init__(
        self,
        settings: Settings,
        registry: WorkflowRegistry,
        *,
        tracer: WorkflowTracer | None = None,
        metrics: NodeMetrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.counters = Counters()
        self.tracer = tracer  # spans for new events only: replay never reaches _record
        self.metrics = metrics
        self.health = health  # health (#8): /healthz and /ready
        self._last_lag = 0.0
        self._group = f"{settings.namespace}.orchestrator"
        self._txn_id = f"{settings.namespace}.orchestrator.{settings.node_id}"
        self._state_root = Path(settings.state_dir) / settings.namespace
        self._partitions: dict[int, Partition] = {}
        self._to_restore: set[int] = set()
        self._known_topics: set[str] = set()
        self._missing_topics: dict[str, float] = {}  # topic -> when it was found missing
        self._history_offsets: dict[int, int] = {}
        # Next inbox offset per owned partition: every transaction sends it for each partition it
        # writes for, so even a batch that consumed nothing (timers, retention) is fenced by the
        # group generation (KIP-447) once the partition has moved to another node.
        self._positions: dict[int, int] = {}
        self._stop = threading.Event()
        # Inbox records (partition, offset) whose outputs the producer refused, with why: when
        # re-read after the abort they are dead-lettered instead of handled again.
        self._refused: dict[tuple[int, int], str] = {}
        self._repairs: dict[int, list[bytes]] = {}  # partition -> history keys to repair
        # A dead letter copies its record, cut to fit what this node's producer may send.
        max_message = int(
            producer_config(settings.bootstrap_servers, extra=settings.client_extra()).get(
                "message.max.bytes", 1_000_000
            )
        )
        self._letter_max = min(DEAD_LETTER_MAX_BYTES, max_message - 16_384)
        self._last_retention = 0.0
        # Static membership: a node that restarts with the same node id takes its partitions
        # back at once instead of waiting for a rebalance. So one process per node id: the claim
        # refuses a second one before it could fence this one (membership.py).
        instance_id = f"{self._group}.{settings.node_id}"
        consumer_conf = consumer_config(
            settings.bootstrap_servers,
            self._group,
            extra={"group.instance.id": instance_id, **settings.client_extra()},
        )
        self._claim = NodeClaim(self._state_root, self._group, instance_id)
        consumer_conf["client.id"] = self._claim.acquire(
            admin_config(settings.bootstrap_servers, extra=settings.client_extra()),
            int(consumer_conf["session.timeout.ms"]) / 1000,
        )
        self._consumer = Consumer(consumer_conf)
        self._calls = DeadlineCaller(f"txn-{settings.node_id}")
        self._producer = self._new_producer()

    # ----------------------------------------------------------------- lifecycle

    def _new_producer(self) -> Producer:
        """A transactional producer whose init_transactions went through: it aborts what a
        previous incarnation left open. Waits out a broker that is away; a producer whose
        init failed or hung is let go and the next try starts with a new one."""
        conf = producer_config(
            self.settings.bootstrap_servers,
            transactional_id=self._txn_id,
            extra=self.settings.client_extra(),
        )

        def attempt() -> Producer:
            self._brokers_lost = False
            producer = Producer({**conf, "error_cb": self._on_producer_error})
            try:
                self._calls.call(
                    "init_transactions",
                    lambda: producer.init_transactions(_INIT_CALL_S),
                    2 * _INIT_CALL_S,
                    self._stop.is_set,
                )
            except (KafkaException, Wedged):
                drop_in_background([producer])
                raise
            return producer

        return self._retrying("init_transactions", attempt)

    def _replace_producer(self, why: str) -> None:
        """A new producer with the same transactional id: its init_transactions fences the old
        one and settles whatever transaction that one left open."""
        log.warning("replacing the producer: %s", why)
        drop_in_background([self._producer])
        self._producer = self._new_producer()

    def _on_producer_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # After the broker comes back, this producer's first send_offsets_to_transaction was
            # seen to hang until its deadline (librdkafka 5456): start the next batch on a new one.
            self._brokers_lost = True

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call`` until it succeeds: a broker that restarts answers NOT_COORDINATOR, times out
        or is unreachable for a while, and the node must outlast that rather than exit. Fatal
        errors (fenced, unsupported) go up at once; so does a stop request."""
        delay = 0.1
        while True:
            try:
                return call()
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or self._stop.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
            except Wedged as exc:
                if self._stop.is_set():
                    raise
                log.warning("%s; retrying in %.1fs", exc, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._consumer.subscribe(
            [self.settings.inbox],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        try:
            while not stop.is_set():
                self.step()
        except Stopping as exc:
            log.info("%s", exc)  # whatever was in flight is redone by the next owner
        finally:
            self.close()

    def close(self) -> None:
        self._calls.close()
        with contextlib.suppress(RuntimeError):  # closed already
            self._consumer.close()
        for part in self._partitions.values():
            part.close()
        self._partitions.clear()
        self._claim.release()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Only note them: restoring is long work for the loop, not for librdkafka's callback.
        self._to_restore.update(tp.partition for tp in partitions)
        if self.health is not None:  # health (#8): ready again once _restore_assigned ran
            self.health.set_ready(not self._to_restore, "restoring assigned partitions")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._to_restore.discard(tp.partition)
            self._positions.pop(tp.partition, None)
            part = self._partitions.pop(tp.partition, None)
            if part is not None:
                part.close()
            if self.metrics is not None:
                self.metrics.forget_partition(tp.partition)
        if self.metrics is not None:  # health (#8)
            self.metrics.owned_partitions(len(self._partitions))

    def _restore_assigned(self) -> None:
        # The committed offsets first: under read_committed this fetch waits for a transaction
        # of the previous owner that still holds offsets for these partitions (KIP-447), so the
        # history read below cannot stop short of events that such a transaction commits.
        numbers = sorted(self._to_restore)
        committed = self._retrying(
            "fetching committed inbox offsets",
            lambda: self._consumer.committed(
                [TopicPartition(self.settings.inbox, n) for n in numbers], timeout=30
            ),
        )
        for tp in committed:
            self._positions[tp.partition] = tp.offset if tp.offset >= 0 else self._low(tp)
        parts = [
            Partition(number, self._state_root / f"p{number}", self.registry)
            for number in sorted(self._to_restore)
        ]
        reports = restore_partitions(
            parts, self.settings.bootstrap_servers, self.settings.history, f"{self._group}.restore"
        )
        for part, report in zip(parts, reports, strict=True):
            self.counters.restores.append(report)
            if report.skipped_keys:
                self._repairs[part.number] = list(report.skipped_keys)
            if self.metrics is not None:
                self.metrics.restored(report.events, report.seconds)
            self._partitions[part.number] = part
        self._to_restore.clear()
        if self.metrics is not None:  # health (#8)
            self.metrics.owned_partitions(len(self._partitions))
        if self.health is not None:  # health (#8)
            self.health.set_ready(True)

    def _low(self, tp: TopicPartition) -> int:
        """Where a partition with no committed offset starts (auto.offset.reset=earliest)."""
        low, _high = self._retrying(
            "reading inbox watermarks",
            lambda: self._consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=30
            ),
        )
        return int(low)

    # ----------------------------------------------------------------- one turn of the loop

    def step(self) -> None:
        msgs = self._next_records()
        if self._to_restore:
            self._restore_assigned()
        batch = Batch()
        now = now_ms()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise NodeStopped(_fatal_reason(err))
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("inbox consumer error: %s", err)
                continue
            self._handle(msg, batch, now)
        self._fire_timers(batch, now)
        self._expire_finished(batch, now)
        self._repair_history(batch)
        if batch:
            self._commit(batch)
        if self.metrics is not None and time.monotonic() - self._last_lag >= 1.0:
            self._report_lag(self.metrics)
        if self.metrics is not None:  # health (#8): a lazy iterable; counted every few seconds
            self.metrics.count_workflows(p.store for p in self._partitions.values())
        if self.health is not None:  # health (#8)
            self.health.beat()

    def _report_lag(self, metrics: NodeMetrics) -> None:
        """Inbox lag per partition: the high watermark seen by the fetcher minus our position."""
        assigned = [TopicPartition(self.settings.inbox, p) for p in self._partitions]
        if not assigned:
            return
        reported = 0
        try:
            for tp in self._consumer.position(assigned):
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    metrics.lag(tp.partition, high - tp.offset)
                    reported += 1
        except KafkaException as exc:
            log.debug("inbox lag not known: %s", exc)
        if reported == len(assigned):
            # Until every partition has a position (a record was fetched), try again next turn.
            self._last_lag = time.monotonic()

    def _next_records(self) -> list[Message]:
        """One transaction's worth of input: wait for a first record (at most until the next
        timer is due), then gather more for up to ``commit_interval_ms`` or ``max_batch``.

        The interval trades step latency for fewer, larger transactions (each commit costs a
        few ms of broker round trips); 0 takes only what has already arrived.
        """
        first = self._consumer.poll(self._poll_timeout())
        if first is None:
            return []
        records = [first]
        deadline = time.monotonic() + self.settings.commit_interval_ms / 1000
        while len(records) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            more = self._consumer.consume(
                num_messages=self.settings.max_batch - len(records), timeout=max(0.0, remaining)
            )
            records.extend(more)
            if remaining <= 0 or not more:
                break
        return records

    def _poll_timeout(self) -> float:
        dues = [d for d in (p.next_due_ms() for p in self._partitions.values()) if d is not None]
        wait_ms = _IDLE_POLL_MS
        if dues:
            wait_ms = min(wait_ms, max(0, min(dues) - now_ms()))
        return wait_ms / 1000

    # ----------------------------------------------------------------- inbox records

    def _handle(self, msg: Message, batch: Batch, now: int) -> None:
        number, offset = msg.partition() or 0, msg.offset() or 0
        batch.offsets[number] = offset + 1
        part = self._partitions.get(number)
        if part is None:  # revoked in the middle of a poll: the new owner will process it
            batch.offsets.pop(number, None)
            return
        refused = self._refused.pop((number, offset), None)
        if refused is not None:
            # What this record led to was refused by the producer (batch aborted): park the
            # record itself, so the partition moves on and the input is not lost; a start gets
            # its FAILED result, so whoever waits for it is not left waiting.
            start = _as_start(msg.value())
            if start is not None:
                return self._reject(batch, msg, start, "ProduceFailed", refused)
            return self._dead_letter(batch, msg, refused, "ProduceFailed")
        first = len(batch.outputs)
        self._decide(part, msg, batch, now)
        for out in batch.outputs[first:]:
            out.source = (number, offset)

    def _decide(self, part: Partition, msg: Message, batch: Batch, now: int) -> None:
        value = msg.value()
        if value is None:
            return self._dead_letter(batch, msg, "the inbox record has no value", "EmptyRecord")
        if len(value) > MAX_RECORD_BYTES:
            return self._dead_letter(
                batch, msg, f"record of {len(value)} bytes exceeds {MAX_RECORD_BYTES}", "Oversized"
            )
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
        self, part: Partition, msg_env: StartWorkflow, batch: Batch, msg: Message, now: int
    ) -> None:
        wf = msg_env.workflow_id
        existing = part.get(wf)
        if existing is not None:
            state = existing.run.state
            if state.workflow_type == msg_env.workflow_type and state.input == msg_env.input:
                return  # the same start again: the workflow that runs is the answer
            return self._reject(
                batch, msg, msg_env, "WorkflowIdConflict",
                f"workflow {wf} exists as {state.workflow_type} with other input",
            )  # fmt: skip
        definition = self.registry.get(msg_env.workflow_type)
        if definition is None:
            return self._reject(
                batch, msg, msg_env, "UnknownWorkflowType",
                f"unknown workflow type {msg_env.workflow_type!r}; this node runs: "
                + ", ".join(self.registry.names()),
            )  # fmt: skip
        try:
            from_payload(msg_env.input, definition.input_type)
        except PayloadError as exc:
            return self._reject(batch, msg, msg_env, "InvalidInput", str(exc))
        cached = part.new(wf)
        trace = msg_env.trace
        if self.tracer is not None:
            trace = self.tracer.root(msg_env.workflow_type, wf, trace, now)
        events = cached.run.start(msg_env, now, trace)
        self.counters.started += 1
        if self.metrics is not None:
            self.metrics.workflows_started.inc()
        self._record(part, cached, events, batch, now)

    def _reject(
        self, batch: Batch, msg: Message, start: StartWorkflow, error_type: str, reason: str
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
            _Out(self.settings.results, start.workflow_id.encode(), codec.encode(result))
        )

    def _on_reply(
        self, part: Partition, reply: ActivityReply, batch: Batch, msg: Message, now: int
    ) -> None:
        cached = part.get(reply.workflow_id)
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
        msg: Message,
        now: int,
    ) -> None:
        wf = envelope.workflow_id
        kind = "signal" if isinstance(envelope, SignalWorkflow) else "cancel"
        cached = part.get(wf)
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

    # ----------------------------------------------------------------- timers and retention

    def _fire_timers(self, batch: Batch, now: int) -> None:
        budget = self.settings.max_batch
        for part in list(self._partitions.values()):
            while budget > 0 and (wf := part.pop_due(now)) is not None:
                budget -= 1
                try:
                    cached = part.get(wf)
                    if cached is None:
                        continue
                    events = cached.run.on_timers(now)
                except NonDeterminismError as exc:
                    log.error("timer of %s not fired: %s", wf, exc)
                    part.forget(wf)
                    continue
                self._record(part, cached, events, batch, now)

    def _repair_history(self, batch: Batch) -> None:
        """Undo records on the history topic that no node wrote (restore skipped them): the key
        of an event we hold gets that event again (compaction keeps the latest value), any other
        key a tombstone, so compaction removes them and no later restore meets them."""
        for number in list(self._repairs):
            part = self._partitions.get(number)
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
                batch.outputs.append(_Out(self.settings.history, key, value, number))
            batch.store(number)  # the transaction carries this partition's fencing offset

    def _expire_finished(self, batch: Batch, now: int) -> None:
        """Tombstone the history of workflows that finished longer ago than the retention."""
        if time.monotonic() - self._last_retention < 5.0:
            return
        self._last_retention = time.monotonic()
        cutoff = now - self.settings.retention_ms
        for part in self._partitions.values():
            for summary in part.store.summaries():
                if summary.finished_at_ms is None or summary.finished_at_ms > cutoff:
                    continue
                wf = summary.workflow_id
                for seq in range(1, summary.last_seq + 1):
                    batch.outputs.append(
                        _Out(self.settings.history, f"{wf}/{seq}".encode(), None, part.number)
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
            batch.outputs.append(_Out(self.settings.history, key, encoded, part.number))
            store.add_event(event, encoded)
            body = event.event
            if isinstance(body, ActivityScheduled | ActivityAttemptStarted):
                self._send_command(part, cached, body.seq, batch, now)
            elif isinstance(body, WorkflowCompleted | WorkflowFailed):
                self._send_result(cached, batch)
            elif self.metrics is not None and isinstance(
                body, ActivityCompleted | ActivityFailed | ActivityAttemptFailed
            ):
                act = run.state.activities.get(body.seq)
                if act is not None and act.attempt == body.attempt:
                    seconds = (event.recorded_at_ms - act.attempt_started_ms) / 1000
                    self.metrics.step(act.name, body.kind, seconds)
        batch.touched[(part.number, run.state.workflow_id)] = cached

    def _send_command(
        self, part: Partition, cached: Cached, seq: int, batch: Batch, now: int
    ) -> None:
        run = cached.run
        act = run.state.activities[seq]
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
        )
        if self.tracer is not None:  # the command's own span: the service's span is its child
            command = command.model_copy(update={"trace": self.tracer.command(command, act.topic)})
        if self.metrics is not None:
            self.metrics.attempt(act.name, act.is_compensation)
        headers = headers_of(command.trace)
        batch.outputs.append(
            _Out(act.topic, run.state.workflow_id.encode(), codec.encode(command), None, headers)
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
            _Out(self.settings.results, state.workflow_id.encode(), codec.encode(result))
        )

    def _forward(self, batch: Batch, msg: Message, value: bytes, wf: str, home: int) -> None:
        """A record on another partition than its workflow's (a null key, or a key other than
        its workflow id): handled there would split the workflow's history from its replies,
        so it goes, in this transaction, to the partition that owns the workflow."""
        self.counters.forwarded += 1
        log.warning(
            "inbox record %s[%s]@%s for workflow %s belongs on partition %d (key %r): forwarded",
            msg.topic(), msg.partition(), msg.offset(), wf, home, (msg.key() or b"")[:80],
        )  # fmt: skip
        headers: list[tuple[str, str | bytes | None]] = [
            (h[0], h[1]) for h in msg.headers() or [] if h[0] in _FORWARDED_HEADERS
        ]
        batch.outputs.append(_Out(self.settings.inbox, wf.encode(), value, home, headers or None))

    def _dead_letter(self, batch: Batch, msg: Message, reason: str, error_type: str) -> None:
        self.counters.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_letters.inc()
        log.warning(
            "dead letter from %s[%s]@%s: %s", msg.topic(), msg.partition(), msg.offset(), reason
        )
        record = dead_letter_of(msg, reason, error_type, max_bytes=self._letter_max)
        batch.outputs.append(_Out(self.settings.dlq, record.key or b"", codec.encode(record)))

    def _topic_exists(self, topic: str) -> bool:
        """Whether a command topic exists: a yes is kept, a no is asked again after 5 s."""
        if topic in self._known_topics:
            return True
        missing_since = self._missing_topics.get(topic)
        if missing_since is not None and time.monotonic() - missing_since < 5.0:
            return False
        meta = self._consumer.list_topics(topic, timeout=10)
        found = meta.topics.get(topic)
        if found is not None and found.error is None and found.partitions:
            self._known_topics.add(topic)
            self._missing_topics.pop(topic, None)
            return True
        self._missing_topics[topic] = time.monotonic()
        return False

    # ----------------------------------------------------------------- the transaction

    def _commit(self, batch: Batch) -> None:
        """Make one batch durable. The order is what makes a crash anywhere harmless:

        1. Summarise every touched workflow (its timer index entry) into the store batches.
        2. Begin a Kafka transaction.
        3. Produce the history events (to the workflow's own partition), activity commands,
           results, dead letters and retention tombstones.
        4. Send the consumed inbox offsets to the transaction (KIP-447: with the consumer's
           group metadata, so a zombie from an older generation is fenced).
        5. Commit. A crash before this point aborts everything; the inbox is re-read.
        6. Only now write the events, summaries, timer index and the applied history offset to
           RocksDB, one batch per partition. A crash before this point loses only local state
           that the restore reads back from the history topic.
        """
        for (number, _wf), cached in batch.touched.items():
            part = self._partitions.get(number)
            if part is not None:
                part.summarize(cached, batch.store(number))
        self._history_offsets.clear()
        if self._brokers_lost:
            self._replace_producer("the brokers were unreachable since its last transaction")
        try:
            self._producer.begin_transaction()
            for out in batch.outputs:
                self._produce(out)
            offsets = self._fencing_offsets(batch)
            group = self._consumer.consumer_group_metadata()
            producer = self._producer
            self._calls.call(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(offsets, group, _TXN_CALL_S),
                _CALL_DEADLINE_S,
                self._stop.is_set,
            )
            _crash_point(self.counters.transactions)
            self._calls.call(
                "commit_transaction",
                lambda: producer.commit_transaction(_TXN_CALL_S),
                _CALL_DEADLINE_S,
                self._stop.is_set,
            )
        except _Refused as refused:
            self._on_refused(refused)
            self._abort(refused.error)
            return
        except (KafkaException, Wedged) as exc:
            self._abort(exc)
            return
        # A Stopping from a call above goes up to run(): the batch is not written locally, and
        # the next owner settles the transaction (init_transactions) and re-reads its input.
        self.counters.transactions += 1
        self._positions.update(batch.offsets)
        if self.tracer is not None:
            self.tracer.committed()
        if self.metrics is not None:
            self.metrics.transactions.labels(result="committed").inc()
        self._producer.poll(0)  # serve delivery reports: they carry the history offsets
        for number, store_batch in batch.stores.items():
            part = self._partitions.get(number)
            if part is None:
                continue
            if number in self._history_offsets:
                store_batch.checkpoint = self._history_offsets[number] + 1
            part.store.write(store_batch)
        for number, wf in batch.removed:
            part = self._partitions.get(number)
            if part is not None:
                part.forget(wf)
        for (number, wf), cached in batch.touched.items():
            part = self._partitions.get(number)
            if part is not None and cached.run.finished:
                # A finished workflow rarely hears anything again (a late reply, a repeated
                # start): it is replayed from the store then. Keeping thousands of them cached
                # made every full garbage collection a long pause (docs/performance.md).
                part.forget(wf)

    def _fencing_offsets(self, batch: Batch) -> list[TopicPartition]:
        """The inbox offsets this transaction commits: what it consumed, and for every other
        partition it writes for, the current position again. The group coordinator refuses
        them from a member of an older generation, which aborts the transaction: a node that
        lost a partition (paused past its session timeout, cut off) cannot write for it."""
        offsets = dict.fromkeys(batch.stores, -1) | batch.offsets
        return [
            TopicPartition(self.settings.inbox, p, o if o >= 0 else self._positions[p])
            for p, o in sorted(offsets.items())
            if o >= 0 or p in self._positions
        ]

    def _produce(self, out: _Out) -> None:
        on_delivery = self._on_history_delivery if out.topic == self.settings.history else None
        while True:
            try:
                self._producer.produce(
                    out.topic,
                    value=out.value,
                    key=out.key,
                    partition=-1 if out.partition is None else out.partition,
                    on_delivery=on_delivery,
                    headers=out.headers,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: let it drain
            except KafkaException as exc:
                raise _Refused(out, exc) from exc

    def _on_refused(self, refused: _Refused) -> None:
        out, error = refused.out, refused.error.args[0]
        what = (
            f"{out.topic} record of {len(out.value or b'')} bytes refused by the producer: {error}"
        )
        if out.source is None:
            # Timers and retention make records of bounded size (inputs are capped at
            # MAX_RECORD_BYTES); a refusal here is a bug or a broker limit set too low.
            log.error("%s (from a timer or retention)", what)
            return
        log.error("%s; its input %s[%d]@%d goes to the DLQ", what, self.settings.inbox, *out.source)
        self._refused[out.source] = what

    def _on_history_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            number, offset = msg.partition() or 0, msg.offset() or 0
            if offset > self._history_offsets.get(number, -1):
                self._history_offsets[number] = offset

    def _abort(self, exc: KafkaException | Wedged) -> None:
        """Undo a failed batch: abort, forget what it changed in memory, rewind the inbox."""
        error: KafkaError | None = exc.args[0] if isinstance(exc, KafkaException) else None
        self.counters.aborted_transactions += 1
        if self.tracer is not None:
            self.tracer.aborted()
        if self.metrics is not None:
            self.metrics.transactions.labels(result="aborted").inc()
        log.warning("transaction failed (%s); aborting and re-reading the inbox", error or exc)
        if error is not None and error.code() in _FENCED:
            # Another process took this node's transactional id: a second node with the same
            # SAGA_NODE_ID. A new producer would fence that one in turn, and so on for ever.
            raise NodeStopped(_fatal_reason(error))
        if error is None or error.fatal():
            self._replace_producer(str(exc))
        else:
            producer = self._producer
            try:
                self._calls.call(
                    "abort_transaction",
                    lambda: producer.abort_transaction(_TXN_CALL_S),
                    _CALL_DEADLINE_S,
                    self._stop.is_set,
                )
            except (KafkaException, Wedged) as abort_exc:
                self._replace_producer(f"abort failed ({abort_exc})")
        for part in self._partitions.values():
            part.forget_all()
            part.reload_timers()
        assigned = [TopicPartition(self.settings.inbox, p) for p in self._partitions]
        if assigned:
            committed = self._retrying(
                "fetching committed inbox offsets",
                lambda: self._consumer.committed(assigned, timeout=30),
            )
            for tp in committed:
                position = tp.offset if tp.offset >= 0 else self._low(tp)
                self._positions[tp.partition] = position
                with contextlib.suppress(KafkaException):  # revoked meanwhile: nothing to read
                    self._consumer.seek(TopicPartition(tp.topic, tp.partition, position))
