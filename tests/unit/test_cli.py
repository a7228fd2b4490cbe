"""The ``orchestrator`` command's argument and settings handling (no broker needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from contracts.envelopes import ErrorInfo, Payload, WorkflowStatus
from orchestrator.cli import main, render_description
from orchestrator.client import EventSummary, WorkflowDescription
from orchestrator.settings import Settings
from orchestrator.workflow import WorkflowRegistry

# Nothing listens here: a command that got as far as talking to Kafka would hang or fail late.
NOWHERE = "127.0.0.1:9"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_works_even_with_bad_settings_in_the_environment(runner: CliRunner) -> None:
    out = runner.invoke(main, ["start", "--help"], env={"SAGA_NAMESPACE": "bad ns"})
    assert out.exit_code == 0, out.output
    assert "--input" in out.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--namespace", "bad ns"], "invalid setting namespace (--namespace or SAGA_NAMESPACE)"),
        (["--namespace", "a/b"], "may hold only letters, digits"),
        (["--bootstrap", "nohost"], "invalid setting bootstrap_servers (--bootstrap or"),
        (["--bootstrap", "host:port"], "'host:port' is not host:port"),
        (["--partitions", "0"], "invalid setting partitions (--partitions or SAGA_PARTITIONS)"),
        (["--node-id", "x y"], "invalid setting node_id"),
    ],
)
def test_a_bad_setting_is_a_usage_error_naming_the_field(
    runner: CliRunner, args: list[str], expected: str
) -> None:
    out = runner.invoke(main, [*args, "topics", "verify"])
    assert out.exit_code == 2, out.output
    assert expected in out.output
    assert "Traceback" not in out.output


def test_a_bad_setting_from_the_environment_is_reported_too(runner: CliRunner) -> None:
    out = runner.invoke(main, ["describe", "wf-1"], env={"SAGA_NAMESPACE": "bad ns"})
    assert out.exit_code == 2, out.output
    assert "'bad ns' may hold only" in out.output
    out = runner.invoke(main, ["describe", "wf-1"], env={"KAFKA_BOOTSTRAP_SERVERS": "nohost"})
    assert out.exit_code == 2, out.output
    assert "'nohost' is not host:port" in out.output


def test_flags_override_the_environment(runner: CliRunner) -> None:
    env = {"SAGA_NAMESPACE": "bad ns", "KAFKA_BOOTSTRAP_SERVERS": "env-host:1"}
    out = runner.invoke(main, ["--namespace", "shop", "--partitions", "12", "config"], env=env)
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["namespace"] == "shop"
    assert shown["partitions"] == 12
    assert shown["bootstrap_servers"] == "env-host:1"
    out = runner.invoke(
        main, ["--bootstrap", "flag-host:2", "config"], env=env | {"SAGA_NAMESPACE": "ok"}
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["bootstrap_servers"] == "flag-host:2"


@pytest.mark.parametrize("text", ["{bad", "{'single': 'quotes'}", "", "[1,"])
def test_start_rejects_input_that_is_not_json(runner: CliRunner, text: str) -> None:
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "start", "place-order", "--input", text])
    assert out.exit_code == 2, out.output
    assert "Invalid value for '--input'" in out.output
    assert "is not valid JSON" in out.output


def test_signal_rejects_a_payload_that_is_not_json(runner: CliRunner) -> None:
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "signal", "wf-1", "go", "--payload", "nope"])
    assert out.exit_code == 2, out.output
    assert "'nope' is not valid JSON" in out.output


def test_input_from_a_missing_file_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "start", "t", "--input", f"@{missing}"])
    assert out.exit_code == 2, out.output
    assert "cannot read" in out.output


def test_start_rejects_an_empty_id(runner: CliRunner) -> None:
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "start", "t", "--id", ""])
    assert out.exit_code == 2, out.output
    assert "--id" in out.output


def test_run_with_an_unknown_module_is_a_usage_error(runner: CliRunner) -> None:
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "run", "--workflows", "no_such_mod_xyz.wf"])
    assert out.exit_code == 2, out.output
    assert "no module named 'no_such_mod_xyz.wf'" in out.output


def test_run_with_a_module_without_workflows_is_a_usage_error(runner: CliRunner) -> None:
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "run", "--workflows", "json"])
    assert out.exit_code == 2, out.output
    assert "defines no @workflow.defn class" in out.output


def test_run_with_a_module_that_fails_to_import_says_why(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_wf_mod.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raising_wf_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "run", "--workflows", "broken_wf_mod"])
    assert out.exit_code == 1, out.output
    assert "importing broken_wf_mod failed" in out.output
    assert "no_such_dependency_xyz" in out.output
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "run", "--workflows", "raising_wf_mod"])
    assert out.exit_code == 1, out.output
    assert "RuntimeError: boom at import" in out.output
    for name in ("broken_wf_mod", "raising_wf_mod"):
        sys.modules.pop(name, None)


def test_run_builds_a_node_from_the_settings_and_the_modules_workflows(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built: list[tuple[Settings, WorkflowRegistry]] = []
    providers: list[object] = []

    class FakeNode:
        def __init__(
            self, settings: Settings, registry: WorkflowRegistry, tracer_provider: object = None
        ) -> None:
            built.append((settings, registry))
            providers.append(tracer_provider)

        def run(self, stop: threading.Event | None = None) -> None:
            return None

    fake = types.ModuleType("orchestrator.node")
    fake.OrchestratorNode = FakeNode  # type: ignore[attr-defined]
    gc_tuned: list[bool] = []
    fake.tune_gc = lambda: gc_tuned.append(True)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchestrator.node", fake)
    out = runner.invoke(
        main,
        ["--bootstrap", NOWHERE, "--namespace", "shop", "--node-id", "n-1", "run",
         "--workflows", "tests.unit.sagas"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    ((settings, registry),) = built
    assert (settings.namespace, settings.node_id, settings.bootstrap_servers) == (
        "shop",
        "n-1",
        NOWHERE,
    )
    assert "three-steps" in registry.names()
    # Nowhere to export spans: the node makes none (it still passes trace context on).
    assert providers == [None]
    assert gc_tuned == [True]

    spans = tmp_path / "spans.jsonl"
    out = runner.invoke(
        main,
        ["--bootstrap", NOWHERE, "run", "--workflows", "tests.unit.sagas"],
        env={"SAGA_TRACES_FILE": str(spans)},
    )
    assert out.exit_code == 0, out.output
    assert providers[1] is not None, "with a span file the node records spans"


def _description(**changes: object) -> WorkflowDescription:
    t0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    base = WorkflowDescription(
        workflow_id="order-1",
        workflow_type="place-order",
        status=WorkflowStatus.COMPENSATED,
        current_step="compensated",
        started_at=t0,
        finished_at=t0 + timedelta(minutes=3, seconds=5),
        input=Payload(data=b'{"sku":"A"}'),
        result=None,
        error=ErrorInfo(type="ActivityError", message="card declined"),
        request_id="r",
        cancel_requested=False,
        events=(
            EventSummary(1, t0, "WorkflowStarted", "place-order started with {}"),
            EventSummary(2, t0 + timedelta(milliseconds=12), "ActivityScheduled", "reserve #1"),
            EventSummary(3, t0 + timedelta(minutes=3, seconds=5), "WorkflowFailed", "COMPENSATED"),
        ),
    )
    return WorkflowDescription(**{**base.__dict__, **changes})


def test_describe_output_shows_status_step_and_a_relative_timeline() -> None:
    text = render_description(_description())
    lines = text.splitlines()
    assert lines[0].split() == ["workflow", "order-1"]
    assert "status    COMPENSATED" in text
    assert "step      compensated" in text
    assert "error     ActivityError: card declined" in text
    assert 'input     {"sku": "A"}' in text
    timeline = [line.split()[:3] for line in lines[lines.index("events (3):") + 1 :]]
    assert timeline == [
        ["+0.000s", "#1", "WorkflowStarted"],
        ["+0.012s", "#2", "ActivityScheduled"],
        ["+3m05.000s", "#3", "WorkflowFailed"],
    ]


def test_describe_output_warns_about_gaps() -> None:
    assert "the history has gaps" in render_description(_description(complete=False))


# --------------------------------------------------------------------------- errors in one line


def _cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own: librdkafka writes to the process's stderr directly,
    which the in-process runner would not see."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_an_unreachable_broker_is_one_line_without_librdkafka_noise() -> None:
    done = _cli_process("--bootstrap", NOWHERE, "topics", "verify", "--timeout", "2")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"Error: could not read metadata from {NOWHERE}: Failed to get metadata: "
        "Local: Broker transport failure; "
        "is the broker running, and are --bootstrap / KAFKA_BOOTSTRAP_SERVERS right?"
    ]
    verbose = _cli_process("-v", "--bootstrap", NOWHERE, "topics", "verify", "--timeout", "2")
    assert verbose.returncode == 1
    lines = verbose.stderr.splitlines()
    assert any("orchestrator.librdkafka" in line and "Connection refused" in line for line in lines)
    assert lines[-1].startswith("Error: could not read metadata")


def test_run_on_an_unreachable_broker_does_not_suggest_creating_topics(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.topics import BrokerUnreachable

    class DeadBrokerNode:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def run(self) -> None:
            raise BrokerUnreachable(f"could not read metadata from {NOWHERE}: down")

    fake = types.ModuleType("orchestrator.node")
    fake.OrchestratorNode = DeadBrokerNode  # type: ignore[attr-defined]
    fake.tune_gc = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchestrator.node", fake)
    out = runner.invoke(main, ["--bootstrap", NOWHERE, "run", "--workflows", "tests.unit.sagas"])
    assert out.exit_code == 1, out.output
    assert "could not read metadata" in out.output
    assert "topics create" not in out.output


def test_an_unknown_librdkafka_key_is_one_line_naming_the_setting(runner: CliRunner) -> None:
    out = runner.invoke(main, ["describe", "wf-1"], env={"SAGA_KAFKA__NO_SUCH_KEY": "1"})
    assert out.exit_code == 2, out.output
    assert out.output.splitlines()[-1] == (
        "Error: invalid setting kafka (SAGA_KAFKA__<KEY>): librdkafka refuses it: "
        'No such configuration property: "no.such.key"'
    )
    assert out.exception is None or isinstance(out.exception, SystemExit)


def test_config_masks_every_secret_kafka_value(runner: CliRunner) -> None:
    env = {
        "SAGA_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SAGA_KAFKA__SASL_MECHANISM": "PLAIN",
        "SAGA_KAFKA__SASL_USERNAME": "bob",
        "SAGA_KAFKA__SASL_PASSWORD": "pw-1-secret",
        "SAGA_KAFKA__SSL_KEY_PASSWORD": "pw-2-secret",
        "SAGA_KAFKA__SASL_OAUTHBEARER_CLIENT_SECRET": "pw-3-secret",
        "SAGA_SASL_PASSWORD": "pw-4-secret",
    }
    out = runner.invoke(main, ["config"], env=env)
    assert out.exit_code == 0, out.output
    assert "-secret" not in out.output
    shown = json.loads(out.output)
    assert shown["kafka"]["security.protocol"] == "SASL_PLAINTEXT"
    assert shown["kafka"]["sasl.password"] == "**********"
    assert shown["sasl_password"] == "**********"


def test_run_with_a_state_dir_that_cannot_be_created_is_one_line(
    runner: CliRunner, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = runner.invoke(
        main,
        ["--bootstrap", NOWHERE, "--state-dir", str(blocker / "state"), "run",
         "--workflows", "tests.unit.sagas"],
    )  # fmt: skip
    assert out.exit_code == 1, out.output
    assert out.output.splitlines() == [
        f"Error: cannot create the state dir {blocker / 'state' / 'saga'}: Not a directory; "
        "set --state-dir / SAGA_STATE_DIR to a directory this user can write"
    ]


def test_a_locked_state_dir_is_one_line_from_run(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from orchestrator._local_db import open_local_db

    held = open_local_db(tmp_path / "saga" / "p0")

    class LockedNode:
        def __init__(self, settings: Settings, *args: object, **kwargs: object) -> None:
            self.settings = settings

        def run(self) -> None:
            open_local_db(self.settings.state_dir / "saga" / "p0")

    fake = types.ModuleType("orchestrator.node")
    fake.OrchestratorNode = LockedNode  # type: ignore[attr-defined]
    fake.tune_gc = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchestrator.node", fake)
    try:
        out = runner.invoke(
            main,
            ["--bootstrap", NOWHERE, "--state-dir", str(tmp_path), "run",
             "--workflows", "tests.unit.sagas"],
        )  # fmt: skip
    finally:
        held.close()
    assert out.exit_code == 1, out.output
    (line,) = [x for x in out.output.splitlines() if x.startswith("Error:")]
    assert f"the state dir {tmp_path / 'saga' / 'p0'} is in use by another process" in line
    assert "Traceback" not in out.output


def test_version_names_the_installed_distribution() -> None:
    from importlib.metadata import version

    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == f"orchestrator, version {version('kafka-saga-orchestrator')}"
