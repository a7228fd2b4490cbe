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


def test_a_stale_timer_of_an_uncached_workflow_is_skipped_and_a_current_one_fires(
    tmp_path: Path,
) -> None:
    """pop_due reads the store for a workflow not in the cache: its timer key tells a stale
    heap entry (a due time since moved, or a workflow since removed) from a current one."""
    part = Partition(0, tmp_path / "p0", WorkflowRegistry())
    _write(part.store, "wf-moved", fire_at=500)
    _write(part.store, "wf-current", fire_at=600)
    _write(part.store, "wf-removed", fire_at=550)
    part.reload_timers()  # the heap: 500 wf-moved, 550 wf-removed, 600 wf-current
    moved = StoreBatch()
    moved.set_summary(WorkflowSummary.of(fold("wf-moved", _events("wf-moved", 900))), 500)
    moved.remove_workflow("wf-removed", last_seq=2, due_ms=550)
    part.store.write(moved)

    assert part.pop_due(1_000) == "wf-current"  # 500 and 550 are stale: skipped
    assert part.pop_due(1_000) is None  # 900 was never pushed to this heap
    assert part.store.has_timer(900, "wf-moved") and not part.store.has_timer(500, "wf-moved")
    part.close()


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
