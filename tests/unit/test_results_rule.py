"""Which result answers a waiter (orchestrator/_results.py ``pick``): its own start's, else the
latest that is not a rejected start; another start's rejection never answers."""

from __future__ import annotations

from contracts.envelopes import ErrorInfo, IdReusePolicy, WorkflowResult, WorkflowStatus
from orchestrator._payloads import to_payload
from orchestrator._results import Sent, pick


def _done(request_id: str | None, value: int) -> WorkflowResult:
    return WorkflowResult(
        workflow_id="w",
        status=WorkflowStatus.COMPLETED,
        finished_at_ms=value,
        result=to_payload(value),
        request_id=request_id,
    )


def _rejected(request_id: str, kind: str = "WorkflowIdConflict") -> WorkflowResult:
    return WorkflowResult(
        workflow_id="w",
        status=WorkflowStatus.FAILED,
        finished_at_ms=0,
        error=ErrorInfo(type=kind, message="refused"),
        request_id=request_id,
    )


def test_a_waiters_own_result_wins_over_a_later_one() -> None:
    assert pick([_done("a", 1), _done("b", 2)], "a") == _done("a", 1)


def test_an_own_rejection_answers_its_start() -> None:
    assert pick([_done("a", 1), _rejected("b")], "b") == _rejected("b")


def test_another_starts_rejection_never_answers() -> None:
    stale = _rejected("x", "UnknownWorkflowType")
    assert pick([stale], "a") is None
    assert pick([stale], None) is None
    assert pick([stale, _done("a", 1)], None) == _done("a", 1)
    assert pick([_done("a", 1), _rejected("y")], "z") == _done("a", 1)


def test_without_an_own_result_the_latest_answers() -> None:
    assert pick([_done("a", 1), _done("b", 2)], None) == _done("b", 2)
    assert pick([_done("a", 1), _done("b", 2)], "c") == _done("b", 2)
    assert pick([], "c") is None


def _ended(request_id: str, finished_at_ms: int) -> WorkflowResult:
    return WorkflowResult(
        workflow_id="wf",
        status=WorkflowStatus.COMPLETED,
        finished_at_ms=finished_at_ms,
        request_id=request_id,
    )


def test_which_other_run_may_answer_a_start_by_its_id_reuse_policy() -> None:
    """The result of an earlier run never answers a start that began a new run of the id."""
    sent_at = 1_000

    def sent(reuse: IdReusePolicy) -> Sent:
        return Sent(sent_at, 0, 5, reuse)

    earlier, later = _ended("old", sent_at - 1), _ended("old", sent_at + 1)
    assert sent(IdReusePolicy.REJECT_DUPLICATE).may_take(earlier)  # a duplicate of a finished one
    assert not sent(IdReusePolicy.ALLOW_DUPLICATE).may_take(earlier)  # it started a new run
    assert sent(IdReusePolicy.ALLOW_DUPLICATE).may_take(later)  # it duplicated the running one
    assert not sent(IdReusePolicy.TERMINATE_IF_RUNNING).may_take(later)  # always its own run
