"""Bring a partition's local store up to the end of its history partition.

Runs from the processing loop (never inside a rebalance callback) before any inbox record of
the partition is processed. Starts at the store's checkpoint, or at the beginning when there is
no local state; applying an event is idempotent by its sequence number, so reading some events
twice is harmless.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from contracts import codec
from contracts.envelopes import HistoryEvent
from orchestrator.kafka_config import consumer_config
from orchestrator.topics import HISTORY_DELETE_RETENTION_MS

from .partition import Partition
from .state import WorkflowState, fold
from .store import StoreBatch, WorkflowSummary

log = logging.getLogger(__name__)

_FLUSH_EVERY = 5_000


@dataclass(frozen=True)
class RestoreReport:
    partition: int
    events: int
    tombstones: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class _Restorer:
    def __init__(self, part: Partition) -> None:
        self.part = part
        self.states: dict[str, WorkflowState] = {}
        self.old_due: dict[str, int | None] = {}
        self.batch = StoreBatch()
        self.events = 0
        self.tombstones = 0

    def state(self, workflow_id: str) -> WorkflowState:
        state = self.states.get(workflow_id)
        if state is None:
            state = fold(workflow_id, self.part.store.events(workflow_id))
            summary = self.part.store.summary(workflow_id)
            self.old_due[workflow_id] = summary.next_due_ms if summary else None
            self.states[workflow_id] = state
        return state

    def apply(self, key: bytes, value: bytes | None) -> None:
        workflow_id = key.decode().rpartition("/")[0]
        if value is None:
            # Retention tombstoned this finished workflow: its events go, one key at a time.
            self.tombstones += 1
            if workflow_id not in self.batch.removed:
                self.state(workflow_id)  # learn its timer entry, if any
                self.batch.remove_workflow(workflow_id, 1 << 40, self.old_due.get(workflow_id))
                self.states.pop(workflow_id, None)
            return
        event = codec.decode_as(value, HistoryEvent)
        state = self.state(event.workflow_id)
        if event.event_seq <= state.last_seq:
            return
        state.apply(event)
        self.batch.add_event(event, value)
        self.events += 1

    def flush(self, next_offset: int | None) -> None:
        for workflow_id, state in self.states.items():
            summary = WorkflowSummary.of(state)
            self.batch.set_summary(summary, self.old_due.get(workflow_id))
            self.old_due[workflow_id] = summary.next_due_ms
        self.batch.checkpoint = next_offset
        if self.batch:
            self.part.store.write(self.batch)
        self.batch = StoreBatch()
        self.states.clear()


def restore_partitions(
    parts: list[Partition],
    bootstrap: str,
    history_topic: str,
    group: str,
    timeout_s: float = 300.0,
) -> list[RestoreReport]:
    """Restore every partition in ``parts`` at once, with one consumer.

    Each starts at its checkpoint (or the beginning) and is done at its end of partition, which
    under ``read_committed`` is the last stable offset captured by the fetcher.
    """
    if not parts:
        return []
    began = time.monotonic()
    for part in parts:
        _drop_if_stale(part, history_topic)
    by_number = {part.number: part for part in parts}
    restorers = {part.number: _Restorer(part) for part in parts}
    next_offsets: dict[int, int | None] = {p.number: p.store.checkpoint() for p in parts}
    pending = dict.fromkeys(by_number, 0)
    done: set[int] = set()
    reader = Consumer(consumer_config(bootstrap, group, extra={"enable.partition.eof": True}))
    try:
        reader.assign(
            [
                TopicPartition(history_topic, n, OFFSET_BEGINNING if o is None else o)
                for n, o in next_offsets.items()
            ]
        )
        deadline = began + timeout_s
        while len(done) < len(parts):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"restoring {history_topic} partitions {sorted(set(by_number) - done)} "
                    f"took over {timeout_s:.0f}s"
                )
            for msg in _next(reader):
                number = msg.partition() or 0
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    done.add(number)
                    continue
                restorers[number].apply(msg.key() or b"", msg.value())
                next_offsets[number] = (msg.offset() or 0) + 1
                pending[number] += 1
                if pending[number] >= _FLUSH_EVERY:
                    restorers[number].flush(next_offsets[number])
                    pending[number] = 0
        for number, restorer in restorers.items():
            restorer.flush(next_offsets[number])
    finally:
        reader.close()
    seconds = time.monotonic() - began
    reports = []
    for number, restorer in sorted(restorers.items()):
        by_number[number].reload_timers()
        report = RestoreReport(number, restorer.events, restorer.tombstones, seconds)
        log.info(
            "restored %s[%d]: %d events, %d tombstones in %.2fs",
            history_topic, number, report.events, report.tombstones, seconds,
        )  # fmt: skip
        reports.append(report)
    return reports


def _drop_if_stale(part: Partition, history_topic: str) -> None:
    """A checkpoint older than the history's ``delete.retention.ms`` may have missed tombstones
    that compaction has since removed: catching up from it would keep expired workflows forever.
    Such a partition is rebuilt from the beginning instead."""
    written = part.store.checkpoint_written_ms()
    if written is None and part.store.checkpoint() is None:
        return
    age_ms = int(time.time() * 1000) - (written or 0)
    if written is None or age_ms > HISTORY_DELETE_RETENTION_MS:
        log.warning(
            "%s[%d]: local state is from %s; rebuilding it from the topic",
            history_topic, part.number,
            "an unknown time" if written is None else f"{age_ms / 86_400_000:.1f} days ago",
        )  # fmt: skip
        part.reset_store()


def _next(reader: Consumer) -> list[Message]:
    """Wait briefly for one record, then take what else has arrived (never wait for a count)."""
    first = reader.poll(0.2)
    if first is None:
        return []
    return [first, *reader.consume(num_messages=5_000, timeout=0)]
