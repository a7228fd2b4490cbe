"""The public names are a promise: adding one is a decision, removing one breaks users."""

from __future__ import annotations

import re
from pathlib import Path

import orchestrator

ROOT = Path(__file__).parents[2]

#: What users import from: the package, and three submodules (see orchestrator/__init__.py).
PUBLIC_MODULES = {
    "orchestrator",
    "orchestrator.workflow",
    "orchestrator.tracing",
    "orchestrator.schedule",
    "orchestrator.testing",
}


def test_the_exported_names_are_pinned() -> None:
    assert sorted(orchestrator.__all__) == [
        "ActivityContract",
        "ActivityError",
        "AsyncClient",
        "AsyncWorkflowHandle",
        "AsyncioInWorkflow",
        "BusinessError",
        "ChildHandle",
        "ChildWorkflowError",
        "Client",
        "ClientError",
        "ClientUnreachable",
        "CommandInfo",
        "Compensation",
        "CompensationFailed",
        "ConfigurationError",
        "ContinueAsNew",
        "DeliveryFailed",
        "DeterminismViolation",
        "EventSummary",
        "IdReusePolicy",
        "KafkaUnavailable",
        "NodeStopped",
        "NonDeterminismError",
        "OrchestratorError",
        "OrchestratorNode",
        "ParentClosePolicy",
        "PayloadTooLarge",
        "QueryFailed",
        "Rejection",
        "RetryPolicy",
        "RetryableError",
        "Saga",
        "Service",
        "ServiceError",
        "Settings",
        "StateDirError",
        "StateDirLocked",
        "TopicError",
        "UnknownQuery",
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
        "WorkflowTimedOut",
        "ensure_service_topic",
        "ensure_topics",
        "run_in_thread",
        "serving",
        "testing",
        "tracing",
        "verify_topics",
        "workflow",
    ]
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None


def test_the_package_docstring_example_names_exist() -> None:
    assert callable(orchestrator.workflow.defn)
    assert callable(orchestrator.workflow.run)


def test_every_error_the_client_raises_on_purpose_is_public() -> None:
    # docs/client.md: each derives from OrchestratorError, so one except clause catches them all
    for error in (
        orchestrator.ClientError,
        orchestrator.ClientUnreachable,
        orchestrator.DeliveryFailed,
        orchestrator.PayloadTooLarge,
        orchestrator.UnknownWorkflow,
        orchestrator.WorkflowFailedError,
        orchestrator.WorkflowIdConflict,
    ):
        assert issubclass(error, orchestrator.OrchestratorError), error


def _imported_modules(markdown: str) -> list[str]:
    modules = []
    for block in re.findall(r"```python\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            found = re.match(r"\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", line)
            if found:
                modules.append(found.group(1) or found.group(2))
    return modules


def test_the_readme_and_docs_import_only_the_public_surface() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    imports = {page.name: _imported_modules(page.read_text()) for page in pages}
    assert any(imports.values()), "no python blocks found: the page layout changed"
    private = {
        page: sorted(
            m
            for m in modules
            if m.split(".")[0] in {"orchestrator", "contracts"} and m not in PUBLIC_MODULES
        )
        for page, modules in imports.items()
    }
    assert {page: mods for page, mods in private.items() if mods} == {}
