"""Versioning with ``ctx.patched``: runs started on v1 and replayed with v2 code finish the old
way, new runs (and old runs that reach the change after the deploy) the new way; both compensate
what they did. Pure engine: the node's replay (``WorkflowRun.replay``) with another registry."""

from __future__ import annotations

import pytest

from contracts.envelopes import (
    ActivityAttemptStarted,
    ActivityReply,
    ActivityScheduled,
    ErrorInfo,
    HistoryEvent,
    MarkerRecorded,
    ReplyOutcome,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator._engine.instance import WorkflowRun
from orchestrator._payloads import from_payload, to_payload
from orchestrator.errors import NonDeterminismError
from orchestrator.workflow import WorkflowRegistry

from .evolving.v1 import EvolvingV1
from .evolving.v2 import EvolvingV2
from .evolving.v3 import EvolvingV3
from .sagas import Done, Step, TripResult

V1 = WorkflowRegistry([EvolvingV1])
V2 = WorkflowRegistry([EvolvingV2])
V3 = WorkflowRegistry([EvolvingV3])


class Node:
    """One workflow on a node running ``registry``; a restart is a replay on another node."""

    def __init__(self, wf: str, registry: WorkflowRegistry, fail: str = "") -> None:
        self.wf = wf
        self.fail = fail  # the activity that fails for good (a business failure)
        self.history: list[HistoryEvent] = []
        self.run = WorkflowRun(wf, registry)

    def start(self) -> None:
        msg = StartWorkflow(
            workflow_id=self.wf,
            workflow_type="evolving",
            request_id="r",
            input=to_payload(Step(n=0)),
            sent_at_ms=1,
        )
        self._answer(self.run.start(msg, 1_000, None))

    def restart_on(self, registry: WorkflowRegistry) -> None:
        self.run = WorkflowRun.replay(self.wf, self.history, registry)

    def signal(self) -> None:
        self._answer(self.run.on_signal("go", to_payload(Done(n=0)), "s", 2_000))

    def _answer(self, new: list[HistoryEvent]) -> None:
        """Services reply to every command at once, until the workflow waits for something
        else (a signal) or ends."""
        while new:
            self.history += new
            replies = []
            for event in new:
                body = event.event
                if isinstance(body, ActivityScheduled | ActivityAttemptStarted):
                    act = self.run.state.activities[body.seq]
                    replies.append(self._reply(act.seq, act.name, act.idempotency_key))
            new = [e for reply in replies for e in self.run.on_reply(reply, 2_000)]

    def _reply(self, seq: int, name: str, key: str) -> ActivityReply:
        failed = name == self.fail
        return ActivityReply(
            workflow_id=self.wf,
            seq=seq,
            attempt=1,
            idempotency_key=key,
            outcome=ReplyOutcome.BUSINESS_FAILURE if failed else ReplyOutcome.SUCCESS,
            sent_at_ms=0,
            result=None if failed else to_payload(Done(n=seq, ref=name)),
            error=ErrorInfo(type="Refused", message="no") if failed else None,
        )

    def steps(self) -> list[str]:
        return [
            ("undo:" if e.event.is_compensation else "do:") + e.event.activity_name
            for e in self.history
            if isinstance(e.event, ActivityScheduled)
        ]

    def markers(self) -> list[str]:
        return [e.event.change_id for e in self.history if isinstance(e.event, MarkerRecorded)]

    def result(self) -> TripResult:
        assert self.run.state.result is not None
        return from_payload(self.run.state.result, TripResult)


def _waiting_old_run(wf: str, fail: str = "") -> Node:
    """A run started on v1 that is past the change point (waits for the signal) when the node
    stops."""
    node = Node(wf, V1, fail)
    node.start()
    assert node.run.state.current_step == "waiting for a signal"
    return node


def test_a_v1_run_replayed_on_v2_finishes_the_old_way() -> None:
    old = _waiting_old_run("old")
    old.restart_on(V2)
    old.signal()
    assert old.run.state.status is WorkflowStatus.COMPLETED
    assert old.steps() == ["do:a.do", "do:c.do"]
    assert old.markers() == []
    assert old.result().refs == ["a.do", "c.do"]
    assert old.result().token == "v2"  # v2 code finished it
    # The node would replay the whole history the same way again, e.g. after another restart.
    assert WorkflowRun.replay("old", old.history, V2).state == old.run.state


def test_a_new_run_on_v2_takes_the_new_path_and_records_the_marker() -> None:
    new = Node("new", V2)
    new.start()
    new.restart_on(V2)  # replays with the marker: the same path
    new.signal()
    assert new.run.state.status is WorkflowStatus.COMPLETED
    assert new.steps() == ["do:a.do", "do:b.do", "do:c.do"]
    assert new.markers() == ["add-b"]
    # v1 code cannot replay it: the marker is where v1 asks for nothing.
    with pytest.raises(NonDeterminismError, match="patch marker 'add-b'"):
        WorkflowRun.replay("new", new.history, V1)


def test_both_kinds_compensate_what_they_did_when_the_last_step_fails() -> None:
    old = _waiting_old_run("old", fail="c.do")
    old.restart_on(V2)
    old.signal()
    new = Node("new", V2, fail="c.do")
    new.start()
    new.signal()
    assert old.run.state.status is WorkflowStatus.COMPENSATED
    assert old.steps() == ["do:a.do", "do:c.do", "undo:a.undo"]
    assert new.run.state.status is WorkflowStatus.COMPENSATED
    assert new.steps() == ["do:a.do", "do:b.do", "do:c.do", "undo:b.undo", "undo:a.undo"]
    assert old.run.state.error is not None and old.run.state.error.type == "Refused"


def test_a_v1_run_that_reaches_the_change_after_the_deploy_takes_the_new_path() -> None:
    """As in Temporal: the answer is about where the run is, not when it started."""
    node = Node("early", V1)
    msg = StartWorkflow(
        workflow_id="early",
        workflow_type="evolving",
        request_id="r",
        input=to_payload(Step(n=0)),
        sent_at_ms=1,
    )
    node.history = node.run.start(msg, 1_000, None)  # a.do scheduled, no reply yet
    node.restart_on(V2)
    act = node.run.state.activities[1]
    node._answer(node.run.on_reply(node._reply(1, act.name, act.idempotency_key), 2_000))
    node.signal()
    assert node.steps() == ["do:a.do", "do:b.do", "do:c.do"]
    assert node.markers() == ["add-b"]


def test_deprecate_patch_replays_runs_with_the_marker_and_records_none() -> None:
    with_marker = Node("marked", V2)
    with_marker.start()
    with_marker.restart_on(V3)
    with_marker.signal()
    assert with_marker.run.state.status is WorkflowStatus.COMPLETED
    assert with_marker.result().token == "v3"
    assert with_marker.markers() == ["add-b"]

    fresh = Node("fresh", V3)
    fresh.start()
    fresh.signal()
    assert fresh.steps() == ["do:a.do", "do:b.do", "do:c.do"]
    assert fresh.markers() == []
    assert WorkflowRun.replay("fresh", fresh.history, V3).state == fresh.run.state


def test_deprecate_patch_refuses_a_run_that_never_had_the_change() -> None:
    """The promise of deprecate_patch is that no such run is left: replaying one fails loudly."""
    old = _waiting_old_run("old")
    with pytest.raises(NonDeterminismError, match=r"activity b\.do #2"):
        old.restart_on(V3)
