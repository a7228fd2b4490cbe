"""A service that is not running: the node's default attempt timeout ends the saga, visibly.

Before ``activity_timeout_ms`` a call without ``timeout=`` waited for ever; here neither the call
nor the compensation names a timeout, and the node is configured with a 1 s default. The
compensation that gives up parks; an operator skips it (``orchestrator skip``) and the saga
ends; another workflow is terminated (``orchestrator terminate``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from contracts import codec
from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityScheduled,
    HistoryEvent,
    OperatorActed,
    RetryPolicy,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator.cli import main
from orchestrator.client import Client
from orchestrator.errors import UnknownWorkflow, WorkflowFailedError
from orchestrator.node import OrchestratorNode
from orchestrator.settings import Settings
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

from .kit import Done, Step, build, create_topics, make_service, settings_for
from .procs import history_values
from .test_client import _cli

pytestmark = pytest.mark.broker

FEW = RetryPolicy(max_attempts=2, initial_interval_ms=100)


def _registry(live: str, dead: str) -> WorkflowRegistry:
    live_do = ActivityContract(f"{live}.do", live, Step, Done)
    dead_do = ActivityContract(f"{dead}.do", dead, Step, Done)
    dead_undo = ActivityContract(f"{dead}.undo", dead, Step, Done)

    @workflow.defn(name="calls-dead")
    class CallsDead:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> Done:
            return await ctx.call(dead_do, step, retry=FEW)

    @workflow.defn(name="undo-dead")
    class UndoDead:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> Done:
            async with ctx.saga() as saga:
                done = await ctx.call(live_do, step, retry=FEW)
                saga.on_failure(dead_undo, step, retry=FEW)
                await ctx.call(dead_do, step, retry=FEW)
            return done

    @workflow.defn(name="waits")
    class Waits:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> Done:
            async with ctx.saga() as saga:
                await ctx.call(live_do, step, retry=FEW)
                saga.on_failure(dead_undo, step, retry=FEW)  # never run: terminate undoes nothing
                go = await ctx.wait_signal("go", Done)
            return go

    return WorkflowRegistry([CallsDead, UndoDead, Waits])


@pytest.fixture
def stack(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """A node with a 1 s default attempt timeout, and the name of the service nobody runs."""
    kit = build(namespace)
    live, dead = kit.services[0], kit.services[1]  # the dead one's topic exists; nobody reads it
    settings = settings_for(kafka_bootstrap, namespace, tmp_path, activity_timeout_ms=1_000)
    create_topics(kit, settings)
    node = OrchestratorNode(settings, _registry(live, dead), with_metrics=False)
    service = make_service(kit, live, settings)
    stops = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=node.run, args=(stops[0],), daemon=True),
        threading.Thread(target=service.run, args=(stops[1],), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield settings, dead
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()


def _events(settings: Settings, workflow_id: str) -> list[HistoryEvent]:
    events = [
        codec.decode_as(values[-1], HistoryEvent)
        for key, values in history_values(settings).items()
        if key.rsplit("/", 1)[0] == workflow_id
    ]
    return sorted(events, key=lambda e: e.event_seq)


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.2)


def _step(client: Client, workflow_id: str) -> str:
    try:
        return client.describe(workflow_id).current_step
    except UnknownWorkflow:
        return "not started yet"


@pytest.mark.timeout(150)
def test_a_call_and_a_compensation_to_a_stopped_service_end_the_saga_within_the_default(
    stack: tuple[Settings, str],
) -> None:
    settings, dead = stack
    cli = CliRunner()
    with Client(settings) as client:
        began = time.monotonic()
        failed = client.start("calls-dead", Step(n=1), workflow_id="calls-dead-1")
        parked = client.start("undo-dead", Step(n=2), workflow_id="undo-dead-1")
        with pytest.raises(WorkflowFailedError) as fail_info:
            failed.result(Done, timeout=60)
        # The compensation to the dead service gives up and parks: the saga waits for an
        # operator, visibly, instead of ending PARKED with no way out.
        _until(
            "undo-dead-1 is PARKED",
            lambda: client.describe("undo-dead-1").operator_status == "PARKED",
        )
        # Node start-up (topic check, assignment, restore) is most of it; the saga's own part
        # is two 1 s attempts, then two more for the compensation.
        assert time.monotonic() - began < 60
        described = client.describe("undo-dead-1")
        assert described.status is WorkflowStatus.RUNNING and described.finished_at is None
        (step,) = described.parked_steps
        shown = cli.invoke(main, _cli(settings, "describe", "undo-dead-1"))
        assert "PARKED" in shown.output and f"--step {step}" in shown.output, shown.output

        refused = cli.invoke(main, _cli(settings, "skip", "undo-dead-1", "--step", "1"))
        assert refused.exit_code == 1 and "is not a parked compensation" in refused.output
        skipped = cli.invoke(
            main,
            _cli(settings, "skip", "undo-dead-1", "--step", str(step), "--reason", "refunded "
                 "by hand", "--operator", "alice"),
        )  # fmt: skip
        assert skipped.exit_code == 0, skipped.output
        assert "recorded as event #" in skipped.output, skipped.output
        with pytest.raises(WorkflowFailedError) as park_info:
            parked.result(Done, timeout=30)

        waiting = client.start("waits", Step(n=3), workflow_id="waits-1")
        _until("waits-1 waits", lambda: "signal" in _step(client, "waits-1"))
        ended = cli.invoke(
            main, _cli(settings, "terminate", "waits-1", "--reason", "INC-7", "--operator", "bob")
        )
        assert ended.exit_code == 0, ended.output
        assert "status now TERMINATED" in ended.output, ended.output
        with pytest.raises(WorkflowFailedError) as term_info:
            waiting.result(Done, timeout=30)
        terminated = client.describe("waits-1")
    assert fail_info.value.status == WorkflowStatus.FAILED.value
    assert fail_info.value.error_type == "ActivityTimeout"
    assert park_info.value.status == WorkflowStatus.COMPENSATED.value
    acted = [
        e.event for e in _events(settings, "undo-dead-1") if isinstance(e.event, OperatorActed)
    ]
    assert [(a.action, a.step_seq, a.operator, a.reason) for a in acted] == [
        ("skip", step, "alice", "refunded by hand")
    ]
    assert term_info.value.status == WorkflowStatus.TERMINATED.value
    assert term_info.value.message == "INC-7"
    # terminated: nothing compensated, the live step's undo never scheduled
    scheduled = [
        e.event for e in _events(settings, "waits-1") if isinstance(e.event, ActivityScheduled)
    ]
    assert [s.is_compensation for s in scheduled] == [False]
    assert terminated.events[-1].summary == "terminate by bob: INC-7"

    for wf, expected in (("calls-dead-1", ["do"]), ("undo-dead-1", ["do", "do", "undo"])):
        events = _events(settings, wf)
        scheduled = [e.event for e in events if isinstance(e.event, ActivityScheduled)]
        assert [s.activity_name.rsplit(".", 1)[1] for s in scheduled] == expected
        assert {s.attempt_timeout_ms for s in scheduled} == {1_000}  # recorded: replay agrees
        timed_out = [
            e.event.seq
            for e in events
            if isinstance(e.event, ActivityAttemptFailed)
            and e.event.error.type == "ActivityTimeout"
        ]
        # each attempt to the dead service (call or compensation) timed out; the live one none
        on_dead = [s.seq for s in scheduled if s.activity_name.startswith(f"{dead}.")]
        assert sorted(timed_out) == sorted(on_dead * 2), (wf, events)
