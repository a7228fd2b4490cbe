"""AsyncClient against the real broker, with a node and the kit's services running (``stack``),
and the shared results subscription under it (orchestrator/_results.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from contracts.envelopes import WorkflowStatus
from orchestrator import AsyncClient
from orchestrator.errors import WorkflowFailedError

from .kit import Approval, Trip, TripResult
from .stack import Stack

pytestmark = pytest.mark.broker

R = TypeVar("R")


def run(
    main: Callable[[AsyncClient], Awaitable[R]], stack: Stack, results_lookback: float = 120.0
) -> R:
    async def with_client() -> R:
        async with AsyncClient(stack.settings, results_lookback=results_lookback) as client:
            return await main(client)

    return asyncio.run(with_client())


async def _eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


def test_start_signal_cancel_result_and_describe(stack: Stack) -> None:
    async def main(client: AsyncClient) -> None:
        plain = await client.start("trip", Trip(), workflow_id="a-plain")
        assert plain.request_id
        signed = await client.start("trip", Trip(wait_signal=True), workflow_id="a-signed")
        cancelled = await client.start("trip", Trip(wait_signal=True), workflow_id="a-cancelled")
        assert len((await plain.result(TripResult, timeout=30)).refs) == 3

        await _eventually(lambda: len(stack.kit.steps_of("a-signed")) == 2)
        await _eventually(lambda: len(stack.kit.steps_of("a-cancelled")) == 2)
        await signed.signal("approve", Approval(by="async-ops"))
        await client.cancel("a-cancelled", reason="changed my mind")
        assert (await signed.result(TripResult, timeout=30)).approved_by == "async-ops"
        with pytest.raises(WorkflowFailedError) as info:
            await cancelled.result(TripResult, timeout=30)
        assert info.value.status == WorkflowStatus.CANCELLED.value

        described = await client.describe("a-signed")
        assert described.status is WorkflowStatus.COMPLETED
        assert described.output(TripResult).approved_by == "async-ops"
        kinds = [e.kind for e in described.events]
        assert "SignalReceived" in kinds and kinds[-1] == "WorkflowCompleted"
        # The sync client underneath shares the subscription and sees the same result.
        got = await asyncio.to_thread(client.sync.result, "a-plain", TripResult, timeout=10)
        assert got == await plain.result(TripResult)

    run(main, stack)


def test_many_concurrent_waiters_each_get_their_own_result(stack: Stack) -> None:
    n = 60

    async def main(client: AsyncClient) -> None:
        handles = await asyncio.gather(
            *(
                client.start("trip", Trip(wait_signal=True), workflow_id=f"many-{i}")
                for i in range(n)
            )
        )
        waits = [asyncio.ensure_future(h.result(TripResult, timeout=90)) for h in handles]
        await _eventually(
            lambda: all(len(stack.kit.steps_of(h.workflow_id)) == 2 for h in handles), 60
        )
        # Every workflow gets its own approver: a waiter woken with another's result would show.
        await asyncio.gather(
            *(h.signal("approve", Approval(by=f"user-{i}")) for i, h in enumerate(handles))
        )
        results = await asyncio.gather(*waits)
        assert [r.approved_by for r in results] == [f"user-{i}" for i in range(n)]
        sub = client.sync._results
        assert sub is not None and sub.waiting() == 0

    run(main, stack)


def test_a_waiter_that_comes_after_the_result_still_gets_it(stack: Stack) -> None:
    async def main(client: AsyncClient) -> None:
        # The subscription is open (an earlier result()), then a result is written while
        # nobody waits for it: it is in the cache.
        first = await client.start("trip", Trip(), workflow_id="late-1")
        await first.result(TripResult, timeout=30)
        second = await client.start("trip", Trip(), workflow_id="late-2")
        await _eventually(lambda: len(stack.kit.steps_of("late-2")) == 3)
        await _eventually(lambda: stack.client.describe("late-2").finished)
        assert len((await second.result(TripResult, timeout=10)).refs) == 3

    run(main, stack)

    # A new client whose subscription starts after the results were written (lookback 0):
    # they are below its floor, and a waiter reads them there once (the backfill).
    async def fresh(client: AsyncClient) -> None:
        got = await client.get_handle("late-2").result(TripResult, timeout=20)
        assert len(got.refs) == 3
        sub = client.sync._results
        assert sub is not None and sub.ready

    run(fresh, stack, results_lookback=0.0)


def test_a_stale_rejection_does_not_mask_a_valid_start_with_the_same_id(stack: Stack) -> None:
    async def main(client: AsyncClient) -> None:
        bad = await client.start("no-such-type", Trip(), workflow_id="a-reused")
        with pytest.raises(WorkflowFailedError) as rejected:
            await bad.result(TripResult, timeout=20)
        assert rejected.value.error_type == "UnknownWorkflowType"
        good = await client.start("trip", Trip(), workflow_id="a-reused")
        assert len((await good.result(TripResult, timeout=30)).refs) == 3
        assert len((await client.get_handle("a-reused").result(TripResult, timeout=30)).refs) == 3
        # A start with the same id and input is a duplicate: it gets the workflow's result, once
        # the node has processed it (no result of its own comes).
        again = await client.start("trip", Trip(), workflow_id="a-reused")
        assert len((await again.result(TripResult, timeout=30)).refs) == 3

    run(main, stack)


def test_result_times_out_clearly(stack: Stack) -> None:
    async def main(client: AsyncClient) -> None:
        with pytest.raises(TimeoutError, match="no result for workflow 'never'"):
            await client.result("never", timeout=1.0)

    run(main, stack)
