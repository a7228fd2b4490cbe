"""Exceptions users of the orchestrator see: in workflow code, in services, and in the client."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path


class Rejection(StrEnum):
    """Why a node refused a start: the ``error.type`` of the FAILED result it gets. Such a result
    answers only the start it refused: it says nothing of a workflow with the same id that a
    later, valid start runs."""

    WORKFLOW_ID_CONFLICT = "WorkflowIdConflict"
    UNKNOWN_WORKFLOW_TYPE = "UnknownWorkflowType"
    INVALID_INPUT = "InvalidInput"
    OVERSIZED = "Oversized"
    PRODUCE_FAILED = "ProduceFailed"
    OPERATOR_REFUSED = "OperatorRefused"  # an operator action that does not apply (dead letter)


class OrchestratorError(Exception):
    """The root of errors whose message is written for a person, in one line.

    The ``orchestrator`` command prints such an error as ``Error: <message>`` and exits 1,
    without a traceback; the message says what went wrong and what to do about it.
    """


class ConfigurationError(OrchestratorError, ValueError):
    """A setting is wrong, e.g. a librdkafka key or value that librdkafka refuses.

    A ``ValueError`` too, so that raised inside a settings validator it becomes a pydantic
    validation error naming the setting.
    """


class KafkaUnavailable(OrchestratorError):
    """The Kafka cluster did not answer at the configured bootstrap servers."""


#: What a :class:`KafkaUnavailable` message ends with.
UNREACHABLE_HINT = "is the broker running, and are --bootstrap / KAFKA_BOOTSTRAP_SERVERS right?"


class StateDirError(OrchestratorError):
    """The local state directory cannot be created or opened."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class StateDirLocked(StateDirError):
    """Another process (or another store in this one) holds the RocksDB lock of a state dir."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            path,
            f"the state dir {path} is in use by another process (its RocksDB lock is held): "
            "is another `orchestrator run` using the same --state-dir / SAGA_STATE_DIR? "
            "Stop it, or give each node its own state dir and node id",
        )


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


class ChildWorkflowError(ActivityError):
    """A child workflow ended without a result (failed, compensated, cancelled, parked), or its
    start was refused. Raised at ``await handle.result()`` (or ``ctx.execute_child``); inside
    ``ctx.saga()`` it triggers the compensations like a failed activity."""

    def __init__(
        self, workflow_id: str, seq: int, status: str, error_type: str, message: str
    ) -> None:
        super().__init__(f"child {workflow_id}", seq, error_type, message, business=True)
        self.args = (
            f"child workflow {workflow_id} (#{seq}) ended {status}: {error_type}: {message}",
        )
        self.workflow_id = workflow_id
        self.status = status


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


class AsyncioInWorkflow(TypeError, RuntimeError):
    """Workflow code used asyncio (``asyncio.gather``, ``asyncio.sleep``, a task...).

    The engine, not an event loop, runs workflow code: ``ctx.gather`` and ``ctx.sleep`` do what
    those would. Raised where the code asked asyncio for its loop; the commands the same code
    asked for just before (the calls handed to ``asyncio.gather``) are not sent. A
    ``RuntimeError`` too, so that asyncio closes the coroutines it was given.
    """


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


class WorkflowIdConflict(OrchestratorError):
    """A workflow with this id exists and was started with another type or input."""


class UnknownWorkflow(OrchestratorError, LookupError):
    """No workflow with this id is known."""


class UnknownQuery(OrchestratorError, LookupError):
    """The workflow's type has no query of that name."""


class QueryFailed(OrchestratorError):
    """A query could not be answered: its method raised, its argument does not fit, the node
    that owns the workflow could not be reached, or the workflow is BLOCKED."""

    def __init__(self, message: str, *, error_type: str = "QueryFailed") -> None:
        super().__init__(message)
        self.error_type = error_type


class WorkflowFailedError(OrchestratorError):
    """The workflow ended without a result (failed, compensated, cancelled or parked)."""

    def __init__(self, workflow_id: str, status: str, error_type: str, message: str) -> None:
        super().__init__(f"workflow {workflow_id} ended {status}: {error_type}: {message}")
        self.workflow_id = workflow_id
        self.status = status
        self.error_type = error_type
        self.message = message


class NodeStopped(OrchestratorError):
    """A node cannot go on and must exit: fenced by another process with the same node id, or an
    unrecoverable Kafka error. The message is the one line an operator needs."""


class DeterminismViolation(Exception):
    """Workflow code called something nondeterministic (the clock, ``random``, a sleep, I/O, a
    thread) directly; the message names the call, the line and the ``ctx`` equivalent. The
    workflow fails with it, like with any other error in its code."""


class WorkflowFailure(OrchestratorError):
    """Raise it in workflow code to fail the workflow on purpose (its saga compensates first);
    ``error_type`` names the failure in the result. An exception that is not deliberate (see
    docs/workflows.md, "Blocked workflows") is taken for a bug and blocks the workflow instead."""

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type or type(self).__name__


class WorkflowTimedOut(WorkflowFailure):
    """Raised at the workflow's current ``await`` when its execution timeout
    (``Client.start(..., execution_timeout=)``) has passed. Like any failure, its saga
    compensates; the workflow then ends FAILED (or COMPENSATED) with error type
    ``WorkflowTimedOut``."""

    def __init__(self, timeout_ms: int) -> None:
        super().__init__(
            f"the workflow did not finish within its execution timeout of {timeout_ms} ms"
        )
        self.timeout_ms = timeout_ms


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new(input)``: ends this run, and a new run of the same
    workflow starts with ``input``. A ``BaseException``, so that ``except Exception`` in
    workflow code does not swallow it; a saga does not compensate for it."""

    def __init__(self, payload: object) -> None:
        super().__init__("continue as new")
        self.payload = payload
