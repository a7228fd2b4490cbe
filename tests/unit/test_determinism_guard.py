"""The determinism guard: nondeterministic calls made directly by workflow code fail the workflow
with DeterminismViolation naming the call, the line and the ctx equivalent; libraries called by
workflow code, the engine, and code outside workflows are not affected."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from time import time_ns  # bound before the guard was installed: rebound for workflow modules
from typing import Any

import pytest
from pydantic import BaseModel

from contracts.envelopes import (
    ActivityReply,
    ActivityScheduled,
    HistoryEvent,
    ReplyOutcome,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator._engine import determinism
from orchestrator._engine.instance import WorkflowRun
from orchestrator._payloads import to_payload
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

from .sagas import Done, Step, step_a, step_b, undo_a


class Call(BaseModel):
    what: str
    swallow: bool = False


def _connect() -> None:
    with socket.socket() as sock:
        sock.connect(("127.0.0.1", 9))


async def _asyncio_sleep() -> None:
    await asyncio.sleep(0.01)


# what the workflow calls -> (the call, the ctx equivalent named in the error)
FORBIDDEN: dict[str, tuple[Callable[[], Any], str]] = {
    "time.time()": (lambda: time.time(), "ctx.now()"),
    "time.time_ns()": (lambda: time_ns(), "ctx.now()"),
    "datetime.now()": (lambda: datetime.now(UTC), "ctx.now()"),
    "datetime.utcnow()": (lambda: datetime.utcnow(), "ctx.now()"),
    "time.time() (date.today)": (lambda: date.today(), "ctx.now()"),
    "random.random()": (lambda: random.random(), "ctx.random()"),
    "random.randint()": (lambda: random.randint(1, 6), "ctx.random()"),
    "random.choice()": (lambda: random.choice("ab"), "ctx.random()"),
    "uuid.uuid4()": (lambda: uuid.uuid4(), "ctx.uuid()"),
    "time.sleep()": (lambda: time.sleep(0.01), "ctx.sleep"),
    "open()": (lambda: open("/nonexistent/x"), "an activity"),  # noqa: SIM115
    "socket.connect()": (_connect, "an activity"),
    "Thread.start()": (lambda: threading.Thread(target=print).start(), "ctx.call / ctx.gather"),
}

log = logging.getLogger("tests.workflow")


@workflow.defn(name="misbehaves")
class Misbehaves:
    @workflow.run
    async def run(self, ctx: WorkflowContext, call: Call) -> Done:
        async with ctx.saga() as saga:
            await ctx.call(step_a, Step(n=1))
            saga.on_failure(undo_a, Step(n=1))
            log.info("logging reads the clock; it is a library, so it may")  # allowed
            Done(n=int(ctx.now().timestamp()), ref=str(ctx.uuid()))  # pydantic, ctx: allowed
            if call.what == "asyncio.sleep()":
                await _asyncio_sleep()
            elif call.swallow:
                with contextlib.suppress(Exception):  # hides the error: it must fail all the same
                    FORBIDDEN[call.what][0]()
            else:
                FORBIDDEN[call.what][0]()
            await ctx.call(step_b, Step(n=2))
        return Done(n=ctx.random().randint(1, 6))


REGISTRY = WorkflowRegistry([Misbehaves])


def _reply(body: ActivityScheduled) -> ActivityReply:
    return ActivityReply(
        workflow_id="wf",
        seq=body.seq,
        attempt=1,
        idempotency_key=body.idempotency_key,
        outcome=ReplyOutcome.SUCCESS,
        sent_at_ms=0,
        result=to_payload(Done(n=body.seq)),
    )


def _run(call: Call) -> tuple[WorkflowRun, list[HistoryEvent]]:
    run = WorkflowRun("wf", REGISTRY)
    start = StartWorkflow(
        workflow_id="wf",
        workflow_type="misbehaves",
        request_id="r",
        input=to_payload(call),
        sent_at_ms=0,
    )
    new = run.start(start, 1_000, None)
    history = list(new)
    while new:
        scheduled = [e.event for e in new if isinstance(e.event, ActivityScheduled)]
        new = [e for body in scheduled for e in run.on_reply(_reply(body), 2_000)]
        history += new
    return run, history


@pytest.fixture(autouse=True)
def _guard_on() -> Iterator[None]:
    was = determinism.enabled()
    determinism.set_enabled(True)
    yield
    determinism.set_enabled(was)


@pytest.mark.parametrize("what", [*FORBIDDEN, "asyncio.sleep()"])
def test_a_forbidden_call_fails_the_workflow_and_its_saga_compensates(what: str) -> None:
    run, history = _run(Call(what=what))
    state = run.state
    assert state.status is WorkflowStatus.COMPENSATED  # step a was undone
    assert state.error is not None
    assert state.error.type == "DeterminismViolation"
    call = what.split(" ")[0]
    instead = FORBIDDEN[what][1] if what in FORBIDDEN else "ctx.sleep"
    assert f"{call} called from workflow code at {__file__}:" in state.error.message
    assert instead in state.error.message
    names = [e.event.activity_name for e in history if isinstance(e.event, ActivityScheduled)]
    assert names == ["a.do", "a.undo"]
    # Replay (a restart) reaches the same end: the guard is part of the deterministic code.
    assert WorkflowRun.replay("wf", history, REGISTRY).state == state


def test_a_caught_violation_still_fails_the_workflow() -> None:
    run, history = _run(Call(what="time.time()", swallow=True))
    # Its saga block ended without an error, so nothing is compensated; the workflow does not
    # complete either: it fails when the code returns.
    assert run.state.status is WorkflowStatus.FAILED
    assert run.state.error is not None and run.state.error.type == "DeterminismViolation"
    assert "time.time() called from workflow code" in run.state.error.message
    names = [e.event.activity_name for e in history if isinstance(e.event, ActivityScheduled)]
    assert names == ["a.do", "b.do"]


def test_code_outside_workflows_and_other_threads_are_not_guarded() -> None:
    _run(Call(what="time.time()"))  # installs the guard
    assert isinstance(time.time(), float)
    assert random.random() < 1
    assert uuid.uuid4().version == 4
    assert datetime.now(UTC).year >= 2024
    seen: list[float] = []
    worker = threading.Thread(target=lambda: seen.append(time.time()))
    worker.start()
    worker.join()
    assert len(seen) == 1


def test_the_guard_can_be_switched_off() -> None:
    determinism.set_enabled(False)
    run, _ = _run(Call(what="random.random()"))
    assert run.state.status is WorkflowStatus.COMPLETED
