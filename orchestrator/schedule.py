"""Durable cron schedules: a schedule is itself a workflow.

``schedule:<name>`` (type ``orchestrator.schedule``, which every node runs) sleeps with a durable
timer until its next tick, starts the target workflow with the id ``<name>-<tick time>`` and a
request id of its own, and continues as new with the following tick, so its history stays
bounded. The start goes to the inbox in the same transaction as the event that records it
(``WorkflowStartSent``): a tick is started once, whatever node restarts or partition moves come
between, and a start repeated anyway would be a duplicate of the same id, not a second run.

Catch-up: a tick whose time passed while no node ran the schedule is started late, when a node
runs it again; ticks older than ``catch_up`` (default one hour) at that moment are skipped, and at
most :data:`MAX_STARTS_PER_RUN` ticks are started per run (the next run goes on at once).
Delete = cancel the schedule's workflow; nothing it started is touched.

``orchestrator schedule create|list|delete`` (docs/operations.md) wraps the functions here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.envelopes import IdReusePolicy, WorkflowStatus
from orchestrator import workflow
from orchestrator.client import Client, WorkflowHandle, _newest_run
from orchestrator.errors import OrchestratorError, UnknownWorkflow
from orchestrator.payloads import from_payload
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

SCHEDULE_TYPE = "orchestrator.schedule"
PREFIX = "schedule:"
MAX_STARTS_PER_RUN = 100
DEFAULT_CATCH_UP = timedelta(hours=1)


class ScheduleError(OrchestratorError):
    """A schedule cannot be created or deleted as asked (the message says why)."""


class ScheduleSpec(BaseModel):
    """The input of a schedule's workflow. ``cron`` has 5 fields (minute first) or 6 (seconds
    first, e.g. ``*/2 * * * * *``), in UTC; ``every_ms`` is a fixed interval aligned to the Unix
    epoch. ``next_tick_ms`` is the next tick to start (``None``: the first after the schedule
    was created)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    workflow_type: str = Field(min_length=1)
    input: Any = None
    cron: str | None = None
    every_ms: int | None = Field(default=None, ge=1000)
    catch_up_ms: int = Field(default=int(DEFAULT_CATCH_UP.total_seconds() * 1000), ge=0)
    next_tick_ms: int | None = None
    started: int = 0  # ticks started so far, for ``schedule list``

    @model_validator(mode="after")
    def _one_cadence(self) -> ScheduleSpec:
        if (self.cron is None) == (self.every_ms is None):
            raise ValueError("a schedule needs exactly one of cron and every_ms")
        if self.cron is not None and not _valid_cron(self.cron):
            raise ValueError(f"invalid cron expression {self.cron!r}")
        return self

    def next_tick(self, after_ms: int) -> int:
        """The first tick strictly after ``after_ms``."""
        if self.every_ms is not None:
            return (after_ms // self.every_ms + 1) * self.every_ms
        assert self.cron is not None
        start = datetime.fromtimestamp(after_ms / 1000, tz=UTC)
        found = croniter(self.cron, start, second_at_beginning=_has_seconds(self.cron))
        return int(cast(datetime, found.get_next(datetime)).timestamp() * 1000)


def _has_seconds(cron: str) -> bool:
    return len(cron.split()) == 6


def _valid_cron(cron: str) -> bool:
    return len(cron.split()) in (5, 6) and bool(
        croniter.is_valid(cron, second_at_beginning=_has_seconds(cron))
    )


def target_id(name: str, tick_ms: int) -> str:
    """The id of the workflow a tick starts: the schedule's name and the tick's UTC time."""
    moment = datetime.fromtimestamp(tick_ms / 1000, tz=UTC)
    return f"{name}-{moment.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@workflow.defn(name=SCHEDULE_TYPE)
class ScheduleWorkflow:
    """One run: wait for the next tick, start what is due, continue as new."""

    @workflow.run
    async def run(self, ctx: WorkflowContext, spec: ScheduleSpec) -> None:
        now = _ms(ctx.now())
        tick = spec.next_tick_ms if spec.next_tick_ms is not None else spec.next_tick(now)
        # Always a timer, even for a tick already due: a run waits for something before it
        # continues as new (one run per timer turn, never a loop inside one step).
        await ctx.sleep(timedelta(milliseconds=max(0, tick - now)))
        now = _ms(ctx.now())
        oldest = now - spec.catch_up_ms
        starts = 0
        while tick <= now and starts < MAX_STARTS_PER_RUN:
            if tick < oldest:  # missed too long ago: skipped (catch-up rule)
                tick = spec.next_tick(oldest - 1)
                continue
            start = getattr(ctx, "_start_workflow")  # noqa: B009 (engine-internal)
            start(
                spec.workflow_type,
                target_id(spec.name, tick),
                spec.input,
                f"{PREFIX}{spec.name}@{tick}",
            )
            starts += 1
            tick = spec.next_tick(tick)
        ctx.continue_as_new(
            spec.model_copy(update={"next_tick_ms": tick, "started": spec.started + starts})
        )


def with_schedules(registry: WorkflowRegistry) -> WorkflowRegistry:
    """``registry`` plus the schedule workflow (what every node runs)."""
    if registry.get(SCHEDULE_TYPE) is not None:
        return registry
    classes: list[type] = []
    for name in registry.names():
        definition = registry.get(name)
        assert definition is not None
        classes.append(definition.cls)
    return WorkflowRegistry(
        [*classes, ScheduleWorkflow], activity_timeout=registry.activity_timeout
    )


# --------------------------------------------------------------------------- client side


def schedule_id(name: str) -> str:
    return PREFIX + name


def create_schedule(
    client: Client,
    name: str,
    workflow_type: str,
    input: Any = None,
    *,
    cron: str | None = None,
    every: timedelta | None = None,
    catch_up: timedelta = DEFAULT_CATCH_UP,
) -> WorkflowHandle:
    """Start the schedule ``name``. :class:`ScheduleError` if one of that name runs, or the
    cadence is invalid."""
    try:
        spec = ScheduleSpec(
            name=name,
            workflow_type=workflow_type,
            input=input,
            cron=cron,
            every_ms=None if every is None else int(every.total_seconds() * 1000),
            catch_up_ms=int(catch_up.total_seconds() * 1000),
        )
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        message = (
            "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in errors())
            if callable(errors)
            else str(exc)
        )
        raise ScheduleError(f"schedule {name!r}: {message}") from exc
    try:
        found = client.describe(schedule_id(name))
        if not found.finished:
            raise ScheduleError(f"schedule {name!r} exists: delete it first")
    except UnknownWorkflow:
        pass
    # A deleted (cancelled) schedule's id is free again: ALLOW_DUPLICATE starts a new run.
    return client.start(
        SCHEDULE_TYPE, spec, workflow_id=schedule_id(name), id_reuse=IdReusePolicy.ALLOW_DUPLICATE
    )


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    workflow_type: str
    cadence: str  # "cron <expr>" or "every <n>s"
    next_tick: datetime | None
    started: int


def list_schedules(client: Client, *, timeout: float = 60.0) -> list[ScheduleInfo]:
    """The running schedules, by name (reads the whole history topic: a tool, not a hot path)."""
    from orchestrator._engine.state import fold

    out: list[ScheduleInfo] = []
    for wf, events in client.histories(timeout=timeout).items():
        if not wf.startswith(PREFIX):
            continue
        state = fold(wf, _newest_run(events))
        if state.status is not WorkflowStatus.RUNNING or state.finished or state.input is None:
            continue
        spec = from_payload(state.input, ScheduleSpec)
        pending = sorted(state.timers.values())
        next_ms = pending[0] if pending else spec.next_tick_ms
        cadence = f"cron {spec.cron}" if spec.cron else f"every {(spec.every_ms or 0) / 1000:g}s"
        out.append(
            ScheduleInfo(
                name=spec.name,
                workflow_type=spec.workflow_type,
                cadence=cadence,
                next_tick=None
                if next_ms is None
                else datetime.fromtimestamp(next_ms / 1000, tz=UTC),
                started=spec.started,
            )
        )
    return sorted(out, key=lambda s: s.name)


def delete_schedule(client: Client, name: str) -> str:
    """Cancel the schedule's workflow (no more ticks); the workflows it started go on."""
    try:
        found = client.describe(schedule_id(name))
    except UnknownWorkflow:
        raise ScheduleError(f"no schedule {name!r}") from None
    if found.finished:
        raise ScheduleError(f"no schedule {name!r} (it was deleted or ended)")
    return client.cancel(schedule_id(name), reason="schedule deleted")
