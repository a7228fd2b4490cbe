"""Child workflows and queries on the Decider, without Kafka: every inbox record an output makes
(a child's start, its end reported to the parent, a cancel passed down) is fed back to the
decider of the partition it hashes to, and the services answer at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts import codec
from contracts.envelopes import (
    ActivityCommand,
    ActivityReply,
    CancelWorkflow,
    ChildWorkflowEnded,
    ChildWorkflowFailed,
    DeadLetter,
    HistoryEvent,
    ReplyOutcome,
    SignalWorkflow,
    StartWorkflow,
    WorkflowResult,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator._engine.instance import WorkflowRun
from orchestrator.errors import QueryFailed, UnknownQuery, WorkflowFailure
from orchestrator.partitioner import partition_for
from orchestrator.payloads import to_payload
from orchestrator.workflow import Compensation, ParentClosePolicy, WorkflowContext

from .sagas import Done, Step, step_a, step_b, step_c, undo_a, undo_b, undo_c
from .test_decide import NOW, PARTITIONS, Core


class Job(BaseModel):
    child_fails: bool = False
    child_waits: bool = False  # the child waits for signal "go" before its step
    child_type: str = "child"
    detach: bool = False  # start the child and end without waiting for it
    policy: str = "REQUEST_CANCEL"
    pad: int = 0  # the parent gives its child an input of this many more bytes
    note: str = ""


class Out(BaseModel):
    refs: list[str]


@workflow.defn(name="child")
class Child:
    @workflow.run
    async def run(self, ctx: WorkflowContext, job: Job) -> Out:
        async with ctx.saga():
            done = await ctx.call(step_b, Step(n=2), compensate=Compensation(undo_a, Step(n=20)))
            if job.child_waits:
                await ctx.wait_signal("go", Step)
            if job.child_fails:
                raise WorkflowFailure("the child gives up", error_type="ChildGaveUp")
        return Out(refs=[done.ref])


@workflow.defn(name="parent")
class Parent:
    def __init__(self) -> None:
        self.stage = "new"
        self.refs: list[str] = []

    @workflow.run
    async def run(self, ctx: WorkflowContext, job: Job) -> Out:
        async with ctx.saga():
            first = await ctx.call(step_a, Step(n=1), compensate=Compensation(undo_a, Step(n=1)))
            self.refs.append(first.ref)
            self.stage = "child"
            policy = ParentClosePolicy(job.policy)
            if job.detach:
                handle = await ctx.start_child(
                    job.child_type, job, id="kid", parent_close_policy=policy
                )
                self.stage = f"left {handle.workflow_id}"
                return Out(refs=self.refs)
            arg = job.model_copy(update={"note": "x" * job.pad, "pad": 0})
            child = await ctx.execute_child(
                Child if job.child_type == "child" else job.child_type, arg, id="kid",
                parent_close_policy=policy,
            )  # fmt: skip
            self.refs.extend(Out.model_validate(child).refs)
            self.stage = "done"
        return Out(refs=self.refs)

    @workflow.query
    def progress(self) -> str:
        return self.stage

    @workflow.query(name="ref")
    def ref_at(self, index: int) -> str:
        self.refs.clear()  # a query that tries to change the workflow: it works on a copy
        return f"#{index}"

    @workflow.query
    def broken(self) -> str:
        raise KeyError("nope")


@workflow.defn(name="parent-saga")
class ParentSaga:
    """The child is a step of the saga: undone (by an activity) when a later step fails."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, job: Job) -> Out:
        async with ctx.saga():
            await ctx.call(step_a, Step(n=1), compensate=Compensation(undo_a, Step(n=1)))
            child = await ctx.execute_child(
                Child, job, id="kid", compensate=lambda out: Compensation(undo_b, Step(n=99))
            )
            if job.detach:  # here: fail after the child completed
                await ctx.call(step_c, Step(n=3), compensate=Compensation(undo_c, Step(n=3)))
                raise WorkflowFailure("too late", error_type="TooLate")
        return Out(refs=child.refs)


# The parent's and the child's ids hash to different partitions: the start and the end cross.
PARENT = "job-1"
assert partition_for(PARENT, PARTITIONS) != partition_for("kid", PARTITIONS)


class Net:
    """The decider, its partitions and the records in flight between them."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.history: dict[str, list[HistoryEvent]] = {}
        self.results: dict[str, WorkflowResult] = {}
        self.inbox: list[object] = []  # every envelope the engine sent to the inbox
        self.commands: list[str] = []
        self.letters: list[str] = []

    def send(self, envelope: StartWorkflow | SignalWorkflow | CancelWorkflow) -> None:
        self.queue.append((codec.encode(envelope), envelope.workflow_id.encode()))

    def run(self) -> None:
        while self.queue:
            value, key = self.queue.popleft()
            batch = self.core.feed(value, key)
            self.core.commit(batch)
            for out in batch.outputs:
                value = out.value or b""
                if out.topic == "ns.inbox":
                    self.inbox.append(codec.decode(value))
                    self.queue.append((value, out.key))
                elif out.topic == "ns.history":
                    event = codec.decode_as(value, HistoryEvent)
                    self.history.setdefault(event.workflow_id, []).append(event)
                elif out.topic == "ns.dlq":
                    self.letters.append(codec.decode_as(value, DeadLetter).error_type)
                elif out.topic == "ns.results":
                    result = codec.decode_as(value, WorkflowResult)
                    self.results[result.workflow_id] = result
                elif out.topic.startswith("svc-"):
                    command = codec.decode_as(value, ActivityCommand)
                    self.commands.append(f"{command.workflow_id}:{command.activity_name}")
                    answer = ActivityReply(
                        workflow_id=command.workflow_id,
                        seq=command.seq,
                        attempt=command.attempt,
                        idempotency_key=command.idempotency_key,
                        outcome=ReplyOutcome.SUCCESS,
                        sent_at_ms=NOW,
                        result=to_payload(Done(n=command.seq, ref=command.activity_name)),
                    )
                    self.queue.append((codec.encode(answer), out.key))

    def kinds(self, wf: str) -> list[str]:
        return [e.event.kind for e in self.history.get(wf, [])]

    def status(self, wf: str) -> WorkflowStatus | None:
        result = self.results.get(wf)
        return result.status if result else None


def start(wf: str, job: Job, kind: str = "parent") -> StartWorkflow:
    return StartWorkflow(
        workflow_id=wf, workflow_type=kind, request_id=f"r-{wf}", input=to_payload(job),
        sent_at_ms=NOW,
    )  # fmt: skip


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    core = Core(tmp_path, workflows=(Parent, Child, ParentSaga))
    yield Net(core)
    core.close()


def test_a_child_runs_on_its_own_partition_and_its_result_reaches_the_parent(net: Net) -> None:
    net.send(start(PARENT, Job()))
    net.run()
    assert net.status(PARENT) is WorkflowStatus.COMPLETED
    assert net.status("kid") is WorkflowStatus.COMPLETED
    result = net.results[PARENT]
    assert result.result is not None and b'"a.do","b.do"' in result.result.data
    assert net.kinds(PARENT) == [
        "WorkflowStarted", "ActivityScheduled", "ActivityCompleted",
        "ChildWorkflowStarted", "ChildWorkflowCompleted", "WorkflowCompleted",
    ]  # fmt: skip
    (child_start,) = [e for e in net.inbox if isinstance(e, StartWorkflow)]
    assert child_start.parent is not None and child_start.parent.workflow_id == PARENT
    (started,) = [e for e in net.history["kid"] if e.event.kind == "WorkflowStarted"]
    assert started.event.parent == child_start.parent  # type: ignore[union-attr]
    (ended,) = [e for e in net.inbox if isinstance(e, ChildWorkflowEnded)]
    assert (ended.workflow_id, ended.child_workflow_id) == (PARENT, "kid")
    # The parent's history replays with the same code.
    WorkflowRun.replay(PARENT, net.history[PARENT], net.core.decider.registry)


def test_a_failed_child_fails_the_await_and_the_parent_compensates(net: Net) -> None:
    net.send(start(PARENT, Job(child_fails=True)))
    net.run()
    assert net.status("kid") is WorkflowStatus.COMPENSATED
    assert net.status(PARENT) is WorkflowStatus.COMPENSATED
    failed = [e.event for e in net.history[PARENT] if isinstance(e.event, ChildWorkflowFailed)]
    assert [(f.status, f.error.type) for f in failed] == [
        (WorkflowStatus.COMPENSATED, "ChildGaveUp")
    ]
    error = net.results[PARENT].error
    assert error is not None and error.type == "ChildGaveUp"
    assert "kid" in error.message
    # the child undid its step, the parent its own
    assert net.commands.count("kid:a.undo") == 1
    assert net.commands.count(f"{PARENT}:a.undo") == 1


def test_a_refused_child_start_fails_the_parent_await(net: Net) -> None:
    net.send(start(PARENT, Job(child_type="no-such-type")))
    net.run()
    assert net.letters == ["UnknownWorkflowType"]  # the refused start, as for a client's
    failed = [e.event for e in net.history[PARENT] if isinstance(e.event, ChildWorkflowFailed)]
    assert [f.error.type for f in failed] == ["UnknownWorkflowType"]
    assert net.status(PARENT) is WorkflowStatus.COMPENSATED


def test_cancelling_the_parent_cancels_the_running_child_and_both_compensate(net: Net) -> None:
    net.send(start(PARENT, Job(child_waits=True)))
    net.run()
    assert net.status(PARENT) is None and net.status("kid") is None  # the child waits
    net.send(CancelWorkflow(workflow_id=PARENT, request_id="c1", reason="stop", sent_at_ms=NOW))
    net.run()
    cancels = [e for e in net.inbox if isinstance(e, CancelWorkflow)]
    assert [c.workflow_id for c in cancels] == ["kid"]  # passed down once
    assert net.status("kid") is WorkflowStatus.CANCELLED
    assert net.status(PARENT) is WorkflowStatus.CANCELLED
    assert net.commands.count("kid:a.undo") == 1
    assert net.commands.count(f"{PARENT}:a.undo") == 1
    # the child's end came after the parent's: nothing is recorded after the parent's end
    assert net.kinds(PARENT)[-1] == "WorkflowFailed"


@pytest.mark.parametrize(
    ("policy", "child_status", "undone"),
    [
        ("REQUEST_CANCEL", WorkflowStatus.CANCELLED, 1),
        ("TERMINATE", WorkflowStatus.TERMINATED, 0),
        ("ABANDON", None, 0),
    ],
)
def test_a_child_still_running_when_its_parent_ends_follows_the_policy(
    net: Net, policy: str, child_status: WorkflowStatus | None, undone: int
) -> None:
    net.send(start(PARENT, Job(child_waits=True, detach=True, policy=policy)))
    net.run()
    assert net.status(PARENT) is WorkflowStatus.COMPLETED
    assert net.status("kid") is child_status
    assert net.commands.count("kid:a.undo") == undone  # a terminated child does not compensate
    if policy == "TERMINATE":
        error = net.results["kid"].error
        assert error is not None and error.type == "Terminated"
        kinds = net.kinds("kid")
        # terminated while its step was in flight: the step's reply comes late, and is ignored
        assert kinds[kinds.index("OperatorActed") + 1 :] == ["LateReplyIgnored"]
        (acted,) = [e.event for e in net.history["kid"] if e.event.kind == "OperatorActed"]
        assert acted.operator == f"parent {PARENT}"
        # its history replays: the end is no command of the code
        WorkflowRun.replay("kid", net.history["kid"], net.core.decider.registry)
    if child_status is None:  # abandoned: it goes on alone, and its end changes nothing above
        go = SignalWorkflow(
            workflow_id="kid", signal_name="go", request_id="g", payload=to_payload(Step(n=1)),
            sent_at_ms=NOW,
        )  # fmt: skip
        net.send(go)
        net.run()
        assert net.status("kid") is WorkflowStatus.COMPLETED
        assert net.kinds(PARENT)[-1] == "WorkflowCompleted"


def test_a_start_of_an_existing_id_by_another_parent_is_refused_to_that_parent(net: Net) -> None:
    net.send(start("kid", Job(child_waits=True), kind="child"))  # a client took the id
    net.run()
    net.send(start(PARENT, Job(child_waits=True)))
    net.run()
    failed = [e.event for e in net.history[PARENT] if isinstance(e.event, ChildWorkflowFailed)]
    assert [f.error.type for f in failed] == ["WorkflowIdConflict"]
    assert net.status(PARENT) is WorkflowStatus.COMPENSATED
    refusal = net.results["kid"]  # the answer to the parent's start, not the kid's end
    assert refusal.request_id == f"{PARENT}/2" and refusal.error is not None
    assert "started by a client" in refusal.error.message
    kid = net.core.parts[partition_for("kid", PARTITIONS)].get("kid")
    assert kid is not None and not kid.run.finished  # the client's workflow is untouched


# --------------------------------------------------------------------------- queries


def test_a_query_answers_from_the_state_and_cannot_change_it(net: Net) -> None:
    net.send(start(PARENT, Job(child_waits=True)))
    net.run()
    part = net.core.parts[partition_for(PARENT, PARTITIONS)]
    cached = part.get(PARENT)
    assert cached is not None
    run = cached.run
    last = run.state.last_seq
    assert run.query("progress", None) == to_payload("child")
    assert run.query("ref", to_payload(3)) == to_payload("#3")
    assert run.query("progress", None) == to_payload("child")
    assert run._instance.refs == ["a.do"]  # the query cleared a copy
    assert run.state.last_seq == last  # nothing recorded
    with pytest.raises(UnknownQuery, match="progress, ref"):
        run.query("nope", None)
    with pytest.raises(QueryFailed, match="KeyError") as raised:
        run.query("broken", None)
    assert raised.value.error_type == "QueryFailed"
    with pytest.raises(QueryFailed, match="does not fit") as raised:
        run.query("ref", to_payload("x"))
    assert raised.value.error_type == "InvalidArgument"
    # A run rebuilt from its history (a restart, the cache evicted it) answers the same.
    part.forget(PARENT)
    rebuilt = part.get(PARENT)
    assert rebuilt is not None and rebuilt.run.query("progress", None) == to_payload("child")


def test_a_child_with_compensate_is_undone_like_a_step_in_reverse_order(net: Net) -> None:
    net.send(start(PARENT, Job(detach=True), kind="parent-saga"))
    net.run()
    assert net.status("kid") is WorkflowStatus.COMPLETED
    assert net.status(PARENT) is WorkflowStatus.COMPENSATED
    mine = [c.split(":")[1] for c in net.commands if c.startswith(f"{PARENT}:")]
    assert mine == ["a.do", "c.do", "c.undo", "b.undo", "a.undo"]  # the child's undo: b.undo


def test_a_cancelled_parent_waits_for_its_compensatable_child_to_end(net: Net) -> None:
    net.send(start(PARENT, Job(child_waits=True), kind="parent-saga"))
    net.run()
    net.send(CancelWorkflow(workflow_id=PARENT, request_id="c1", reason="stop", sent_at_ms=NOW))
    net.run()
    assert net.status("kid") is WorkflowStatus.CANCELLED
    assert net.status(PARENT) is WorkflowStatus.CANCELLED
    # the child's cancelled end is in the parent's history before the parent's own end, and the
    # child (which undid its own step) is not undone again by the parent
    assert net.kinds(PARENT)[-2:] == ["ActivityCompleted", "WorkflowFailed"]
    assert "ChildWorkflowFailed" in net.kinds(PARENT)
    mine = [c.split(":")[1] for c in net.commands if c.startswith(f"{PARENT}:")]
    assert mine == ["a.do", "a.undo"]
    assert net.commands.count("kid:a.undo") == 1


def test_a_child_input_or_result_too_large_for_the_inbox_fails_the_parent_not_hangs(
    net: Net,
) -> None:
    big = "x" * (600 * 1024)
    net.send(start(PARENT, Job(pad=len(big))))  # the child's input is too big
    net.run()
    error = net.results[PARENT].error
    assert error is not None and error.type == "PayloadTooLarge"
    assert net.status(PARENT) is WorkflowStatus.COMPENSATED
    assert not [e for e in net.inbox if isinstance(e, StartWorkflow)]  # nothing was sent

    # A child's end over the limit (a result too big): the parent's await fails.
    net.send(start("job-2", Job(child_waits=True)))
    net.run()
    huge = ChildWorkflowEnded(
        workflow_id="job-2", seq=2, child_workflow_id="kid", status=WorkflowStatus.COMPLETED,
        sent_at_ms=NOW, result=to_payload(big),
    )  # fmt: skip
    net.queue.append((codec.encode(huge), b"job-2"))
    net.run()
    assert net.letters[-1] == "Oversized"
    failed = [e.event for e in net.history["job-2"] if isinstance(e.event, ChildWorkflowFailed)]
    assert [f.error.type for f in failed] == ["PayloadTooLarge"]
