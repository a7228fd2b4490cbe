"""Finding workflows against the broker: a node's index and query API, its registration on
``<ns>.nodes``, and the client and CLI that fan out to it; describe through the node, and from
the history once the node is gone."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.client import Client, NoNodes, WorkflowDescription
from orchestrator.errors import UnknownWorkflow, WorkflowFailedError
from orchestrator.node import OrchestratorNode
from orchestrator.partitioner import partition_for
from orchestrator.visibility import NodeRecord, WorkflowPage, WorkflowRow

from .kit import Trip, TripResult
from .stack import Stack

T = TypeVar("T")

pytestmark = pytest.mark.parametrize("stack_settings", [{"metrics_port": 0}], indirect=True)


def _eventually(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """The first answer of ``probe`` that is not None (the index is written right after the
    transaction that also writes the result, so a reader may be a moment early)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen in {timeout:g} s: {what}")
        time.sleep(0.2)


def _ids(rows: list[WorkflowRow]) -> list[str]:
    return [row.workflow_id for row in rows]


def _start_mix(stack: Stack) -> None:
    """3 completed, 2 compensated (step 2 refused), 1 waiting for a signal."""
    client = stack.client
    handles = [client.start("trip", Trip(), workflow_id=f"ok-{i}") for i in (1, 2, 3)]
    failing = [client.start("trip", Trip(fail_at=2), workflow_id=f"bad-{i}") for i in (1, 2)]
    client.start("trip", Trip(wait_signal=True), workflow_id="wait-1")
    for handle in handles:
        handle.result(TripResult, timeout=60)
    for handle in failing:
        with pytest.raises(WorkflowFailedError, match="COMPENSATED"):
            handle.result(TripResult, timeout=60)


def test_list_filters_pages_and_counts_the_workflows_of_the_node(stack: Stack) -> None:
    _start_mix(stack)
    client = stack.client

    def everything() -> WorkflowPage | None:
        page = client.list(limit=50)
        statuses = {row.workflow_id: row.status for row in page.items}
        ready = statuses.get("wait-1") == "RUNNING" and "steps" not in statuses
        return page if len(page.items) == 6 and ready else None

    page = _eventually(everything, "six workflows listed, wait-1 running")
    assert page.missing_partitions == [] and page.errors == []
    assert page.partitions == [0, 1, 2]
    rows = page.items
    # Newest start first, ties by id: the one order of every list.
    assert _ids(rows) == _ids(sorted(rows, key=lambda r: (-r.started_at_ms, r.workflow_id)))
    by_id = {row.workflow_id: row for row in rows}
    assert {wf: by_id[wf].status for wf in by_id} == {
        "ok-1": "COMPLETED", "ok-2": "COMPLETED", "ok-3": "COMPLETED",
        "bad-1": "COMPENSATED", "bad-2": "COMPENSATED", "wait-1": "RUNNING",
    }  # fmt: skip
    assert by_id["bad-1"].reason is not None and "Refused" in by_id["bad-1"].reason
    assert by_id["wait-1"].waiting_for == "waiting for a signal"
    assert by_id["wait-1"].finished_at_ms is None and by_id["ok-1"].finished_at_ms is not None
    assert by_id["ok-1"].steps_done == 3 and by_id["ok-1"].attempts == 3

    compensated = client.list(status="COMPENSATED")
    assert _ids(compensated.items) == [r for r in _ids(rows) if r.startswith("bad-")]
    assert _ids(client.list(status=["running", "compensated"]).items) == [
        r for r in _ids(rows) if not r.startswith("ok-")
    ]
    assert _ids(client.list(type="trip").items) == _ids(rows)
    assert client.list(type="other").items == []
    assert _ids(client.list(prefix="ok-").items) == [r for r in _ids(rows) if r.startswith("ok-")]
    middle = by_id["bad-1"].started_at_ms
    assert _ids(client.list(since=middle).items) == [
        row.workflow_id for row in rows if row.started_at_ms >= middle
    ]
    assert _ids(client.list(until=middle, status="COMPENSATED").items) == [
        row.workflow_id
        for row in rows
        if row.started_at_ms <= middle and row.status == "COMPENSATED"
    ]

    paged: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = client.list(limit=4, cursor=cursor)
        assert len(page.items) <= 4
        paged += _ids(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert paged == _ids(rows)

    counts = client.counts()
    assert counts.total == 6
    assert counts.by_status == {"COMPENSATED": 2, "COMPLETED": 3, "RUNNING": 1}
    assert counts.by_type == {"trip": 6}
    assert counts.missing_partitions == []

    [node] = client.nodes()
    assert node.node_id == stack.settings.node_id and node.partitions == [0, 1, 2]
    assert node.url is not None and node.url.startswith("http://127.0.0.1:")

    out = CliRunner().invoke(main, [*_cli(stack), "list", "--status", "COMPENSATED", "--json"])
    assert out.exit_code == 0, out.output
    assert _ids(WorkflowPage.model_validate(json.loads(out.stdout)).items) == _ids(
        compensated.items
    )
    out = CliRunner().invoke(main, [*_cli(stack), "list", "--status", "DONE"])
    assert out.exit_code == 1
    assert out.output.strip().startswith("Error: unknown status DONE")
    out = CliRunner().invoke(main, [*_cli(stack), "counts"])
    assert out.exit_code == 0, out.output
    assert "6 workflows" in out.stdout and "COMPENSATED  2" in out.stdout

    # The index is local state: a node that lost it rebuilds it from the history topic.
    stack.stop_node()
    for part in (stack.settings.state_dir / stack.settings.namespace).glob("p*"):
        shutil.rmtree(part)
    stack.start_node()

    def rebuilt() -> WorkflowPage | None:
        try:
            page = client.list(limit=50)
        except NoNodes:  # the new node has not registered yet
            return None
        return page if len(page.items) == 6 else None

    assert _eventually(rebuilt, "the index rebuilt by the restore").items == rows
    assert client.counts().by_status == counts.by_status


def test_describe_asks_the_node_and_reads_the_history_once_it_is_gone(stack: Stack) -> None:
    client = stack.client
    client.start("trip", Trip(fail_at=2), workflow_id="bad-1")
    with pytest.raises(WorkflowFailedError):
        client.get_handle("bad-1").result(timeout=60)
    # A signal to a finished workflow is dead-lettered, keyed by the workflow id.
    client.signal("bad-1", "approve", {"by": "late"})

    def with_letter() -> WorkflowDescription | None:
        found = client.describe("bad-1")
        return found if found.dead_letters else None

    described = _eventually(with_letter, "the dead-lettered signal of bad-1")
    assert described.source == f"node {stack.settings.node_id}"
    node_view = described.to_dict()
    assert node_view["status"] == "COMPENSATED"
    [letter] = node_view["dead_letters"]
    assert (letter["kind"], letter["error_type"]) == ("SignalWorkflow", "WorkflowFinished")
    with pytest.raises(UnknownWorkflow, match="owns its partition"):
        client.describe("never-started")

    stack.stop_node()  # a clean stop: its registration is tombstoned
    with Client(stack.settings) as fresh:
        from_history = fresh.describe("bad-1")
        assert from_history.source == "history"
        assert from_history.to_dict()["events"] == node_view["events"]
        assert fresh.nodes() == []
        with pytest.raises(NoNodes, match="no orchestrator node"):
            fresh.list()
    # The client that knew the node (cached for a few seconds) finds it unreachable.
    assert client.describe("bad-1", dead_letters=False).source == "history"


def _cli(stack: Stack) -> list[str]:
    s = stack.settings
    return [
        "--bootstrap",
        s.bootstrap_servers,
        "--namespace",
        s.namespace,
        "--partitions",
        str(s.partitions),
    ]


def test_two_nodes_answer_for_their_partitions_and_the_client_merges_them(
    stack: Stack, tmp_path: Path
) -> None:
    second_settings = stack.settings.model_copy(
        update={"node_id": "n2", "state_dir": tmp_path / "n2"}
    )
    second = OrchestratorNode(second_settings, stack.kit.registry)
    stop = threading.Event()
    thread = threading.Thread(target=second.run, args=(stop,), daemon=True)
    thread.start()
    try:
        client = stack.client

        def split() -> list[NodeRecord] | None:
            nodes = client.nodes(refresh=True)  # the registrations are moving
            owned = sorted(p for node in nodes for p in node.partitions)
            both = len(nodes) == 2 and all(node.partitions for node in nodes)
            return nodes if both and owned == [0, 1, 2] else None

        nodes = _eventually(split, "the partitions split between n1 and n2", timeout=90)
        assert {node.node_id for node in nodes} == {"n1", "n2"}
        ids = [f"wf-{i}" for i in range(9)]
        handles = [client.start("trip", Trip(), workflow_id=wf) for wf in ids]
        for handle in handles:
            handle.result(TripResult, timeout=60)

        def listed() -> WorkflowPage | None:
            page = client.list(status="COMPLETED")
            return page if len(page.items) == len(ids) and not page.errors else None

        whole = _eventually(listed, "nine workflows listed from two nodes")
        assert whole.partitions == [0, 1, 2] and whole.missing_partitions == []
        paged: list[str] = []
        cursor: str | None = None
        for _ in range(20):
            page = client.list(status="COMPLETED", limit=2, cursor=cursor)
            paged += _ids(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert paged == _ids(whole.items) and sorted(paged) == ids
        assert client.counts().by_status == {"COMPLETED": len(ids)}
        for wf in ids:  # each asked at the node that owns it
            owner = next(n for n in nodes if partition_for(wf, 3) in n.partitions)
            assert client.describe(wf, dead_letters=False).source == f"node {owner.node_id}"
    finally:
        stop.set()
        thread.join(30)
