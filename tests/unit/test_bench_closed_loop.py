"""The closed-loop bench's per-hop split, from hand-made records (no broker, no timing).

A wrong pairing (a retry's command against the first attempt's reply, a history event taken for
another step) would give plausible but false figures in docs/performance.md, so the arithmetic is
pinned here.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.closed_loop import Saga, commit_split, histogram_quantile, hops
from contracts.envelopes import (
    ActivityCommand,
    ActivityCompleted,
    ActivityReply,
    HistoryEvent,
    Payload,
    ReplyOutcome,
    StartWorkflow,
    WorkflowCompleted,
    WorkflowStarted,
)

WF = "c1-0-0"
KEY = WF.encode()
INPUT = Payload(encoding="json", data=b"{}")


def history(seq: int, at: int, body: Any) -> tuple[str, bytes, int, HistoryEvent]:
    event = HistoryEvent(workflow_id=WF, event_seq=seq, recorded_at_ms=at, event=body)
    return ("ns.history", KEY, at + 1, event)


def command(seq: int, attempt: int, decided: int, produced: int) -> tuple[str, bytes, int, Any]:
    cmd = ActivityCommand(
        workflow_id=WF,
        activity_name="a.do",
        seq=seq,
        attempt=attempt,
        idempotency_key=f"{WF}/{seq}",
        is_compensation=False,
        input=INPUT,
        reply_topic="ns.inbox",
        sent_at_ms=decided,
    )
    return ("ns.a.commands", KEY, produced, cmd)


def reply(seq: int, attempt: int, sent: int) -> tuple[str, bytes, int, Any]:
    rep = ActivityReply(
        workflow_id=WF,
        seq=seq,
        attempt=attempt,
        idempotency_key=f"{WF}/{seq}",
        outcome=ReplyOutcome.SUCCESS,
        sent_at_ms=sent,
        result=INPUT,
    )
    return ("ns.inbox", KEY, sent + 1, rep)


def test_a_saga_of_two_steps_is_split_at_each_record() -> None:
    start = StartWorkflow(
        workflow_id=WF, workflow_type="t", request_id="r", input=INPUT, sent_at_ms=1_000
    )
    records = [
        ("ns.inbox", KEY, 1_000, start),
        history(
            1, 1_004, WorkflowStarted(workflow_type="t", request_id="r", input=INPUT, random_seed=1)
        ),
        command(1, 1, decided=1_004, produced=1_005),
        reply(1, 1, sent=1_011),
        history(2, 1_020, ActivityCompleted(seq=1, attempt=1, result=INPUT)),
        command(2, 1, decided=1_020, produced=1_022),
        # A second attempt of step 2 (after a lost reply) is not paired with the first's reply.
        command(2, 2, decided=1_500, produced=1_501),
        reply(2, 1, sent=1_030),
        history(3, 1_036, ActivityCompleted(seq=2, attempt=1, result=INPUT)),
        history(4, 1_036, WorkflowCompleted(result=INPUT)),
        # Another workflow's record under the same key prefix is never read: hops() groups by key.
    ]
    saga = Saga(WF, called_ms=999.0, acked_ms=1_002.0, done_ms=1_041.0, status="COMPLETED")

    split = hops(records, [saga])

    assert split["start_ack"]["p50_ms"] == 3.0
    assert split["start_to_decided"]["p50_ms"] == 4
    # decide: command produced - decided (1 and 2 ms); to service: reply sent - produced (6, 8);
    # back to node: completed recorded - reply sent (9, 6); a hop: completed - decided (16, 16).
    assert (split["decide"]["p50_ms"], split["decide"]["p99_ms"]) == (1, 2)
    assert (split["to_service"]["p50_ms"], split["to_service"]["p99_ms"]) == (6, 8)
    assert (split["back_to_node"]["p50_ms"], split["back_to_node"]["p99_ms"]) == (6, 9)
    assert (split["hop"]["p50_ms"], split["hop"]["p99_ms"]) == (16, 16)
    assert split["result_visible"]["p50_ms"] == 5.0
    assert split["history_span"]["p50_ms"] == 36


def test_a_saga_without_records_gives_only_the_client_side_figure() -> None:
    saga = Saga(WF, called_ms=0.0, acked_ms=2.5, done_ms=40.0, status="COMPLETED")

    split = hops([], [saga])

    assert split == {"start_ack": {"p50_ms": 2.5, "p99_ms": 2.5}}


def test_the_transaction_time_quantile_interpolates_inside_the_bucket_it_falls_in() -> None:
    inf = float("inf")
    before = {0.001: 5.0, 0.002: 5.0, 0.004: 10.0, inf: 10.0}
    # 100 transactions in the level: 20 under 1 ms, 60 in 1-2 ms, 18 in 2-4 ms, 2 above 4 ms.
    after = {0.001: 25.0, 0.002: 85.0, 0.004: 108.0, inf: 110.0}
    assert histogram_quantile(before, after, 0.5) == pytest.approx(0.0015)  # rank 50: 30 of 60
    assert histogram_quantile(before, after, 0.1) == pytest.approx(0.0005)
    assert histogram_quantile(before, after, 0.99) == 0.004  # in +Inf: its lower bound
    assert math.isnan(histogram_quantile(after, after, 0.5)), "nothing observed in the level"


def test_fetch_is_what_the_commit_leaves_of_the_way_to_the_service() -> None:
    inf = float("inf")
    after = {0.002: 50.0, 0.003: 100.0, inf: 100.0}
    split = commit_split({}, after, {"to_service": {"p50_ms": 4.5, "p99_ms": 9.0}})
    assert split["commit"]["p50_ms"] == pytest.approx(2.0)
    assert split["fetch"]["p50_ms"] == pytest.approx(2.5)
    # No node answered its /metrics: no commit figure, and no fetch made up from nothing.
    assert commit_split({}, {}, {"to_service": {"p50_ms": 4.5}}) == {
        "commit": {"p50_ms": None, "p99_ms": None},
        "fetch": {"p50_ms": None, "p99_ms": None},
    }
