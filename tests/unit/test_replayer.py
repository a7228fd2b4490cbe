"""Replay testing without a broker: ``orchestrator.testing.Replayer`` and ``orchestrator replay
--file`` on exported histories of the ``evolving`` workflow (v1 runs, v2 runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from contracts.envelopes import HistoryEvent, WorkflowStatus
from orchestrator.cli import main
from orchestrator.errors import NonDeterminismError
from orchestrator.testing import (
    HISTORY_FORMAT,
    HistoryFileError,
    Replayer,
    dump_histories,
    load_histories,
)

from .evolving.v1 import EvolvingV1
from .evolving.v2 import EvolvingV2
from .evolving.v3 import EvolvingV3
from .sagas import ThreeSteps
from .test_versioning import V1, V2, Node


def _finished_v1_run() -> list[HistoryEvent]:
    node = Node("v1-run", V1)
    node.start()
    node.signal()
    assert node.run.state.status is WorkflowStatus.COMPLETED
    return node.history


def _waiting_v2_run() -> list[HistoryEvent]:
    node = Node("v2-run", V2)
    node.start()  # a done, b done, waits for the signal
    return node.history


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    path = tmp_path / "histories.json"
    document = dump_histories(
        {"v1-run": _finished_v1_run(), "v2-run": _waiting_v2_run()}, namespace="shop"
    )
    path.write_text(json.dumps(document))
    return path


def test_the_exported_file_round_trips_and_reads_like_a_timeline(exported: Path) -> None:
    document = json.loads(exported.read_text())
    assert document["format"] == HISTORY_FORMAT
    v2 = document["histories"][1]
    assert (v2["workflow_id"], v2["workflow_type"]) == ("v2-run", "evolving")
    assert [e["kind"] for e in v2["events"]][:5] == [
        "WorkflowStarted",
        "ActivityScheduled",
        "ActivityCompleted",
        "MarkerRecorded",
        "ActivityScheduled",
    ]
    assert v2["events"][3]["summary"] == "patch add-b"
    assert load_histories(exported) == [_finished_v1_run(), _waiting_v2_run()]


def test_code_that_keeps_the_patch_replays_both_generations(exported: Path) -> None:
    results = Replayer([EvolvingV2]).replay_file(exported)
    assert [(r.workflow_id, r.status) for r in results] == [
        ("v1-run", WorkflowStatus.COMPLETED),
        ("v2-run", WorkflowStatus.RUNNING),
    ]


def test_dropping_the_patch_too_early_is_caught_with_the_source_line(exported: Path) -> None:
    replayer = Replayer([EvolvingV3])
    (v1_run, v2_run) = load_histories(exported)
    assert replayer.replay(v2_run).status is WorkflowStatus.RUNNING
    with pytest.raises(NonDeterminismError) as info:
        replayer.replay(v1_run)
    message = str(info.value)
    assert "activity b.do #2" in message
    assert "evolving/v3.py:" in message  # the line of workflow code that asks for b


def test_the_old_code_rejects_a_history_with_the_marker_and_says_where_it_waits(
    exported: Path,
) -> None:
    (_, v2_run) = load_histories(exported)
    with pytest.raises(NonDeterminismError) as info:
        Replayer([EvolvingV1]).replay(v2_run)
    message = str(info.value)
    assert "history event 4 is patch marker 'add-b'" in message
    assert "asks for nothing (it waits at " in message and "evolving/v1.py:" in message


def test_replayer_refuses_other_types_gaps_and_other_files(tmp_path: Path) -> None:
    history = _finished_v1_run()
    with pytest.raises(LookupError, match="this replayer knows: three-steps"):
        Replayer([ThreeSteps]).replay(history)
    with pytest.raises(ValueError, match="event 3 is missing"):
        Replayer([EvolvingV1]).replay([e for e in history if e.event_seq != 3])
    other = tmp_path / "other.json"
    other.write_text('{"events": []}')
    with pytest.raises(HistoryFileError, match="not an exported history"):
        load_histories(other)


def test_cli_replay_of_a_file_reports_each_history_and_exits_1_on_a_difference(
    exported: Path,
) -> None:
    runner = CliRunner()

    def replay(version: str, *more: str) -> list[str]:
        return [
            "replay",
            "--workflows",
            f"tests.unit.evolving.{version}",
            "--file",
            str(exported),
            *more,
        ]

    ok = runner.invoke(main, replay("v2"))
    assert ok.exit_code == 0, ok.output
    assert "OK      v1-run (evolving, " in ok.output
    assert "OK      v2-run (evolving, " in ok.output
    assert "2 ok, 0 non-deterministic" in ok.output

    bad = runner.invoke(main, replay("v3"))
    assert bad.exit_code == 1, bad.output
    assert "FAILED  v1-run: " in bad.output and "evolving/v3.py:" in bad.output
    assert "OK      v2-run" in bad.output
    assert "1 ok, 1 non-deterministic" in bad.output

    limited = runner.invoke(main, replay("v3", "--limit", "1", "--type", "evolving"))
    assert limited.exit_code == 1
    assert "v2-run" not in limited.output

    unknown = runner.invoke(main, replay("v2", "--type", "nope"))
    assert unknown.exit_code == 2
    assert "'nope' is not defined in tests.unit.evolving.v2" in unknown.output
