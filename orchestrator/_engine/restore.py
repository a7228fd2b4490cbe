"""Bring a partition's local store up to the end of its history partition.

Runs from the processing loop (never inside a rebalance callback) before any inbox record of
the partition is processed. Starts at the store's checkpoint, or at the beginning when there is
no local state; applying an event is idempotent by its sequence number, so reading some events
twice is harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from contracts import codec
from contracts.codec import CodecError, UnknownSchema
from contracts.envelopes import HistoryEvent
from orchestrator.errors import NodeStopped
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
    skipped: int = 0  # records that are not this workflow's next event: counted, logged, passed
    skipped_keys: tuple[bytes, ...] = ()  # of records that are no history event at all
    rebuilt: bool = False  # the local state did not fit the topic and was rebuilt from scratch

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class _Gap(Exception):
    """An event that does not follow its workflow's last one: local state and topic disagree."""


class _Restorer:
    def __init__(self, part: Partition, from_scratch: bool) -> None:
        self.part = part
        self.from_scratch = from_scratch
        self.skipped = 0
        self.skipped_keys: list[bytes] = []
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

    def apply(self, key: bytes, value: bytes | None, where: str) -> None:
        """Fold one history record in. Raises :class:`_Gap` when an event does not follow and
        the store was restored from a checkpoint (it, not the topic, is then suspect)."""
        workflow_id, _, seq = key.decode(errors="replace").rpartition("/")
        if not workflow_id or not seq.isdigit():
            self.skipped_keys.append(key)
            return self.skip(where, f"key {key[:80]!r} is not <workflow id>/<seq>")
        if value is None:
            self.tombstones += 1
            if workflow_id not in self.batch.removed:
                state = self.state(workflow_id)
                if state.status is None:
                    # Nothing held under this id (an earlier run's key, its event compacted).
                    self.states.pop(workflow_id, None)
                    return
                if int(seq) < state.run_start_seq:
                    # An event of a run before the current one (continue-as-new, id reuse):
                    # only the old run's events go.
                    self.batch.truncate(workflow_id, state.run_start_seq)
                    return
            # Retention tombstoned this finished workflow: its events go, one key at a time.
            if workflow_id not in self.batch.removed:
                self.state(workflow_id)  # learn its timer entry, if any
                self.batch.remove_workflow(workflow_id, 1 << 40, self.old_due.get(workflow_id))
                self.states.pop(workflow_id, None)
            return
        try:
            event = codec.decode_as(value, HistoryEvent)
        except UnknownSchema as exc:
            # Most likely a newer release's event kind (a rolling deploy moved the partition to
            # an older node): skipping it would fold a truncated history and write over it, and
            # "repairing" it would delete it. This node must not own the partition.
            raise NodeStopped(
                f"{where}: a history record of a schema this node does not know ({exc}); it was "
                "written by a newer release (run that release on every node) or by a foreign "
                "producer"
            ) from exc
        except CodecError as exc:
            self.skipped_keys.append(key)
            return self.skip(where, f"not a history event ({exc})")
        if (event.workflow_id, event.event_seq) != (workflow_id, int(seq)):
            self.skipped_keys.append(key)
            return self.skip(where, f"key {key[:80]!r} does not name its event")
        state = self.state(event.workflow_id)
        if event.event_seq <= state.last_seq:
            return
        if event.event_seq != state.last_seq + 1 and not state.begins_run(event):
            if not self.from_scratch:
                raise _Gap(f"{where}: {workflow_id} event {event.event_seq} after {state.last_seq}")
            return self.skip(where, f"{workflow_id} event {event.event_seq} after {state.last_seq}")
        state.apply(event)
        self.batch.add_event(event, value)
        self.events += 1

    def skip(self, where: str, reason: str) -> None:
        # A record no writer of ours makes (a forged or foreign producer): restoring must not
        # die on it, or the partition could never be owned again.
        self.skipped += 1
        log.error("history record %s skipped: %s", where, reason)

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
    client_extra: Mapping[str, Any] | None = None,
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
    # The node's security settings: without them a secured cluster never answers the reader,
    # and the restore would wait out its timeout with nothing logged.
    extra = dict(client_extra or {})
    reports, gaps = _restore(parts, bootstrap, history_topic, group, began + timeout_s, extra)
    if gaps:
        for part in gaps:
            part.reset_store()
        again, _ = _restore(gaps, bootstrap, history_topic, group, began + timeout_s, extra)
        reports = [r for r in reports if r.partition not in {p.number for p in gaps}]
        reports += [dataclasses.replace(r, rebuilt=True) for r in again]
    seconds = time.monotonic() - began
    reports = sorted(
        (dataclasses.replace(r, seconds=seconds) for r in reports), key=lambda r: r.partition
    )
    for part in parts:
        part.reload_timers()
    for report in reports:
        log.info(
            "restored %s[%d]: %d events, %d tombstones%s%s in %.2fs",
            history_topic, report.partition, report.events, report.tombstones,
            f", {report.skipped} records skipped" if report.skipped else "",
            " (rebuilt from the beginning)" if report.rebuilt else "", seconds,
        )  # fmt: skip
    return reports


def _restore(
    parts: list[Partition],
    bootstrap: str,
    history_topic: str,
    group: str,
    deadline: float,
    extra: dict[str, Any],
) -> tuple[list[RestoreReport], list[Partition]]:
    """One pass over ``parts``; returns the reports of those restored and the partitions whose
    local state disagreed with the topic (to be rebuilt from the beginning)."""
    by_number = {part.number: part for part in parts}
    restorers = {p.number: _Restorer(p, p.store.checkpoint() is None) for p in parts}
    gaps: list[Partition] = []
    next_offsets: dict[int, int | None] = {p.number: p.store.checkpoint() for p in parts}
    pending = dict.fromkeys(by_number, 0)
    done: set[int] = set()
    reader = Consumer(
        consumer_config(bootstrap, group, extra={**extra, "enable.partition.eof": True})
    )
    try:
        reader.assign(
            [
                TopicPartition(history_topic, n, OFFSET_BEGINNING if o is None else o)
                for n, o in next_offsets.items()
            ]
        )
        while len(done) < len(parts):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"restoring {history_topic} partitions {sorted(set(by_number) - done)} "
                    "took too long"
                )
            for msg in _next(reader):
                number = msg.partition() or 0
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    done.add(number)
                    continue
                if number in done:
                    continue  # given up on above: it is rebuilt from the beginning next
                where = f"{history_topic}[{number}]@{msg.offset()}"
                try:
                    restorers[number].apply(msg.key() or b"", msg.value(), where)
                except _Gap as gap:
                    log.warning("%s; rebuilding the partition from the beginning", gap)
                    gaps.append(by_number[number])
                    done.add(number)
                    continue
                next_offsets[number] = (msg.offset() or 0) + 1
                pending[number] += 1
                if pending[number] >= _FLUSH_EVERY:
                    restorers[number].flush(next_offsets[number])
                    pending[number] = 0
        for number, restorer in restorers.items():
            if by_number[number] not in gaps:
                restorer.flush(next_offsets[number])
    finally:
        reader.close()
    reports = [
        RestoreReport(number, r.events, r.tombstones, 0.0, r.skipped, tuple(r.skipped_keys))
        for number, r in restorers.items()
        if by_number[number] not in gaps
    ]
    return reports, gaps


def _drop_if_stale(part: Partition, history_topic: str) -> None:
    """A checkpoint older than the history's ``delete.retention.ms`` may have missed tombstones
    that compaction has since removed: catching up from it would keep expired workflows forever.
    Such a partition is rebuilt from the beginning instead; so is a store of an older layout
    (``store.LAYOUT``)."""
    if not part.store.layout_current():
        # Written by an older release: its summaries lack what the visibility index needs.
        log.warning(
            "%s[%d]: local state of an older layout; rebuilding it from the topic",
            history_topic, part.number,
        )  # fmt: skip
        part.reset_store()
        return
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
