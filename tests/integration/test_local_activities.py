"""ctx.run_local against a real broker: the function runs once in the node, its result is in the
history, and a node that rebuilds the workflow later returns it without running the function."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts.envelopes import LocalActivityRecorded
from orchestrator.client import Client
from orchestrator.node import OrchestratorNode
from orchestrator.settings import Settings
from orchestrator.topics import ensure_topics
from orchestrator.workflow import WorkflowContext, WorkflowRegistry, defn, run

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

RAN: list[str] = []


class Ticket(BaseModel):
    order: str


class Numbered(BaseModel):
    order: str
    number: int


def next_number(ticket: Ticket) -> Numbered:
    RAN.append(ticket.order)
    return Numbered(order=ticket.order, number=1000 + len(RAN))


class Approval(BaseModel):
    by: str


class Done(BaseModel):
    number: int
    by: str


@defn(name="numbered")
class NumberedOrder:
    @run
    async def run(self, ctx: WorkflowContext, ticket: Ticket) -> Done:
        numbered = await ctx.run_local(next_number, ticket)
        approval = await ctx.wait_signal("approve", Approval)
        return Done(number=numbered.number, by=approval.by)


def _node(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    node = OrchestratorNode(settings, WorkflowRegistry([NumberedOrder]))
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_a_local_activity_runs_once_and_replays_from_the_history(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    RAN.clear()
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        namespace=namespace,
        partitions=2,
        state_dir=tmp_path / "first",
        node_id="n1",
    )
    ensure_topics(kafka_bootstrap, namespace, 2)
    client = Client(settings)
    try:
        thread, stop = _node(settings)
        handle = client.start("numbered", Ticket(order="o-1"), workflow_id="num-1")
        deadline = time.monotonic() + 60
        while not RAN and time.monotonic() < deadline:
            time.sleep(0.05)
        assert RAN == ["o-1"]
        time.sleep(1)  # the step is committed
        stop.set()
        thread.join(30)

        # Another node, with an empty state directory, restores the workflow from the history
        # topic and replays it: the recorded number comes back, next_number does not run.
        thread, stop = _node(settings.model_copy(update={"state_dir": tmp_path / "second"}))
        handle.signal("approve", Approval(by="ops"))
        done = handle.result(Done, timeout=60)
        stop.set()
        thread.join(30)
        history = client.history("num-1")
    finally:
        client.close()
    assert done == Done(number=1001, by="ops")
    assert RAN == ["o-1"], "the function ran once"
    recorded = [e.event for e in history if isinstance(e.event, LocalActivityRecorded)]
    assert [(r.name, r.error) for r in recorded] == [("next_number", None)]
