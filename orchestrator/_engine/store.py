"""A partition's local state in RocksDB: events, workflow summaries, the timer index, checkpoint.

One database per inbox/history partition, so a partition that moves to another node takes its
directory's worth of state with it and nothing else. The history topic is the changelog: this
store is written only after the Kafka transaction that produced the same events has committed,
together with the history offset it has applied, in one write batch.

Keys (raw bytes):
    e<workflow id>\\0<seq: 8 bytes BE>  -> the HistoryEvent (Avro, as on the topic)
    w<workflow id>                     -> the workflow's summary (JSON)
    t<due ms: 8 bytes BE><workflow id> -> b"" (the timer index)
    c                                  -> the next history offset to restore from (8 bytes BE)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rocksdict import WriteBatch

from contracts import codec
from contracts.envelopes import HistoryEvent
from orchestrator.local_db import open_local_db

from .state import WorkflowState

_CHECKPOINT = b"c"
# The status as ``write`` serialises it (json.dumps' default separators): a match costs a
# quarter of decoding the summary, which matters when every summary is counted.
_STATUS = re.compile(rb'"status": "([A-Za-z_]*)"')


@dataclass(frozen=True)
class WorkflowSummary:
    workflow_id: str
    workflow_type: str
    status: str
    last_seq: int
    next_due_ms: int | None
    finished_at_ms: int | None

    @classmethod
    def of(cls, state: WorkflowState) -> WorkflowSummary:
        return cls(
            workflow_id=state.workflow_id,
            workflow_type=state.workflow_type,
            status=_status(state),
            last_seq=state.last_seq,
            next_due_ms=state.next_due_ms(),
            finished_at_ms=state.finished_at_ms,
        )


def _status(state: WorkflowState) -> str:
    # BLOCKED and PARKED are no end states (the workflow is RUNNING, waiting for new code or
    # for an operator), but operators count them apart and alert on them.
    if not state.finished:
        if state.blocked is not None:
            return "BLOCKED"
        if state.parked:
            return "PARKED"
    return state.status.value if state.status else ""


def _event_prefix(workflow_id: str) -> bytes:
    return b"e" + workflow_id.encode() + b"\0"


def _event_key(workflow_id: str, seq: int) -> bytes:
    return _event_prefix(workflow_id) + seq.to_bytes(8, "big")


def _timer_key(due_ms: int, workflow_id: str) -> bytes:
    return b"t" + max(due_ms, 0).to_bytes(8, "big") + workflow_id.encode()


class StoreBatch:
    """Changes to apply in one RocksDB write: events, summaries, timer index, checkpoint."""

    def __init__(self) -> None:
        self.events: list[tuple[HistoryEvent, bytes]] = []
        self.summaries: dict[str, tuple[WorkflowSummary, int | None]] = {}  # new, old due
        self.removed: dict[str, tuple[int, int | None]] = {}  # workflow -> (last seq, due)
        self.checkpoint: int | None = None

    def add_event(self, event: HistoryEvent, encoded: bytes) -> None:
        self.events.append((event, encoded))

    def set_summary(self, summary: WorkflowSummary, previous_due_ms: int | None) -> None:
        earlier = self.summaries.get(summary.workflow_id)
        old_due = earlier[1] if earlier is not None else previous_due_ms
        self.summaries[summary.workflow_id] = (summary, old_due)

    def remove_workflow(self, workflow_id: str, last_seq: int, due_ms: int | None) -> None:
        self.removed[workflow_id] = (last_seq, due_ms)

    def __bool__(self) -> bool:
        return bool(self.events or self.summaries or self.removed or self.checkpoint is not None)


class PartitionStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_local_db(path)

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def destroy(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- reads

    def checkpoint(self) -> int | None:
        """The next history offset to restore from, if this store has applied any."""
        raw = self._db.get(_CHECKPOINT)
        return int.from_bytes(raw[:8], "big") if isinstance(raw, bytes) else None

    def checkpoint_written_ms(self) -> int | None:
        """When the checkpoint was last written (wall clock ms)."""
        raw = self._db.get(_CHECKPOINT)
        return (
            int.from_bytes(raw[8:16], "big") if isinstance(raw, bytes) and len(raw) >= 16 else None
        )

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self._db.items(from_key=prefix):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if not key.startswith(prefix):
                return
            yield key, value

    def events(self, workflow_id: str) -> list[HistoryEvent]:
        return [
            codec.decode_as(value, HistoryEvent)
            for _, value in self._scan(_event_prefix(workflow_id))
        ]

    def event_bytes(self, workflow_id: str, seq: int) -> bytes | None:
        """The stored encoding of one event, as the history topic holds it."""
        value = self._db.get(_event_key(workflow_id, seq))
        assert value is None or isinstance(value, bytes)
        return value

    def summary(self, workflow_id: str) -> WorkflowSummary | None:
        raw = self._db.get(b"w" + workflow_id.encode())
        return WorkflowSummary(**json.loads(raw)) if isinstance(raw, bytes) else None

    def summaries(self) -> Iterator[WorkflowSummary]:
        for _, value in self._scan(b"w"):
            yield WorkflowSummary(**json.loads(value))

    def status_counts(self) -> dict[str, int]:
        """How many workflows this store holds, by summary status."""
        counts: dict[str, int] = {}
        for _, value in self._scan(b"w"):
            match = _STATUS.search(value)
            status = match.group(1).decode() if match else str(json.loads(value)["status"])
            counts[status] = counts.get(status, 0) + 1
        return counts

    def timers(self) -> Iterator[tuple[int, str]]:
        """(due ms, workflow id) in due order."""
        for key, _ in self._scan(b"t"):
            yield int.from_bytes(key[1:9], "big"), key[9:].decode()

    # ----------------------------------------------------------------- the one write

    def write(self, batch: StoreBatch) -> None:
        wb = WriteBatch(raw_mode=True)
        for event, encoded in batch.events:
            wb.put(_event_key(event.workflow_id, event.event_seq), encoded)
        for summary, old_due in batch.summaries.values():
            wf = summary.workflow_id
            if old_due is not None and old_due != summary.next_due_ms:
                wb.delete(_timer_key(old_due, wf))
            if summary.next_due_ms is not None:
                wb.put(_timer_key(summary.next_due_ms, wf), b"")
            wb.put(b"w" + wf.encode(), json.dumps(vars(summary)).encode())
        for wf, (last_seq, due) in batch.removed.items():
            wb.delete_range(_event_key(wf, 0), _event_key(wf, last_seq + 1))
            if due is not None:
                wb.delete(_timer_key(due, wf))
            wb.delete(b"w" + wf.encode())
        if batch.checkpoint is not None:
            written = int(time.time() * 1000)
            wb.put(_CHECKPOINT, batch.checkpoint.to_bytes(8, "big") + written.to_bytes(8, "big"))
        self._db.write(wb)
