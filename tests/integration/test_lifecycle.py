"""Execution timeout, continue-as-new, id reuse and schedules against the broker."""

from __future__ import annotations

import calendar
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer
from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import IdReusePolicy, WorkflowStatus
from orchestrator import workflow
from orchestrator._kafka_config import consumer_config
from orchestrator.cli import main
from orchestrator.errors import WorkflowFailedError, WorkflowIdConflict
from orchestrator.schedule import (
    ScheduleError,
    create_schedule,
    delete_schedule,
    list_schedules,
    target_id,
)
from orchestrator.settings import Settings
from orchestrator.workflow import Compensation, WorkflowContext

from .kit import Done, Kit, Step, build, settings_for
from .procs import inbox_starts
from .stack import Stack, running_stack

pytestmark = pytest.mark.broker


class Count(BaseModel):
    n: int = 0
    limit: int = 1


def _add_workflows(kit: Kit) -> None:
    a = kit.services[0]
    do = ActivityContract(f"{a}.do", a, Step, Done)
    undo = ActivityContract(f"{a}.undo", a, Step, Done)

    @workflow.defn(name="held")
    class Held:
        """A step with its compensation, then an hour's wait."""

        @workflow.run
        async def run(self, ctx: WorkflowContext, count: Count) -> Count:
            async with ctx.saga():
                await ctx.call(do, Step(n=1), compensate=Compensation(undo, Step(n=1)))
                await ctx.sleep(timedelta(hours=1))
            return count

    @workflow.defn(name="looper")
    class Looper:
        """One step per run, then continue as new until ``limit`` runs."""

        @workflow.run
        async def run(self, ctx: WorkflowContext, count: Count) -> Count:
            await ctx.call(do, Step(n=count.n))
            if count.n + 1 < count.limit:
                ctx.continue_as_new(Count(n=count.n + 1, limit=count.limit))
            return count

    kit.registry.add(Held)
    kit.registry.add(Looper)


@pytest.fixture
def life(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    kit = build(namespace)
    _add_workflows(kit)
    with running_stack(kit, settings_for(kafka_bootstrap, namespace, tmp_path / "state")) as s:
        yield s


def _live_keys(settings: Settings, prefix: str) -> set[str]:
    """The history keys of ``prefix`` that compaction would keep: the last record of each key
    is an event, not a tombstone."""
    reader = Consumer(
        consumer_config(
            settings.bootstrap_servers,
            f"live.{time.monotonic_ns()}",
            extra={"enable.partition.eof": True},
        )
    )
    reader.subscribe([settings.history])
    last: dict[str, bool] = {}
    eofs: set[int] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(eofs) < settings.partitions:
        for msg in reader.consume(1000, 0.2):
            if msg.error() is not None:
                eofs.add(msg.partition() or 0)
                continue
            key = (msg.key() or b"").decode()
            if key.startswith(prefix):
                last[key] = msg.value() is not None
    reader.close()
    return {key for key, live in last.items() if live}


def _wait(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


# --------------------------------------------------------------------------- tests


def test_an_execution_timeout_compensates_and_tells_the_caller(life: Stack) -> None:
    handle = life.client.start("held", Count(), workflow_id="held-1", execution_timeout=2)
    with pytest.raises(WorkflowFailedError) as failed:
        handle.result(timeout=60)
    assert failed.value.error_type == "WorkflowTimedOut"
    assert failed.value.status == WorkflowStatus.COMPENSATED.value
    assert life.kit.steps_of("held-1") == ["do", "undo"]
    kinds = [e.kind for e in life.client.describe("held-1").events]
    assert "WorkflowTimedOut" in kinds


def test_a_loop_of_200_runs_keeps_a_bounded_history_across_a_restart(life: Stack) -> None:
    began = time.monotonic()
    handle = life.client.start("looper", Count(limit=200), workflow_id="loop-1")
    _wait("a third of the loop", lambda: len(life.kit.steps_of("loop-1")) >= 60)
    # A restart from the topic alone (local state deleted): the restore meets the earlier
    # runs' events and their tombstones, and keeps the current run.
    life.stop_node()
    shutil.rmtree(Path(life.settings.state_dir) / life.settings.namespace)
    life.start_node()
    assert handle.result(Count, timeout=180) == Count(n=199, limit=200)
    print(f"200 runs (one step each, a restart from the topic) in {time.monotonic() - began:.1f}s")
    # Each run's step ran once (its own idempotency key), none twice.
    assert len(life.kit.steps_of("loop-1")) == 200
    assert set(life.kit.effects.values()) == {1}
    live = _live_keys(life.settings, "loop-1/")
    assert 0 < len(live) <= 4, sorted(live)
    print(f"live history keys after the loop: {len(live)} of {max(int(k[7:]) for k in live)}")
    described = life.client.describe("loop-1")
    assert described.status is WorkflowStatus.COMPLETED and described.complete
    assert described.events[0].kind == "WorkflowStarted" and described.events[0].seq > 700


def test_id_reuse_policies(life: Stack) -> None:
    client = life.client
    assert client.start("looper", Count(), workflow_id="reuse").result(Count, timeout=60) == (
        Count()
    )
    # REJECT_DUPLICATE (the default): another input under a closed id is a conflict.
    with pytest.raises(WorkflowIdConflict):
        client.start("looper", Count(n=4), workflow_id="reuse").result(timeout=60)
    # ALLOW_DUPLICATE: a new run, whose result the new handle gets; describe sees it.
    again = client.start(
        "looper", Count(n=5), workflow_id="reuse", id_reuse=IdReusePolicy.ALLOW_DUPLICATE
    )
    assert again.result(Count, timeout=60) == Count(n=5)
    assert client.describe("reuse").output(Count) == Count(n=5)
    # TERMINATE_IF_RUNNING: the running one ends TERMINATED, without compensation.
    held = client.start("held", Count(), workflow_id="term")
    _wait("the held step", lambda: life.kit.steps_of("term") == ["do"])
    new = client.start(
        "looper", Count(n=6), workflow_id="term", id_reuse=IdReusePolicy.TERMINATE_IF_RUNNING
    )
    with pytest.raises(WorkflowFailedError) as ended:
        held.result(timeout=60)
    assert ended.value.status == WorkflowStatus.TERMINATED.value
    assert new.result(Count, timeout=60) == Count(n=6)
    assert life.kit.steps_of("term") == ["do", "do"]  # no undo


def test_a_schedule_starts_once_per_tick_across_a_restart(life: Stack) -> None:
    settings, client = life.settings, life.client
    create_schedule(client, "tick", "looper", {"n": 0, "limit": 1}, every=timedelta(seconds=1))
    _wait("three ticks", lambda: len(inbox_starts(settings, "tick-")) >= 3)
    assert [s.name for s in list_schedules(client)] == ["tick"]
    runner = CliRunner()
    base = ["--bootstrap", settings.bootstrap_servers, "--namespace", settings.namespace]
    listed = runner.invoke(main, [*base, "--partitions", "3", "schedule", "list"])
    assert listed.exit_code == 0 and "tick\tevery 1s\tlooper" in listed.output, listed.output
    # The node goes away for a few ticks and comes back: the missed ticks are started late
    # (well within the one-hour catch-up window), none twice.
    life.stop_node()
    time.sleep(3)
    life.start_node()
    before = len(inbox_starts(settings, "tick-"))
    _wait("three more ticks", lambda: len(inbox_starts(settings, "tick-")) >= before + 3)
    deleted = runner.invoke(main, [*base, "--partitions", "3", "schedule", "delete", "tick"])
    assert deleted.exit_code == 0, deleted.output
    _wait("the delete", lambda: list_schedules(client) == [])
    starts = inbox_starts(settings, "tick-")
    assert set(starts.values()) == {1}, starts  # one start per tick
    ticks = sorted(starts)
    first = calendar.timegm(time.strptime(ticks[0], "tick-%Y-%m-%dT%H:%M:%SZ"))
    assert ticks == [target_id("tick", (first + k) * 1000) for k in range(len(ticks))]  # no gap
    for wf in ticks[:3]:  # and the started workflows ran
        assert client.get_handle(wf).result(Count, timeout=60) == Count()
    with pytest.raises(ScheduleError, match="no schedule"):
        delete_schedule(client, "tick")
