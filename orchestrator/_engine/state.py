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
from typing import Any

from tenacity import wait_exponential

from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityReply,
    ActivityScheduled,
    CancelRequested,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    LateReplyIgnored,
    LocalActivityRecorded,
    MarkerRecorded,
    Payload,
    ReplyOutcome,
    RetryPolicy,
    SignalReceived,
    TimerFired,
    TimerStarted,
    TraceContext,
    WorkflowBlocked,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowStatus,
)

TIMEOUT_ERROR = "ActivityTimeout"
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
        if self.done:
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
    finished_at_ms: int | None = None
    result: Payload | None = None
    error: ErrorInfo | None = None
    cancel_requested: bool = False
    activities: dict[int, ActivityState] = field(default_factory=dict)
    timers: dict[int, int] = field(default_factory=dict)  # seq -> fire_at_ms, while pending
    signal_request_ids: set[str] = field(default_factory=set)
    steps_done: int = 0
    blocked: ErrorInfo | None = None  # the code cannot go on with this history (WorkflowBlocked)

    @property
    def finished(self) -> bool:
        return self.status is not None and self.status is not WorkflowStatus.RUNNING

    @property
    def current_step(self) -> str:
        """What the workflow waits for, in words, for ``describe``."""
        if self.status is None:
            return "not started"
        if self.finished:
            return self.status.value.lower()
        if self.blocked is not None:
            return f"blocked: {self.blocked.type}: {self.blocked.message}"
        waiting = [
            f"{a.name} #{a.seq} attempt {a.attempt}"
            + (" (compensation)" if a.is_compensation else "")
            for a in self.activities.values()
            if not a.done
        ]
        waiting += [f"timer #{seq}" for seq in self.timers]
        return ", ".join(waiting) if waiting else "waiting for a signal"

    def apply(self, event: HistoryEvent) -> None:
        """Fold one event in. Events at or below ``last_seq`` were applied already: ignored."""
        if event.event_seq <= self.last_seq:
            return
        if event.event_seq != self.last_seq + 1:
            raise ValueError(
                f"workflow {self.workflow_id}: event {event.event_seq} follows {self.last_seq}"
            )
        self.last_seq = event.event_seq
        _FOLD[type(event.event)](self, event.event, event.recorded_at_ms)

    def next_due_ms(self) -> int | None:
        if self.finished:
            return None
        dues = [d for d in (a.next_due_ms() for a in self.activities.values()) if d is not None]
        dues.extend(self.timers.values())
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


def _nothing(s: WorkflowState, e: LateReplyIgnored, at: int) -> None:
    return None


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


def _after_failure(
    act: ActivityState, error: ErrorInfo, now_ms: int, rng: random.Random
) -> list[EventBody]:
    policy = act.retry
    out_of_attempts = policy.max_attempts > 0 and act.attempt >= policy.max_attempts
    if error.type in policy.non_retryable_error_types or out_of_attempts:
        return [
            ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error),
            ActivityFailed(seq=act.seq, attempt=act.attempt, error=error, business=False),
        ]
    retry_at = now_ms + retry_delay_ms(policy, act.attempt, rng)
    if (
        act.overall_timeout_ms is not None
        and retry_at >= act.scheduled_at_ms + act.overall_timeout_ms
    ):
        return [
            ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error),
            ActivityFailed(seq=act.seq, attempt=act.attempt, error=error, business=False),
        ]
    return [
        ActivityAttemptFailed(seq=act.seq, attempt=act.attempt, error=error, retry_at_ms=retry_at)
    ]


def decide_reply(
    state: WorkflowState, reply: ActivityReply, now_ms: int, rng: random.Random
) -> list[EventBody]:
    """The events a service's reply leads to. Raises UnknownActivity for a stranger's reply."""
    act = state.activities.get(reply.seq)
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
        return [ActivityFailed(seq=act.seq, attempt=act.attempt, error=error, business=True)]
    return _after_failure(act, error, now_ms, rng)


def decide_timers(state: WorkflowState, now_ms: int, rng: random.Random) -> list[EventBody]:
    """The events of the first timer of this workflow that is due at ``now_ms`` (or none).

    One timer at a time: its events may wake the workflow code, which may change what is due,
    so the caller applies them and asks again until nothing is due.
    """
    if state.finished:
        return []
    for act in state.activities.values():
        if act.done:
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
            out.append(
                ActivityFailed(seq=act.seq, attempt=act.attempt, error=error, business=False)
            )
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
