"""What the console reads, and the one place that knows where it comes from.

The list and the counts come from ``Client.list`` / ``Client.counts`` (the nodes' query API) when
the client has them; until then (and against an older client) they are folded from a scan of the
history topic (``Client.histories``), which is fine for a test or demo namespace and slow for a
big one. :func:`_list_from_histories` is that fallback, and the only code to drop once every
client has ``list``.

A workflow's page always reads its own history (``Client.history``: one partition) and folds it
with the engine's fold, since the timeline, the steps and the pending timers are all in it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityParked,
    ActivityScheduled,
    ChildWorkflowCompleted,
    ChildWorkflowFailed,
    ChildWorkflowStarted,
    HistoryEvent,
    OperatorActed,
    SignalReceived,
    WorkflowStatus,
)
from orchestrator._engine.state import WorkflowState, fold
from orchestrator.client import (
    Client,
    ClientError,
    EventSummary,
    _payload_json,
    _preview,
    _summaries,
)
from orchestrator.visibility import QueryError

__all__ = ["Detail", "Filters", "Overview", "Row", "Source", "StepRow"]

# BLOCKED: running, but its code cannot go on with its history (docs/workflows.md); the list
# shows it as a status of its own, as the nodes' index does.
STATUSES = ("RUNNING", "BLOCKED", *(s.value for s in WorkflowStatus if s.value != "RUNNING"))


@dataclass(frozen=True)
class Filters:
    """The list's filters, as the page's form gives them (empty: no filter)."""

    status: str = ""
    type: str = ""
    prefix: str = ""
    limit: int = 50
    cursor: str = ""

    def __post_init__(self) -> None:
        if self.status and self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r} (one of {', '.join(STATUSES)})")
        if not 1 <= self.limit <= 1000:
            raise ValueError(f"limit must be between 1 and 1000, not {self.limit}")


@dataclass(frozen=True)
class Row:
    """One workflow in the list."""

    workflow_id: str
    workflow_type: str
    status: str
    current_step: str
    started_at: datetime | None
    updated_at: datetime | None
    reason: str = ""  # why BLOCKED, PARKED, FAILED, ...


@dataclass(frozen=True)
class Overview:
    rows: list[Row]
    counts: dict[str, int]  # per status, over the whole namespace
    next_cursor: str | None
    source: str  # "query API" or "history scan": shown in the page's footer
    warnings: list[str] = field(default_factory=list)  # e.g. partitions no node answered for


@dataclass
class StepRow:
    """One activity of the workflow (a step or a compensation), or a child workflow, from its
    events."""

    seq: int
    name: str
    compensation: bool
    scheduled_at: datetime
    attempts: int = 1
    outcome: str = "in flight"
    detail: str = ""
    retry_at: datetime | None = None


@dataclass(frozen=True)
class Signal:
    name: str
    at: datetime
    payload: str


@dataclass(frozen=True)
class Detail:
    """Everything the workflow page shows, folded from the workflow's history."""

    workflow_id: str
    state: WorkflowState
    events: tuple[EventSummary, ...]
    steps: list[StepRow]
    signals: list[Signal]
    timers: list[tuple[int, datetime]]  # pending: (seq, fires at)
    complete: bool  # false: the history has a gap, the state is folded up to it
    input_json: str
    result_json: str | None
    trace_id: str | None = None

    @property
    def status(self) -> str:
        return operator_status(self.state)

    @property
    def parked_steps(self) -> list[int]:
        """Compensations that gave up: an operator retries or skips them."""
        return [a.seq for a in self.state.parked]

    @property
    def retry_steps(self) -> list[int]:
        """Steps an operator's retry runs at once: parked, or between attempts."""
        return sorted(a.seq for a in self.state.activities.values() if a.waits_for_retry)


def operator_status(state: WorkflowState) -> str:
    """The status as operators count it (as ``WorkflowDescription.operator_status``): BLOCKED or
    PARKED while the workflow waits for one of them, else its status."""
    if state.status is None:
        return "UNKNOWN"
    if not state.finished and state.blocked is not None:
        return "BLOCKED"
    if not state.finished and state.parked:
        return "PARKED"
    return state.status.value


class Source:
    """Reads for the console through one :class:`Client` (thread-safe; shared by requests)."""

    def __init__(self, client: Client, *, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout

    @property
    def has_query_api(self) -> bool:
        return hasattr(self.client, "list") and hasattr(self.client, "counts")

    def overview(self, filters: Filters) -> Overview:
        if not self.has_query_api:
            return _list_from_histories(self.client.histories(timeout=self.timeout), filters)
        client: Any = self.client  # the query API is newer than this module's type checking
        try:
            page = client.list(
                status=filters.status or None,
                type=filters.type or None,
                prefix=filters.prefix or None,
                limit=filters.limit,
                cursor=filters.cursor or None,
            )
            counts = client.counts()
        except (ClientError, QueryError) as exc:
            # No node answers (none running?), or a cursor of the scan below: the history does.
            found = _list_from_histories(self.client.histories(timeout=self.timeout), filters)
            found.warnings.append(f"the nodes' query API did not answer: {exc}")
            return found
        by_status = getattr(counts, "by_status", counts)
        warnings = [str(e) for e in getattr(page, "errors", [])]
        missing = getattr(page, "missing_partitions", None)
        if missing:
            warnings.insert(0, f"no node answered for partitions {missing}: rows may be missing")
        return Overview(
            rows=[_row(item) for item in getattr(page, "items", page)],
            counts={str(k): int(v) for k, v in dict(by_status).items()},
            next_cursor=getattr(page, "next_cursor", None),
            source="query API",
            warnings=warnings,
        )

    def workflow(self, workflow_id: str) -> Detail:
        """Raises ``UnknownWorkflow`` when the history has no event of ``workflow_id``."""
        return detail_of(workflow_id, self.client.history(workflow_id, timeout=self.timeout))


def _get(item: Any, *names: str) -> Any:
    for name in names:
        value = item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
        if value is not None:
            return value
    return None


def _moment(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, int | float):  # epoch milliseconds
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    return datetime.fromisoformat(str(value))


def _row(item: Any) -> Row:
    """A row of ``Client.list``'s answer, an object or a dict."""
    status = _get(item, "status")
    return Row(
        workflow_id=str(_get(item, "workflow_id", "id")),
        workflow_type=str(_get(item, "workflow_type", "type") or ""),
        status=str(getattr(status, "value", status) or "UNKNOWN"),
        current_step=str(_get(item, "current_step", "waiting_for") or ""),
        started_at=_moment(_get(item, "started_at", "started_at_ms")),
        updated_at=_moment(_get(item, "updated_at", "updated_at_ms", "finished_at")),
        reason=str(_get(item, "reason") or ""),
    )


# --------------------------------------------------------------------------- the fallback


def _list_from_histories(found: Mapping[str, list[HistoryEvent]], filters: Filters) -> Overview:
    """The list and the counts folded from every history (``Client.histories``)."""
    rows: list[Row] = []
    for workflow_id, events in found.items():
        state = fold(workflow_id, _gapless(events))
        if state.status is None:
            continue
        rows.append(
            Row(
                workflow_id=workflow_id,
                workflow_type=state.workflow_type,
                status=operator_status(state),
                current_step=state.current_step,
                started_at=_ms(state.started_at_ms),
                updated_at=_ms(events[-1].recorded_at_ms),
            )
        )
    counts = dict(Counter(r.status for r in rows))
    rows = [
        r
        for r in rows
        if (not filters.status or r.status == filters.status)
        and (not filters.type or r.workflow_type == filters.type)
        and r.workflow_id.startswith(filters.prefix)
    ]
    rows.sort(key=lambda r: (r.started_at or _EPOCH, r.workflow_id), reverse=True)
    start = int(filters.cursor) if filters.cursor.isdigit() else 0
    end = start + filters.limit
    return Overview(
        rows=rows[start:end],
        counts=counts,
        next_cursor=str(end) if end < len(rows) else None,
        source="history scan",
    )


_EPOCH = datetime.fromtimestamp(0, tz=UTC)


# --------------------------------------------------------------------------- one workflow


def _ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _gapless(events: Iterable[HistoryEvent]) -> list[HistoryEvent]:
    out = []
    for expected, event in enumerate(events, start=1):
        if event.event_seq != expected:
            break
        out.append(event)
    return out


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def detail_of(workflow_id: str, events: list[HistoryEvent]) -> Detail:
    """The workflow page's content, from the workflow's events in sequence order."""
    run = _gapless(events)
    state = fold(workflow_id, run)
    steps: dict[int, StepRow] = {}
    signals: list[Signal] = []
    for event in run:
        body, at = event.event, _ms(event.recorded_at_ms)
        seq = body.step_seq if isinstance(body, OperatorActed) else getattr(body, "seq", None)
        step = steps.get(seq) if seq is not None else None
        match body:
            case ActivityScheduled():
                steps[body.seq] = StepRow(body.seq, body.activity_name, body.is_compensation, at)
            case ActivityAttemptStarted() if step:
                step.attempts, step.outcome, step.retry_at = body.attempt, "in flight", None
            case ActivityAttemptFailed() if step:
                step.detail = f"{body.error.type}: {body.error.message}"
                if body.retry_at_ms is not None:
                    step.outcome, step.retry_at = "retry pending", _ms(body.retry_at_ms)
            case ActivityCompleted() if step:
                step.outcome, step.detail, step.retry_at = "completed", _preview(body.result), None
            case ActivityFailed() if step:
                step.outcome = "business failure" if body.business else "failed"
                step.detail, step.retry_at = f"{body.error.type}: {body.error.message}", None
            case ActivityParked() if step:
                step.outcome, step.retry_at = "parked", None
                step.detail = f"{body.error.type}: {body.error.message}"
            case OperatorActed() if step and body.action == "skip":
                step.outcome = "skipped"
                step.detail = f"by {body.operator}: {body.reason or '(no reason)'}"
            case ChildWorkflowStarted():
                name = f"child {body.workflow_type} {body.child_workflow_id}"
                steps[body.seq] = StepRow(body.seq, name, False, at)
            case ChildWorkflowCompleted() if step:
                step.outcome, step.detail = "completed", _preview(body.result)
            case ChildWorkflowFailed() if step:
                step.outcome = body.status.value.lower()
                step.detail = f"{body.error.type}: {body.error.message}"
            case SignalReceived():
                signals.append(Signal(body.signal_name, at, _preview(body.payload)))
    trace_id = None
    if state.trace is not None:
        parts = state.trace.traceparent.split("-")
        trace_id = parts[1] if len(parts) == 4 else None
    return Detail(
        workflow_id=workflow_id,
        state=state,
        events=_summaries(events),
        steps=sorted(steps.values(), key=lambda s: s.seq),
        signals=signals,
        timers=sorted((seq, _ms(at)) for seq, at in state.timers.items()),
        complete=len(run) == len(events),
        input_json=_json(_payload_json(state.input)),
        result_json=_json(_payload_json(state.result)) if state.result is not None else None,
        trace_id=trace_id,
    )
