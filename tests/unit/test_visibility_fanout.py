"""The client's side of the query API against real node HTTP servers (no broker): merging the
pages of several nodes, a partition two nodes answer for during a rebalance, a node that does
not answer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from orchestrator._engine.store import PartitionStore, StoreBatch, WorkflowSummary
from orchestrator._fanout import merged_counts, merged_list
from orchestrator.health import Health, HealthServer
from orchestrator.visibility import ListQuery, NodeRecord, OwnedStores, VisibilityApi


def _store(path: Path, rows: list[tuple[str, str, int, int]]) -> PartitionStore:
    """rows: (id, status, started ms, last seq)."""
    store = PartitionStore(path)
    batch = StoreBatch()
    for wf, status, started, last_seq in rows:
        summary = WorkflowSummary(
            wf, "trip", status, last_seq, None, None, started_at_ms=started, updated_at_ms=started
        )
        batch.set_summary(summary, None)
    store.write(batch)
    return store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeRecord]]:
    """n1 owns partitions 0 and 1; n2 owns 1 (a rebalance in flight: an older view of it, so
    its row of ``b`` is behind) and 2; n3 is registered but does not answer."""
    layout = {
        "n1": {
            0: [("a", "COMPLETED", 100, 5), ("c", "RUNNING", 300, 3)],
            1: [("b", "PARKED", 200, 9)],
        },
        "n2": {1: [("b", "RUNNING", 200, 4)], 2: [("d", "COMPLETED", 400, 5)]},
    }
    records = []
    with ExitStack() as stack:
        for node_id, partitions in layout.items():
            owned = OwnedStores()
            for number, rows in partitions.items():
                store = _store(tmp_path / node_id / f"p{number}", rows)
                stack.callback(store.close)
                owned.add(number, store)
            api = VisibilityApi(owned, node_id)
            server = HealthServer(Health(), None, 0, "127.0.0.1", routes=api.route)
            stack.callback(server.close)
            records.append(_record(node_id, f"http://127.0.0.1:{server.port}", sorted(partitions)))
        records.append(_record("n3", f"http://127.0.0.1:{_free_port()}", [3]))
        yield records


def _record(node_id: str, url: str, partitions: list[int]) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        namespace="ns",
        url=url,
        partitions=partitions,
        started_at_ms=0,
        updated_at_ms=0,
    )


def test_pages_of_several_nodes_merge_in_one_order(nodes: list[NodeRecord]) -> None:
    page = merged_list(nodes, ListQuery.build(limit=2), partitions=4, timeout=5)
    assert [row.workflow_id for row in page.items] == ["d", "c"]
    assert page.partitions == [0, 1, 2] and page.missing_partitions == [3]
    assert len(page.errors) == 1 and page.errors[0].startswith(nodes[2].url or "")
    rest = merged_list(nodes, ListQuery.build(limit=2, cursor=page.next_cursor), 4, 5)
    assert [row.workflow_id for row in rest.items] == ["b", "a"]
    # The row both nodes returned is kept once, with the later state (more events).
    assert [row.status for row in rest.items] == ["PARKED", "COMPLETED"]
    assert rest.next_cursor is None

    parked = merged_list(nodes, ListQuery.build(status="PARKED"), 4, 5)
    assert [row.workflow_id for row in parked.items] == ["b"]


def test_counts_leave_out_a_node_that_counts_a_partition_twice(nodes: list[NodeRecord]) -> None:
    counts = merged_counts(nodes, partitions=4, timeout=5)
    assert counts.by_status == {"COMPLETED": 1, "PARKED": 1, "RUNNING": 1}
    assert counts.partitions == [0, 1] and counts.missing_partitions == [2, 3]
    assert any("counts partitions another did" in error for error in counts.errors)


def test_a_node_without_http_is_reported_not_fatal(nodes: list[NodeRecord]) -> None:
    silent = _record("n9", "http://127.0.0.1:1", []).model_copy(update={"url": None})
    page = merged_list([nodes[0], silent], ListQuery.build(), partitions=2, timeout=5)
    assert [row.workflow_id for row in page.items] == ["c", "b", "a"]
    assert page.errors == ["node n9 serves no query API (its metrics_port is unset)"]
