"""Exceptions users of the orchestrator see: in workflow code, in services, and in the client."""

from __future__ import annotations

from collections.abc import Sequence


class ActivityError(Exception):
    """An activity failed for good: a business failure, or retries/timeouts ran out.

    Raised at the ``await ctx.call(...)`` in workflow code. Inside ``ctx.saga()`` it triggers the
    registered compensations.
    """

    def __init__(
        self, activity: str, seq: int, error_type: str, message: str, *, business: bool
    ) -> None:
        super().__init__(f"activity {activity} (#{seq}) failed: {error_type}: {message}")
        self.activity = activity
        self.seq = seq
        self.error_type = error_type
        self.message = message
        self.business = business


class WorkflowCancelled(Exception):
    """Raised at the workflow's current ``await`` when someone cancels it."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"workflow cancelled: {reason}")
        self.reason = reason


class CompensationFailed(Exception):
    """One or more compensations gave up; the workflow ends PARKED for an operator."""

    def __init__(self, failures: Sequence[ActivityError]) -> None:
        super().__init__("compensation gave up: " + "; ".join(str(f) for f in failures))
        self.failures = list(failures)


class NonDeterminismError(Exception):
    """Replaying a workflow's history produced different commands than the history holds."""


class BusinessError(Exception):
    """Raised by a service handler: the operation is refused for a business reason.

    The workflow sees an ``ActivityError(business=True)`` at once, without retries.
    """

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type or type(self).__name__


class RetryableError(Exception):
    """Raised by a service handler: a transient failure; the orchestrator retries the activity."""


class WorkflowIdConflict(Exception):
    """A workflow with this id exists and was started with another type or input."""


class UnknownWorkflow(LookupError):
    """No workflow with this id is known."""


class WorkflowFailedError(Exception):
    """The workflow ended without a result (failed, compensated, cancelled or parked)."""

    def __init__(self, workflow_id: str, status: str, error_type: str, message: str) -> None:
        super().__init__(f"workflow {workflow_id} ended {status}: {error_type}: {message}")
        self.workflow_id = workflow_id
        self.status = status
        self.error_type = error_type
        self.message = message


class NodeStopped(RuntimeError):
    """A node cannot go on and must exit: fenced by another process with the same node id, or an
    unrecoverable Kafka error. The message is the one line an operator needs."""
