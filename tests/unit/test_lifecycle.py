"""Execution timeout, continue-as-new, id reuse and schedules, on the Decider without Kafka."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts import codec
from contracts.envelopes import (
    ActivityCommand,
    ActivityReply,
    HistoryEvent,
    IdReusePolicy,
    Payload,
    ReplyOutcome,
    StartWorkflow,
    WorkflowResult,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator._engine.decide import Batch
from orchestrator._engine.partition import Partition
from orchestrator._engine.restore import _Restorer
from orchestrator._engine.state import fold
from orchestrator._engine.store import StoreBatch
from orchestrator._partitioner import partition_for
from orchestrator._payloads import from_payload, to_payload
from orchestrator.errors import ContinueAsNew
from orchestrator.schedule import ScheduleSpec, ScheduleWorkflow, target_id, with_schedules
from orchestrator.testing import Replayer
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

from .sagas import Done, Step, step_a, undo_a
from .test_decide import NOW, PARTITIONS, Core, Record

# --------------------------------------------------------------------------- workflows


class Count(BaseModel):
    n: int = 0
    limit: int = 1


@workflow.defn(name="timed-saga")
class TimedSaga:
    """A step with its compensation, then a long wait: what an execution timeout cuts."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, count: Count) -> Done:
        async with ctx.saga():
            done = await ctx.call(
                step_a, Step(n=1), compensate=workflow.Compensation(undo_a, Step(n=1))
            )
            await ctx.sleep(timedelta(days=1))
        return done


@workflow.defn(name="looper")
class Looper:
    """One step per run; continues as new until ``limit`` runs are done."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, count: Count) -> Count:
        await ctx.call(step_a, Step(n=count.n))
        if count.n + 1 < count.limit:
            ctx.continue_as_new(Count(n=count.n + 1, limit=count.limit))
        return count


@workflow.defn(name="eager")
class Eager:
    """Continues as new without awaiting anything: refused, it would loop without end."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, count: Count) -> None:
        ctx.continue_as_new(count)


@workflow.defn(name="catches-everything")
class CatchesEverything:
    """``except Exception`` does not swallow a continue-as-new."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, count: Count) -> str:
        await ctx.sleep(timedelta(seconds=1))
        if count.n == 0:
            try:
                ctx.continue_as_new(Count(n=1))
            except Exception:
                return "swallowed"
        return "second run"


WORKFLOWS = (TimedSaga, Looper, Eager, CatchesEverything, ScheduleWorkflow)


class Engine(Core):
    """The test_decide core with these workflows, at any time, committing every batch."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, workflows=WORKFLOWS)
        self.compacted: dict[str, bytes] = {}  # the history topic after compaction: live keys
        self.tombstoned: set[str] = set()
        self.log: list[tuple[bytes, bytes | None]] = []  # the history topic, in order

    def _commit(self, batch: Batch) -> Batch:
        self.commit(batch)
        for out in batch.outputs:
            if out.topic == "ns.history":
                self.log.append((out.key, out.value))
                key = out.key.decode()
                if out.value is None:
                    self.compacted.pop(key, None)
                    self.tombstoned.add(key)
                else:
                    self.compacted[key] = out.value
        return batch

    def send(self, envelope: StartWorkflow | ActivityReply, at: int = NOW) -> Batch:
        wf = envelope.workflow_id
        self._offset += 1
        batch = Batch()
        number = partition_for(wf.encode(), PARTITIONS)
        record = Record(codec.encode(envelope), wf.encode(), number, self._offset)
        self.decider.handle(self.parts[number], record, batch, at)
        return self._commit(batch)

    def tick(self, at: int) -> Batch:
        batch = Batch()
        self.decider.fire_timers(self.parts.values(), batch, at)
        return self._commit(batch)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(tmp_path)
    yield e
    e.close()


def begin(
    wf: str,
    kind: str,
    arg: BaseModel,
    *,
    request: str = "r1",
    timeout_ms: int | None = None,
    reuse: IdReusePolicy = IdReusePolicy.REJECT_DUPLICATE,
) -> StartWorkflow:
    return StartWorkflow(
        workflow_id=wf,
        workflow_type=kind,
        request_id=request,
        input=to_payload(arg),
        sent_at_ms=NOW,
        execution_timeout_ms=timeout_ms,
        id_reuse=reuse,
    )


def commands(batch: Batch) -> list[ActivityCommand]:
    return [
        codec.decode_as(o.value or b"", ActivityCommand)
        for o in batch.outputs
        if o.topic.endswith(".commands") and o.value
    ]


def answer(cmd: ActivityCommand, outcome: ReplyOutcome = ReplyOutcome.SUCCESS) -> ActivityReply:
    return ActivityReply(
        workflow_id=cmd.workflow_id,
        seq=cmd.seq,
        attempt=cmd.attempt,
        idempotency_key=cmd.idempotency_key,
        outcome=outcome,
        sent_at_ms=NOW,
        result=to_payload(Done(n=cmd.seq, ref=cmd.activity_name)),
    )


def results(batch: Batch) -> list[WorkflowResult]:
    return [
        codec.decode_as(o.value or b"", WorkflowResult)
        for o in batch.outputs
        if o.topic == "ns.results"
    ]


def events(batch: Batch) -> list[HistoryEvent]:
    return [
        codec.decode_as(o.value, HistoryEvent)
        for o in batch.outputs
        if o.topic == "ns.history" and o.value is not None
    ]


def starts(batch: Batch) -> list[StartWorkflow]:
    return [
        codec.decode_as(o.value or b"", StartWorkflow)
        for o in batch.outputs
        if o.topic == "ns.inbox" and o.value
    ]


def out(result: WorkflowResult) -> Payload:
    assert result.result is not None, result
    return result.result


def part_of(engine: Engine, wf: str) -> Partition:
    return engine.parts[partition_for(wf.encode(), PARTITIONS)]


# --------------------------------------------------------------------------- execution timeout


def test_an_execution_timeout_fails_the_workflow_after_its_saga_compensated(
    engine: Engine,
) -> None:
    (cmd,) = commands(engine.send(begin("t-1", "timed-saga", Count(), timeout_ms=10_000)))
    engine.send(answer(cmd), at=NOW + 100)
    assert engine.tick(NOW + 9_999).outputs == []  # not yet: only the day-long timer waits
    fired = engine.tick(NOW + 10_000)
    assert [e.event.kind for e in events(fired)][:2] == ["WorkflowTimedOut", "ActivityScheduled"]
    (undo,) = commands(fired)
    assert (undo.activity_name, undo.is_compensation) == ("a.undo", True)
    (result,) = results(engine.send(answer(undo), at=NOW + 10_100))
    assert result.status is WorkflowStatus.COMPENSATED
    assert result.error is not None and result.error.type == "WorkflowTimedOut"
    assert "10000 ms" in result.error.message and result.request_id == "r1"


def test_a_workflow_that_finishes_in_time_is_not_timed_out(engine: Engine) -> None:
    (cmd,) = commands(engine.send(begin("t-2", "looper", Count(limit=1), timeout_ms=10_000)))
    (result,) = results(engine.send(answer(cmd), at=NOW + 100))
    assert result.status is WorkflowStatus.COMPLETED
    assert engine.tick(NOW + 20_000).outputs == []


def test_the_timeout_is_recorded_and_survives_a_rebuild(engine: Engine) -> None:
    started = events(engine.send(begin("t-3", "timed-saga", Count(), timeout_ms=5_000)))[0]
    assert started.event.kind == "WorkflowStarted"
    assert started.event.execution_timeout_ms == 5_000
    part = part_of(engine, "t-3")
    part.forget("t-3")  # the next input rebuilds it from the store, like after a restart
    assert part.next_due_ms() == NOW + 5_000
    assert events(engine.tick(NOW + 5_000))[0].event.kind == "WorkflowTimedOut"


# --------------------------------------------------------------------------- continue-as-new


def test_a_loop_of_200_runs_keeps_a_bounded_history(engine: Engine) -> None:
    batch = engine.send(begin("loop", "looper", Count(limit=200)))
    keys: set[str] = set()
    most_live = 0
    for i in range(200):
        (cmd,) = commands(batch)
        assert cmd.input == to_payload(Step(n=i))
        keys.add(cmd.idempotency_key)
        batch = engine.send(answer(cmd), at=NOW + i)
        most_live = max(most_live, sum(k.startswith("loop/") for k in engine.compacted))
    (result,) = results(batch)
    assert result.status is WorkflowStatus.COMPLETED and result.request_id == "r1"
    assert from_payload(out(result), Count) == Count(n=199, limit=200)
    assert len(keys) == 200  # every run's step has its own idempotency key
    # After compaction the topic holds the last run only (3 events: started, scheduled,
    # completed... and the end); the store too.
    live = sorted(int(k.split("/")[1]) for k in engine.compacted if k.startswith("loop/"))
    assert len(live) <= 4 and most_live <= 7, (live, most_live)
    stored = part_of(engine, "loop").store.events("loop")
    assert [e.event_seq for e in stored] == live
    # The live events fold to the finished workflow, as describe and a restore see it.
    state = fold(
        "loop", [codec.decode_as(engine.compacted[f"loop/{s}"], HistoryEvent) for s in live]
    )
    assert state.status is WorkflowStatus.COMPLETED and state.run_start_seq == live[0]
    # The replay tools take the last run's history as it is (it does not start at 1).
    replayed = Replayer(WORKFLOWS).replay(stored)
    assert replayed.status is WorkflowStatus.COMPLETED
    with pytest.raises(ValueError, match="gap"):
        Replayer(WORKFLOWS).replay(stored[1:])


@pytest.mark.parametrize("compacted", [False, True])
def test_a_restore_from_the_topic_keeps_the_last_run_only(
    engine: Engine, tmp_path: Path, compacted: bool
) -> None:
    batch = engine.send(begin("loop4", "looper", Count(limit=4)))
    for i in range(3):
        (cmd,) = commands(batch)
        batch = engine.send(answer(cmd), at=NOW + i)
    log = engine.log
    if compacted:  # what compaction leaves: the last record of each key, in offset order
        last = {key: i for i, (key, _) in enumerate(log)}
        log = [rec for i, rec in enumerate(log) if last[rec[0]] == i]
    fresh = Partition(0, tmp_path / "fresh", WorkflowRegistry(WORKFLOWS))
    try:
        restorer = _Restorer(fresh, from_scratch=True)
        for key, value in log:
            restorer.apply(key, value, "test")
        restorer.flush(len(log))
        assert restorer.skipped == 0
        mine = part_of(engine, "loop4").store.events("loop4")
        assert fresh.store.events("loop4") == mine
        summary = fresh.store.summary("loop4")
        assert summary is not None and summary.run_start_seq == mine[0].event_seq > 1
        # ... and the node goes on from it.
        (cmd,) = commands(batch)
        run = fresh.get("loop4")
        assert run is not None and run.run.state.activities[cmd.seq].idempotency_key == (
            cmd.idempotency_key
        )
    finally:
        fresh.close()


def test_continue_as_new_after_a_restart_goes_on_from_the_store(engine: Engine) -> None:
    batch = engine.send(begin("loop2", "looper", Count(limit=5)))
    for i in range(3):
        (cmd,) = commands(batch)
        batch = engine.send(answer(cmd), at=NOW + i)
    part = part_of(engine, "loop2")
    part.forget("loop2")  # rebuilt from the current run's events only
    for i in range(3, 5):
        (cmd,) = commands(batch)
        assert cmd.input == to_payload(Step(n=i))
        batch = engine.send(answer(cmd), at=NOW + i)
    (result,) = results(batch)
    assert from_payload(out(result), Count).n == 4


def test_a_late_reply_to_an_earlier_run_is_ignored_not_dead_lettered(engine: Engine) -> None:
    (first,) = commands(engine.send(begin("loop3", "looper", Count(limit=3))))
    engine.send(answer(first))
    again = engine.send(answer(first))  # the same reply delivered again, to the old run
    assert [e.event.kind for e in events(again)] == ["LateReplyIgnored"]
    assert not [o for o in again.outputs if o.topic == "ns.dlq"]


def test_continue_as_new_before_awaiting_anything_fails_the_workflow(engine: Engine) -> None:
    (result,) = results(engine.send(begin("eager", "eager", Count())))
    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and "awaited nothing" in result.error.message


def test_except_exception_does_not_swallow_continue_as_new(engine: Engine) -> None:
    assert not issubclass(ContinueAsNew, Exception)
    engine.send(begin("catch", "catches-everything", Count()))
    engine.tick(NOW + 1_000)
    (result,) = results(engine.tick(NOW + 2_000))
    assert from_payload(out(result), str) == "second run"


# --------------------------------------------------------------------------- id reuse


def _finish_looper(engine: Engine, wf: str, request: str, reuse: IdReusePolicy) -> Batch:
    (cmd,) = commands(engine.send(begin(wf, "looper", Count(), request=request, reuse=reuse)))
    return engine.send(answer(cmd))


def test_reject_duplicate_is_the_default_and_what_it_was(engine: Engine) -> None:
    _finish_looper(engine, "r", "r1", IdReusePolicy.REJECT_DUPLICATE)
    assert engine.send(begin("r", "looper", Count(), request="r2")).outputs == []  # same start
    (rejected,) = results(engine.send(begin("r", "looper", Count(n=5), request="r3")))
    assert rejected.error is not None and rejected.error.type == "WorkflowIdConflict"
    assert rejected.request_id == "r3"


def test_allow_duplicate_starts_a_new_run_once_the_old_one_closed(engine: Engine) -> None:
    allow = IdReusePolicy.ALLOW_DUPLICATE
    (cmd,) = commands(engine.send(begin("a", "looper", Count(), request="r1", reuse=allow)))
    # While the first runs, another start with other input is a conflict, as before.
    (busy,) = results(engine.send(begin("a", "looper", Count(n=7), request="r2", reuse=allow)))
    assert busy.error is not None and busy.error.type == "WorkflowIdConflict"
    (first,) = results(engine.send(answer(cmd)))
    assert first.request_id == "r1"
    old_keys = {k for k in engine.compacted if k.startswith("a/")}
    batch = engine.send(begin("a", "looper", Count(n=7), request="r3", reuse=allow))
    (new_cmd,) = commands(batch)
    assert new_cmd.idempotency_key != cmd.idempotency_key
    assert old_keys <= engine.tombstoned  # the old run's events go; its result stays
    (second,) = results(engine.send(answer(new_cmd)))
    assert second.request_id == "r3" and from_payload(out(second), Count).n == 7


def test_terminate_if_running_ends_the_running_run_and_starts_anew(engine: Engine) -> None:
    (cmd,) = commands(engine.send(begin("x", "timed-saga", Count(), request="r1")))
    batch = engine.send(
        begin("x", "looper", Count(n=3), request="r2", reuse=IdReusePolicy.TERMINATE_IF_RUNNING)
    )
    (terminated,) = results(batch)
    assert terminated.request_id == "r1" and terminated.status is WorkflowStatus.TERMINATED
    assert terminated.error is not None and "TERMINATE_IF_RUNNING" in terminated.error.message
    (new_cmd,) = commands(batch)  # no compensation ran for the terminated run
    assert new_cmd.activity_name == "a.do" and new_cmd.input == to_payload(Step(n=3))
    late = engine.send(answer(cmd))  # the terminated run's step answers late
    assert [e.event.kind for e in events(late)] == ["LateReplyIgnored"]
    (done,) = results(engine.send(answer(new_cmd)))
    assert done.request_id == "r2" and done.status is WorkflowStatus.COMPLETED


# --------------------------------------------------------------------------- schedules


def _schedule(name: str, every_ms: int, catch_up_ms: int = 3_600_000) -> StartWorkflow:
    spec = ScheduleSpec(
        name=name,
        workflow_type="looper",
        input={"n": 0, "limit": 1},
        every_ms=every_ms,
        catch_up_ms=catch_up_ms,
    )
    return begin(f"schedule:{name}", "orchestrator.schedule", spec, request=f"create-{name}")


def test_a_schedule_starts_each_tick_once_with_an_id_of_its_own(engine: Engine) -> None:
    assert NOW % 1000 == 0
    engine.send(_schedule("s", every_ms=1000))
    started: list[str] = []
    for at in (NOW + 1000, NOW + 2000, NOW + 2500, NOW + 3000):
        started += [s.workflow_id for s in starts(engine.tick(at))]
    assert started == [target_id("s", NOW + k * 1000) for k in (1, 2, 3)]
    # The schedule's own history stays one run long.
    live = [k for k in engine.compacted if k.startswith("schedule:s/")]
    assert len(live) <= 3, live


def test_missed_ticks_are_started_late_within_the_catch_up_window(engine: Engine) -> None:
    engine.send(_schedule("late", every_ms=1000, catch_up_ms=2500))
    engine.tick(NOW + 1000)
    # No node ran for 9 s: ticks older than 2.5 s at the wake are skipped, the rest started.
    late = [s.workflow_id for s in starts(engine.tick(NOW + 10_000))]
    assert late == [target_id("late", NOW + k * 1000) for k in (8, 9, 10)]


def test_a_schedule_goes_on_after_a_restart_without_a_duplicate(engine: Engine) -> None:
    engine.send(_schedule("r", every_ms=1000))
    seen = [s.workflow_id for s in starts(engine.tick(NOW + 1000))]
    part = part_of(engine, "schedule:r")
    part.forget_all()  # a restart: the run is rebuilt from its store
    part.reload_timers()
    for at in (NOW + 2000, NOW + 3000):
        seen += [s.workflow_id for s in starts(engine.tick(at))]
    assert seen == [target_id("r", NOW + k * 1000) for k in (1, 2, 3)]
    # The started workflow is a duplicate of itself when started again: the same id/request.
    (again,) = [s for s in starts(engine.tick(NOW + 4000))]
    assert again.request_id == f"schedule:r@{NOW + 4000}"


def test_cron_ticks_with_and_without_seconds() -> None:
    at = int(datetime(2026, 1, 1, 0, 3, tzinfo=UTC).timestamp() * 1000)
    five = ScheduleSpec(name="c", workflow_type="t", cron="*/5 * * * *")
    assert five.next_tick(at) == at + 2 * 60_000
    seconds = ScheduleSpec(name="c", workflow_type="t", cron="*/2 * * * * *")
    assert seconds.next_tick(at) == at + 2_000
    with pytest.raises(ValueError, match="invalid cron"):
        ScheduleSpec(name="c", workflow_type="t", cron="every minute")
    with pytest.raises(ValueError, match="exactly one"):
        ScheduleSpec(name="c", workflow_type="t")


def test_a_schedule_with_a_bad_cron_is_rejected_with_a_result(engine: Engine) -> None:
    start = begin(
        "schedule:bad",
        "orchestrator.schedule",
        Count(),  # not a ScheduleSpec
        request="bad",
    )
    (result,) = results(engine.send(start))
    assert result.error is not None and result.error.type == "InvalidInput"


def test_registry_of_a_node_has_the_schedule_workflow() -> None:
    registry = with_schedules(WorkflowRegistry([Looper]))
    assert registry.names() == ["looper", "orchestrator.schedule"]


def test_a_restore_leaves_no_summary_for_a_tombstone_alone(tmp_path: Path) -> None:
    fresh = Partition(0, tmp_path / "fresh", WorkflowRegistry(WORKFLOWS))
    try:
        restorer = _Restorer(fresh, from_scratch=True)
        restorer.apply(b"gone/1", None, "test")
        restorer.flush(1)
        assert list(fresh.store.summaries()) == []
    finally:
        fresh.close()


def test_retention_tombstones_only_the_last_run_of_a_continued_workflow(engine: Engine) -> None:
    batch = engine.send(begin("old", "looper", Count(limit=3)))
    for i in range(3):
        (cmd,) = commands(batch)
        batch = engine.send(answer(cmd), at=NOW + i)
    summary = part_of(engine, "old").store.summary("old")
    assert summary is not None and summary.run_start_seq > 1
    expired = Batch()
    later = NOW + engine.settings.retention_ms + 60_000
    engine.decider.expire_finished(engine.parts.values(), expired, later)
    keys = sorted(int(o.key.decode().split("/")[1]) for o in expired.outputs if o.value is None)
    assert keys == list(range(summary.run_start_seq, summary.last_seq + 1))
    engine._commit(expired)
    assert part_of(engine, "old").store.events("old") == []
    assert not any(k.startswith("old/") for k in engine.compacted)


def test_a_cron_schedule_runs_inside_the_determinism_guard(engine: Engine) -> None:
    spec = ScheduleSpec(name="cron", workflow_type="looper", input={}, cron="*/2 * * * * *")
    engine.send(begin("schedule:cron", "orchestrator.schedule", spec, request="c"))
    seen = [s.workflow_id for at in range(1, 7) for s in starts(engine.tick(NOW + at * 1000))]
    assert seen == [target_id("cron", NOW + k * 1000) for k in (2, 4, 6)]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["schedule", "create", "x", "--cron", "bad cron", "--type", "t"], 1, "invalid cron"),
        (["schedule", "create", "x", "--type", "t"], 2, "give one of --cron and --every"),
        (["schedule", "create", "x", "--every", "0.5", "--type", "t"], 2, "--every"),
        (["start", "t", "--execution-timeout", "0"], 2, "--execution-timeout"),
        (["start", "t", "--id-reuse", "sometimes"], 2, "--id-reuse"),
    ],
)
def test_cli_refuses_bad_schedules_and_start_options_before_sending(
    args: list[str], code: int, says: str
) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main

    out = CliRunner().invoke(main, ["--bootstrap", "127.0.0.1:1", *args])
    assert out.exit_code == code and says in out.output, out.output
    assert "Traceback" not in out.output and "Value error" not in out.output


def test_both_clients_put_the_timeout_and_the_policy_in_the_start(tmp_path: Path) -> None:
    import inspect

    from orchestrator.aio import AsyncClient
    from orchestrator.client import Client
    from orchestrator.settings import Settings

    for method in (Client.start, AsyncClient.start):
        params = inspect.signature(method).parameters
        assert {"execution_timeout", "id_reuse"} <= set(params), method
    client = Client(Settings(namespace="ns", state_dir=tmp_path))
    try:
        start, _ = client._start_envelope(
            "t", {}, "wf", None, timedelta(seconds=5), "ALLOW_DUPLICATE"
        )
        assert start.execution_timeout_ms == 5_000
        assert start.id_reuse is IdReusePolicy.ALLOW_DUPLICATE
        with pytest.raises(ValueError, match="positive"):
            client._start_envelope("t", {}, "wf", None, 0, IdReusePolicy.REJECT_DUPLICATE)
    finally:
        client.close()


def test_retention_reads_its_index_expiring_only_what_finished_before_the_cutoff(
    engine: Engine,
) -> None:
    """Retention walks the index of finished workflows up to the cutoff (not every summary):
    one that finished before it goes, a younger one stays until its own time has come."""
    retention = engine.settings.retention_ms
    for wf, at in (("early", NOW), ("late", NOW + 600_000)):
        batch = engine.send(begin(wf, "looper", Count(limit=1)), at=at)
        for cmd in commands(batch):
            engine.send(answer(cmd), at=at)
        summary = part_of(engine, wf).store.summary(wf)
        assert summary is not None and summary.finished_at_ms == at

    def expire(at: int) -> set[str]:
        batch = Batch()
        engine.decider._last_retention = 0  # retention runs at most every 5 s
        engine.decider.expire_finished(engine.parts.values(), batch, at)
        engine._commit(batch)
        return {wf for _, wf in batch.removed}

    assert expire(NOW + retention + 1) == {"early"}
    assert part_of(engine, "early").store.summary("early") is None
    assert part_of(engine, "late").store.summary("late") is not None
    assert expire(NOW + retention + 2) == set()  # its index key went with it
    assert expire(NOW + 600_000 + retention + 1) == {"late"}
    assert list(part_of(engine, "late").store.finished_by(1 << 60)) == []


def test_retention_drops_a_stale_index_key_and_keeps_its_workflow(engine: Engine) -> None:
    """A workflow that finished and runs again (a new run of the same id) leaves its first
    index key behind: retention drops the key and leaves the running workflow alone."""
    batch = engine.send(begin("again", "looper", Count(limit=1)))
    for cmd in commands(batch):
        engine.send(answer(cmd))
    store = part_of(engine, "again").store
    finished = store.summary("again")
    assert finished is not None and finished.finished_at_ms == NOW
    running = StoreBatch()
    running.set_summary(dataclasses.replace(finished, status="RUNNING", finished_at_ms=None), None)
    store.write(running)
    assert list(store.finished_by(1 << 60)) == [(NOW, "again")]

    expired = Batch()
    engine.decider.expire_finished(
        engine.parts.values(), expired, NOW + engine.settings.retention_ms + 1
    )
    engine._commit(expired)
    assert expired.removed == []
    assert list(store.finished_by(1 << 60)) == []
    assert store.summary("again") is not None
