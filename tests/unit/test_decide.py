"""The node's decisions without Kafka: every path of ``Decider`` on a store in a temp dir."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contracts import codec
from contracts.envelopes import (
    ActivityCommand,
    ActivityReply,
    DeadLetter,
    ErrorInfo,
    HistoryEvent,
    OperatorAction,
    ReplyOutcome,
    SignalWorkflow,
    StartWorkflow,
    WorkflowBlocked,
    WorkflowResult,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator._engine.decide import MAX_RECORD_BYTES, Batch, Counters, Decider, Out
from orchestrator._engine.partition import Partition
from orchestrator._engine.restore import RestoreReport
from orchestrator._partitioner import partition_for
from orchestrator._payloads import to_payload
from orchestrator.errors import WorkflowFailure
from orchestrator.settings import Settings
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

from .sagas import (
    Done,
    Step,
    ThreeSteps,
    Trip,
    TripResult,
    WaitsForSignal,
    step_a,
    step_b,
    step_c,
    undo_a,
)

PARTITIONS = 3
NOW = 1_700_000_000_000


@dataclass
class Record:
    """An inbox record as a consumer hands it over (the parts the decider reads)."""

    _value: bytes | None
    _key: bytes | None
    _partition: int
    _offset: int = 0

    def topic(self) -> str:
        return "ns.inbox"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [("traceparent", b"00-abc")]


class Core:
    """A decider, one partition per number, and a fresh batch per call."""

    def __init__(
        self,
        tmp: Path,
        missing_topics: frozenset[str] = frozenset(),
        workflows: tuple[type, ...] = (ThreeSteps, WaitsForSignal),
    ) -> None:
        self.settings = Settings(namespace="ns", partitions=PARTITIONS, state_dir=tmp)
        registry = WorkflowRegistry(workflows)
        self.parts = {n: Partition(n, tmp / f"p{n}", registry) for n in range(PARTITIONS)}
        self.counters = Counters()
        self.decider = Decider(
            self.settings,
            registry,
            self.counters,
            topic_exists=lambda topic: topic not in missing_topics,
        )
        self._offset = 0

    def close(self) -> None:
        for part in self.parts.values():
            part.close()

    def commit(self, batch: Batch) -> None:
        """What the processor writes locally once the batch's transaction committed."""
        for (number, _wf), cached in batch.touched.items():
            self.parts[number].summarize(cached, batch.store(number))
        for number, store_batch in batch.stores.items():
            self.parts[number].store.write(store_batch)

    def feed(self, value: bytes | None, key: bytes | None, partition: int | None = None) -> Batch:
        """One inbox record, on the workflow's partition unless ``partition`` says otherwise."""
        if partition is None:
            partition = partition_for(key or b"", PARTITIONS)
        self._offset += 1
        batch = Batch()
        record = Record(value, key, partition, self._offset)
        self.decider.handle(self.parts[partition], record, batch, NOW)
        return batch


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    c = Core(tmp_path)
    yield c
    c.close()


def start(wf: str, kind: str = "three-steps", payload: object = None) -> bytes:
    return codec.encode(
        StartWorkflow(
            workflow_id=wf,
            workflow_type=kind,
            request_id=f"r-{wf}",
            input=to_payload(Trip() if payload is None else payload),
            sent_at_ms=NOW,
        )
    )


def on(batch: Batch, topic: str) -> list[Out]:
    return [out for out in batch.outputs if out.topic == topic]


def letters(batch: Batch) -> list[DeadLetter]:
    return [codec.decode_as(o.value or b"", DeadLetter) for o in on(batch, "ns.dlq")]


def results(batch: Batch) -> list[WorkflowResult]:
    return [codec.decode_as(o.value or b"", WorkflowResult) for o in on(batch, "ns.results")]


def test_a_start_writes_its_first_events_and_sends_the_first_command(core: Core) -> None:
    batch = core.feed(start("wf-1"), b"wf-1")
    history = [codec.decode_as(o.value or b"", HistoryEvent) for o in on(batch, "ns.history")]
    assert [e.event.kind for e in history] == ["WorkflowStarted", "ActivityScheduled"]
    assert {o.partition for o in on(batch, "ns.history")} == {partition_for("wf-1", PARTITIONS)}
    (command,) = on(batch, "svc-a.commands")
    assert codec.decode_as(command.value or b"", ActivityCommand).reply_topic == "ns.inbox"
    assert batch.offsets == {partition_for("wf-1", PARTITIONS): 2}
    assert core.counters.started == 1


def test_the_same_start_again_is_answered_by_the_running_workflow(core: Core) -> None:
    core.feed(start("wf-1"), b"wf-1")
    assert core.feed(start("wf-1"), b"wf-1").outputs == []


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (start("wf-1", payload=Trip(fail_at=2)), "WorkflowIdConflict"),
        (start("wf-1", kind="no-such-type"), "UnknownWorkflowType"),
        (start("wf-1", payload={"fail_at": "not a number"}), "InvalidInput"),
    ],
)
def test_a_rejected_start_gets_a_dead_letter_and_a_failed_result(
    core: Core, value: bytes, error_type: str
) -> None:
    if error_type == "WorkflowIdConflict":
        core.feed(start("wf-1"), b"wf-1")
    batch = core.feed(value, b"wf-1")
    assert [d.error_type for d in letters(batch)] == [error_type]
    (result,) = results(batch)
    assert result.status == WorkflowStatus.FAILED and result.error is not None
    assert result.error.type == error_type
    assert on(batch, "ns.history") == []


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (None, "EmptyRecord"),
        (b"\x00random bytes", "BadMagic"),
        (start("wf-1")[:-5], None),  # truncated: the codec names it
        (b"\xc3\x01" + b"\x00" * (MAX_RECORD_BYTES + 1), "Oversized"),
        (start("x" * 300), "InvalidId"),
        (start("a\0b"), "InvalidId"),
        (
            codec.encode(
                ActivityCommand(
                    workflow_id="wf-1",
                    activity_name="a.do",
                    seq=1,
                    attempt=1,
                    idempotency_key="k",
                    is_compensation=False,
                    input=to_payload(Step(n=1)),
                    reply_topic="ns.inbox",
                    sent_at_ms=NOW,
                )
            ),
            "WrongTopic",
        ),
        (
            codec.encode(
                ActivityReply(
                    workflow_id="nobody",
                    seq=1,
                    attempt=1,
                    idempotency_key="nobody/1",
                    outcome=ReplyOutcome.SUCCESS,
                    sent_at_ms=NOW,
                )
            ),
            "UnknownWorkflow",
        ),
        (
            codec.encode(
                SignalWorkflow(
                    workflow_id="nobody",
                    signal_name="approve",
                    request_id="r",
                    payload=to_payload(Step(n=1)),
                    sent_at_ms=NOW,
                )
            ),
            "UnknownWorkflow",
        ),
    ],
)
def test_bad_records_are_dead_lettered_with_their_reason(
    core: Core, value: bytes | None, error_type: str | None
) -> None:
    # Keyed by the workflow the record names, so that it is decided here, not forwarded.
    key = b"nobody" if value is not None and b"nobody" in value else b"wf-1"
    batch = core.feed(value, key)
    (letter,) = letters(batch)
    assert letter.source_topic == "ns.inbox" and letter.reason
    if error_type is not None:
        assert letter.error_type == error_type, letter.reason
    assert on(batch, "ns.history") == []
    assert batch.offsets  # consumed: the partition moves on


def test_a_record_on_another_partition_than_its_workflow_is_forwarded(core: Core) -> None:
    home = partition_for("wf-1", PARTITIONS)
    elsewhere = (home + 1) % PARTITIONS
    batch = core.feed(start("wf-1"), None, partition=elsewhere)
    (forward,) = batch.outputs
    assert (forward.topic, forward.key, forward.partition) == ("ns.inbox", b"wf-1", home)
    assert forward.headers == [
        ("traceparent", b"00-abc"),
        ("saga-forwarded-from", f"ns.inbox[{elsewhere}]@1"),
    ]
    assert batch.offsets == {elsewhere: 2}
    assert core.counters.forwarded == 1
    assert core.parts[elsewhere].get("wf-1") is None  # nothing started on the wrong partition


def test_a_signal_for_a_finished_workflow_is_dead_lettered(core: Core) -> None:
    wf = "waiter"
    core.feed(start(wf, kind="waits-for-signal", payload=Step(n=1)), wf.encode())
    signal = codec.encode(
        SignalWorkflow(
            workflow_id=wf,
            signal_name="approve",
            request_id="s1",
            payload=to_payload(Step(n=2)),
            sent_at_ms=NOW,
        )
    )
    done = core.feed(signal, wf.encode())
    assert [r.status for r in results(done)] == [WorkflowStatus.COMPLETED]
    again = codec.encode(
        SignalWorkflow(
            workflow_id=wf,
            signal_name="approve",
            request_id="s2",
            payload=to_payload(Step(n=3)),
            sent_at_ms=NOW,
        )
    )
    assert [d.error_type for d in letters(core.feed(again, wf.encode()))] == ["WorkflowFinished"]


def test_a_missing_command_topic_fails_the_attempt_instead_of_sending(tmp_path: Path) -> None:
    core = Core(tmp_path, missing_topics=frozenset({"svc-a.commands"}))
    try:
        batch = core.feed(start("wf-1"), b"wf-1")
    finally:
        core.close()
    assert on(batch, "svc-a.commands") == []
    history = [codec.decode_as(o.value or b"", HistoryEvent) for o in on(batch, "ns.history")]
    failed = [e.event for e in history if e.event.kind == "ActivityAttemptFailed"]
    assert failed and "does not exist" in str(failed[0])


def test_a_record_whose_outputs_were_refused_is_dead_lettered_when_read_again(
    core: Core,
) -> None:
    home = partition_for("wf-1", PARTITIONS)
    core.decider.refuse((home, 1), "ns.history record of 2000000 bytes refused")
    batch = core.feed(start("wf-1"), b"wf-1")
    assert [d.error_type for d in letters(batch)] == ["ProduceFailed"]
    assert [r.error.type for r in results(batch) if r.error] == ["ProduceFailed"]
    assert on(batch, "ns.history") == []


def test_history_records_skipped_by_a_restore_are_tombstoned(core: Core) -> None:
    core.decider.restored(RestoreReport(1, 0, 0, 0.0, 1, (b"forged",)))
    batch = Batch()
    core.decider.repair_history(core.parts, batch)
    assert [(o.topic, o.key, o.value, o.partition) for o in batch.outputs] == [
        ("ns.history", b"forged", None, 1)
    ]
    assert 1 in batch.stores  # the transaction carries the partition's fencing offset


@workflow.defn(name="three-steps")
class ThreeStepsReordered:
    """A deploy that changed the order of the calls: c before b."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
        a = await ctx.call(step_a, Step(n=1))
        c = await ctx.call(step_c, Step(n=3))
        b = await ctx.call(step_b, Step(n=2))
        return TripResult(refs=[a.ref, b.ref, c.ref], at="", token="")


def reply(wf: str, seq: int) -> bytes:
    return codec.encode(
        ActivityReply(
            workflow_id=wf,
            seq=seq,
            attempt=1,
            idempotency_key=f"{wf}/{seq}",
            outcome=ReplyOutcome.SUCCESS,
            sent_at_ms=NOW,
            result=to_payload(Done(n=seq, ref=f"r{seq}")),
        )
    )


def kinds(batch: Batch) -> list[str]:
    return [
        codec.decode_as(o.value or b"", HistoryEvent).event.kind for o in on(batch, "ns.history")
    ]


def test_code_that_disagrees_with_a_history_blocks_it_keeps_its_inputs_and_resumes(
    tmp_path: Path,
) -> None:
    """v1 runs two steps; v2 (calls reordered) meets the history: the workflow is BLOCKED, the
    reply that arrives is kept in the history and nothing is sent; rolled back to v1, the node
    wakes it after the restore and it finishes with that reply."""
    wf, home = "deploy-1", partition_for("deploy-1", PARTITIONS)
    v1 = Core(tmp_path)
    v1.commit(v1.feed(start(wf), wf.encode()))
    v1.commit(v1.feed(reply(wf, 1), wf.encode()))  # a done: b#2 is scheduled
    v1.close()

    v2 = Core(tmp_path, workflows=(ThreeStepsReordered,))
    blocked = v2.feed(reply(wf, 2), wf.encode())
    v2.commit(blocked)
    assert kinds(blocked) == ["WorkflowBlocked", "ActivityCompleted"]
    assert on(blocked, "svc-c.commands") == [] and results(blocked) == []
    block = codec.decode_as(on(blocked, "ns.history")[0].value or b"", HistoryEvent).event
    assert isinstance(block, WorkflowBlocked) and block.error is not None
    assert "activity b.do #2" in block.error.message and "test_decide.py" in block.error.message
    summary = v2.parts[home].store.summary(wf)
    assert summary is not None and summary.status == "BLOCKED"
    assert v2.counters.blocked == 1
    v2.close()

    v1 = Core(tmp_path)
    v1.decider.restored(RestoreReport(home, 0, 0, 0.0))
    woken = Batch()
    v1.decider.wake_blocked(v1.parts, woken, NOW)
    v1.commit(woken)
    assert kinds(woken) == ["WorkflowBlocked", "ActivityScheduled"]  # no error: it moves again
    assert len(on(woken, "svc-c.commands")) == 1
    done = v1.feed(reply(wf, 3), wf.encode())
    assert [r.status for r in results(done)] == [WorkflowStatus.COMPLETED]
    v1.close()


def test_an_oversized_start_gets_a_failed_result(core: Core) -> None:
    batch = core.feed(start("big", payload={"pad": "x" * (MAX_RECORD_BYTES + 10)}), b"big")
    assert [d.error_type for d in letters(batch)] == ["Oversized"]
    assert [r.error.type for r in results(batch) if r.error] == ["Oversized"]


def test_an_oversized_reply_fails_its_attempt_and_the_saga_moves_on(core: Core) -> None:
    core.feed(start("wf-1"), b"wf-1")
    big = codec.encode(
        ActivityReply(
            workflow_id="wf-1",
            seq=1,
            attempt=1,
            idempotency_key="wf-1/1",
            outcome=ReplyOutcome.SUCCESS,
            sent_at_ms=NOW,
            result=to_payload(Done(n=1, ref="x" * (MAX_RECORD_BYTES + 10))),
        )
    )
    batch = core.feed(big, b"wf-1")
    assert [d.error_type for d in letters(batch)] == ["Oversized"]
    history = [codec.decode_as(o.value or b"", HistoryEvent).event for o in on(batch, "ns.history")]
    failed = [e for e in history if e.kind == "ActivityFailed"]
    assert failed and failed[0].error.type == "PayloadTooLarge"
    assert [r.status for r in results(batch)] == [WorkflowStatus.FAILED]


@workflow.defn(name="three-steps")
class ThreeStepsWithABug:
    """A deploy with a bug after the first step."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
        async with ctx.saga() as saga:
            a = await ctx.call(step_a, Step(n=1))
            saga.on_failure(undo_a, Step(n=1))
            ctx.call(step_b, Step(n=2))  # asked for, never sent: the bug below ends the step
            return TripResult(refs=[a.ref, trip.no_such_field], at="", token="")  # type: ignore[attr-defined]
        raise AssertionError("not reached")


@workflow.defn(name="three-steps")
class ThreeStepsThatGiveUp:
    @workflow.run
    async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
        async with ctx.saga() as saga:
            await ctx.call(step_a, Step(n=1))
            saga.on_failure(undo_a, Step(n=1))
            raise WorkflowFailure("the trip is off", error_type="TripOff")
        raise AssertionError("not reached")


def test_a_bug_in_workflow_code_blocks_it_without_compensating_and_fixed_code_resumes(
    tmp_path: Path,
) -> None:
    wf, home = "buggy", partition_for("buggy", PARTITIONS)
    buggy = Core(tmp_path, workflows=(ThreeStepsWithABug,))
    buggy.commit(buggy.feed(start(wf), wf.encode()))
    blocked = buggy.feed(reply(wf, 1), wf.encode())
    buggy.commit(blocked)
    assert kinds(blocked) == ["ActivityCompleted", "WorkflowBlocked"]
    assert blocked.outputs[-1].topic == "ns.history"  # no undo, no b: nothing was sent
    assert not on(blocked, "svc-a.commands") and not on(blocked, "svc-b.commands")
    block = codec.decode_as(on(blocked, "ns.history")[1].value or b"", HistoryEvent).event
    assert isinstance(block, WorkflowBlocked) and block.error is not None
    assert block.error.type == "CodeBug"
    assert "AttributeError" in block.error.message and "test_decide.py" in block.error.message
    buggy.close()

    fixed = Core(tmp_path)
    fixed.decider.restored(RestoreReport(home, 0, 0, 0.0))
    woken = Batch()
    fixed.decider.wake_blocked(fixed.parts, woken, NOW)
    assert kinds(woken) == ["WorkflowBlocked", "ActivityScheduled"]
    assert len(on(woken, "svc-b.commands")) == 1
    fixed.close()


def test_a_deliberate_failure_still_compensates_and_fails(tmp_path: Path) -> None:
    core = Core(tmp_path, workflows=(ThreeStepsThatGiveUp,))
    core.feed(start("off"), b"off")
    batch = core.feed(reply("off", 1), b"off")
    assert len(on(batch, "svc-a.commands")) == 1  # the undo
    done = core.feed(reply("off", 2), b"off")
    (result,) = results(done)
    assert result.status == WorkflowStatus.COMPENSATED
    assert result.error is not None and result.error.type == "TripOff"
    core.close()


def operator(wf: str, action: str, step: int | None = None, request: str = "op-1") -> bytes:
    return codec.encode(
        OperatorAction(
            workflow_id=wf,
            request_id=request,
            action=action,
            reason="INC-42",
            operator="alice",
            step_seq=step,
            sent_at_ms=NOW,
        )
    )


def failed_reply(wf: str, seq: int, attempt: int = 1, business: bool = True) -> bytes:
    return codec.encode(
        ActivityReply(
            workflow_id=wf,
            seq=seq,
            attempt=attempt,
            idempotency_key=f"{wf}/{seq}",
            outcome=ReplyOutcome.BUSINESS_FAILURE if business else ReplyOutcome.RETRYABLE_FAILURE,
            sent_at_ms=NOW,
            error=ErrorInfo(type="Refused", message="no"),
        )
    )


def test_terminate_records_who_and_why_and_answers_the_caller(core: Core) -> None:
    core.commit(core.feed(start("t-1"), b"t-1"))
    batch = core.feed(operator("t-1", "terminate"), b"t-1")
    core.commit(batch)
    assert kinds(batch) == ["OperatorActed"]
    (result,) = results(batch)
    assert result.status == WorkflowStatus.TERMINATED
    assert result.error is not None and result.error.message == "INC-42"
    # the reply to the step in flight is ignored; terminating again changes nothing
    assert kinds(core.feed(reply("t-1", 1), b"t-1")) == ["LateReplyIgnored"]
    again = core.feed(operator("t-1", "terminate", request="op-2"), b"t-1")
    assert again.outputs == []


def test_an_action_that_does_not_apply_is_dead_lettered_with_the_reason(core: Core) -> None:
    core.commit(core.feed(start("r-1"), b"r-1"))
    batch = core.feed(operator("r-1", "skip", step=1), b"r-1")
    assert kinds(batch) == []
    (letter,) = letters(batch)
    assert letter.error_type == "OperatorRefused"
    assert "not a parked compensation" in letter.reason
    unknown = core.feed(operator("nobody", "retry"), b"nobody")
    assert [d.error_type for d in letters(unknown)] == ["UnknownWorkflow"]


def test_a_parked_compensation_is_retried_by_an_operator_and_the_saga_ends(core: Core) -> None:
    wf = "park-1"
    core.commit(core.feed(start(wf), wf.encode()))
    core.commit(core.feed(reply(wf, 1), wf.encode()))
    core.commit(core.feed(reply(wf, 2), wf.encode()))
    core.commit(core.feed(failed_reply(wf, 3), wf.encode()))  # c refused: undo b (#4)
    core.commit(core.feed(reply(wf, 4), wf.encode()))  # b undone: undo a (#5)
    parked = core.feed(failed_reply(wf, 5), wf.encode())  # a's undo refused: parked
    core.commit(parked)
    assert kinds(parked) == ["ActivityParked"] and results(parked) == []
    summary = core.parts[partition_for(wf, PARTITIONS)].store.summary(wf)
    assert summary is not None and summary.status == "PARKED"
    retried = core.feed(operator(wf, "retry", step=5), wf.encode())
    core.commit(retried)
    assert kinds(retried) == ["OperatorActed", "ActivityAttemptStarted"]
    (command,) = [
        codec.decode_as(o.value or b"", ActivityCommand) for o in on(retried, "svc-a.commands")
    ]
    assert (command.seq, command.attempt, command.is_compensation) == (5, 2, True)
    assert command.idempotency_key == f"{wf}/5/retry1"  # the service runs it again
    done = core.feed(
        codec.encode(
            ActivityReply(
                workflow_id=wf,
                seq=5,
                attempt=2,
                idempotency_key=command.idempotency_key,
                outcome=ReplyOutcome.SUCCESS,
                sent_at_ms=NOW,
                result=to_payload(Done(n=5, ref="u")),
            )
        ),
        wf.encode(),
    )
    assert [r.status for r in results(done)] == [WorkflowStatus.COMPENSATED]


def test_a_restore_finds_a_workflow_this_code_cannot_replay_without_waiting_for_input(
    tmp_path: Path,
) -> None:
    """A deploy that breaks a sleeping workflow shows it BLOCKED at once, not when it wakes."""
    wf, home = "sleepy", partition_for("sleepy", PARTITIONS)
    v1 = Core(tmp_path)
    v1.commit(v1.feed(start(wf), wf.encode()))
    v1.commit(v1.feed(reply(wf, 1), wf.encode()))  # b#2 in flight, nothing else comes
    v1.close()
    v2 = Core(tmp_path, workflows=(ThreeStepsReordered,))
    v2.decider.restored(RestoreReport(home, 0, 0, 0.0))
    found = Batch()
    v2.decider.wake_blocked(v2.parts, found, NOW)
    v2.commit(found)
    assert kinds(found) == ["WorkflowBlocked"]
    summary = v2.parts[home].store.summary(wf)
    assert summary is not None and summary.status == "BLOCKED"
    # an operator's retry re-runs it on this code: still blocked, recorded, nothing sent
    retried = v2.feed(operator(wf, "retry"), wf.encode())
    assert kinds(retried) == ["OperatorActed"] and not on(retried, "svc-c.commands")
    v2.close()
