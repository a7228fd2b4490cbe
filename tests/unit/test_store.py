"""A partition's RocksDB store: events, summaries, the timer index, the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts import codec
from contracts.envelopes import HistoryEvent, Payload, TimerStarted, WorkflowStarted
from orchestrator._engine import restore
from orchestrator._engine.partition import Partition
from orchestrator._engine.state import fold
from orchestrator._engine.store import PartitionStore, StoreBatch, WorkflowSummary
from orchestrator.topics import HISTORY_DELETE_RETENTION_MS
from orchestrator.workflow import WorkflowRegistry


def _events(wf: str, fire_at: int) -> list[HistoryEvent]:
    started = WorkflowStarted(workflow_type="t", request_id="r", input=Payload(), random_seed=1)
    return [
        HistoryEvent(workflow_id=wf, event_seq=1, recorded_at_ms=10, event=started),
        HistoryEvent(
            workflow_id=wf,
            event_seq=2,
            recorded_at_ms=10,
            event=TimerStarted(seq=1, fire_at_ms=fire_at),
        ),
    ]


def _write(store: PartitionStore, wf: str, fire_at: int, old_due: int | None = None) -> None:
    batch = StoreBatch()
    events = _events(wf, fire_at)
    for event in events:
        batch.add_event(event, codec.encode(event))
    batch.set_summary(WorkflowSummary.of(fold(wf, events)), old_due)
    batch.checkpoint = 42
    store.write(batch)


def test_events_summaries_and_timers_are_written_in_one_batch(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "p0")
    _write(store, "wf-b", fire_at=500)
    _write(store, "wf-a", fire_at=900)
    assert [e.event_seq for e in store.events("wf-a")] == [1, 2]
    assert store.events("wf-a") == _events("wf-a", 900)
    assert [s.workflow_id for s in store.summaries()] == ["wf-a", "wf-b"]
    assert list(store.timers()) == [(500, "wf-b"), (900, "wf-a")]
    assert store.checkpoint() == 42


def test_a_moved_timer_replaces_its_index_entry_and_removal_clears_everything(
    tmp_path: Path,
) -> None:
    store = PartitionStore(tmp_path / "p0")
    _write(store, "wf", fire_at=500)
    batch = StoreBatch()
    summary = WorkflowSummary.of(fold("wf", _events("wf", 700)))
    batch.set_summary(summary, previous_due_ms=500)
    store.write(batch)
    assert list(store.timers()) == [(700, "wf")]
    removal = StoreBatch()
    removal.remove_workflow("wf", last_seq=2, due_ms=700)
    store.write(removal)
    assert (store.events("wf"), list(store.summaries()), list(store.timers())) == ([], [], [])


def test_a_checkpoint_older_than_the_tombstone_retention_rebuilds_the_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = Partition(0, tmp_path / "p0", WorkflowRegistry())
    _write(part.store, "wf", fire_at=500)
    assert part.store.checkpoint_written_ms() is not None
    restore._drop_if_stale(part, "ns.history")  # fresh: kept
    assert part.store.checkpoint() == 42

    later = part.store.checkpoint_written_ms() or 0
    monkeypatch.setattr("time.time", lambda: (later + HISTORY_DELETE_RETENTION_MS + 1_000) / 1000)
    restore._drop_if_stale(part, "ns.history")
    assert part.store.checkpoint() is None  # rebuilt from the start of the topic
    assert list(part.store.summaries()) == []
    part.close()
