"""The engine against the real broker: orchestrator node and services in threads of this process."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from contracts import codec
from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityReply,
    DeadLetter,
    ReplyOutcome,
    RetryPolicy,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator.client import PayloadTooLarge
from orchestrator.errors import UnknownWorkflow, WorkflowFailedError
from orchestrator.kafka_config import consumer_config, producer_config
from orchestrator.partitioner import partition_for
from orchestrator.payloads import to_payload
from orchestrator.settings import Settings
from orchestrator.workflow import WorkflowContext

from .kit import (
    Approval,
    Done,
    Step,
    Trip,
    TripResult,
)
from .stack import Stack

pytestmark = pytest.mark.broker


def test_three_step_saga_completes(stack: Stack) -> None:
    result = stack.run(Trip(), "ok-1")
    assert result.refs == [
        f"{stack.kit.prefix}-{x}.do#{n}" for n, x in ((1, "a"), (2, "b"), (3, "c"))
    ]
    assert stack.kit.steps_of("ok-1") == ["do", "do", "do"]


def test_failure_at_step_three_compensates_two_then_one_exactly_once(stack: Stack) -> None:
    with pytest.raises(WorkflowFailedError) as info:
        stack.run(Trip(fail_at=3), "fail-3")
    assert info.value.status == WorkflowStatus.COMPENSATED.value
    assert info.value.error_type == "Refused"
    assert stack.kit.steps_of("fail-3") == ["do", "do", "undo", "undo"]
    undone = [k for k in stack.kit.effects if "undo" in k and "fail-3/" in k]
    assert [k.split("|")[0] for k in sorted(undone, key=lambda k: int(k.rsplit("/", 1)[1]))] == [
        f"{stack.kit.prefix}-b.undo",
        f"{stack.kit.prefix}-a.undo",
    ]
    assert all(stack.kit.effects[k] == 1 for k in stack.kit.effects)


def test_retries_with_backoff_then_success(stack: Stack) -> None:
    stack.run(Trip(flaky_at=2, flaky=2), "flaky-2")
    key = f"{stack.kit.prefix}-b.do|flaky-2/2"
    assert stack.kit.attempts[key] == 3
    failed = [e for e in stack.history("flaky-2") if e.event.kind == "ActivityAttemptFailed"]
    assert len(failed) == 2
    retry_at = [getattr(e.event, "retry_at_ms", None) for e in failed]
    assert all(
        r is not None and r > e.recorded_at_ms for r, e in zip(retry_at, failed, strict=True)
    )


def test_activity_timeout_retries_then_compensates(stack: Stack) -> None:
    with pytest.raises(WorkflowFailedError) as info:
        stack.run(Trip(silent_at=2, silent=4), "slow-2", timeout=40)
    assert info.value.status == WorkflowStatus.COMPENSATED.value
    assert info.value.error_type == "ActivityTimeout"
    kinds = [e.event.kind for e in stack.history("slow-2")]
    assert kinds.count("ActivityAttemptStarted") == 3  # attempts 2, 3, 4 after the first
    assert stack.kit.steps_of("slow-2") == ["do", "undo"]


def test_cancel_compensates_and_a_signal_resumes(stack: Stack) -> None:
    cancelled = stack.client.start("trip", Trip(wait_signal=True), workflow_id="cancel-me")
    waiting = stack.client.start("trip", Trip(wait_signal=True), workflow_id="sign-me")
    # Both steps recorded as completed, not only applied by the service: a cancel that comes
    # before step 2's reply finds it in flight (it is registered with on_failure only once it
    # returned), and only step 1 is undone.
    for wf in ("cancel-me", "sign-me"):
        _wait_for(lambda wf=wf: _completed(stack, wf) == 2)
    stack.client.cancel("cancel-me", reason="customer changed their mind")
    stack.client.signal("sign-me", "approve", Approval(by="ops"))
    with pytest.raises(WorkflowFailedError) as info:
        cancelled.result(TripResult, timeout=20)
    assert info.value.status == WorkflowStatus.CANCELLED.value
    assert stack.kit.steps_of("cancel-me") == ["do", "do", "undo", "undo"]
    assert waiting.result(TripResult, timeout=20).approved_by == "ops"


def test_durable_sleep_survives_a_restart(stack: Stack) -> None:
    handle = stack.client.start("trip", Trip(sleep_ms=3000), workflow_id="sleepy")
    _wait_for(lambda: len(stack.kit.steps_of("sleepy")) == 2)
    stack.stop_node()
    time.sleep(1)
    stack.start_node()
    assert len(handle.result(TripResult, timeout=30).refs) == 3
    fired = [e for e in stack.history("sleepy") if e.event.kind == "TimerFired"]
    assert len(fired) == 1


def test_deleting_the_state_rebuilds_the_same_state(stack: Stack) -> None:
    for i in range(3):
        stack.run(Trip(), f"rebuild-{i}")
    with pytest.raises(WorkflowFailedError):
        stack.run(Trip(fail_at=3), "rebuild-x")
    sleeping = stack.client.start("trip", Trip(sleep_ms=60_000), workflow_id="rebuild-sleeps")
    _wait_for(lambda: len(stack.kit.steps_of(sleeping.workflow_id)) == 2)
    time.sleep(0.5)  # its TimerStarted is committed and stored
    state_dir = Path(stack.settings.state_dir) / stack.settings.namespace
    stack.stop_node()
    before = _store_dump(stack, state_dir)
    assert sum(len(v) - 1 for v in before.values()) == 5  # each list ends with the timers
    shutil.rmtree(state_dir)
    node = stack.start_node()
    _wait_for(lambda: len(node.counters.restores) == stack.settings.partitions)
    stack.stop_node()
    assert _store_dump(stack, state_dir) == before
    stack.start_node()


def test_bad_records_go_to_the_dlq_and_the_saga_beside_them_completes(stack: Stack) -> None:
    producer = Producer(producer_config(stack.settings.bootstrap_servers))
    producer.produce(stack.settings.inbox, key=b"junk", value=b"\x00not avro at all")
    stranger = ActivityReply(
        workflow_id="nobody",
        seq=1,
        attempt=1,
        idempotency_key="nobody/1",
        outcome=ReplyOutcome.SUCCESS,
        sent_at_ms=0,
    )
    producer.produce(stack.settings.inbox, key=b"nobody", value=codec.encode(stranger))
    producer.flush(10)
    assert len(stack.run(Trip(), "beside").refs) == 3
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + 15
    while len(letters) < 2 and time.monotonic() < deadline:
        letters = stack.dead_letters()
    reasons = sorted(letter.error_type for letter in letters)
    assert reasons == ["BadMagic", "UnknownWorkflow"], [letter.reason for letter in letters]


def _store_dump(stack: Stack, state_dir: Path) -> dict[int, list[object]]:
    """Everything a partition store holds: summaries, every event, the timer index."""
    from orchestrator._engine.store import PartitionStore

    out: dict[int, list[object]] = {}
    for p in range(stack.settings.partitions):
        store = PartitionStore(state_dir / f"p{p}")
        summaries = sorted(store.summaries(), key=lambda s: s.workflow_id)
        out[p] = [
            (summary, [e.model_dump() for e in store.events(summary.workflow_id)])
            for summary in summaries
        ]
        out[p].append(list(store.timers()))
        store.close()
    return out


def _completed(stack: Stack, workflow_id: str) -> int:
    return sum(e.event.kind == "ActivityCompleted" for e in stack.history(workflow_id))


def _wait_for(condition: object, timeout: float = 20.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize(
    "stack_settings",
    [pytest.param({"retention_ms": 500}, id="retention-500ms")],
    indirect=True,
)
def test_finished_workflows_are_tombstoned_after_their_retention(stack: Stack) -> None:
    stack.run(Trip(), "short-lived")
    events = len(stack.history("short-lived"))
    assert events >= 7
    tombstones: list[str] = []
    deadline = time.monotonic() + 30
    while len(tombstones) < events and time.monotonic() < deadline:
        tombstones = stack.tombstones("short-lived")
    assert sorted(tombstones) == sorted(f"short-lived/{n}" for n in range(1, events + 1))
    with pytest.raises(Exception, match="short-lived"):
        stack.client.describe("short-lived", timeout=5)


def test_a_command_topic_that_does_not_exist_fails_the_attempts_not_the_partition(
    stack: Stack,
) -> None:
    ghost = ActivityContract("ghost.do", f"{stack.kit.prefix}-ghost", Step, Done)

    @workflow.defn(name="calls-a-ghost")
    class CallsAGhost:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> Done:
            policy = RetryPolicy(max_attempts=2, initial_interval_ms=50)
            return await ctx.call(ghost, step, retry=policy)

    stack.stop_node()
    stack.kit.registry.add(CallsAGhost)
    stack.start_node()
    handle = stack.client.start("calls-a-ghost", Step(n=1), workflow_id="ghostly")
    assert len(stack.run(Trip(), "beside-the-ghost").refs) == 3  # the partition moves on
    with pytest.raises(WorkflowFailedError) as info:
        handle.result(Done, timeout=20)
    assert (info.value.status, info.value.error_type) == ("FAILED", "UnknownTopic")
    failed = [e for e in stack.history("ghostly") if e.event.kind == "ActivityAttemptFailed"]
    assert len(failed) == 2


def _raw_start(workflow_id: str, trip: object) -> bytes:
    return codec.encode(
        StartWorkflow(
            workflow_id=workflow_id,
            workflow_type="trip",
            request_id=f"req-{workflow_id}",
            input=to_payload(trip),
            sent_at_ms=int(time.time() * 1000),
        )
    )


def test_starts_on_another_partition_than_their_workflow_are_forwarded_and_run(
    stack: Stack,
) -> None:
    """A start keyed by something else than its workflow id, and one with a null key, land on
    a partition that does not own the workflow: they are moved to the one that does and run
    there (before: the workflow started on the wrong partition and its replies were orphaned)."""
    settings = stack.settings
    elsewhere = partition_for(b"elsewhere", settings.partitions)
    wfs = [w for w in (f"misplaced-{i}" for i in range(50))
           if partition_for(w, settings.partitions) != elsewhere][:2]  # fmt: skip
    producer = Producer(producer_config(settings.bootstrap_servers))
    producer.produce(settings.inbox, key=b"elsewhere", value=_raw_start(wfs[0], Trip()))
    producer.produce(settings.inbox, value=_raw_start(wfs[1], Trip()), partition=elsewhere)
    producer.flush(10)
    for wf in wfs:
        result = stack.client.get_handle(wf).result(TripResult, timeout=30)
        assert len(result.refs) == 3
        events = stack.history(wf)
        assert [e.event_seq for e in events] == list(range(1, len(events) + 1))
        assert stack.client.describe(wf).status == WorkflowStatus.COMPLETED
    assert stack.node_counters().forwarded == 2


@pytest.mark.parametrize(
    "stack_settings", [{"kafka": {"message.max.bytes": "300000"}}], indirect=True
)
def test_a_record_whose_output_the_producer_refuses_is_dead_lettered_not_retried_forever(
    stack: Stack,
) -> None:
    """The node's producer refuses the history event of a start (its input is over the
    producer's message.max.bytes): the batch aborts once, then the start is dead-lettered with
    a FAILED result, and the partition moves on (before: abort, re-read, abort, for ever)."""
    settings = stack.settings
    producer = Producer(producer_config(settings.bootstrap_servers))  # librdkafka's 1 MB limit
    producer.produce(
        settings.inbox, key=b"too-big", value=_raw_start("too-big", {"pad": "x" * 400_000})
    )
    producer.flush(10)
    with pytest.raises(WorkflowFailedError) as failed:
        # The rejection answers the start that was refused (its request id), as a handle has it.
        stack.client.result("too-big", TripResult, timeout=30, request_id="req-too-big")
    assert failed.value.error_type == "ProduceFailed"
    assert len(stack.run(Trip(), "beside-too-big").refs) == 3
    letters = [d for d in stack.dead_letters() if d.error_type == "ProduceFailed"]
    assert len(letters) == 1
    assert letters[0].source_topic == settings.inbox
    assert "MSG_SIZE_TOO_LARGE" in letters[0].reason or "too large" in letters[0].reason


def _latest_values(settings: Settings) -> dict[bytes, bytes | None]:
    """The last value of every history key (None: a tombstone), read to the end."""
    reader = Consumer(
        consumer_config(
            settings.bootstrap_servers,
            f"latest.{time.monotonic_ns()}",
            extra={"enable.partition.eof": True},
        )
    )
    reader.subscribe([settings.history])
    latest: dict[bytes, bytes | None] = {}
    eofs: set[int] = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(eofs) < settings.partitions:
        for msg in reader.consume(500, 0.2):
            if msg.error() is not None:
                eofs.add(msg.partition() or 0)
            else:
                latest[msg.key() or b""] = msg.value()
    reader.close()
    return latest


def test_records_no_node_wrote_on_the_history_are_skipped_and_repaired(stack: Stack) -> None:
    """A forged record under a key of its own and one under an existing event's key: a rebuild
    skips both (before: `UnexpectedEnvelope` ended the node, at every restart), then the node
    tombstones the first and writes the real event again under the second."""
    settings = stack.settings
    stack.run(Trip(), "victim")
    victim_key = b"victim/2"
    original = _latest_values(settings)[victim_key]
    assert original is not None
    home = partition_for("victim", settings.partitions)
    forged = codec.encode(
        ActivityReply(
            workflow_id="victim", seq=1, attempt=1, idempotency_key="victim/1",
            outcome=ReplyOutcome.SUCCESS, sent_at_ms=0,
        )
    )  # fmt: skip
    producer = Producer(producer_config(settings.bootstrap_servers))
    producer.produce(settings.history, key=b"forged", value=forged, partition=home)
    producer.produce(settings.history, key=victim_key, value=forged, partition=home)
    producer.flush(10)
    stack.stop_node()
    shutil.rmtree(Path(settings.state_dir) / settings.namespace)
    node = stack.start_node()
    _wait_for(lambda: len(node.counters.restores) == settings.partitions)
    assert sum(r.skipped for r in node.counters.restores) == 2
    assert len(stack.run(Trip(), "after-forgery").refs) == 3  # the node lives on
    _wait_for(lambda: _latest_values(settings).get(b"forged", b"") is None)
    assert _latest_values(settings)[victim_key] == original
    assert stack.client.describe("victim").status == WorkflowStatus.COMPLETED


def test_a_rejected_start_does_not_mask_a_valid_start_with_the_same_id(stack: Stack) -> None:
    """Before: the valid workflow's handle, get_handle and `orchestrator result` all reported the
    earlier start's UnknownWorkflowType rejection."""
    bad = stack.client.start("no-such-type", Trip(), workflow_id="reused")
    with pytest.raises(WorkflowFailedError) as rejected:
        bad.result(TripResult, timeout=20)
    assert rejected.value.error_type == "UnknownWorkflowType"
    good = stack.client.start("trip", Trip(), workflow_id="reused")
    assert len(good.result(TripResult, timeout=30).refs) == 3
    assert len(stack.client.get_handle("reused").result(TripResult, timeout=30).refs) == 3


def test_a_start_over_the_inbox_limit_is_refused_by_the_client(stack: Stack) -> None:
    with pytest.raises(PayloadTooLarge, match="over the 524288 bytes"):
        stack.client.start("trip", {"pad": "x" * 600_000}, workflow_id="too-large")
    with pytest.raises(UnknownWorkflow):
        stack.client.describe("too-large", timeout=3)
