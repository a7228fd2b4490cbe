"""The public names are a promise: adding one is a decision, removing one breaks users."""

from __future__ import annotations

import orchestrator


def test_the_exported_names_are_pinned() -> None:
    assert sorted(orchestrator.__all__) == [
        "ActivityContract",
        "ActivityError",
        "AsyncClient",
        "AsyncWorkflowHandle",
        "BusinessError",
        "Client",
        "CommandInfo",
        "Compensation",
        "CompensationFailed",
        "NonDeterminismError",
        "OrchestratorNode",
        "RetryPolicy",
        "RetryableError",
        "Saga",
        "Service",
        "Settings",
        "UnknownWorkflow",
        "WorkflowCancelled",
        "WorkflowContext",
        "WorkflowDescription",
        "WorkflowFailedError",
        "WorkflowFailure",
        "WorkflowHandle",
        "WorkflowIdConflict",
        "WorkflowRegistry",
        "WorkflowStatus",
        "workflow",
    ]
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None


def test_the_package_docstring_example_names_exist() -> None:
    assert callable(orchestrator.workflow.defn)
    assert callable(orchestrator.workflow.run)
