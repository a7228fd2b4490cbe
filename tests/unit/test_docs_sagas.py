"""The saga example of docs/workflows.md ("Saga semantics") runs, and does what the page says."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.envelopes import (
    ActivityReply,
    ActivityScheduled,
    ErrorInfo,
    HistoryEvent,
    ReplyOutcome,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator._engine.instance import WorkflowRun
from orchestrator._payloads import from_payload, to_payload
from orchestrator.workflow import WorkflowRegistry

UNDOS = {"cancel", "refund", "return"}
PAGE = Path(__file__).parents[2] / "docs" / "workflows.md"


@pytest.fixture(scope="module")
def example() -> Iterator[types.ModuleType]:
    section = PAGE.read_text().split("### Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    module = types.ModuleType("docs_workflows_example")
    sys.modules[module.__name__] = module  # pydantic resolves the models' annotations there
    try:
        exec(compile(code.group(1), str(PAGE), "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module.__name__]


class Trip:
    """The example workflow and the commands it sent that no one answered yet."""

    def __init__(self, example: types.ModuleType) -> None:
        self.ex = example
        self.run = WorkflowRun("trip-1", WorkflowRegistry([example.BookTrip]))
        start = StartWorkflow(
            workflow_id="trip-1", workflow_type="book-trip", request_id="r1",
            input=to_payload(example.Booking(trip_id="t1")), sent_at_ms=0,
        )  # fmt: skip
        self.history: list[HistoryEvent] = self.run.start(start, 0, None)
        self.answered: set[int] = set()

    def sent(self) -> list[str]:
        return [
            e.event.activity_name for e in self.history if isinstance(e.event, ActivityScheduled)
        ]

    def waiting(self) -> list[str]:
        return [
            e.event.activity_name
            for e in self.history
            if isinstance(e.event, ActivityScheduled) and e.event.seq not in self.answered
        ]

    def reply(self, name: str, outcome: ReplyOutcome = ReplyOutcome.SUCCESS) -> None:
        seq, act = next(
            (seq, a)
            for seq, a in self.run.state.activities.items()
            if a.name == name and seq not in self.answered
        )
        self.answered.add(seq)
        ok = outcome is ReplyOutcome.SUCCESS
        reply = ActivityReply(
            workflow_id="trip-1", seq=seq, attempt=act.attempt,
            idempotency_key=act.idempotency_key, outcome=outcome, sent_at_ms=0,
            result=to_payload(self.ex.Ref(ref=f"{name}#{seq}")) if ok else None,
            error=None if ok else ErrorInfo(type="Refused", message="no car left"),
        )  # fmt: skip
        self.history += self.run.on_reply(reply, 0)

    def undo_all(self) -> list[str]:
        """Let each compensation succeed as it comes (one at a time); what they were."""
        while waiting := [n for n in self.waiting() if n.split(".")[1] in UNDOS]:
            self.reply(waiting[0])
        return self.compensations()

    def compensations(self) -> list[str]:
        return [
            f"{e.event.activity_name}({from_payload(e.event.input, self.ex.Ref).ref})"
            for e in self.history
            if isinstance(e.event, ActivityScheduled) and e.event.is_compensation
        ]


def test_the_car_refused_while_the_flight_is_in_flight(example: types.ModuleType) -> None:
    trip = Trip(example)
    trip.reply("payments.charge")  # 1
    assert trip.waiting() == ["flights.book", "hotels.book"]
    trip.reply("hotels.book")  # 2
    assert trip.waiting() == ["flights.book", "cars.rent"]
    trip.reply("cars.rent", ReplyOutcome.BUSINESS_FAILURE)  # 3
    assert trip.compensations() == []
    trip.reply("flights.book")  # 4
    assert trip.undo_all() == [  # 5
        "flights.cancel(flights.book#2)",
        "hotels.cancel(hotels.book#3)",
        "payments.refund(payments.charge#1)",
    ]
    assert trip.run.state.status is WorkflowStatus.COMPENSATED


def test_a_cancel_at_step_three_waits_for_the_car_and_the_flight(
    example: types.ModuleType,
) -> None:
    trip = Trip(example)
    trip.reply("payments.charge")
    trip.reply("hotels.book")
    trip.history += trip.run.on_cancel("plans changed", "c1", 0)
    assert trip.compensations() == []  # car and flight are in flight
    trip.reply("cars.rent")
    trip.reply("flights.book", ReplyOutcome.BUSINESS_FAILURE)
    assert trip.undo_all() == [
        "cars.return(cars.rent#4)",
        "hotels.cancel(hotels.book#3)",
        "payments.refund(payments.charge#1)",
    ]
    assert trip.run.state.status is WorkflowStatus.CANCELLED
