"""An asyncio client: start, signal, cancel, wait for results and describe workflows from
``async`` code (FastAPI, aiohttp, ...) without blocking the event loop.

    from orchestrator import AsyncClient, Settings

    async with AsyncClient(Settings(namespace="shop")) as client:
        handle = await client.start("place-order", order, workflow_id="order-42")
        receipt = await handle.result(Receipt, timeout=60)

It wraps a :class:`~orchestrator.client.Client` (``client.sync``) and shares its producer and its
results subscription, so the two can be mixed. What never blocks the loop:

* ``start``/``signal``/``cancel`` queue the record with librdkafka and await its delivery report,
  which the client's sender thread hands to the loop (``loop.call_soon_threadsafe``). Only the
  first send on a client reads the inbox's metadata, in a worker thread.
* ``result`` registers an asyncio waiter on the client's one results subscription (opened in a
  worker thread the first time). 1,000 waiters are 1,000 futures, not 1,000 consumers.
* ``describe`` (and ``list``) read over the network in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, overload

from opentelemetry.trace import TracerProvider
from pydantic import BaseModel

from contracts.codec import encode
from contracts.envelopes import CancelWorkflow, IdReusePolicy, TraceContext, WorkflowResult
from orchestrator._results import LOOKBACK_S, NEEDS_CONFIRM, ResultSubscription
from orchestrator.client import (
    Client,
    ClientError,
    DeliveryFailed,
    WorkflowDescription,
    _check_id,
    _now_ms,
    _output,
)
from orchestrator.settings import Settings

__all__ = ["AsyncClient", "AsyncWorkflowHandle"]

T = TypeVar("T")


@dataclass(frozen=True)
class AsyncWorkflowHandle:
    """A workflow started (or looked up) through an :class:`AsyncClient`."""

    client: AsyncClient = field(repr=False)
    workflow_id: str
    request_id: str | None = None
    workflow_type: str | None = None

    @overload
    async def result(self, output_type: type[T], timeout: float = 30.0) -> T: ...
    @overload
    async def result(self, output_type: Any = ..., timeout: float = 30.0) -> Any: ...
    async def result(self, output_type: Any = Any, timeout: float = 30.0) -> Any:
        """Wait for the workflow's result; see :meth:`AsyncClient.result`."""
        return await self.client.result(
            self.workflow_id, output_type, timeout=timeout, request_id=self.request_id
        )

    async def signal(self, name: str, payload: object = None) -> str:
        return await self.client.signal(self.workflow_id, name, payload)

    async def cancel(self, reason: str = "") -> str:
        return await self.client.cancel(self.workflow_id, reason)

    async def describe(self, *, timeout: float = 10.0) -> WorkflowDescription:
        return await self.client.describe(self.workflow_id, timeout=timeout)


class AsyncClient:
    """The asyncio face of :class:`~orchestrator.client.Client`; see the module docstring.

    Create it anywhere; use it from one event loop at a time (a waiter is woken on the loop that
    awaits it). ``close()`` (or ``async with``) releases the producer and the subscription.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        send_timeout: float = 15.0,
        tracer_provider: TracerProvider | None = None,
        results_lookback: float = LOOKBACK_S,
    ) -> None:
        self.sync = Client(
            settings,
            send_timeout=send_timeout,
            tracer_provider=tracer_provider,
            results_lookback=results_lookback,
        )
        """The sync client underneath (same producer, same results subscription)."""
        self.settings = settings

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush what is still queued, release the producer and the subscription. Idempotent."""
        await asyncio.to_thread(self.sync.close)

    # -- sending -------------------------------------------------------------------------

    async def start(
        self,
        workflow_type: str,
        input: BaseModel | Any,
        *,
        workflow_id: str | None = None,
        trace: TraceContext | None = None,
        execution_timeout: timedelta | float | None = None,
        id_reuse: IdReusePolicy | str = IdReusePolicy.REJECT_DUPLICATE,
    ) -> AsyncWorkflowHandle:
        """Ask the orchestrator to start a workflow; return once the broker acknowledged the
        request. Same rules as :meth:`Client.start <orchestrator.client.Client.start>`
        (``execution_timeout``, ``id_reuse`` included)."""
        envelope, span = self.sync._start_envelope(
            workflow_type, input, workflow_id, trace, execution_timeout, id_reuse
        )
        try:
            partition, offset = await self._send(
                envelope.workflow_id,
                encode(envelope),
                envelope.trace,
                f"start of {envelope.workflow_id}",
            )
        finally:
            if span is not None:
                span.end()
        self.sync._remember(envelope, partition, offset)
        return AsyncWorkflowHandle(self, envelope.workflow_id, envelope.request_id, workflow_type)

    async def signal(
        self,
        workflow_id: str,
        name: str,
        payload: object = None,
        *,
        trace: TraceContext | None = None,
    ) -> str:
        """Send signal ``name`` with ``payload`` to a workflow; returns the request id."""
        envelope = self.sync._signal_envelope(workflow_id, name, payload, trace)
        await self._send(workflow_id, encode(envelope), trace, f"signal {name} to {workflow_id}")
        return envelope.request_id

    async def cancel(
        self, workflow_id: str, reason: str = "", *, trace: TraceContext | None = None
    ) -> str:
        """Ask the orchestrator to cancel a workflow (compensations run); returns the request id."""
        _check_id(workflow_id)
        envelope = CancelWorkflow(
            workflow_id=workflow_id,
            request_id=uuid.uuid4().hex,
            reason=reason,
            sent_at_ms=_now_ms(),
            trace=trace,
        )
        await self._send(workflow_id, encode(envelope), trace, f"cancel of {workflow_id}")
        return envelope.request_id

    def get_handle(self, workflow_id: str) -> AsyncWorkflowHandle:
        """A handle to an existing workflow (its ``result()`` ignores every rejected start)."""
        _check_id(workflow_id)
        return AsyncWorkflowHandle(self, workflow_id)

    # -- reading -------------------------------------------------------------------------

    @overload
    async def result(
        self,
        workflow_id: str,
        output_type: type[T],
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
    ) -> T: ...
    @overload
    async def result(
        self,
        workflow_id: str,
        output_type: Any = ...,
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
    ) -> Any: ...
    async def result(
        self,
        workflow_id: str,
        output_type: Any = Any,
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
    ) -> Any:
        """Wait up to ``timeout`` seconds for the workflow's result and return its output;
        the same rules and errors as :meth:`Client.result <orchestrator.client.Client.result>`.
        """
        _check_id(workflow_id)
        found = await self._wait_result(workflow_id, request_id, timeout)
        return _output(found, workflow_id, request_id, output_type)

    async def describe(self, workflow_id: str, *, timeout: float = 10.0) -> WorkflowDescription:
        """The workflow's state and timeline (:meth:`Client.describe
        <orchestrator.client.Client.describe>`, run in a worker thread)."""
        return await asyncio.to_thread(self.sync.describe, workflow_id, timeout=timeout)

    async def list(self, *args: Any, **kwargs: Any) -> Any:
        """The workflows the nodes know, as :meth:`Client.list` returns them (in a worker thread).

        Takes the same arguments as ``Client.list``; raises ``NotImplementedError`` on a build
        whose ``Client`` has no ``list`` yet.
        """
        listing = getattr(self.sync, "list", None)
        if listing is None:
            raise NotImplementedError("this build's Client has no list(): update the package")
        return await asyncio.to_thread(listing, *args, **kwargs)

    # -- private -------------------------------------------------------------------------

    async def _send(
        self, workflow_id: str, value: bytes, trace: TraceContext | None, what: str
    ) -> tuple[int, int]:
        sync = self.sync
        if sync.settings.inbox not in sync._partitions:
            # The first send reads the inbox's metadata (a clear error if it is missing).
            await asyncio.to_thread(
                sync._partition_count, sync.settings.inbox, time.monotonic() + sync._send_timeout
            )
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[tuple[int, int]] = loop.create_future()

        def on_done(error: DeliveryFailed | None, partition: int, offset: int) -> None:
            # On the sender's thread: hand over to the loop, which may have gone meanwhile.
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, delivered, error, (partition, offset))

        sync._submit(workflow_id, value, trace, what, on_done)
        try:
            async with asyncio.timeout(sync._send_timeout + 5.0):
                return await delivered
        except TimeoutError:
            raise sync._not_acknowledged(what) from None

    async def _subscription(self) -> ResultSubscription:
        sub = self.sync._results
        if sub is None or sub.failure is not None:
            # Opening it reads metadata and offsets: a worker thread's job.
            return await asyncio.to_thread(self.sync._results_subscription)
        return sub

    async def _wait_result(
        self, workflow_id: str, request_id: str | None, timeout: float
    ) -> WorkflowResult:
        deadline = time.monotonic() + timeout
        await self._subscription()
        loop = asyncio.get_running_loop()
        outcomes: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(item: Any) -> None:
            # Called on the subscription's thread (or this one, from the cache).
            if not loop.is_closed():
                loop.call_soon_threadsafe(outcomes.put_nowait, item)

        sub, waiter = self.sync._register_waiter(workflow_id, request_id, deliver)
        try:
            if waiter.backfill is not None:
                await asyncio.to_thread(self.sync._backfill, sub, waiter, deadline)
            while True:
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                        found = await outcomes.get()
                except TimeoutError:
                    raise self.sync._no_result(workflow_id, timeout, sub, waiter) from None
                if found is not NEEDS_CONFIRM:
                    break
                await asyncio.to_thread(self.sync._confirm, sub, waiter, deadline)
        finally:
            sub.unregister(waiter)
        if isinstance(found, BaseException):
            raise ClientError(f"reading {sub.topic} failed: {found}") from found
        assert isinstance(found, WorkflowResult)
        return found


def _settle(
    future: asyncio.Future[tuple[int, int]],
    error: DeliveryFailed | None,
    where: tuple[int, int],
) -> None:
    if future.done():  # the caller gave up (cancelled or timed out)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(where)
