"""The examples of docs/workflows.md run: every ``python`` block, in order, as one module; then
this test drives what they define through the engine and checks what the page says."""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contracts.envelopes import (
    ActivityReply,
    ActivityScheduled,
    ChildWorkflowEnded,
    ChildWorkflowStarted,
    HistoryEvent,
    ReplyOutcome,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator._engine.instance import WorkflowRun
from orchestrator.errors import NonDeterminismError
from orchestrator.payloads import from_payload, to_payload
from orchestrator.testing import Replayer, dump_histories
from orchestrator.workflow import WorkflowRegistry

DOC = Path(__file__).parents[2] / "docs" / "workflows.md"


@pytest.fixture(scope="module")
def doc() -> types.SimpleNamespace:
    namespace: dict[str, Any] = {"__name__": "docs_workflows"}
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text().split("## Saga semantics")[0], re.S)
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, "docs/workflows.md", "exec"), namespace)
    return types.SimpleNamespace(**namespace)


def _drive(
    cls: type, wf: str, arg: Any, fail: str = "", history: list[HistoryEvent] | None = None
) -> tuple[WorkflowRun, list[HistoryEvent]]:
    """Start (or, with ``history``, replay and continue) a workflow; services answer at once."""
    registry = WorkflowRegistry([cls])
    if history is None:
        run = WorkflowRun(wf, registry)
        kind = registry.names()[0]
        start = StartWorkflow(
            workflow_id=wf, workflow_type=kind, request_id="r", input=to_payload(arg), sent_at_ms=0
        )
        new = run.start(start, 1_000, None)
        events = list(new)
    else:
        run = WorkflowRun.replay(wf, history, registry)
        new, events = [], list(history)
    reply: Callable[[ActivityScheduled], ActivityReply] = lambda body: ActivityReply(  # noqa: E731
        workflow_id=wf,
        seq=body.seq,
        attempt=1,
        idempotency_key=body.idempotency_key,
        outcome=ReplyOutcome.BUSINESS_FAILURE
        if body.activity_name == fail
        else ReplyOutcome.SUCCESS,
        sent_at_ms=0,
        result=None if body.activity_name == fail else to_payload({"ref": body.activity_name}),
        error=None,
    )
    while True:
        scheduled = [e.event for e in new if isinstance(e.event, ActivityScheduled)]
        new = [e for body in scheduled for e in run.on_reply(reply(body), 2_000)]
        if not new and (due := run.state.next_due_ms()) is not None:
            new = run.on_timers(due)
        if not new:
            return run, events
        events += new


def _calls(events: list[HistoryEvent]) -> list[str]:
    return [e.event.activity_name for e in events if isinstance(e.event, ActivityScheduled)]


def test_determinism_example_uses_ctx_and_replays_to_the_same_result(doc: Any) -> None:
    run, events = _drive(doc.StampOrder, "o1", doc.Order(id="o1"))
    assert run.state.status is WorkflowStatus.COMPLETED
    assert run.state.result is not None
    stamp = from_payload(run.state.result, doc.Stamp)
    assert stamp.at == "1970-01-01T01:00:01+00:00"  # when the 1 h timer fired, started at 1 s
    assert WorkflowRun.replay("o1", events, WorkflowRegistry([doc.StampOrder])).state == run.state


def test_the_guard_example_fails_with_the_call_and_the_ctx_equivalent(doc: Any) -> None:
    run, _ = _drive(doc.StampOrderBadly, "o2", doc.Order(id="o2"))
    assert run.state.status is WorkflowStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.type == "DeterminismViolation"
    assert re.match(
        r"time\.time\(\) called from workflow code at docs/workflows\.md:\d+ in run: .*"
        r"use ctx\.now\(\)",
        run.state.error.message,
    )


def test_versioning_example_old_runs_old_way_new_runs_new_way(doc: Any) -> None:
    order = doc.Order(id="o3")
    # A v1 run that failed at ship: the charge was refunded.
    _, v1_history = _drive(doc.ShipOrderV1, "o3", order, fail="shipping.ship")
    assert _calls(v1_history) == ["payments.charge", "shipping.ship", "payments.refund"]
    # v2 replays it (the node restarted on v2): no fraud check was, or is, asked for.
    replayed = WorkflowRun.replay("o3", v1_history, WorkflowRegistry([doc.ShipOrderV2]))
    assert replayed.state.status is WorkflowStatus.COMPENSATED
    # A new run on v2 takes the new path, and compensates it the same way.
    run, v2_history = _drive(doc.ShipOrderV2, "o4", order, fail="shipping.ship")
    assert _calls(v2_history) == [
        "payments.charge",
        "risk.check",
        "shipping.ship",
        "payments.refund",
    ]
    assert run.state.status is WorkflowStatus.COMPENSATED
    # v3 accepts v2 histories (with the marker) and refuses v1 ones.
    v3 = WorkflowRegistry([doc.ShipOrderV3])
    assert WorkflowRun.replay("o4", v2_history, v3).state == run.state
    with pytest.raises(NonDeterminismError, match=r"risk\.check"):
        WorkflowRun.replay("o3", v1_history, v3)


def test_replay_testing_example_passes_and_catches_v3(
    doc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, v1_history = _drive(doc.ShipOrderV1, "o5", doc.Order(id="o5"))
    _, v2_history = _drive(doc.ShipOrderV2, "o6", doc.Order(id="o6"))
    folder = tmp_path / "tests" / "histories"
    folder.mkdir(parents=True)
    document = dump_histories({"o5": v1_history, "o6": v2_history}, namespace="shop")
    (folder / "ship-order.json").write_text(json.dumps(document))
    monkeypatch.chdir(tmp_path)
    doc.test_shipping_orders_still_replay()  # the page's test passes with v2

    with pytest.raises(NonDeterminismError, match=r"docs/workflows\.md:"):
        Replayer([doc.ShipOrderV3]).replay_file("tests/histories/ship-order.json")


def _child_of(parent: WorkflowRun, events: list[HistoryEvent], doc: Any, fail: str) -> list[Any]:
    """Run each child the parent started (as its node would) and hand its end to the parent."""
    more: list[HistoryEvent] = []
    for body in [e.event for e in events if isinstance(e.event, ChildWorkflowStarted)]:
        child, _ = _drive(
            doc.ShipParcel, body.child_workflow_id, from_payload(body.input, doc.Parcel), fail
        )
        state = child.state
        assert state.status is not None
        ended = ChildWorkflowEnded(
            workflow_id=parent.state.workflow_id,
            seq=body.seq,
            child_workflow_id=body.child_workflow_id,
            status=state.status,
            sent_at_ms=0,
            result=state.result,
            error=state.error,
        )
        more += parent.on_child_ended(ended, 3_000)
    return more


@pytest.mark.parametrize("fail", ["", "shipping.ship"])
def test_child_workflow_example_ships_parcels_or_refunds(doc: Any, fail: str) -> None:
    registry = WorkflowRegistry([doc.FulfilOrder, doc.ShipParcel])
    run, events = _drive(doc.FulfilOrder, "o7", doc.Order(id="o7"))  # charged; children started
    children = [e.event for e in events if isinstance(e.event, ChildWorkflowStarted)]
    assert [c.child_workflow_id for c in children] == ["o7-parcel-1", "o7-parcel-2"]
    ended = _child_of(run, events, doc, fail)
    # a failed child: the saga refunds (the refund's reply, as the services would send it)
    for body in [e.event for e in ended if isinstance(e.event, ActivityScheduled)]:
        ended += run.on_reply(
            ActivityReply(
                workflow_id="o7", seq=body.seq, attempt=1, idempotency_key=body.idempotency_key,
                outcome=ReplyOutcome.SUCCESS, sent_at_ms=0, result=to_payload({"ref": "r"}),
            ),
            4_000,
        )  # fmt: skip
    history = events + ended
    if fail:
        assert run.state.status is WorkflowStatus.COMPENSATED
        assert run.state.error is not None and "o7-parcel-1" in run.state.error.message
        assert _calls(history) == ["payments.charge", "payments.refund"]
    else:
        assert run.state.status is WorkflowStatus.COMPLETED
        assert run.state.result is not None
        assert from_payload(run.state.result, list[str]) == ["shipping.ship", "shipping.ship"]
    assert WorkflowRun.replay("o7", history, registry).state == run.state


def test_query_example_answers_from_the_state(doc: Any) -> None:
    registry = WorkflowRegistry([doc.ApproveOrder])
    run, events = _drive(doc.ApproveOrder, "o8", doc.Order(id="o8"))
    assert from_payload(run.query("progress", None), str) == "waiting for approval"
    assert from_payload(run.query("eta", to_payload(3)), str) == "after the approval"
    run.on_signal("approve", to_payload({"ref": "ann"}), "s1", 2_000)
    assert from_payload(run.query("progress", None), str) == "approved by ann, shipping"
    assert from_payload(run.query("eta", to_payload(3)), str) == "3 days"
    assert WorkflowRun.replay("o8", events, registry).query("progress", None) == to_payload(
        "waiting for approval"
    )
