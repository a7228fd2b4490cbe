"""Child workflows and queries against the broker: a parent and its child on different
partitions, the child's failure and a cancel crossing between them through the inbox, and a
query answered by the node over HTTP (Client.query with node discovery, and the CLI)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import ChildWorkflowFailed, ChildWorkflowStarted, WorkflowStatus
from orchestrator import workflow
from orchestrator.cli import main
from orchestrator.errors import QueryFailed, UnknownQuery, UnknownWorkflow, WorkflowFailedError
from orchestrator.partitioner import partition_for
from orchestrator.workflow import Compensation, WorkflowContext

from .kit import Approval, Done, Kit, Step, build, settings_for
from .stack import Stack, running_stack

pytestmark = pytest.mark.broker


class Order(BaseModel):
    child_id: str
    child_fails: bool = False
    child_waits: bool = False


class Refs(BaseModel):
    refs: list[str]


def family(kit: Kit) -> tuple[type, type]:
    """A parent (step a, then a child) and its child (step b, then maybe a refused step c, or a
    wait for signal "go"), each undoing its own steps."""
    a, b, c = kit.services
    do = {s: ActivityContract(f"{s}.do", s, Step, Done) for s in kit.services}
    undo = {s: ActivityContract(f"{s}.undo", s, Step, Done) for s in kit.services}

    @workflow.defn(name="child")
    class Child:
        @workflow.run
        async def run(self, ctx: WorkflowContext, order: Order) -> Refs:
            async with ctx.saga():
                done = await ctx.call(do[b], Step(n=2), compensate=Compensation(undo[b], Step(n=2)))
                if order.child_waits:
                    await ctx.wait_signal("go", Approval)
                if order.child_fails:
                    await ctx.call(do[c], Step(n=3, fail=True))
            return Refs(refs=[done.ref])

    @workflow.defn(name="parent")
    class Parent:
        def __init__(self) -> None:
            self.stage = "starting"

        @workflow.run
        async def run(self, ctx: WorkflowContext, order: Order) -> Refs:
            async with ctx.saga():
                done = await ctx.call(do[a], Step(n=1), compensate=Compensation(undo[a], Step(n=1)))
                self.stage = f"waiting for {order.child_id}"
                child = await ctx.execute_child(Child, order, id=order.child_id)
            self.stage = "done"
            return Refs(refs=[done.ref, *child.refs])

        @workflow.query
        def progress(self) -> str:
            return self.stage

        @workflow.query
        def fails(self) -> str:
            raise ValueError("this query always fails")

    return Parent, Child


@pytest.fixture
def stack(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    kit = build(namespace)
    for cls in family(kit):
        kit.registry.add(cls)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state", metrics_port=0)
    with running_stack(kit, settings) as running:
        yield running


def ids(stack: Stack, name: str) -> tuple[str, str]:
    """A parent id and a child id on different partitions."""
    count = stack.settings.partitions
    parent = f"{name}-parent"
    child = next(
        f"{name}-child-{i}"
        for i in range(100)
        if partition_for(f"{name}-child-{i}", count) != partition_for(parent, count)
    )
    return parent, child


def _until(what: str, probe: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_a_child_on_another_partition_completes_and_then_fails_to_its_parent(
    stack: Stack,
) -> None:
    parent, child = ids(stack, "ok")
    handle = stack.client.start("parent", Order(child_id=child), workflow_id=parent)
    assert handle.result(Refs, timeout=60).refs == [
        f"{stack.kit.services[0]}.do#1",
        f"{stack.kit.services[1]}.do#2",
    ]

    parent, child = ids(stack, "bad")
    handle = stack.client.start(
        "parent", Order(child_id=child, child_fails=True), workflow_id=parent
    )
    with pytest.raises(WorkflowFailedError) as failed:
        handle.result(Refs, timeout=60)
    assert failed.value.status == "COMPENSATED" and failed.value.error_type == "Refused"
    events = [e.event for e in stack.client.history(parent)]
    (started,) = [e for e in events if isinstance(e, ChildWorkflowStarted)]
    assert started.child_workflow_id == child
    (ended,) = [e for e in events if isinstance(e, ChildWorkflowFailed)]
    assert (ended.status, ended.error.type) == (WorkflowStatus.COMPENSATED, "Refused")
    assert stack.client.describe(child).status is WorkflowStatus.COMPENSATED
    # each undid its own step, once
    assert stack.kit.steps_of(child) == ["do", "undo"]
    assert stack.kit.steps_of(parent) == ["do", "undo"]


@pytest.mark.timeout(120)
def test_cancelling_the_parent_cancels_its_child_and_queries_see_the_wait(stack: Stack) -> None:
    parent, child = ids(stack, "cancel")
    handle = stack.client.start(
        "parent", Order(child_id=child, child_waits=True), workflow_id=parent
    )
    _until("the child waits", lambda: stack.kit.steps_of(child) == ["do"])
    node = stack._node[2] if stack._node else None
    assert node is not None and node.http_port is not None
    url = f"http://127.0.0.1:{node.http_port}"

    # Queries, answered by the node from its state: by URL, then found through the group.
    _until("the parent waits", lambda: stack.client.query(parent, "progress", url=url) != "")
    assert stack.client.query(parent, "progress", url=url) == f"waiting for {child}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAGA_NODE_URLS", f"{stack.settings.node_id}={url}")
        assert stack.client.query(parent, "progress") == f"waiting for {child}"
    with pytest.raises(UnknownQuery, match="progress"):
        stack.client.query(parent, "nope", url=url)
    with pytest.raises(QueryFailed, match="always fails"):
        stack.client.query(parent, "fails", url=url)
    with pytest.raises(UnknownWorkflow):
        stack.client.query("no-such-workflow", "progress", url=url)
    with pytest.raises(QueryFailed, match="cannot reach"):
        stack.client.query(parent, "progress", url="http://127.0.0.1:9", timeout=2)
    cli = CliRunner().invoke(
        main,
        ["--bootstrap", stack.settings.bootstrap_servers, "--namespace", stack.settings.namespace,
         "query", parent, "progress", "--url", url],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output) == f"waiting for {child}"
    cli = CliRunner().invoke(
        main,
        ["--bootstrap", stack.settings.bootstrap_servers, "--namespace", stack.settings.namespace,
         "query", parent, "nope", "--url", url],
    )  # fmt: skip
    assert cli.exit_code == 1 and "no query 'nope'" in cli.output
    # a query writes nothing
    before = len(stack.client.history(parent))

    stack.client.cancel(parent, "changed my mind")
    with pytest.raises(WorkflowFailedError) as failed:
        handle.result(Refs, timeout=60)
    assert failed.value.status == "CANCELLED"
    _until(
        "the child is cancelled",
        lambda: stack.client.describe(child).status is WorkflowStatus.CANCELLED,
    )
    assert stack.kit.steps_of(child) == ["do", "undo"]
    assert stack.kit.steps_of(parent) == ["do", "undo"]
    kinds = [e.event.kind for e in stack.client.history(parent)]
    assert kinds[before] == "CancelRequested"
    assert "CancelRequested" in [e.event.kind for e in stack.client.history(child)]
