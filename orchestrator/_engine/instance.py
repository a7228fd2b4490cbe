"""One workflow, live: its aggregate state plus the coroutine of its code, driven by events.

Every event, whether it comes from the history (replay) or was just decided (live), goes
through :meth:`WorkflowRun._apply`. Events that report something that happened (a start, a reply,
a timer, a signal, a cancel) wake the code; the code then asks for new things (an activity, a
timer, the end) which become the next events. On replay those next events are already in the
history, and must match what the code asks for now: a mismatch is a NonDeterminismError.
"""

from __future__ import annotations

import hashlib
import random
import sys
import uuid
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    LateReplyIgnored,
    MarkerRecorded,
    Payload,
    RetryPolicy,
    SignalReceived,
    StartWorkflow,
    TimerFired,
    TimerStarted,
    TraceContext,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowStatus,
)
from orchestrator.errors import (
    ActivityError,
    CompensationFailed,
    NonDeterminismError,
    WorkflowCancelled,
)
from orchestrator.payloads import PayloadError, from_payload, to_payload
from orchestrator.workflow import (
    DEFAULT_COMPENSATION_RETRY,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
)

from . import determinism
from .state import WorkflowState, decide_reply, decide_timers

T = TypeVar("T")
InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)

_CODE_EVENTS: tuple[type, ...] = (
    ActivityScheduled,
    TimerStarted,
    WorkflowCompleted,
    WorkflowFailed,
)
_CODE_EVENTS += (MarkerRecorded,)  # ctx.patched (versioning)
_DEFAULT_RETRY = RetryPolicy()


class _Future(Generic[T]):
    """What workflow code awaits. Resolved by the engine, never by an event loop."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, value: Any) -> None:
        self._done, self._value = True, value

    def fail(self, error: BaseException) -> None:
        self._done, self._error = True, error

    def __await__(self) -> Generator[_Future[Any], None, T]:
        if not self._done:
            yield self
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]


class _Gather(_Future[list[Any]]):
    __slots__ = ("_parts",)

    def __init__(self, parts: list[_Future[Any]]) -> None:
        super().__init__()
        self._parts = parts

    @property
    def done(self) -> bool:
        if not self._done and all(p.done for p in self._parts):
            failed = next((p._error for p in self._parts if p._error is not None), None)
            if failed is not None:
                self.fail(failed)
            else:
                self.resolve([p._value for p in self._parts])
        return self._done

    def __await__(self) -> Generator[_Future[Any], None, list[Any]]:
        if not self.done:
            yield self
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]


@dataclass
class _Pending:
    """A command the code asked for, awaiting its event; ``where`` names the code line."""

    body: EventBody
    where: str


@dataclass
class _ActivityCall:
    future: _Future[Any]
    output_type: Any
    name: str


def _call_site() -> str:
    """The first frame outside the engine: the line of workflow code that asked."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename in _ENGINE_FILES:
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


_ENGINE_FILES = {__file__}


class _SagaImpl(Saga):
    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._steps: list[
            tuple[ActivityContract[Any, Any], Any, RetryPolicy, timedelta | None]
        ] = []

    def on_failure(
        self,
        activity: ActivityContract[InT, OutT],
        arg: InT,
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        self._steps.append((activity, arg, retry or DEFAULT_COMPENSATION_RETRY, timeout))

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        run = self._ctx._run
        run._shield += 1  # a cancel must not interrupt the compensations
        failures: list[ActivityError] = []
        try:
            for activity, arg, retry, timeout in reversed(self._steps):
                try:
                    await self._ctx._schedule(
                        activity, arg, retry, timeout, None, compensation=True
                    )
                except ActivityError as err:
                    failures.append(err)
        finally:
            run._shield -= 1
        if failures:
            raise CompensationFailed(failures) from exc
        run._compensated += len(self._steps)
        return False


class _Context(WorkflowContext):
    def __init__(self, run: WorkflowRun) -> None:
        self._run = run
        self._rng: random.Random | None = None  # made on first use: most workflows never ask

    @property
    def workflow_id(self) -> str:
        return self._run.state.workflow_id

    def call(
        self,
        activity: ActivityContract[InT, OutT],
        arg: InT,
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
        overall_timeout: timedelta | None = None,
    ) -> Awaitable[OutT]:
        return self._schedule(activity, arg, retry or _DEFAULT_RETRY, timeout, overall_timeout)

    def _schedule(
        self,
        activity: ActivityContract[InT, OutT],
        arg: InT,
        retry: RetryPolicy,
        timeout: timedelta | None,
        overall_timeout: timedelta | None,
        *,
        compensation: bool = False,
    ) -> _Future[OutT]:
        if not isinstance(arg, activity.input):
            raise TypeError(
                f"{activity.name} takes {activity.input.__name__}, got {type(arg).__name__}"
            )
        run = self._run
        seq = run._next_command_seq()
        future: _Future[OutT] = _Future()
        run._activities[seq] = _ActivityCall(future, activity.output, activity.name)
        run._command(
            ActivityScheduled(
                seq=seq,
                activity_name=activity.name,
                topic=activity.topic,
                input=to_payload(arg),
                idempotency_key=f"{run.state.workflow_id}/{seq}",
                is_compensation=compensation,
                retry=retry,
                attempt_timeout_ms=_ms(timeout),
                overall_timeout_ms=_ms(overall_timeout),
            )
        )
        return future

    def sleep(self, duration: timedelta) -> Awaitable[None]:
        run = self._run
        seq = run._next_command_seq()
        future: _Future[None] = _Future()
        run._timers[seq] = future
        fire_at = run._now_ms + max(0, int(duration.total_seconds() * 1000))
        run._command(TimerStarted(seq=seq, fire_at_ms=fire_at))
        return future

    def wait_signal(self, name: str, type_: type[T]) -> Awaitable[T]:
        future: _Future[T] = _Future()
        run = self._run
        buffered = run._signals.get(name)
        if buffered:
            _resolve_payload(future, buffered.popleft(), type_)
        else:
            run._signal_waiters.setdefault(name, deque()).append((future, type_))
        return future

    def gather(self, *awaitables: Awaitable[Any]) -> Awaitable[list[Any]]:
        parts: list[_Future[Any]] = []
        for item in awaitables:
            if not isinstance(item, _Future):
                raise TypeError(
                    "ctx.gather takes what ctx.call, ctx.sleep and ctx.wait_signal return"
                )
            parts.append(item)
        return _Gather(parts)

    def saga(self) -> Saga:
        return _SagaImpl(self)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._run._now_ms / 1000, tz=UTC)

    def random(self) -> random.Random:
        if self._rng is None:
            self._rng = random.Random(self._run.state.random_seed)
        return self._rng

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.random().getrandbits(128), version=4)

    def patched(self, change_id: str) -> bool:
        return self._run._patch(change_id, deprecated=False)

    def deprecate_patch(self, change_id: str) -> None:
        self._run._patch(change_id, deprecated=True)


def _ms(value: timedelta | None) -> int | None:
    return None if value is None else int(value.total_seconds() * 1000)


def _resolve_payload(future: _Future[Any], payload: Payload, tp: Any) -> None:
    try:
        future.resolve(from_payload(payload, tp))
    except PayloadError as exc:
        future.fail(exc)


def seed_for(workflow_id: str, request_id: str) -> int:
    digest = hashlib.blake2b(f"{workflow_id}\0{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class WorkflowRun:
    """A workflow's state and code. Not thread-safe; one partition's loop owns it."""

    def __init__(self, workflow_id: str, registry: WorkflowRegistry) -> None:
        self.state = WorkflowState(workflow_id)
        self._registry = registry
        self._coro: Coroutine[Any, Any, Any] | None = None
        self._blocked: _Future[Any] | None = None
        self._throw: BaseException | None = None
        self._pending: deque[_Pending] = deque()
        self._activities: dict[int, _ActivityCall] = {}
        self._timers: dict[int, _Future[None]] = {}
        self._signals: dict[str, deque[Payload]] = {}
        self._signal_waiters: dict[str, deque[tuple[_Future[Any], Any]]] = {}
        self._command_seq = 0
        self._now_ms = 0
        self._shield = 0
        self._compensated = 0
        self._rng: random.Random | None = None  # retry jitter; see _jitter
        # Versioning (ctx.patched): the history being replayed, by seq, so the code can tell
        # whether a marker was recorded at the point it has reached; None once live.
        self._replaying: dict[int, EventBody] | None = None
        self._patches: dict[str, bool] = {}

    # ----------------------------------------------------------------- building

    @classmethod
    def replay(
        cls, workflow_id: str, events: Iterable[HistoryEvent], registry: WorkflowRegistry
    ) -> WorkflowRun:
        run = cls(workflow_id, registry)
        history = list(events)
        run._replaying = {event.event_seq: event.event for event in history}
        try:
            for event in history:
                run._apply(event)
        finally:
            run._replaying = None
        if run._pending:
            raise NonDeterminismError(
                f"workflow {workflow_id}: its code asks for "
                f"{_describe(run._pending[0].body)} at {run._pending[0].where}, "
                f"which the history (up to event {run.state.last_seq}) never recorded"
            )
        return run

    # ----------------------------------------------------------------- inputs (live)

    def start(
        self, msg: StartWorkflow, now_ms: int, trace: TraceContext | None
    ) -> list[HistoryEvent]:
        if self.state.status is not None:
            raise RuntimeError(f"workflow {self.state.workflow_id} exists already")
        if self._registry.get(msg.workflow_type) is None:
            raise LookupError(
                f"unknown workflow type {msg.workflow_type!r}; this node runs: "
                + ", ".join(self._registry.names())
            )
        started = WorkflowStarted(
            workflow_type=msg.workflow_type,
            request_id=msg.request_id,
            input=msg.input,
            random_seed=seed_for(msg.workflow_id, msg.request_id),
            trace=trace or msg.trace,
        )
        return self._record([started], now_ms)

    def on_reply(self, reply: ActivityReply, now_ms: int) -> list[HistoryEvent]:
        return self._record(decide_reply(self.state, reply, now_ms, self._jitter), now_ms)

    def on_signal(
        self, name: str, payload: Payload, request_id: str, now_ms: int
    ) -> list[HistoryEvent]:
        if request_id in self.state.signal_request_ids:
            return []  # the same signal delivered twice
        body = SignalReceived(signal_name=name, payload=payload, request_id=request_id)
        return self._record([body], now_ms)

    def on_cancel(self, reason: str, request_id: str, now_ms: int) -> list[HistoryEvent]:
        if self.state.cancel_requested or self.state.finished:
            return []
        return self._record([CancelRequested(reason=reason, request_id=request_id)], now_ms)

    def on_timers(self, now_ms: int) -> list[HistoryEvent]:
        out: list[HistoryEvent] = []
        while bodies := decide_timers(self.state, now_ms, self._jitter):
            out.extend(self._record(bodies, now_ms))
        return out

    @property
    def _jitter(self) -> random.Random:
        """Randomness for retry jitter. Its draws are recorded in the history (retry_at_ms), so
        replay never needs the same ones: any seed will do."""
        if self._rng is None:
            self._rng = random.Random(self.state.random_seed ^ self.state.last_seq)
        return self._rng

    def _record(self, bodies: list[EventBody], now_ms: int) -> list[HistoryEvent]:
        """Append input events, then the commands the code asks for in response."""
        out: list[HistoryEvent] = []
        wf = self.state.workflow_id
        for body in bodies:
            event = HistoryEvent(
                workflow_id=wf, event_seq=self.state.last_seq + 1, recorded_at_ms=now_ms, event=body
            )
            self._apply(event)
            out.append(event)
            while self._pending:
                command = HistoryEvent(
                    workflow_id=wf,
                    event_seq=self.state.last_seq + 1,
                    recorded_at_ms=now_ms,
                    event=self._pending[0].body,
                )
                self._apply(command)
                out.append(command)
        return out

    # ----------------------------------------------------------------- the fold + the code

    def _apply(self, event: HistoryEvent) -> None:
        if event.event_seq <= self.state.last_seq:
            return
        body = event.event
        if isinstance(body, _CODE_EVENTS) or self._pending:
            self._match_command(event)
        self.state.apply(event)
        self._now_ms = event.recorded_at_ms
        if isinstance(body, WorkflowStarted):
            self._begin(body)
        elif isinstance(body, ActivityCompleted):
            call = self._activities.get(body.seq)
            if call is not None:
                _resolve_payload(call.future, body.result, call.output_type)
        elif isinstance(body, ActivityFailed):
            call = self._activities.get(body.seq)
            if call is not None:
                call.future.fail(
                    ActivityError(
                        call.name,
                        body.seq,
                        body.error.type,
                        body.error.message,
                        business=body.business,
                    )
                )
        elif isinstance(body, TimerFired):
            timer = self._timers.get(body.seq)
            if timer is not None:
                timer.resolve(None)
        elif isinstance(body, SignalReceived):
            self._deliver_signal(body)
        elif isinstance(body, CancelRequested):
            if self._shield == 0:
                self._throw = WorkflowCancelled(body.reason)
        elif isinstance(body, ActivityAttemptStarted | ActivityAttemptFailed | LateReplyIgnored):
            return  # engine bookkeeping; the code does not see attempts
        self._resume()

    def _match_command(self, event: HistoryEvent) -> None:
        body = event.event
        expected = self._pending.popleft() if self._pending else None
        if expected is None or not _same_command(expected.body, body):
            asked = (
                f"asks for {_describe(expected.body)} at {expected.where}"
                if expected
                else "asks for nothing" + _waiting_at(self._coro)
            )
            raise NonDeterminismError(
                f"workflow {self.state.workflow_id} ({self.state.workflow_type}): history event "
                f"{event.event_seq} is {_describe(body)}, but the code now {asked}"
            )

    def _deliver_signal(self, body: SignalReceived) -> None:
        waiters = self._signal_waiters.get(body.signal_name)
        if waiters:
            future, tp = waiters.popleft()
            _resolve_payload(future, body.payload, tp)
        else:
            self._signals.setdefault(body.signal_name, deque()).append(body.payload)

    def _begin(self, body: WorkflowStarted) -> None:
        definition = self._registry.get(body.workflow_type)
        if definition is None:
            raise LookupError(f"unknown workflow type {body.workflow_type!r}")
        ctx = _Context(self)
        instance = definition.cls()
        try:
            arg = from_payload(body.input, definition.input_type)
        except PayloadError as exc:
            self._finish_error(exc)
            return
        self._coro = determinism.guard(
            getattr(instance, definition.run_name)(ctx, arg), definition.cls
        )

    def _resume(self) -> None:
        coro = self._coro
        while coro is not None:
            try:
                if self._throw is not None:
                    error, self._throw = self._throw, None
                    yielded = coro.throw(error)
                elif self._blocked is None or self._blocked.done:
                    yielded = coro.send(None)
                else:
                    return
            except StopIteration as stop:
                self._coro = None
                self._finish_ok(stop.value)
                return
            except Exception as exc:
                self._coro = None
                self._finish_error(exc)
                return
            if not isinstance(yielded, _Future):
                coro.close()
                self._coro = None
                self._finish_error(
                    TypeError(
                        f"workflow code awaited {yielded!r}; await only what ctx gives "
                        "(no asyncio or I/O in workflows)"
                    )
                )
                return
            self._blocked = yielded

    def _finish_ok(self, value: Any) -> None:
        try:
            payload = to_payload(value)
        except PayloadError as exc:
            self._finish_error(exc)
            return
        self._command(WorkflowCompleted(result=payload))

    def _finish_error(self, exc: BaseException) -> None:
        if isinstance(exc, CompensationFailed):
            status = WorkflowStatus.PARKED
        elif isinstance(exc, WorkflowCancelled):
            status = WorkflowStatus.CANCELLED
        elif self._compensated > 0:
            status = WorkflowStatus.COMPENSATED
        else:
            status = WorkflowStatus.FAILED
        error_type = exc.error_type if isinstance(exc, ActivityError) else type(exc).__name__
        self._command(
            WorkflowFailed(status=status, error=ErrorInfo(type=error_type, message=str(exc)))
        )

    def _command(self, body: EventBody) -> None:
        self._pending.append(_Pending(body, _call_site()))

    def _patch(self, change_id: str, *, deprecated: bool) -> bool:
        """``ctx.patched``: True if this run reaches the change live, on code that has it (a
        marker is recorded), or replays a history with the marker right here; False if it
        replays a history without it. The code's reaction to a history event already happened
        when the event was recorded, so during a replay "no marker here" means the code that
        ran then had no such change, even at the end of the history. ``ctx.deprecate_patch``:
        records nothing, and takes a marker the history has here. The first answer holds."""
        known = self._patches.get(change_id)
        if known is not None:
            return known
        marker = MarkerRecorded(marker="patch", change_id=change_id)
        if self._replaying is None:
            answer = True
            if not deprecated:
                self._command(marker)
        else:
            at = self.state.last_seq + len(self._pending) + 1
            answer = self._replaying.get(at) == marker
            if answer:
                self._command(marker)
        self._patches[change_id] = answer
        return answer

    def _next_command_seq(self) -> int:
        self._command_seq += 1
        return self._command_seq

    @property
    def finished(self) -> bool:
        return self.state.finished


def _same_command(expected: EventBody, actual: EventBody) -> bool:
    if type(expected) is not type(actual):
        return False
    if isinstance(expected, ActivityScheduled) and isinstance(actual, ActivityScheduled):
        return (expected.seq, expected.activity_name, expected.is_compensation) == (
            actual.seq,
            actual.activity_name,
            actual.is_compensation,
        )
    if isinstance(expected, TimerStarted) and isinstance(actual, TimerStarted):
        return expected.seq == actual.seq
    if isinstance(expected, WorkflowFailed) and isinstance(actual, WorkflowFailed):
        return expected.status == actual.status
    if isinstance(expected, MarkerRecorded):
        return expected == actual
    return True


def _describe(body: EventBody) -> str:
    if isinstance(body, ActivityScheduled):
        kind = "compensation" if body.is_compensation else "activity"
        return f"{kind} {body.activity_name} #{body.seq}"
    if isinstance(body, TimerStarted):
        return f"timer #{body.seq}"
    if isinstance(body, WorkflowFailed):
        return f"WorkflowFailed ({body.status.value}: {body.error.type}: {body.error.message})"
    if isinstance(body, MarkerRecorded):
        return f"{body.marker} marker {body.change_id!r}"
    return type(body).__name__


def _waiting_at(coro: Any) -> str:
    """Where workflow code is suspended (its innermost frame outside the engine), for errors."""
    where = ""
    current = getattr(coro, "inner", coro)
    while current is not None:
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        if frame is not None and frame.f_code.co_filename not in _ENGINE_FILES:
            code = frame.f_code
            where = f" (it waits at {code.co_filename}:{frame.f_lineno} in {code.co_name})"
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
    return where
