"""The visibility index of a partition store: filtered, paginated lists and counts that read the
index keys, checked against a brute-force filter and sort of every summary."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import codec
from contracts.envelopes import HistoryEvent, Payload, TimerStarted, WorkflowStarted
from orchestrator._engine import restore
from orchestrator._engine.partition import Partition
from orchestrator._engine.state import fold
from orchestrator._engine.store import PartitionStore, StoreBatch, WorkflowSummary
from orchestrator.visibility import (
    ListQuery,
    OwnedStores,
    QueryError,
    VisibilityApi,
    WorkflowCounts,
    WorkflowDetail,
    WorkflowPage,
    count_stores,
    list_stores,
)
from orchestrator.workflow import WorkflowRegistry

_STATUSES = ("RUNNING", "BLOCKED", "COMPLETED", "PARKED")
_TYPES = ("order", "refund")


def _summary(wf: str, status: str, kind: str, started: int) -> WorkflowSummary:
    return WorkflowSummary(
        workflow_id=wf,
        workflow_type=kind,
        status=status,
        last_seq=3,
        next_due_ms=None,
        finished_at_ms=None if status in ("RUNNING", "BLOCKED") else started + 5,
        started_at_ms=started,
        updated_at_ms=started + 5,
    )


_workflow = st.tuples(
    st.text("ab/", min_size=1, max_size=4),  # ids that share prefixes, with a '/' in some
    st.sampled_from(_STATUSES),
    st.sampled_from(_TYPES),
    st.integers(0, 6),  # few start times: ties are the rule, ordered by id
    st.integers(0, 2),  # the partition
)


def _brute(rows: dict[str, tuple[WorkflowSummary, int]], q: ListQuery) -> list[str]:
    kept = [
        s
        for s, _ in rows.values()
        if (not q.statuses or s.status in q.statuses)
        and (not q.types or s.workflow_type in q.types)
        and (q.since_ms is None or s.started_at_ms >= q.since_ms)
        and (q.until_ms is None or s.started_at_ms <= q.until_ms)
        and s.workflow_id.startswith(q.prefix)
    ]
    return [s.workflow_id for s in sorted(kept, key=lambda s: s.position.sort_key)]


@settings(max_examples=40, deadline=None)
@given(
    first=st.lists(_workflow, max_size=25),
    changes=st.lists(_workflow, max_size=10),
    removed=st.lists(st.text("ab/", min_size=1, max_size=4), max_size=5),
    statuses=st.lists(st.sampled_from(_STATUSES), max_size=2, unique=True),
    types=st.lists(st.sampled_from(_TYPES), max_size=2, unique=True),
    since=st.none() | st.integers(0, 6),
    until=st.none() | st.integers(0, 6),
    prefix=st.sampled_from(["", "a", "b/", "ab"]),
    limit=st.integers(1, 7),
)
def test_a_paginated_filtered_list_is_a_filter_and_sort_of_every_summary(
    first: list[tuple[str, str, str, int, int]],
    changes: list[tuple[str, str, str, int, int]],
    removed: list[str],
    statuses: list[str],
    types: list[str],
    since: int | None,
    until: int | None,
    prefix: str,
    limit: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores = [(n, PartitionStore(Path(tmp) / f"p{n}")) for n in range(3)]
        rows: dict[str, tuple[WorkflowSummary, int]] = {}
        # Written in three batches: new workflows, changed ones (a status, a type, even the
        # start time moves: the index must follow), and removals (retention).
        for batch_rows in (first, changes):
            batches = {n: StoreBatch() for n, _ in stores}
            for wf, status, kind, started, number in batch_rows:
                number = rows[wf][1] if wf in rows else number  # a workflow keeps its partition
                summary = _summary(wf, status, kind, started)
                batches[number].set_summary(summary, None)
                rows[wf] = (summary, number)
            for n, store in stores:
                store.write(batches[n])
        removals = {n: StoreBatch() for n, _ in stores}
        for wf in removed:
            if wf in rows:
                removals[rows.pop(wf)[1]].remove_workflow(wf, 3, None)
        for n, store in stores:
            store.write(removals[n])

        query = ListQuery.build(
            status=statuses, type=types, since_ms=since, until_ms=until, prefix=prefix, limit=limit
        )
        listed: list[str] = []
        for _ in range(60):
            page = list_stores(stores, query)
            assert len(page.items) <= limit
            for item in page.items:
                assert rows[item.workflow_id][1] == item.partition
                assert item.status == rows[item.workflow_id][0].status
            listed += [item.workflow_id for item in page.items]
            if page.next_cursor is None:
                break
            query = query.model_copy(update={"cursor": page.next_cursor})
        assert listed == _brute(rows, query)

        expected: dict[tuple[str, str], int] = {}
        for s, _ in rows.values():
            expected[(s.status, s.workflow_type)] = expected.get((s.status, s.workflow_type), 0) + 1
        assert count_stores(stores) == WorkflowCounts.of(expected, [0, 1, 2])
        for _, store in stores:
            store.close()


def _history(wf: str) -> list[HistoryEvent]:
    started = WorkflowStarted(workflow_type="order", request_id="r", input=Payload(), random_seed=1)
    return [
        HistoryEvent(workflow_id=wf, event_seq=1, recorded_at_ms=1_000, event=started),
        HistoryEvent(
            workflow_id=wf,
            event_seq=2,
            recorded_at_ms=1_200,
            event=TimerStarted(seq=1, fire_at_ms=9_000),
        ),
    ]


def _store_with(path: Path, *workflow_ids: str) -> PartitionStore:
    store = PartitionStore(path)
    batch = StoreBatch()
    for wf in workflow_ids:
        events = _history(wf)
        for event in events:
            batch.add_event(event, codec.encode(event))
        batch.set_summary(WorkflowSummary.of(fold(wf, events)), None)
    store.write(batch)
    return store


def test_the_summary_holds_what_an_operator_lists_by(tmp_path: Path) -> None:
    store = _store_with(tmp_path / "p0", "wf-1")
    summary = store.summary("wf-1")
    assert summary is not None
    assert (summary.status, summary.workflow_type) == ("RUNNING", "order")
    assert (summary.started_at_ms, summary.updated_at_ms) == (1_000, 1_200)
    assert summary.waiting_for == "timer #1"
    assert summary.next_due_ms == 9_000
    assert store.counts() == {("RUNNING", "order"): 1}
    assert store.status_counts() == {"RUNNING": 1}


def test_a_store_of_an_older_layout_is_not_current(tmp_path: Path) -> None:
    assert PartitionStore(tmp_path / "empty").layout_current()
    store = _store_with(tmp_path / "p0", "wf")
    assert store.layout_current()
    store._db.delete(b"v")  # as an older release left it: data, no layout key
    assert not store.layout_current()
    store.close()
    part = Partition(0, tmp_path / "p0", WorkflowRegistry())
    restore._drop_if_stale(part, "ns.history")  # rebuilt from the topic by the restore
    assert list(part.store.summaries()) == [] and part.store.layout_current()
    part.close()


def test_the_api_answers_list_counts_and_detail_and_refuses_bad_queries(tmp_path: Path) -> None:
    owned = OwnedStores()
    heard: list[list[int]] = []
    owned.listen(heard.append)
    owned.add(0, _store_with(tmp_path / "p0", "a/1", "a/2"))
    owned.add(1, _store_with(tmp_path / "p1", "b"))
    api = VisibilityApi(owned, "n1")
    assert heard == [[0], [0, 1]]

    status, body, kind = api("/workflows", "status=running&limit=2") or (0, b"", "")
    page = WorkflowPage.model_validate_json(body)
    assert (status, kind) == (200, "application/json")
    assert [row.workflow_id for row in page.items] == ["a/1", "a/2"]  # same start: by id
    assert page.next_cursor is not None and page.partitions == [0, 1]
    _, body, _ = api("/workflows", f"status=RUNNING&limit=2&cursor={page.next_cursor}") or (
        0,
        b"",
        "",
    )
    assert [row.workflow_id for row in WorkflowPage.model_validate_json(body).items] == ["b"]

    _, body, _ = api("/workflows/counts", "") or (0, b"", "")
    assert WorkflowCounts.model_validate_json(body).by_status == {"RUNNING": 3}

    status, body, _ = api("/workflows/a%2F2", "") or (0, b"", "")
    detail = WorkflowDetail.model_validate_json(body)
    assert status == 200 and detail.partition == 0 and detail.node_id == "n1"
    assert [e.event_seq for e in detail.history()] == [1, 2]
    assert [(t.seq, t.fire_at_ms) for t in detail.pending_timers] == [(1, 9_000)]
    assert detail.description["status"] == "RUNNING"
    assert detail.description["current_step"] == "timer #1"
    assert [e["kind"] for e in detail.description["events"]] == ["WorkflowStarted", "TimerStarted"]

    status, body, _ = api("/workflows/nope", "") or (0, b"", "")
    assert status == 404 and json.loads(body)["partitions"] == [0, 1]
    for bad in ("status=DONE", "limit=0", "limit=x", "cursor=%%%", "since=yesterday"):
        status, body, _ = api("/workflows", bad) or (0, b"", "")
        assert status == 400, bad
        assert json.loads(body)["error"], bad
    assert api("/metrics", "") is None

    owned.remove(1)  # revoked: no longer read, then closed
    assert heard[-1] == [0]
    _, body, _ = api("/workflows", "") or (0, b"", "")
    assert [row.workflow_id for row in WorkflowPage.model_validate_json(body).items] == [
        "a/1",
        "a/2",
    ]


def test_a_closed_store_is_left_out_of_a_read(tmp_path: Path) -> None:
    owned = OwnedStores()
    store = _store_with(tmp_path / "p0", "x")
    owned.add(0, store)
    store.close()  # closed by the processing thread before it was removed
    with owned.reading() as stores:
        assert stores == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"status": "DONE"}, "unknown status DONE"),
        ({"limit": 5000}, "limit must be 1 to 1000"),
        ({"cursor": "nonsense"}, "is not one a list returned"),
    ],
)
def test_a_query_error_names_the_problem(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(QueryError, match=words):
        ListQuery.build(**kwargs)


def test_statuses_are_given_in_any_case_one_by_one_or_comma_separated() -> None:
    assert ListQuery.build(status="parked,failed").statuses == ("PARKED", "FAILED")
    assert ListQuery.build(status=["parked", "Failed"]).statuses == ("PARKED", "FAILED")


def test_reads_from_another_thread_while_the_loop_writes_and_closes(tmp_path: Path) -> None:
    """The node's HTTP threads read while the processing thread writes, then revokes and closes
    the store: no read fails, and each page holds rows that match its filter."""
    store = PartitionStore(tmp_path / "p0")
    owned = OwnedStores()
    owned.add(0, store)
    api = VisibilityApi(owned, "n1")
    failures: list[BaseException] = []
    pages = 0
    done = threading.Event()

    def read() -> None:
        nonlocal pages
        try:
            while not done.is_set():
                status, body, _ = api("/workflows", "status=PARKED&limit=20") or (0, b"", "")
                assert status == 200, body
                page = WorkflowPage.model_validate_json(body)
                assert all(row.status == "PARKED" for row in page.items)
                api("/workflows/counts", "")
                pages += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for round_ in range(150):
        batch = StoreBatch()
        for i in range(20):
            status = "PARKED" if (i + round_) % 3 == 0 else "RUNNING"
            batch.set_summary(_summary(f"wf-{i}", status, "order", i), None)
        store.write(batch)
    while pages == 0 and reader.is_alive():  # the reader has read at least once
        time.sleep(0.01)
    owned.remove(0)  # revoked: withdrawn first, then closed, as the processor does
    store.close()
    seen = pages
    while pages == seen and reader.is_alive():  # and one read came after the close
        time.sleep(0.01)
    done.set()
    reader.join(30)
    assert failures == []
    assert pages > 0
    with owned.reading() as stores:
        assert stores == []
