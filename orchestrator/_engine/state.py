"""The workflow aggregate: its state is a fold over its history events.

This module is pure (no I/O, no clock, no coroutine). The same fold serves live processing,
restore from the history topic, and ``describe``. The decisions the engine takes on its own,
without the workflow code (retries, timeouts, late replies), are pure functions of a state, an
input and the time, returning new event bodies.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tenacity import wait_exponential

from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityParked,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    ChildWorkflowCompleted,
    ChildWorkflowFailed,
    ChildWorkflowStarted,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    LateReplyIgnored,
    LocalActivityRecorded,
    MarkerRecorded,
    OperatorActed,
    ParentRef,
    Payload,
    ReplyOutcome,
    RetryPolicy,
    SignalReceived,
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

TIMEOUT_ERROR = "ActivityTimeout"
TERMINATED_ERROR = "Terminated"


class OperatorActionKind(StrEnum):
    """What an operator can do to a workflow (``OperatorAction.action``)."""

    TERMINATE = "terminate"  # end it now; nothing is compensated
    RETRY = "retry"  # a parked or retry-pending step runs at once; a blocked workflow is re-run
    SKIP = "skip"  # a parked compensation is marked done; the saga goes on


class OperatorRefused(ValueError):
    """An operator action that does not apply to the workflow as it is (the reason says why)."""


HEARTBEAT_TIMEOUT_ERROR = "HeartbeatTimeout"


@dataclass
class ActivityState:
    seq: int
    name: str
    topic: str
    input: Payload
    idempotency_key: str
    is_compensation: bool
    retry: RetryPolicy
    attempt_timeout_ms: int | None
    overall_timeout_ms: int | None
    scheduled_at_ms: int
    attempt: int = 1
    attempt_started_ms: int = 0
    attempt_open: bool = True  # a reply to the current attempt is awaited
    retry_at_ms: int | None = None  # the next attempt starts then
    done: bool = False
    parked: ErrorInfo | None = None  # a compensation gave up: waits for an operator
    skipped: bool = False  # marked done by an operator (skip)
    attempts_before: int = 0  # attempts spent before an operator's retry gave a new round
    rounds: int = 0  # operator retries of this step after it parked

    @property
    def waits_for_retry(self) -> bool:
        """An operator's retry applies: parked, or between attempts."""
        return not self.done and (self.parked is not None or self.retry_at_ms is not None)

    heartbeat_timeout_ms: int | None = None
    # Heartbeats are kept here, not in the history (see docs/services.md "Heartbeats"): when
    # the current attempt was last heard of, and the last details any attempt sent (given to
    # the next attempt). A node that rebuilds the workflow gives the attempt a full
    # heartbeat_timeout from then (heartbeat_grace) and has no details.
    last_beat_ms: int = field(default=0, compare=False)
    heartbeat_details: Payload | None = field(default=None, compare=False)

    def heartbeat_due_ms(self) -> int | None:
        if self.done or not self.attempt_open or self.heartbeat_timeout_ms is None:
            return None
        return max(self.attempt_started_ms, self.last_beat_ms) + self.heartbeat_timeout_ms

    def next_due_ms(self) -> int | None:
        if self.done or self.parked is not None:
            return None
        dues: list[int] = []
        if self.overall_timeout_ms is not None:
            dues.append(self.scheduled_at_ms + self.overall_timeout_ms)
        if self.attempt_open and self.attempt_timeout_ms is not None:
            dues.append(self.attempt_started_ms + self.attempt_timeout_ms)
        if (beat_due := self.heartbeat_due_ms()) is not None:
            dues.append(beat_due)
        if self.retry_at_ms is not None:
            dues.append(self.retry_at_ms)
        return min(dues) if dues else None


@dataclass
class ChildState:
    """A child workflow this one started, until it ends."""

    seq: int
    workflow_id: str
    workflow_type: str
    parent_close_policy: str
    done: bool = False


@dataclass
class WorkflowState:
    workflow_id: str
    workflow_type: str = ""
    status: WorkflowStatus | None = None  # None: never started
    input: Payload | None = None
    request_id: str = ""
    trace: TraceContext | None = None
    random_seed: int = 0
    last_seq: int = 0
    started_at_ms: int = 0
    updated_at_ms: int = 0  # the recorded time of the last event (the visibility index)
    finished_at_ms: int | None = None
    result: Payload | None = None
    error: ErrorInfo | None = None
    cancel_requested: bool = False
    activities: dict[int, ActivityState] = field(default_factory=dict)
    timers: dict[int, int] = field(default_factory=dict)  # seq -> fire_at_ms, while pending
    signal_request_ids: set[str] = field(default_factory=set)
    steps_done: int = 0
    blocked: ErrorInfo | None = None  # the code cannot go on with this history (WorkflowBlocked)
    operator_request_ids: set[str] = field(default_factory=set)
    parent: ParentRef | None = None  # a child workflow reports its end there
    children: dict[int, ChildState] = field(default_factory=dict)  # seq -> child
    # The seq of this run's WorkflowStarted: a workflow id may have several runs in a row
    # (continue-as-new, id reuse); each begins with a WorkflowStarted that follows the previous
    # run's last event, and the state holds the current run only.
    run_start_seq: int = 0
    execution_timeout_ms: int | None = None
    timed_out: bool = False
    continued_as_new: Payload | None = None  # the next run's input, once this run has ended so

    def running_children(self) -> list[ChildState]:
        return [child for child in self.children.values() if not child.done]

    @property
    def parked(self) -> list[ActivityState]:
        """Compensations that gave up and wait for an operator (retry or skip)."""
        return [a for a in self.activities.values() if a.parked is not None and not a.done]

    @property
    def finished(self) -> bool:
        if self.continued_as_new is not None:
            return True
        return self.status is not None and self.status is not WorkflowStatus.RUNNING

    @property
    def execution_deadline_ms(self) -> int | None:
        if self.execution_timeout_ms is None:
            return None
        return self.started_at_ms + self.execution_timeout_ms

    @property
    def current_step(self) -> str:
        """What the workflow waits for, in words, for ``describe``."""
        if self.status is None:
            return "not started"
        if self.continued_as_new is not None:
            return "continued as new"
        if self.finished:
            return self.status.value.lower()
        if self.blocked is not None:
            return f"blocked: {self.blocked.type}: {self.blocked.message}"
        parked = [
            f"parked: {a.name} #{a.seq} gave up after attempt {a.attempt} "
            f"({a.parked.type}: {a.parked.message}); retry or skip it"
            for a in self.parked
            if a.parked is not None
        ]
        if parked:
            return "; ".join(parked)
        waiting = [
            f"{a.name} #{a.seq} attempt {a.attempt}"
            + (" (compensation)" if a.is_compensation else "")
            for a in self.activities.values()
            if not a.done and a.parked is None
        ]
        waiting += [f"timer #{seq}" for seq in self.timers]
        waiting += [f"child {c.workflow_id} #{c.seq}" for c in self.running_children()]
        return ", ".join(waiting) if waiting else "waiting for a signal"

    def apply(self, event: HistoryEvent) -> None:
        """Fold one event in. Events at or below ``last_seq`` were applied already: ignored."""
        if event.event_seq <= self.last_seq:
            return
        if self.begins_run(event):
            # A new run: the first (after the old runs' events were tombstoned and compacted
            # away, its seq is > 1), or the next one after the previous run closed.
            self.__dict__.update(vars(WorkflowState(self.workflow_id)))
            self.run_start_seq = event.event_seq
        elif event.event_seq != self.last_seq + 1:
            raise ValueError(
                f"workflow {self.workflow_id}: event {event.event_seq} follows {self.last_seq}"
            )
        self.last_seq = event.event_seq
        self.updated_at_ms = event.recorded_at_ms
        _FOLD[type(event.event)](self, event.event, event.recorded_at_ms)

    def begins_run(self, event: HistoryEvent) -> bool:
        """Whether ``event`` starts a run: a WorkflowStarted on nothing (at any seq: the
        earlier runs' events may be gone), or right after a closed run."""
        if not isinstance(event.event, WorkflowStarted) or event.event_seq <= self.last_seq:
            return False
        return self.status is None or (self.finished and event.event_seq == self.last_seq + 1)

    def next_due_ms(self) -> int | None:
        if self.finished:
            return None
        dues = [d for d in (a.next_due_ms() for a in self.activities.values()) if d is not None]
        dues.extend(self.timers.values())
        deadline = self.execution_deadline_ms
        if deadline is not None and not self.timed_out:
            dues.append(deadline)
        return min(dues) if dues else None


# --------------------------------------------------------------------------- the fold


def _started(s: WorkflowState, e: WorkflowStarted, at: int) -> None:
    s.workflow_type = e.workflow_type
    s.status = WorkflowStatus.RUNNING
    s.input = e.input
    s.request_id = e.request_id
    s.trace = e.trace
    s.random_seed = e.random_seed
    s.started_at_ms = at
    s.parent = e.parent
    s.execution_timeout_ms = e.execution_timeout_ms


def _scheduled(s: WorkflowState, e: ActivityScheduled, at: int) -> None:
    s.activities[e.seq] = ActivityState(
        seq=e.seq,
        name=e.activity_name,
        topic=e.topic,
        input=e.input,
        idempotency_key=e.idempotency_key,
        is_compensation=e.is_compensation,
        retry=e.retry,
        attempt_timeout_ms=e.attempt_timeout_ms,
        overall_timeout_ms=e.overall_timeout_ms,
        scheduled_at_ms=at,
        attempt_started_ms=at,
        heartbeat_timeout_ms=e.heartbeat_timeout_ms,
    )


def _attempt_started(s: WorkflowState, e: ActivityAttemptStarted, at: int) -> None:
    act = s.activities[e.seq]
    act.attempt = e.attempt
    act.attempt_started_ms = at
    act.attempt_open = True
    act.retry_at_ms = None


def _attempt_failed(s: WorkflowState, e: ActivityAttemptFailed, at: int) -> None:
    act = s.activities[e.seq]
    act.attempt_open = False
    act.retry_at_ms = e.retry_at_ms


def _completed(s: WorkflowState, e: ActivityCompleted, at: int) -> None:
    act = s.activities[e.seq]
    act.done = True
    act.attempt_open = False
    s.steps_done += 1


def _failed(s: WorkflowState, e: ActivityFailed, at: int) -> None:
    act = s.activities[e.seq]
    act.done = True
    act.attempt_open = False
    act.retry_at_ms = None


def _timer_started(s: WorkflowState, e: TimerStarted, at: int) -> None:
    s.timers[e.seq] = e.fire_at_ms


def _timer_fired(s: WorkflowState, e: TimerFired, at: int) -> None:
    s.timers.pop(e.seq, None)


def _signal(s: WorkflowState, e: SignalReceived, at: int) -> None:
    s.signal_request_ids.add(e.request_id)


def _cancel(s: WorkflowState, e: CancelRequested, at: int) -> None:
    s.cancel_requested = True


def _wf_completed(s: WorkflowState, e: WorkflowCompleted, at: int) -> None:
    s.status = WorkflowStatus.COMPLETED
    s.result = e.result
    s.finished_at_ms = at
    s.timers.clear()


def _wf_failed(s: WorkflowState, e: WorkflowFailed, at: int) -> None:
    s.status = e.status
    s.error = e.error
    s.finished_at_ms = at
    s.timers.clear()


def _blocked(s: WorkflowState, e: WorkflowBlocked, at: int) -> None:
    s.blocked = e.error


def _parked(s: WorkflowState, e: ActivityParked, at: int) -> None:
    act = s.activities[e.seq]
    act.parked = e.error
    act.attempt_open = False
    act.retry_at_ms = None


def _operator(s: WorkflowState, e: OperatorActed, at: int) -> None:
    s.operator_request_ids.add(e.request_id)
    if e.action == OperatorActionKind.TERMINATE:
        s.status = WorkflowStatus.TERMINATED
        s.error = ErrorInfo(type=TERMINATED_ERROR, message=e.reason or "terminated by an operator")
        s.finished_at_ms = at
        s.timers.clear()
        return
    act = s.activities.get(e.step_seq) if e.step_seq is not None else None
    if act is None:
        return  # a retry of a blocked workflow: recorded for the timeline only
    if e.action == OperatorActionKind.SKIP:
        act.done = True
        act.skipped = True
        act.parked = None
        act.retry_at_ms = None
        return
    if act.parked is not None:  # a new round of attempts, and of the overall timeout
        act.parked = None
        act.attempts_before = act.attempt
        act.scheduled_at_ms = at
        # A new operation for the service: its dedupe store keeps the final failure under the
        # old key and would answer it again instead of running the step.
        base = act.idempotency_key.removesuffix(f"/retry{act.rounds}") if act.rounds else None
        act.rounds += 1
        act.idempotency_key = f"{base or act.idempotency_key}/retry{act.rounds}"
    if e.input is not None:
        act.input = e.input


def _child_started(s: WorkflowState, e: ChildWorkflowStarted, at: int) -> None:
    s.children[e.seq] = ChildState(
        e.seq, e.child_workflow_id, e.workflow_type, e.parent_close_policy
    )


def _child_ended(
    s: WorkflowState, e: ChildWorkflowCompleted | ChildWorkflowFailed, at: int
) -> None:
    child = s.children.get(e.seq)
    if child is not None:
        child.done = True


def _nothing(s: WorkflowState, e: LateReplyIgnored, at: int) -> None:
    return None


def _timed_out(s: WorkflowState, e: WorkflowTimedOut, at: int) -> None:
    s.timed_out = True


def _continued(s: WorkflowState, e: WorkflowContinuedAsNew, at: int) -> None:
    # Not an end state: the next run's WorkflowStarted follows in the same transaction.
    s.continued_as_new = e.input
    s.timers.clear()


_FOLD: dict[type, Callable[[WorkflowState, Any, int], None]] = {
    WorkflowStarted: _started,
    ActivityScheduled: _scheduled,
    ActivityAttemptStarted: _attempt_started,
    ActivityAttemptFailed: _attempt_failed,
    ActivityCompleted: _completed,
    ActivityFailed: _failed,
    LateReplyIgnored: _nothing,
    TimerStarted: _timer_started,
    TimerFired: _timer_fired,
    SignalReceived: _signal,
    CancelRequested: _cancel,
    WorkflowCompleted: _wf_completed,
    WorkflowFailed: _wf_failed,
    WorkflowBlocked: _blocked,
    MarkerRecorded: _nothing,  # only the code reads markers (ctx.patched), on replay
    ActivityParked: _parked,
    OperatorActed: _operator,
    ChildWorkflowStarted: _child_started,
    ChildWorkflowCompleted: _child_ended,
    ChildWorkflowFailed: _child_ended,
    WorkflowTimedOut: _timed_out,
    WorkflowContinuedAsNew: _continued,
    WorkflowStartSent: _nothing,  # the start went to the inbox with the event
    LocalActivityRecorded: _nothing,  # only the code reads it (ctx.run_local), on replay
}


def fold(workflow_id: str, events: list[HistoryEvent]) -> WorkflowState:
    state = WorkflowState(workflow_id)
    for event in events:
        state.apply(event)
    return state


# --------------------------------------------------------------------------- engine decisions


class UnknownActivity(LookupError):
    """A reply names an activity this workflow never scheduled."""


def retry_delay_ms(policy: RetryPolicy, failed_attempt: int, rng: random.Random) -> int:
    """Exponential backoff with a cap, plus up to ``jitter`` of it; recorded, so replay agrees."""
    base = wait_exponential(
        multiplier=policy.initial_interval_ms,
        max=policy.max_interval_ms,
        exp_base=policy.backoff_coefficient,
    )
    delay = float(base(_Attempt(failed_attempt)))  # type: ignore[arg-type]
    return int(delay + delay * policy.jitter * rng.random())


@dataclass(frozen=True)
class _Attempt:
    """The one field of tenacity's RetryCallState that its wait strategies read."""

    attempt_number: int


def _gave_up(act: ActivityState, error: ErrorInfo, business: bool) -> EventBody:
    """The end of an activity's attempts. A compensation does not fail the saga: undoing is not
    optional, so it parks and waits for an operator to retry or skip it (recorded)."""
    if act.is_compensation:
        return ActivityParked(seq=act.seq, attempt=act.attempt, error=error)
    return ActivityFailed(seq=act.seq, attempt=act.attempt, error=error, business=business)


def _after_failure(
    act: ActivityState, error: ErrorInfo, now_ms: int, rng: random.Random
) -> list[EventBody]:
    policy = act.retry
    spent = act.attempt - act.attempts_before  # an operator's retry starts a new round
    out_of_attempts = policy.max_attempts > 0 and spent >= policy.max_attempts
    if error.type in policy.non_retryable_error_types or out_of_attempts:
        return [
            ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error),
            _gave_up(act, error, business=False),
        ]
    retry_at = now_ms + retry_delay_ms(policy, max(spent, 1), rng)
    if (
        act.overall_timeout_ms is not None
        and retry_at >= act.scheduled_at_ms + act.overall_timeout_ms
    ):
        return [
            ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error),
            _gave_up(act, error, business=False),
        ]
    return [
        ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error, retry_at_ms=retry_at)
    ]


def decide_reply(
    state: WorkflowState, reply: ActivityReply, now_ms: int, rng: random.Random
) -> list[EventBody]:
    """The events a service's reply leads to. Raises UnknownActivity for a stranger's reply."""
    act = state.activities.get(reply.seq)
    if (
        act is None
        and 0 < reply.seq < state.run_start_seq
        and f"{reply.idempotency_key}/".startswith(f"{state.workflow_id}/{reply.seq}/")
    ):
        # An activity of an earlier run (its commands have seqs below this run's start; an
        # operator's retry adds /retry<N> to the key): that run is over, its reply changes
        # nothing.
        return [LateReplyIgnored(seq=reply.seq, attempt=reply.attempt, outcome=reply.outcome)]
    if act is None or act.idempotency_key != reply.idempotency_key:
        raise UnknownActivity(
            f"workflow {state.workflow_id} has no activity #{reply.seq} "
            f"with idempotency key {reply.idempotency_key!r}"
        )
    # A finished workflow's state never changes again: a reply to a step it stopped waiting
    # for (a plain call in flight at a cancel, a branch nobody awaits) is recorded as ignored.
    if state.finished or act.done or not act.attempt_open or reply.attempt != act.attempt:
        return [LateReplyIgnored(seq=act.seq, attempt=reply.attempt, outcome=reply.outcome)]
    if reply.outcome is ReplyOutcome.SUCCESS:
        return [
            ActivityCompleted(
                seq=act.seq,
                attempt=act.attempt,
                result=reply.result or Payload(encoding="binary/null"),
            )
        ]
    error = reply.error or ErrorInfo(type="UnknownError", message="the service gave no reason")
    if reply.outcome is ReplyOutcome.BUSINESS_FAILURE:
        return [_gave_up(act, error, business=True)]
    return _after_failure(act, error, now_ms, rng)


def decide_timers(state: WorkflowState, now_ms: int, rng: random.Random) -> list[EventBody]:
    """The events of the first timer of this workflow that is due at ``now_ms`` (or none).

    One timer at a time: its events may wake the workflow code, which may change what is due,
    so the caller applies them and asks again until nothing is due.
    """
    if state.finished:
        return []
    deadline = state.execution_deadline_ms
    if deadline is not None and not state.timed_out and deadline <= now_ms:
        return [WorkflowTimedOut(timeout_ms=state.execution_timeout_ms or 0)]
    for act in state.activities.values():
        if act.done or act.parked is not None:
            continue
        if (
            act.overall_timeout_ms is not None
            and act.scheduled_at_ms + act.overall_timeout_ms <= now_ms
        ):
            error = ErrorInfo(
                type=TIMEOUT_ERROR,
                message=f"{act.name} did not finish within {act.overall_timeout_ms} ms",
            )
            out: list[EventBody] = []
            if act.attempt_open:
                out.append(ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error))
            out.append(_gave_up(act, error, business=False))
            return out
        if (
            act.attempt_open
            and act.attempt_timeout_ms is not None
            and act.attempt_started_ms + act.attempt_timeout_ms <= now_ms
        ):
            error = ErrorInfo(
                type=TIMEOUT_ERROR,
                message=f"attempt {act.attempt} got no reply within {act.attempt_timeout_ms} ms",
            )
            return _after_failure(act, error, now_ms, rng)
        beat_due = act.heartbeat_due_ms()
        if beat_due is not None and beat_due <= now_ms:
            error = ErrorInfo(
                type=HEARTBEAT_TIMEOUT_ERROR,
                message=f"attempt {act.attempt} sent no heartbeat for "
                f"{act.heartbeat_timeout_ms} ms",
            )
            return _after_failure(act, error, now_ms, rng)
        if act.retry_at_ms is not None and act.retry_at_ms <= now_ms:
            return [ActivityAttemptStarted(seq=act.seq, attempt=act.attempt + 1)]
    for seq, due in sorted(state.timers.items()):
        if due <= now_ms:
            return [TimerFired(seq=seq)]
    return []


def decide_operator(
    state: WorkflowState, action: str, request_id: str, step_seq: int | None, has_input: bool
) -> list[int | None]:
    """Which steps an operator's action applies to (``[None]``: the workflow itself), ``[]`` when
    it changes nothing (the same request again, a terminate of a finished workflow). Raises
    :class:`OperatorRefused` with the reason when it does not apply."""
    if request_id in state.operator_request_ids:
        return []
    try:
        kind = OperatorActionKind(action)
    except ValueError:
        raise OperatorRefused(
            f"unknown action {action!r}; one of: {', '.join(k.value for k in OperatorActionKind)}"
        ) from None
    if state.finished:
        if kind is OperatorActionKind.TERMINATE:
            return []  # it has ended already: terminating it again changes nothing
        raise OperatorRefused(f"workflow {state.workflow_id} has ended ({state.status})")
    if kind is OperatorActionKind.TERMINATE:
        return [None]
    act = state.activities.get(step_seq) if step_seq is not None else None
    if step_seq is not None and act is None:
        raise OperatorRefused(f"workflow {state.workflow_id} has no step #{step_seq}")
    if kind is OperatorActionKind.SKIP:
        if act is None:
            raise OperatorRefused("skip needs the step: --step N (see describe)")
        if act.parked is None or act.done:
            raise OperatorRefused(
                f"step #{act.seq} ({act.name}) is not a parked compensation; only those are skipped"
            )
        return [act.seq]
    if act is not None:
        if not act.waits_for_retry:
            raise OperatorRefused(
                f"step #{act.seq} ({act.name}) is not waiting for a retry "
                f"({'done' if act.done else 'running'})"
            )
        return [act.seq]
    if has_input:
        raise OperatorRefused("a new input needs the step it is for: --step N")
    waiting = [a.seq for a in state.activities.values() if a.waits_for_retry]
    if waiting:
        return list(waiting)
    if state.blocked is not None:
        return [None]  # re-run the blocked code on this node
    raise OperatorRefused(
        f"workflow {state.workflow_id} has nothing to retry: no step is parked or between "
        "attempts, and it is not blocked"
    )


def note_heartbeat(state: WorkflowState, beat: ActivityHeartbeat, now_ms: int) -> bool:
    """Take a heartbeat of the current attempt: it is alive now, and its details are the ones
    the next attempt gets. Records nothing; False for a heartbeat of an attempt that ended
    (or of a stranger), which changes nothing."""
    act = state.activities.get(beat.seq)
    if (
        act is None
        or state.finished
        or act.done
        or not act.attempt_open
        or act.idempotency_key != beat.idempotency_key
        or act.attempt != beat.attempt
    ):
        return False
    act.last_beat_ms = max(act.last_beat_ms, now_ms)
    if beat.details is not None:
        act.heartbeat_details = beat.details
    return True


def heartbeat_grace(state: WorkflowState, now_ms: int) -> None:
    """A workflow rebuilt from its history (a restart, another node, the cache) does not know
    when its attempts last sent a heartbeat: each gets a full heartbeat_timeout from now."""
    for act in state.activities.values():
        if act.heartbeat_timeout_ms is not None and act.attempt_open and not act.done:
            act.last_beat_ms = max(act.last_beat_ms, now_ms)
