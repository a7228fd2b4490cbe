"""Workflows as Python code.

A workflow is a class marked with ``@workflow.defn`` whose ``@workflow.run`` method is an
``async def`` taking a :class:`WorkflowContext` and one input. The engine, not asyncio, drives the
coroutine: it resumes it whenever something it awaits has happened, and rebuilds it after a
restart by replaying the workflow's history. Everything nondeterministic goes through ``ctx``::

    from datetime import timedelta
    from orchestrator import workflow, Compensation, WorkflowContext, RetryPolicy

    @workflow.defn(name="place-order")
    class PlaceOrder:
        @workflow.run
        async def run(self, ctx: WorkflowContext, order: Order) -> Receipt:
            async with ctx.saga():   # on failure or cancel: undo what completed, last first
                hold = await ctx.call(
                    reserve, Reserve(sku=order.sku, qty=order.qty),
                    retry=RetryPolicy(max_attempts=5),
                    compensate=lambda h: Compensation(release, Release(hold_id=h.hold_id)))
                paid = await ctx.call(
                    charge, Charge(amount=order.total), timeout=timedelta(seconds=30),
                    compensate=lambda p: Compensation(refund, Refund(payment_id=p.payment_id)))
                await ctx.sleep(timedelta(days=3))          # durable
            return Receipt(...)

Saga semantics (order, parallel branches, cancel): docs/workflows.md.

Rules for workflow code: await only what ``ctx`` gives you (no asyncio, no I/O), read time and
randomness from ``ctx.now()``, ``ctx.random()`` and ``ctx.uuid()``, and keep the order of calls
a function of the inputs and results so that replay takes the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import random
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, NoReturn, TypeVar, get_type_hints, overload

from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import RetryPolicy

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)
C = TypeVar("C", bound=type)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
LocalIn = TypeVar("LocalIn")
LocalOut = TypeVar("LocalOut")

_DEFN_ATTR = "__saga_workflow_defn__"
_RUN_ATTR = "__saga_workflow_run__"
_QUERY_ATTR = "__saga_workflow_query__"

#: Compensations keep trying for a long time before the workflow is parked.
DEFAULT_COMPENSATION_RETRY = RetryPolicy(
    max_attempts=20, initial_interval_ms=500, backoff_coefficient=2.0, max_interval_ms=60_000
)


class DefaultTimeout(Enum):
    """The type of :data:`NODE_DEFAULT`; an enum so that type checkers know its one value."""

    NODE_DEFAULT = "node default"


#: ``timeout=`` left out: each attempt waits the node's ``activity_timeout_ms`` (5 minutes unless
#: configured). ``timeout=None`` is different: no attempt timeout at all.
NODE_DEFAULT = DefaultTimeout.NODE_DEFAULT

#: The default of the ``activity_timeout_ms`` setting, and the attempt timeout of a registry that no
#: node has configured (the engine run without a node). docs/configuration.md says why 5 minutes.
DEFAULT_ACTIVITY_TIMEOUT = timedelta(minutes=5)

AttemptTimeout = timedelta | None | DefaultTimeout


@dataclass(frozen=True)
class WorkflowDefinition:
    name: str
    cls: type
    run_name: str
    input_type: Any
    output_type: Any
    # Query name -> (method name, the type of its argument, or None when it takes none).
    queries: dict[str, tuple[str, Any]] = field(default_factory=dict)


def run(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Mark the workflow's entry point: ``async def run(self, ctx, input) -> output``."""
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@workflow.run needs an 'async def', got {fn!r}")
    setattr(fn, _RUN_ATTR, True)
    return fn


@overload
def query(fn: F, /) -> F: ...
@overload
def query(*, name: str | None = None) -> Callable[[F], F]: ...
def query(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a method that answers a query: ``def status(self) -> X`` or ``def price(self, arg: A)
    -> X`` (not ``async``). The node that owns the workflow runs it on a copy of the workflow's
    attributes, between two events, and writes nothing: ``Client.query(id, name, arg)``,
    ``orchestrator query ID NAME``. ``name`` defaults to the method's name.

    A query reads what the run method keeps on ``self``; it must not call ``ctx`` (nothing it does
    is recorded) and should be quick: the node's loop waits for it."""

    def mark(method: F) -> F:
        if inspect.iscoroutinefunction(method):
            raise TypeError(f"@workflow.query needs a plain 'def', got async {method.__name__}")
        params = list(inspect.signature(method).parameters)
        if len(params) not in (1, 2):
            raise TypeError(
                f"query {method.__name__} must take (self) or (self, arg), got {params}"
            )
        setattr(method, _QUERY_ATTR, name or method.__name__)
        return method

    return mark(fn) if fn is not None else mark


def _queries_of(cls: type) -> dict[str, tuple[str, Any]]:
    found: dict[str, tuple[str, Any]] = {}
    for attr in dir(cls):
        method = getattr(cls, attr, None)
        query_name = getattr(method, _QUERY_ATTR, None)
        if not isinstance(query_name, str) or method is None:
            continue
        if query_name in found:
            raise TypeError(f"workflow {cls.__name__} has two queries named {query_name!r}")
        params = list(inspect.signature(method).parameters)
        arg_type = get_type_hints(method).get(params[1], Any) if len(params) == 2 else None
        found[query_name] = (attr, arg_type)
    return found


def defn(*, name: str | None = None) -> Callable[[C], C]:
    """Declare a workflow class; ``name`` is its type name on the wire (default: class name)."""

    def wrap(cls: C) -> C:
        runs = [m for m in vars(cls).values() if getattr(m, _RUN_ATTR, False)]
        if len(runs) != 1:
            raise TypeError(f"workflow {cls.__name__} needs exactly one @workflow.run method")
        fn = runs[0]
        params = list(inspect.signature(fn).parameters)
        if len(params) != 3:
            raise TypeError(
                f"{cls.__name__}.{fn.__name__} must take (self, ctx, input), got {params}"
            )
        hints = get_type_hints(fn)
        definition = WorkflowDefinition(
            name=name or cls.__name__,
            cls=cls,
            run_name=fn.__name__,
            input_type=hints.get(params[2], Any),
            output_type=hints.get("return", Any),
            queries=_queries_of(cls),
        )
        setattr(cls, _DEFN_ATTR, definition)
        return cls

    return wrap


def definition_of(cls: type) -> WorkflowDefinition:
    found = getattr(cls, _DEFN_ATTR, None)
    if not isinstance(found, WorkflowDefinition):
        raise TypeError(f"{cls!r} is not a workflow: decorate it with @workflow.defn")
    return found


class WorkflowRegistry:
    """The workflow types one orchestrator node can run, by name, and the attempt timeout their
    activities get when the code passes no ``timeout=``.

    A node runs a copy configured from its settings (:meth:`with_activity_timeout`), so the
    ``activity_timeout`` given here matters only where the engine runs without a node (tests).
    """

    def __init__(
        self,
        workflows: Iterable[type] = (),
        *,
        activity_timeout: timedelta = DEFAULT_ACTIVITY_TIMEOUT,
    ) -> None:
        if activity_timeout <= timedelta(0):
            raise ValueError(f"activity_timeout must be positive, got {activity_timeout}")
        self._by_name: dict[str, WorkflowDefinition] = {}
        self.activity_timeout = activity_timeout
        for cls in workflows:
            self.add(cls)

    def with_activity_timeout(self, timeout: timedelta) -> WorkflowRegistry:
        """The same workflows with another default attempt timeout (``self`` if it is the same)."""
        if timeout == self.activity_timeout:
            return self
        copy = WorkflowRegistry(activity_timeout=timeout)
        copy._by_name = dict(self._by_name)
        return copy

    @property
    def code_version(self) -> str:
        """A short digest of the registered workflows' source: names the code that recorded a
        ``WorkflowBlocked`` (which deploy hit it)."""
        digest = hashlib.sha256()
        for name in sorted(self._by_name):
            cls = self._by_name[name].cls
            digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
            # The text of the module that defines it, not inspect.getsource(cls): that parses
            # the module with ast, which CPython 3.11 does not allow from two threads at once
            # ("AST constructor recursion depth mismatch"), and nodes start in threads.
            source = getattr(sys.modules.get(cls.__module__), "__file__", None)
            with contextlib.suppress(OSError):  # no source at hand (e.g. defined in a REPL)
                digest.update(Path(source).read_bytes() if source else b"")
        return digest.hexdigest()[:12]

    def add(self, cls: type) -> None:
        definition = definition_of(cls)
        existing = self._by_name.get(definition.name)
        if existing is not None and existing.cls is not cls:
            raise ValueError(f"two workflows are named {definition.name!r}")
        self._by_name[definition.name] = definition

    @classmethod
    def from_module(cls, module: ModuleType) -> WorkflowRegistry:
        found = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type) and hasattr(obj, _DEFN_ATTR)
        ]
        if not found:
            raise ValueError(f"module {module.__name__} defines no @workflow.defn class")
        return cls(found)

    def get(self, name: str) -> WorkflowDefinition | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)


@dataclass(frozen=True)
class Compensation:
    """What undoes a step: ``activity(arg)``, retried by ``retry`` (default: 20 attempts).

    Given to ``ctx.call(..., compensate=...)`` (or built there from the step's result by a
    function), or registered with :meth:`Saga.on_failure`.
    """

    activity: ActivityContract[Any, Any]
    arg: BaseModel
    retry: RetryPolicy | None = None
    timeout: AttemptTimeout = NODE_DEFAULT  # per attempt; None: no attempt timeout

    def __post_init__(self) -> None:
        # Checked here, in the workflow's own code, rather than when the compensation runs.
        if not isinstance(self.arg, self.activity.input):
            raise TypeError(
                f"{self.activity.name} takes {self.activity.input.__name__}, "
                f"got {type(self.arg).__name__}"
            )


class ParentClosePolicy(Enum):
    """What happens to a child workflow that still runs when its parent ends."""

    TERMINATE = "TERMINATE"  # the child ends at once, TERMINATED, without compensating
    REQUEST_CANCEL = "REQUEST_CANCEL"  # the child is cancelled: its sagas compensate (default)
    ABANDON = "ABANDON"  # the child goes on alone; nobody hears how it ends


class ChildHandle(ABC, Generic[T]):
    """A child workflow started by :meth:`WorkflowContext.start_child`."""

    @property
    @abstractmethod
    def workflow_id(self) -> str: ...

    @abstractmethod
    def result(self) -> Awaitable[T]:
        """The child's result; raises :class:`~orchestrator.errors.ChildWorkflowError` if it
        ended without one (failed, compensated, cancelled, parked, or its start was refused)."""


class Saga(ABC):
    """Compensations of the steps a saga block completed; on failure or cancel they run one at a
    time, in reverse order of completion (see docs/workflows.md, "Saga semantics")."""

    @abstractmethod
    def on_failure(
        self,
        activity: ActivityContract[InT, OutT],
        arg: InT,
        *,
        retry: RetryPolicy | None = None,
        timeout: AttemptTimeout = NODE_DEFAULT,
    ) -> None:
        """Register ``activity(arg)`` to run if the block fails or the workflow is cancelled.

        ``timeout`` bounds each attempt as in :meth:`WorkflowContext.call`.
        """

    @abstractmethod
    def pivot(self) -> None:
        """The point of no return: the steps this saga knows so far (completed, or sent with
        ``compensate=`` and still in flight) are never compensated, whatever happens later.
        Steps after it are compensated as usual."""

    @abstractmethod
    async def __aenter__(self) -> Saga: ...

    @abstractmethod
    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool: ...


class WorkflowContext(ABC):
    """What workflow code may use. Every method is deterministic under replay."""

    @property
    @abstractmethod
    def workflow_id(self) -> str: ...

    @abstractmethod
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
        """Schedule an activity at once and return an awaitable of its result.

        ``timeout`` bounds each attempt: left out, the node's ``activity_timeout_ms`` (5 minutes
        unless configured); ``None``, no bound at all (the attempt waits for its reply however
        long it takes: only for services that always answer). An attempt that times out fails
        with ``ActivityTimeout`` and the retry policy decides. ``overall_timeout`` bounds all
        attempts together. A business failure or the end of retries raises
        :class:`~orchestrator.errors.ActivityError`.
        Several calls may be scheduled before awaiting them (see :meth:`gather`).

        ``compensate`` registers the step's compensation with the innermost ``ctx.saga()``
        before the command is sent: a :class:`Compensation`, or a function that builds it from
        the result. If the saga fails or the workflow is cancelled while this step is in
        flight, the saga waits for its outcome and compensates it if it succeeded.

        ``heartbeat_timeout``: for long activities whose handler calls ``info.heartbeat()``:
        an attempt that sent no heartbeat for this long fails with ``HeartbeatTimeout`` (and
        the retry policy decides), so a dead service is noticed in seconds even when the
        attempt may take hours; the next attempt gets the last heartbeat's details.
        """

    @abstractmethod
    def run_local(
        self, fn: Callable[[LocalIn], LocalOut], arg: LocalIn, *, name: str | None = None
    ) -> Awaitable[LocalOut]:
        """Run ``fn(arg)`` here, in the orchestrator, and record its result in the history: a
        short side effect that needs no service (a lookup, a notification, an id from another
        system). Every replay returns the recorded result without running ``fn`` again.

        The result must be JSON-serialisable and is read back as ``fn``'s return annotation
        (so the first run and every replay see the same value). An exception in ``fn`` is
        recorded too and raised here as :class:`~orchestrator.errors.ActivityError`: no
        retries, no timeout. ``fn`` runs on the node's loop, in the middle of the workflow's
        step: keep it to milliseconds and make it idempotent (a crash before the step's commit
        runs it again). ``name`` (default: ``fn``'s qualified name) is checked on replay.
        """

    @abstractmethod
    def sleep(self, duration: timedelta) -> Awaitable[None]:
        """A durable timer: survives restarts; it may last days."""

    @abstractmethod
    def wait_signal(self, name: str, type_: type[T]) -> Awaitable[T]:
        """The payload of the next signal ``name`` (signals that came earlier are buffered)."""

    @abstractmethod
    def gather(self, *awaitables: Awaitable[Any]) -> Awaitable[list[Any]]:
        """Run in parallel and wait for all; then raise the first failure (in argument order).

        Takes what ``ctx.call``, ``ctx.sleep``, ``ctx.wait_signal`` and ``ctx.gather`` return,
        and coroutines (``branch(...)`` of an ``async def branch``): each coroutine is a branch
        with steps of its own. A failing branch does not stop its siblings: every branch runs
        to its end first, so that each step a branch completed is known to the saga.
        ``asyncio.gather`` does not work in workflow code (it is refused before anything is
        sent).
        """

    @abstractmethod
    def saga(self) -> Saga:
        """``async with ctx.saga() as saga:`` compensates what ``saga.on_failure`` registered."""

    @abstractmethod
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
        """Start a child workflow: ``workflow`` is its ``@workflow.defn`` class (its result is
        then decoded as the class's output type) or its type name (then ``result_type``, default
        the JSON value). The child runs like any workflow, on the partition of its id ``id``
        (default ``<this workflow's id>-child-<n>``), and reports its end to this workflow.

        Cancelling this workflow cancels its running children; when this workflow ends, a child
        that still runs is treated as ``parent_close_policy`` says. ``await`` it for the handle,
        then ``await handle.result()``.

        ``compensate`` makes the child a step of the innermost ``ctx.saga()``, as for
        :meth:`call`: if the saga fails or the workflow is cancelled, the saga waits for the
        child's end and, if it completed, runs the compensation (an activity; a function of the
        child's result, or a :class:`Compensation`)."""

    @abstractmethod
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
        """:meth:`start_child`, then wait for its result."""

    @abstractmethod
    def now(self) -> datetime:
        """The time of the event being processed (UTC): the same value on replay."""

    @abstractmethod
    def random(self) -> random.Random:
        """A random generator seeded from the history."""

    @abstractmethod
    def uuid(self) -> uuid.UUID:
        """A UUID drawn from :meth:`random`."""

    @abstractmethod
    def patched(self, change_id: str) -> bool:
        """Whether this run takes the new code path of change ``change_id``.

        True for a run that reaches this point on code that has the call (a marker is recorded
        in its history), and for every replay of such a history; False for a run replaying a
        history written before the change, which must keep doing what it did::

            if ctx.patched("fraud-check"):
                await ctx.call(check_fraud, ...)

        The answer is fixed for the run at the first call. See ``docs/workflows.md``.
        """

    @abstractmethod
    def continue_as_new(self, input: Any) -> NoReturn:
        """End this run and start a new run of the same workflow (same id) with ``input``.

        The new run starts from scratch with an empty history, so a loop that continues as new
        keeps a bounded history: the old run's events are tombstoned. Signals not yet consumed
        and steps not awaited are not carried over; the caller of the first start gets the
        result of the last run. Raises :class:`~orchestrator.errors.ContinueAsNew` (a
        ``BaseException``: don't catch it); a saga does not compensate for it. A run must
        await something before it continues (else ``TypeError``: it would loop without end).
        See docs/workflows.md, "Continue-as-new".
        """

    @abstractmethod
    def deprecate_patch(self, change_id: str) -> None:
        """Replaces ``if ctx.patched(change_id):`` once no run that lacks the change is left:
        records nothing, and accepts the marker of runs that recorded one."""
