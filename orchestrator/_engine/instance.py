"""One workflow, live: its aggregate state plus the coroutine of its code, driven by events.

Every event, whether it comes from the history (replay) or was just decided (live), goes
through :meth:`WorkflowRun._apply`. Events that report something that happened (a start, a reply,
a timer, a signal, a cancel) wake the code; the code then asks for new things (an activity, a
timer, the end) which become the next events. On replay those next events are already in the
history, and must match what the code asks for now: a mismatch is a NonDeterminismError.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import inspect
import random
import sys
import sysconfig
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, NoReturn, TypeVar, cast, get_type_hints

from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityParked,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    ChildWorkflowCompleted,
    ChildWorkflowEnded,
    ChildWorkflowFailed,
    ChildWorkflowStarted,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    LateReplyIgnored,
    LocalActivityRecorded,
    MarkerRecorded,
    OperatorActed,
    OperatorAction,
    Payload,
    RetryPolicy,
    SignalReceived,
    StartWorkflow,
    TimerFired,
    TimerStarted,
    TraceContext,
    WorkflowBlocked,
    WorkflowCompleted,
    WorkflowContinuedAsNew,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowStartSent,
    WorkflowStatus,
    WorkflowTimedOut,
)
from contracts.limits import MAX_INBOX_RECORD_BYTES
from orchestrator.errors import (
    ActivityError,
    AsyncioInWorkflow,
    BusinessError,
    ChildWorkflowError,
    CompensationFailed,
    ContinueAsNew,
    DeterminismViolation,
    NonDeterminismError,
    QueryFailed,
    UnknownQuery,
    WorkflowCancelled,
    WorkflowFailure,
)
from orchestrator.errors import WorkflowTimedOut as TimedOutError
from orchestrator.payloads import NULL, PayloadError, from_payload, to_payload
from orchestrator.workflow import (
    DEFAULT_COMPENSATION_RETRY,
    NODE_DEFAULT,
    AttemptTimeout,
    ChildHandle,
    Compensation,
    LocalIn,
    LocalOut,
    ParentClosePolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
    definition_of,
)

from . import determinism
from .state import (
    OperatorActionKind,
    UnknownActivity,
    WorkflowState,
    decide_operator,
    decide_reply,
    decide_timers,
)

T = TypeVar("T")
InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)

_CODE_EVENTS = (
    ActivityScheduled,
    TimerStarted,
    WorkflowCompleted,
    WorkflowFailed,
    MarkerRecorded,
    WorkflowContinuedAsNew,
    WorkflowStartSent,
    ChildWorkflowStarted,
    LocalActivityRecorded,
)
#: A child's input, with room left under the inbox limit for the rest of its StartWorkflow.
MAX_CHILD_INPUT_BYTES = MAX_INBOX_RECORD_BYTES - 4096
_BOOKKEEPING = (
    ActivityAttemptStarted,
    ActivityAttemptFailed,
    LateReplyIgnored,
    WorkflowBlocked,
    ActivityParked,
    OperatorActed,
)
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


class _Task(_Future[Any]):
    """A coroutine the engine drives: the workflow's run method, or a branch of ``ctx.gather``.

    Resolved with the coroutine's return value (or failed with what it raised) when it ends."""

    __slots__ = ("blocked", "cancel", "coro", "sagas", "shield", "throw")

    def __init__(self, coro: Coroutine[Any, Any, Any], sagas: list[_SagaImpl]) -> None:
        super().__init__()
        self.coro = coro
        self.blocked: _Future[Any] | None = None
        self.throw: BaseException | None = None
        # A cancel that waits until this task's branches have ended, then is thrown here.
        self.cancel: Exception | None = None  # WorkflowCancelled, or WorkflowTimedOut
        # The saga blocks open around this coroutine, innermost last; a branch starts inside
        # its parent's, so that compensate= in a branch registers with the gather's saga.
        self.sagas = sagas
        self.shield = 0  # > 0 while one of its sagas compensates: a cancel must not cut that

    def waits_for_branches(self) -> bool:
        return self.blocked is not None and _has_live_branch(self.blocked)


def _has_live_branch(future: _Future[Any]) -> bool:
    if isinstance(future, _Task):
        return not future.done
    return isinstance(future, _Gather) and any(_has_live_branch(p) for p in future._parts)


@dataclass
class _Pending:
    """A command the code asked for, awaiting its event; ``where`` names the code line."""

    body: EventBody
    where: str
    task: _Task | None = None


@dataclass
class _ActivityCall:
    future: _Future[Any]
    output_type: Any
    name: str
    undo: _StepUndo | None = None


@dataclass
class _ChildCall:
    future: _Future[Any]
    output_type: Any
    workflow_id: str
    undo: _StepUndo | None = None  # compensate= given: the saga undoes the child like a step


class _ChildHandle(ChildHandle[Any]):
    def __init__(self, workflow_id: str, future: _Future[Any]) -> None:
        self._workflow_id = workflow_id
        self._future = future

    @property
    def workflow_id(self) -> str:
        return self._workflow_id

    def result(self) -> Awaitable[Any]:
        return self._future


@dataclass(eq=False)
class _StepUndo:
    """A compensation given with its call: known before the step is sent, due once it
    succeeded. The saga keeps it in flight until the step ends, and waits for that on failure."""

    saga: _SagaImpl
    future: _Future[Any]
    compensate: Compensation | Callable[[Any], Compensation]
    name: str
    seq: int

    def ended(self, succeeded: bool) -> None:
        saga = self.saga
        if self in saga._inflight:
            saga._inflight.remove(self)
            if succeeded and saga._open:
                saga._done.append(self)

    def resolve(self) -> Compensation:
        if isinstance(self.compensate, Compensation):
            return self.compensate
        if self.future._error is not None:  # the service's result could not be read
            raise self.future._error
        return self.compensate(self.future._value)


def _call_site() -> str:
    """The first frame outside the engine: the line of workflow code that asked."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename in _ENGINE_FILES:
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


_ENGINE_FILES = {__file__}

# What an exception escaping workflow code may be on purpose: an activity's failure the code does
# not catch, a cancel, a compensation that gave up, a failure raised deliberately, a misuse of
# the API the engine reports (TypeError, AsyncioInWorkflow, DeterminismViolation), bad input or
# output. It ends the workflow. Anything else (AttributeError, KeyError, ...) is a bug that new
# code can fix: the workflow is BLOCKED, nothing of that step is sent, its inputs are kept.
_DELIBERATE = (
    ActivityError,
    WorkflowCancelled,
    CompensationFailed,
    WorkflowFailure,
    BusinessError,
    TypeError,
    DeterminismViolation,
    PayloadError,
    ContinueAsNew,
)


_LIBRARY_DIRS = tuple(
    {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


class CodeBug(Exception):
    """An exception from workflow code that was not deliberate, with where it was raised."""


def _as_bug(exc: BaseException) -> CodeBug:
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename not in _ENGINE_FILES and not f.filename.startswith(_LIBRARY_DIRS)
    ]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return CodeBug(f"workflow code raised {type(exc).__name__}: {exc}{where}")


class _SagaImpl(Saga):
    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        # In order of completion: registered by on_failure (after its step returned), or a
        # compensate= step whose ActivityCompleted was applied.
        self._done: list[Compensation | _StepUndo] = []
        self._inflight: list[_StepUndo] = []  # compensate= steps sent that have not ended
        self._open = True

    def on_failure(
        self,
        activity: ActivityContract[InT, OutT],
        arg: InT,
        *,
        retry: RetryPolicy | None = None,
        timeout: AttemptTimeout = NODE_DEFAULT,
    ) -> None:
        if self._open:
            self._done.append(Compensation(activity, arg, retry, timeout))

    def pivot(self) -> None:
        self._done.clear()
        self._inflight.clear()  # so their ends no longer add them to _done

    async def __aenter__(self) -> Saga:
        self._ctx._run._task().sagas.append(self)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        run = self._ctx._run
        current = run._current  # None when a coroutine left suspended is garbage-collected
        if current is not None and self in current.sagas:
            current.sagas.remove(self)
        if exc is None or not isinstance(exc, Exception) or not isinstance(exc, _DELIBERATE):
            # A bug is not a failure of the saga: nothing is undone, the workflow blocks.
            self._open = False
            return False
        task = run._task()
        task.shield += 1  # a cancel must not interrupt the compensations
        failures: list[ActivityError] = []
        try:
            # A step still in flight may yet succeed: its outcome decides whether it is undone,
            # and its completion sets its place in the order.
            while self._inflight:
                step = self._inflight[0]
                with suppress(Exception):
                    await step.future
                if step in self._inflight:
                    self._inflight.remove(step)
            self._open = False
            undos = list(reversed(self._done))
            for undo in undos:
                try:
                    comp = undo if isinstance(undo, Compensation) else undo.resolve()
                except Exception as err:
                    assert isinstance(undo, _StepUndo)
                    failures.append(
                        ActivityError(
                            undo.name,
                            undo.seq,
                            type(err).__name__,
                            f"its compensation could not be built: {err}",
                            business=False,
                        )
                    )
                    continue
                try:
                    await self._ctx._schedule(
                        comp.activity,
                        comp.arg,
                        comp.retry or DEFAULT_COMPENSATION_RETRY,
                        comp.timeout,
                        None,
                        compensation=True,
                    )
                except ActivityError as err:
                    failures.append(err)
        finally:
            task.shield -= 1
        if failures:
            raise CompensationFailed(failures) from exc
        run._compensated += len(undos)
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
        timeout: AttemptTimeout = NODE_DEFAULT,
        overall_timeout: timedelta | None = None,
        compensate: Compensation | Callable[[OutT], Compensation] | None = None,
        heartbeat_timeout: timedelta | None = None,
    ) -> Awaitable[OutT]:
        saga: _SagaImpl | None = None
        if compensate is not None:
            sagas = self._run._task().sagas
            if not sagas:
                raise TypeError(
                    f"ctx.call({activity.name}, compensate=...) outside `async with ctx.saga()`: "
                    "no saga would run the compensation"
                )
            saga = sagas[-1]
        return self._schedule(
            activity, arg, retry or _DEFAULT_RETRY, timeout, overall_timeout,
            undo=(saga, compensate) if saga is not None and compensate is not None else None,
            heartbeat_timeout=heartbeat_timeout,
        )  # fmt: skip

    def _schedule(
        self,
        activity: ActivityContract[InT, OutT],
        arg: InT,
        retry: RetryPolicy,
        timeout: AttemptTimeout,
        overall_timeout: timedelta | None,
        *,
        compensation: bool = False,
        undo: tuple[_SagaImpl, Compensation | Callable[[OutT], Compensation]] | None = None,
        heartbeat_timeout: timedelta | None = None,
    ) -> _Future[OutT]:
        if not isinstance(arg, activity.input):
            raise TypeError(
                f"{activity.name} takes {activity.input.__name__}, got {type(arg).__name__}"
            )
        run = self._run
        seq = run._next_command_seq()
        future: _Future[OutT] = _Future()
        call = run._activities[seq] = _ActivityCall(future, activity.output, activity.name)
        if undo is not None:
            saga, compensate = undo
            call.undo = _StepUndo(saga, future, compensate, activity.name, seq)
            saga._inflight.append(call.undo)
        if timeout is NODE_DEFAULT:
            # Resolved now and recorded in ActivityScheduled: the attempt keeps the timeout it was
            # scheduled with, even when a later deploy changes the node's setting.
            timeout = run._registry.activity_timeout
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
                heartbeat_timeout_ms=_ms(heartbeat_timeout),
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
        strangers = [
            a for a in awaitables if not isinstance(a, _Future) and not inspect.iscoroutine(a)
        ]
        if strangers:
            for item in awaitables:
                if inspect.iscoroutine(item):
                    item.close()  # never started: nothing of it ran
            raise TypeError(
                "ctx.gather takes coroutines and what ctx.call, ctx.sleep, ctx.wait_signal and "
                f"ctx.gather return, not {', '.join(type(a).__name__ for a in strangers)}"
            )
        run = self._run
        parts: list[_Future[Any]] = [
            a if isinstance(a, _Future) else run._spawn(cast(Coroutine[Any, Any, Any], a))
            for a in awaitables
        ]
        return _Gather(parts)

    def saga(self) -> Saga:
        return _SagaImpl(self)

    def start_child(
        self,
        workflow: type | str,
        arg: Any,
        *,
        id: str | None = None,
        parent_close_policy: ParentClosePolicy = ParentClosePolicy.REQUEST_CANCEL,
        result_type: Any = None,
        compensate: Compensation | Callable[[Any], Compensation] | None = None,
    ) -> Awaitable[ChildHandle[Any]]:
        if isinstance(workflow, str):
            type_name, output_type = workflow, Any
        else:
            definition = definition_of(workflow)
            type_name, output_type = definition.name, definition.output_type
            expected = definition.input_type
            if (
                isinstance(expected, type)
                and issubclass(expected, BaseModel)
                and not isinstance(arg, expected)
            ):
                raise TypeError(
                    f"child workflow {type_name} takes {expected.__name__}, "
                    f"got {type(arg).__name__}"
                )
        if result_type is not None:
            output_type = result_type
        if not isinstance(parent_close_policy, ParentClosePolicy):
            raise TypeError(
                f"parent_close_policy must be a ParentClosePolicy, not {parent_close_policy!r}"
            )
        run = self._run
        saga: _SagaImpl | None = None
        if compensate is not None:
            sagas = run._task().sagas
            if not sagas:
                raise TypeError(
                    f"ctx.start_child({type_name}, compensate=...) outside `async with "
                    "ctx.saga()`: no saga would run the compensation"
                )
            saga = sagas[-1]
        seq = run._next_command_seq()
        child_id = f"{run.state.workflow_id}-child-{seq}" if id is None else id
        if not child_id or len(child_id) > 256 or "\0" in child_id:
            raise WorkflowFailure(
                f"invalid child workflow id {child_id[:80]!r}", error_type="InvalidChildId"
            )
        if child_id == run.state.workflow_id:
            raise WorkflowFailure(
                f"a workflow cannot be its own child ({child_id!r})", error_type="InvalidChildId"
            )
        payload = to_payload(arg)
        if len(payload.data) > MAX_CHILD_INPUT_BYTES:
            # Its StartWorkflow would be refused by the child's node (or by the producer).
            raise WorkflowFailure(
                f"the input of child {child_id!r} is {len(payload.data)} bytes, over the "
                f"{MAX_CHILD_INPUT_BYTES} a start may carry: pass a reference to the data",
                error_type="PayloadTooLarge",
            )
        future: _Future[Any] = _Future()
        call = run._children[seq] = _ChildCall(future, output_type, child_id)
        if saga is not None and compensate is not None:
            call.undo = _StepUndo(saga, future, compensate, f"child {child_id}", seq)
            saga._inflight.append(call.undo)
        run._command(
            ChildWorkflowStarted(
                seq=seq,
                child_workflow_id=child_id,
                workflow_type=type_name,
                input=payload,
                parent_close_policy=parent_close_policy.value,
            )
        )
        started: _Future[ChildHandle[Any]] = _Future()
        started.resolve(_ChildHandle(child_id, future))
        return started

    async def execute_child(
        self,
        workflow: type | str,
        arg: Any,
        *,
        id: str | None = None,
        parent_close_policy: ParentClosePolicy = ParentClosePolicy.REQUEST_CANCEL,
        result_type: Any = None,
        compensate: Compensation | Callable[[Any], Compensation] | None = None,
    ) -> Any:
        handle = await self.start_child(
            workflow, arg, id=id, parent_close_policy=parent_close_policy,
            result_type=result_type, compensate=compensate,
        )  # fmt: skip
        return await handle.result()

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

    def run_local(
        self, fn: Callable[[LocalIn], LocalOut], arg: LocalIn, *, name: str | None = None
    ) -> Awaitable[LocalOut]:
        return self._run._local(fn, arg, name or str(getattr(fn, "__qualname__", repr(fn))))

    def deprecate_patch(self, change_id: str) -> None:
        self._run._patch(change_id, deprecated=True)

    def continue_as_new(self, input: Any) -> NoReturn:
        run = self._run
        if run.state.last_seq == run.state.run_start_seq:
            # Nothing was awaited since the run began: the next run would do the same at once,
            # without end, inside one step of the node.
            raise TypeError(
                "ctx.continue_as_new in a run that has awaited nothing yet: it would start runs "
                "without end; await something first (a call, a timer, a signal)"
            )
        raise ContinueAsNew(to_payload(input))

    def _start_workflow(
        self, workflow_type: str, workflow_id: str, arg: Any, request_id: str
    ) -> None:
        """Start another workflow, without waiting for it (a schedule's tick). The start goes
        to the inbox in the same transaction as the event that records it; the target's id and
        ``request_id`` should be deterministic, so a repeated start is the same start."""
        run = self._run
        run._command(
            WorkflowStartSent(
                target_id=workflow_id,
                workflow_type=workflow_type,
                input=to_payload(arg),
                request_id=request_id,
            )
        )


def _return_type(fn: Callable[..., Any]) -> Any:
    """What ``fn`` says it returns (to read its recorded result back as), else Any."""
    try:
        return get_type_hints(fn).get("return", Any)
    except Exception:  # unresolvable annotations: the JSON value as it is
        return Any


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
        # Set when this code disagrees with the history (replay): the run then only folds.
        self.broken: Exception | None = None
        # Versioning (ctx.patched): the history being replayed, by seq, so the code can tell
        # whether a marker was recorded at the point it has reached; None once live.
        self._replaying: dict[int, EventBody] | None = None
        # Runs that ended and were followed by another, as (first seq, next run's first seq):
        # their events are tombstoned (Decider._record takes them).
        self.ended_runs: list[tuple[int, int]] = []
        self._reset_run()

    def _reset_run(self) -> None:
        """What belongs to one run of the workflow's code (a new run starts from scratch)."""
        self._tasks: list[_Task] = []  # live coroutines, in order of creation
        self._main: _Task | None = None
        self._current: _Task | None = None  # the task whose code runs now
        self._task_changes = 0  # tasks started + ended: see _resume
        self._no_loop = _NoEventLoop(self)
        self._pending: deque[_Pending] = deque()
        self._activities: dict[int, _ActivityCall] = {}
        self._timers: dict[int, _Future[None]] = {}
        self._signals: dict[str, deque[Payload]] = {}
        self._signal_waiters: dict[str, deque[tuple[_Future[Any], Any]]] = {}
        self._children: dict[int, _ChildCall] = {}
        self._instance: Any = None  # the workflow object: queries read its attributes
        self._command_seq = 0
        self._now_ms = 0
        self._compensated = 0
        self._rng: random.Random | None = None  # retry jitter; see _jitter
        self._patches: dict[str, bool] = {}

    # ----------------------------------------------------------------- building

    @classmethod
    def replay(
        cls, workflow_id: str, events: Iterable[HistoryEvent], registry: WorkflowRegistry
    ) -> WorkflowRun:
        """The workflow rebuilt from its history by this code; NonDeterminismError (naming the
        event and the line of code) when the code disagrees with the history."""
        run = cls.rebuild(workflow_id, events, registry)
        if run.broken is not None:
            raise run.broken
        return run

    @classmethod
    def rebuild(
        cls, workflow_id: str, events: Iterable[HistoryEvent], registry: WorkflowRegistry
    ) -> WorkflowRun:
        """Like :meth:`replay`, but code that disagrees with the history does not raise: the run
        comes back :attr:`broken` (its state folded to the end, its code not run), so the node
        keeps recording the workflow's inputs while it is blocked."""
        run = cls(workflow_id, registry)
        history = list(events)
        # Versioning (ctx.patched) looks up what the history holds at the point the code reached.
        run._replaying = {event.event_seq: event.event for event in history}
        try:
            for event in history:
                if run.broken is None:
                    try:
                        run._apply(event)
                        continue
                    except (NonDeterminismError, LookupError) as exc:
                        run._break(exc)
                if event.event_seq <= run.state.last_seq:
                    continue
                try:
                    run.state.apply(event)
                except (KeyError, ValueError) as exc:  # the history itself does not fold
                    raise NonDeterminismError(
                        f"workflow {workflow_id}: event {event.event_seq} does not fold ({exc})"
                    ) from exc
        finally:
            run._replaying = None
        if run.broken is None and run._pending and run.state.blocked is None:
            run._break(
                NonDeterminismError(
                    f"workflow {workflow_id}: its code asks for "
                    f"{_describe(run._pending[0].body)} at {run._pending[0].where}, "
                    f"which the history (up to event {run.state.last_seq}) never recorded"
                )
            )
        return run

    def _break(self, exc: Exception) -> None:
        self.broken = exc
        self._close_tasks()

    def _close_tasks(self) -> None:
        self._pending.clear()
        for task in self._tasks:
            with suppress(RuntimeError):
                task.coro.close()
        self._tasks.clear()
        self._main = None

    # ----------------------------------------------------------------- blocked (#10)

    def block(self, now_ms: int, code_version: str) -> list[HistoryEvent]:
        """Record that this (broken) run's code cannot go on with its history."""
        assert self.broken is not None
        error = ErrorInfo(type=type(self.broken).__name__, message=str(self.broken))
        body = WorkflowBlocked(error=error, at_seq=self.state.last_seq, code_version=code_version)
        return self._record([body], now_ms)

    def unblock(self, now_ms: int, code_version: str) -> list[HistoryEvent]:
        """This code accepts the history of a blocked workflow: record that it moves again, then
        the commands it asked for while replaying."""
        assert self.broken is None and self.state.blocked is not None
        return self._record([WorkflowBlocked(at_seq=0, code_version=code_version)], now_ms)

    # ----------------------------------------------------------------- inputs (live)

    def start(
        self, msg: StartWorkflow, now_ms: int, trace: TraceContext | None
    ) -> list[HistoryEvent]:
        """The first run of this workflow id, or (id reuse) a new run after a closed one."""
        if self.state.status is not None and not self.state.finished:
            raise RuntimeError(f"workflow {self.state.workflow_id} is running already")
        if self._registry.get(msg.workflow_type) is None:
            raise LookupError(
                f"unknown workflow type {msg.workflow_type!r}; this node runs: "
                + ", ".join(self._registry.names())
            )
        request = msg.request_id
        if self.state.status is not None:
            request = f"{request}@{self.state.last_seq + 1}"  # another seed for another run
        started = WorkflowStarted(
            workflow_type=msg.workflow_type,
            request_id=msg.request_id,
            input=msg.input,
            random_seed=seed_for(msg.workflow_id, request),
            trace=trace or msg.trace,
            parent=msg.parent,
            execution_timeout_ms=msg.execution_timeout_ms,
        )
        return self._record([started], now_ms)

    def terminate(self, reason: str, request_id: str, now_ms: int) -> list[HistoryEvent]:
        """End the running run at once, without compensations, as an operator's terminate does
        (a start with ``id_reuse=TERMINATE_IF_RUNNING``, whose request id it records): it ends
        TERMINATED; replies to its steps become late replies."""
        if self.state.finished or self.state.status is None:
            return []
        body = OperatorActed(
            action=OperatorActionKind.TERMINATE,
            request_id=request_id,
            reason=reason,
            operator="id-reuse",
        )
        return self._record([body], now_ms)

    def on_reply(self, reply: ActivityReply, now_ms: int) -> list[HistoryEvent]:
        return self._record(decide_reply(self.state, reply, now_ms, self._jitter), now_ms)

    def on_signal(
        self, name: str, payload: Payload, request_id: str, now_ms: int
    ) -> list[HistoryEvent]:
        if request_id in self.state.signal_request_ids:
            return []  # the same signal delivered twice
        body = SignalReceived(signal_name=name, payload=payload, request_id=request_id)
        return self._record([body], now_ms)

    def on_child_ended(self, msg: ChildWorkflowEnded, now_ms: int) -> list[HistoryEvent]:
        """A child's end, reported by its node. Raises UnknownActivity for a child this workflow
        never started; after this workflow's end (or a repeat) it changes nothing."""
        child = self.state.children.get(msg.seq)
        if child is None or child.workflow_id != msg.child_workflow_id:
            raise UnknownActivity(
                f"workflow {self.state.workflow_id} has no child #{msg.seq} "
                f"named {msg.child_workflow_id!r}"
            )
        if self.state.finished or child.done:
            return []
        body: EventBody
        if msg.status is WorkflowStatus.COMPLETED:
            body = ChildWorkflowCompleted(seq=msg.seq, result=msg.result or Payload(encoding=NULL))
        else:
            error = msg.error or ErrorInfo(type="UnknownError", message="the child gave no reason")
            body = ChildWorkflowFailed(seq=msg.seq, status=msg.status, error=error)
        return self._record([body], now_ms)

    def query(self, name: str, arg: Payload | None) -> Payload:
        """Answer query ``name`` from the workflow's state: the query method runs on a copy of
        the workflow object's attributes, so nothing it does reaches the run. Raises
        UnknownQuery, or QueryFailed (the method raised, the argument does not fit, blocked)."""
        wf = self.state.workflow_id
        definition = self._registry.get(self.state.workflow_type)
        if definition is None:
            raise QueryFailed(
                f"workflow {wf} is of type {self.state.workflow_type!r}, which this node does "
                "not run",
                error_type="UnknownWorkflowType",
            )
        found = definition.queries.get(name)
        if found is None:
            known = ", ".join(sorted(definition.queries)) or "none"
            raise UnknownQuery(
                f"workflow type {definition.name!r} has no query {name!r} (its queries: {known})"
            )
        if self.broken is not None or self._instance is None:
            raise QueryFailed(
                f"workflow {wf} is BLOCKED (its code cannot go on with its history): {self.broken}",
                error_type="WorkflowBlocked",
            )
        method_name, arg_type = found
        args: list[Any] = []
        if arg_type is not None:
            try:
                args.append(from_payload(arg or Payload(encoding=NULL), arg_type))
            except PayloadError as exc:
                raise QueryFailed(f"query {name}: {exc}", error_type="InvalidArgument") from exc
        elif arg is not None and arg.encoding != NULL:
            raise QueryFailed(f"query {name} takes no argument", error_type="InvalidArgument")
        shadow = _shadow(self._instance)
        try:
            value = getattr(shadow, method_name)(*args)
        except Exception as exc:
            raise QueryFailed(f"query {name} raised {type(exc).__name__}: {exc}") from exc
        try:
            return to_payload(value)
        except PayloadError as exc:
            raise QueryFailed(f"query {name}: {exc}") from exc

    def on_cancel(self, reason: str, request_id: str, now_ms: int) -> list[HistoryEvent]:
        if self.state.cancel_requested or self.state.finished:
            return []
        return self._record([CancelRequested(reason=reason, request_id=request_id)], now_ms)

    def on_operator(self, action: OperatorAction, now_ms: int) -> list[HistoryEvent]:
        """An operator's action, recorded with who and why (``OperatorRefused`` when it does
        not apply). A retry starts the step's next attempt at once."""
        steps = decide_operator(
            self.state, action.action, action.request_id, action.step_seq, action.input is not None
        )
        bodies: list[EventBody] = []
        for seq in steps:
            bodies.append(
                OperatorActed(
                    action=action.action,
                    request_id=action.request_id,
                    reason=action.reason,
                    operator=action.operator,
                    step_seq=seq,
                    input=action.input if seq is not None else None,
                )
            )
            if action.action == OperatorActionKind.RETRY and seq is not None:
                act = self.state.activities[seq]
                bodies.append(ActivityAttemptStarted(seq=seq, attempt=act.attempt + 1))
        out: list[HistoryEvent] = []
        for body in bodies:  # one at a time: a step's attempt number follows its own retry
            out.extend(self._record([body], now_ms))
        return out

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
        """Append input events, then the commands the code asks for in response (none while the
        run is broken: its inputs are kept for the code that will accept them)."""
        out: list[HistoryEvent] = []
        wf = self.state.workflow_id
        for body in bodies:
            event = HistoryEvent(
                workflow_id=wf, event_seq=self.state.last_seq + 1, recorded_at_ms=now_ms, event=body
            )
            if self.broken is not None and not self.state.begins_run(event):
                self.state.apply(event)
                out.append(event)
                continue
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
            if self.state.continued_as_new is not None:
                out.extend(self._record([self._next_run()], now_ms))
        return out

    def _next_run(self) -> WorkflowStarted:
        """The WorkflowStarted of the run that a continue-as-new asked for: the same type,
        request id (the first start's caller waits for the last run's result) and trace, the
        new input, and what is left of the execution timeout."""
        state = self.state
        assert state.continued_as_new is not None
        seq = state.last_seq + 1
        timeout = state.execution_timeout_ms
        deadline = state.execution_deadline_ms
        if deadline is not None:
            timeout = max(0, deadline - self._now_ms)
        return WorkflowStarted(
            workflow_type=state.workflow_type,
            request_id=state.request_id,
            input=state.continued_as_new,
            random_seed=seed_for(state.workflow_id, f"{state.request_id}@{seq}"),
            trace=state.trace,
            parent=state.parent,  # a child that continues as new still reports to its parent
            execution_timeout_ms=timeout,
        )

    # ----------------------------------------------------------------- the fold + the code

    def _apply(self, event: HistoryEvent) -> None:
        if event.event_seq <= self.state.last_seq:
            return
        body = event.event
        if self.state.begins_run(event) and self.state.status is not None:
            # A new run of this workflow id: its code starts from scratch.
            self._close_tasks()
            self.ended_runs.append((self.state.run_start_seq, event.event_seq))
            self.broken = None
            self._reset_run()
        # While blocked, the history holds only inputs: what the code asks for meanwhile is not
        # in it and is recorded when the workflow moves again (WorkflowBlocked without error).
        if isinstance(body, _CODE_EVENTS) or (
            self._pending and self.state.blocked is None and not isinstance(body, WorkflowBlocked)
        ):
            self._match_command(event)
        self.state.apply(event)
        self._now_ms = event.recorded_at_ms
        if isinstance(body, WorkflowStarted):
            self._begin(body, event.event_seq)
        elif isinstance(body, WorkflowTimedOut):
            for task in self._tasks:
                if task.shield > 0:
                    continue  # compensating already: that goes on, then the workflow fails
                if task.waits_for_branches():
                    task.cancel = TimedOutError(body.timeout_ms)
                else:
                    task.throw = TimedOutError(body.timeout_ms)
        elif isinstance(body, ActivityCompleted):
            call = self._activities.get(body.seq)
            if call is not None:
                _resolve_payload(call.future, body.result, call.output_type)
                if call.undo is not None:
                    call.undo.ended(succeeded=True)
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
                if call.undo is not None:
                    call.undo.ended(succeeded=False)
        elif isinstance(body, ChildWorkflowCompleted):
            child = self._children.get(body.seq)
            if child is not None:
                _resolve_payload(child.future, body.result, child.output_type)
                if child.undo is not None:
                    child.undo.ended(succeeded=True)
        elif isinstance(body, ChildWorkflowFailed):
            child = self._children.get(body.seq)
            if child is not None:
                child.future.fail(
                    ChildWorkflowError(
                        child.workflow_id,
                        body.seq,
                        body.status.value,
                        body.error.type,
                        body.error.message,
                    )
                )
                if child.undo is not None:
                    child.undo.ended(succeeded=False)
        elif isinstance(body, TimerFired):
            timer = self._timers.get(body.seq)
            if timer is not None:
                timer.resolve(None)
        elif isinstance(body, SignalReceived):
            self._deliver_signal(body)
        elif isinstance(body, CancelRequested):
            for task in self._tasks:
                if task.shield > 0:
                    continue
                if task.waits_for_branches():
                    # Its saga must see how each branch ended before it compensates: the
                    # branches hear of the cancel now, this task once they have ended.
                    task.cancel = WorkflowCancelled(body.reason)
                else:
                    task.throw = WorkflowCancelled(body.reason)
        elif isinstance(body, OperatorActed):
            if body.action == OperatorActionKind.TERMINATE:
                self._close_tasks()  # ended from outside: the code neither runs nor undoes
                return
            if body.action != OperatorActionKind.SKIP or body.step_seq is None:
                return  # a retry is engine bookkeeping, like attempts
            call = self._activities.get(body.step_seq)
            if call is not None:  # the parked compensation counts as done for the code
                call.future.resolve(None)
        elif isinstance(body, _BOOKKEEPING):
            return  # engine bookkeeping; the code does not see attempts, blocks or parking
        self._resume()

    def _match_command(self, event: HistoryEvent) -> None:
        body = event.event
        expected = self._pending.popleft() if self._pending else None
        if expected is None or not _same_command(expected.body, body):
            asked = (
                f"asks for {_describe(expected.body)} at {expected.where}"
                if expected
                else "asks for nothing" + _waiting_at(self._main.coro if self._main else None)
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

    def _begin(self, body: WorkflowStarted, seq: int) -> None:
        definition = self._registry.get(body.workflow_type)
        if definition is None:
            raise LookupError(f"unknown workflow type {body.workflow_type!r}")
        # Command seqs (activity and timer numbers, idempotency keys) of a run start at its
        # WorkflowStarted's seq: never those of an earlier run of the same workflow id, whose
        # replies may still come (they are recorded as late then).
        self._command_seq = seq - 1
        ctx = _Context(self)
        instance = self._instance = definition.cls()
        try:
            arg = from_payload(body.input, definition.input_type)
        except PayloadError as exc:
            self._finish_error(exc)
            return
        self._cls = definition.cls
        self._main = _Task(
            determinism.guard(
                getattr(instance, definition.run_name)(ctx, arg), definition.cls, self._drop_unsent
            ),
            [],
        )
        self._tasks.append(self._main)

    def _task(self) -> _Task:
        if self._current is None:
            raise RuntimeError("ctx is used outside the workflow's code")
        return self._current

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> _Task:
        # A branch runs workflow code too: the same determinism guard applies.
        task = _Task(
            determinism.guard(coro, self._cls, self._drop_unsent), list(self._task().sagas)
        )
        self._tasks.append(task)
        self._task_changes += 1
        return task

    def _resume(self) -> None:
        """Run every task that can go on, in order of creation, until all of them wait.

        The order is a function of the events alone, so replay resumes them the same way."""
        while self._tasks:
            # Only a task that starts or ends can unblock another (a branch's end resolves its
            # gather): without either, one pass is enough.
            seen = self._task_changes
            for task in list(self._tasks):
                if task in self._tasks:
                    self._step(task)
            if self._task_changes == seen:
                return

    def _step(self, task: _Task) -> None:
        outer = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(cast(asyncio.AbstractEventLoop, self._no_loop))
        self._current = task
        try:
            while True:
                if task.cancel is not None and not task.waits_for_branches():
                    task.throw, task.cancel = task.cancel, None
                try:
                    if task.throw is not None:
                        error, task.throw = task.throw, None
                        yielded = task.coro.throw(error)
                    elif task.blocked is None or task.blocked.done:
                        yielded = task.coro.send(None)
                    else:
                        return
                except StopIteration as stop:
                    self._end(task, stop.value, None)
                    return
                except (Exception, ContinueAsNew) as exc:
                    self._end(task, None, exc)
                    return
                if not isinstance(yielded, _Future):
                    task.coro.close()
                    self._end(
                        task,
                        None,
                        TypeError(
                            f"workflow code awaited {yielded!r}; await only what ctx gives: "
                            "ctx.gather for parallel steps, ctx.sleep for timers "
                            "(no asyncio or I/O in workflows)"
                        ),
                    )
                    return
                task.blocked = yielded
        finally:
            self._current = None
            asyncio.events._set_running_loop(outer)

    def _end(self, task: _Task, value: Any, error: BaseException | None) -> None:
        self._tasks.remove(task)
        self._task_changes += 1
        if task is not self._main:
            if error is not None:
                task.fail(error)
            else:
                task.resolve(value)
            return
        self._main = None
        for orphan in self._tasks:  # branches of a gather nobody awaits any more
            with suppress(RuntimeError):
                orphan.coro.close()
        self._tasks.clear()
        if error is not None and not isinstance(error, _DELIBERATE):
            self._break(_as_bug(error))
        elif error is not None:
            self._finish_error(error)
        else:
            self._finish_ok(value)

    def _drop_unsent(self) -> None:
        """Forget the commands the running task asked for since it last waited: none of them
        has become an event (nor been sent) yet."""
        task = self._current
        kept: deque[_Pending] = deque()
        for pending in self._pending:
            body = pending.body
            if pending.task is not task:
                kept.append(pending)
            elif isinstance(body, ActivityScheduled):
                call = self._activities.pop(body.seq, None)
                if call is not None and call.undo is not None:
                    call.undo.ended(succeeded=False)
            elif isinstance(body, TimerStarted):
                self._timers.pop(body.seq, None)
            elif isinstance(body, ChildWorkflowStarted):
                child = self._children.pop(body.seq, None)
                if child is not None and child.undo is not None:
                    child.undo.ended(succeeded=False)
        self._pending = kept

    def _finish_ok(self, value: Any) -> None:
        try:
            payload = to_payload(value)
        except PayloadError as exc:
            self._finish_error(exc)
            return
        self._command(WorkflowCompleted(result=payload))

    def _finish_error(self, exc: BaseException) -> None:
        if isinstance(exc, ContinueAsNew):
            try:
                payload = (
                    exc.payload if isinstance(exc.payload, Payload) else to_payload(exc.payload)
                )
            except PayloadError as err:
                self._finish_error(err)
                return
            self._command(WorkflowContinuedAsNew(input=payload))
            return
        if isinstance(exc, CompensationFailed):
            status = WorkflowStatus.PARKED
        elif isinstance(exc, WorkflowCancelled):
            status = WorkflowStatus.CANCELLED
        elif self._compensated > 0:
            status = WorkflowStatus.COMPENSATED
        else:
            status = WorkflowStatus.FAILED
        error_type = (
            exc.error_type
            if isinstance(exc, ActivityError | WorkflowFailure | BusinessError)
            else type(exc).__name__
        )
        self._command(
            WorkflowFailed(status=status, error=ErrorInfo(type=error_type, message=str(exc)))
        )

    def _command(self, body: EventBody) -> None:
        self._pending.append(_Pending(body, _call_site(), self._current))

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

    def _local(self, fn: Callable[[Any], Any], arg: Any, name: str) -> _Future[Any]:
        """``ctx.run_local``: live, run ``fn`` now and record what came of it; on replay, the
        recorded outcome at this point of the history, without running ``fn``."""
        seq = self._next_command_seq()
        future: _Future[Any] = _Future()
        if self._replaying is not None:
            at = self.state.last_seq + len(self._pending) + 1
            recorded = self._replaying.get(at)
            if not isinstance(recorded, LocalActivityRecorded) or (recorded.seq, recorded.name) != (
                seq,
                name,
            ):
                # Not what the history holds here: the command does not match and the replay
                # reports it (NonDeterminismError); a side effect never runs on replay.
                self._command(LocalActivityRecorded(seq=seq, name=name))
                return future
            body = recorded
        else:
            with determinism.suspended():
                try:
                    body = LocalActivityRecorded(seq=seq, name=name, result=to_payload(fn(arg)))
                except Exception as exc:
                    error = ErrorInfo(type=type(exc).__name__, message=str(exc))
                    body = LocalActivityRecorded(seq=seq, name=name, error=error)
        self._command(body)
        if body.error is not None:
            future.fail(
                ActivityError(name, seq, body.error.type, body.error.message, business=False)
            )
        else:
            _resolve_payload(future, body.result or to_payload(None), _return_type(fn))
        return future

    def _next_command_seq(self) -> int:
        self._command_seq += 1
        return self._command_seq

    @property
    def finished(self) -> bool:
        return self.state.finished


class _NoEventLoop:
    """Stands in for asyncio's running loop while workflow code runs.

    ``asyncio.gather(ctx.call(a), ctx.call(b))`` asks for the running loop before it waits, so
    it fails here, in the code, before the two calls it was handed become events and are sent.
    """

    def __init__(self, run: WorkflowRun) -> None:
        self._run = run

    def __getattr__(self, name: str) -> Any:
        self._run._drop_unsent()
        raise AsyncioInWorkflow(
            f"workflow code used asyncio (it asked the event loop for {name}); workflows run "
            "without asyncio: use ctx.gather(...) for parallel steps and ctx.sleep(...) for "
            "timers"
        )


def _same_command(expected: EventBody, actual: EventBody) -> bool:
    """Whether the code asks for what the history recorded. Retry policies and timeouts are not
    compared: the recorded ones apply, so a changed default (or retry) setting between deploys
    does not break the workflows in flight."""
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
    if isinstance(expected, ChildWorkflowStarted) and isinstance(actual, ChildWorkflowStarted):
        return (expected.seq, expected.child_workflow_id, expected.workflow_type) == (
            actual.seq,
            actual.child_workflow_id,
            actual.workflow_type,
        )
    if isinstance(expected, WorkflowStartSent) and isinstance(actual, WorkflowStartSent):
        return (expected.target_id, expected.workflow_type) == (
            actual.target_id,
            actual.workflow_type,
        )
    if isinstance(expected, LocalActivityRecorded) and isinstance(actual, LocalActivityRecorded):
        return (expected.seq, expected.name) == (actual.seq, actual.name)
    return True


def _describe(body: EventBody) -> str:
    if isinstance(body, LocalActivityRecorded):
        return f"local activity {body.name} #{body.seq}"
    if isinstance(body, ActivityScheduled):
        kind = "compensation" if body.is_compensation else "activity"
        return f"{kind} {body.activity_name} #{body.seq}"
    if isinstance(body, TimerStarted):
        return f"timer #{body.seq}"
    if isinstance(body, WorkflowFailed):
        return f"WorkflowFailed ({body.status.value}: {body.error.type}: {body.error.message})"
    if isinstance(body, MarkerRecorded):
        return f"{body.marker} marker {body.change_id!r}"
    if isinstance(body, ChildWorkflowStarted):
        return f"child workflow {body.workflow_type} {body.child_workflow_id!r} #{body.seq}"
    return type(body).__name__


def _shadow(instance: Any) -> Any:
    """A copy of a workflow object for a query: its attributes deep-copied, so the query cannot
    change the run's; an attribute that cannot be copied (e.g. a ctx kept on self) is shared."""
    shadow = object.__new__(type(instance))
    for key, value in getattr(instance, "__dict__", {}).items():
        try:
            copied = copy.deepcopy(value)
        except Exception:
            copied = value
        object.__setattr__(shadow, key, copied)
    return shadow


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
