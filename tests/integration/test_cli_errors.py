"""The ``orchestrator`` command's errors against a real broker: what a person reads, and exit codes.

The test plays the orchestrator where it needs to (it writes history events), as in
``test_client.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from contracts.codec import decode_as
from contracts.envelopes import CancelWorkflow, SignalWorkflow, WorkflowCompleted
from orchestrator._kafka_config import producer_config
from orchestrator._local_db import open_local_db
from orchestrator._partitioner import partition_for
from orchestrator._payloads import to_payload
from orchestrator.cli import main
from orchestrator.settings import Settings
from orchestrator.topics import delete_topics, ensure_topics
from tests.integration.test_client import (
    N,
    _cli,
    _put_events,
    _read_partition,
    _scheduled,
    _started,
    make_settings,
)


@pytest.fixture
def settings(kafka_bootstrap: str, namespace: str) -> Iterator[Settings]:
    ensure_topics(kafka_bootstrap, namespace, N)
    yield make_settings(kafka_bootstrap, namespace=namespace, partitions=N)
    delete_topics(kafka_bootstrap, namespace)


@pytest.fixture
def producer(settings: Settings) -> Iterator[Producer]:
    p = Producer(producer_config(settings.bootstrap_servers))
    yield p
    p.flush(10)


def _inbox(settings: Settings, workflow_id: str, want: int) -> list[bytes]:
    partition = partition_for(workflow_id, N)
    msgs = _read_partition(settings.bootstrap_servers, settings.inbox, partition, want)
    return [m.value() or b"" for m in msgs]


def test_signal_and_cancel_refuse_an_unknown_workflow_and_send_nothing(
    settings: Settings,
) -> None:
    runner = CliRunner()
    for args in (["signal", "ghost", "approve"], ["cancel", "ghost"]):
        out = runner.invoke(main, _cli(settings, *args))
        assert out.exit_code == 1, out.output
        assert "no workflow 'ghost'" in out.output
        assert "was not sent" in out.output
    assert _inbox(settings, "ghost", want=1) == []
    # --force sends it anyway (e.g. right after a start the node has not processed yet).
    out = runner.invoke(main, _cli(settings, "signal", "ghost", "approve", "--force"))
    assert out.exit_code == 0, out.output
    assert "not applied yet" in out.output
    (sent,) = _inbox(settings, "ghost", want=1)
    assert decode_as(sent, SignalWorkflow).signal_name == "approve"


def test_signal_and_cancel_refuse_a_finished_workflow(
    settings: Settings, producer: Producer
) -> None:
    done = WorkflowCompleted(result=to_payload({"ok": True}))
    _put_events(producer, settings, "done-1", [_started(), _scheduled(), done])
    runner = CliRunner()
    for args in (["signal", "done-1", "approve"], ["cancel", "done-1"]):
        out = runner.invoke(main, _cli(settings, *args))
        assert out.exit_code == 1, out.output
        assert "workflow done-1 has already ended COMPLETED" in out.output
    assert _inbox(settings, "done-1", want=1) == []


def test_signal_and_cancel_to_a_running_workflow_say_sent_not_applied(
    settings: Settings, producer: Producer
) -> None:
    _put_events(producer, settings, "live-1", [_started(), _scheduled()])
    runner = CliRunner()
    out = runner.invoke(main, _cli(settings, "signal", "live-1", "approve"))
    assert out.exit_code == 0, out.output
    assert out.output.startswith("sent signal approve to live-1 (request ")
    assert "not applied yet" in out.output
    out = runner.invoke(main, _cli(settings, "cancel", "live-1", "--reason", "r"))
    assert out.exit_code == 0, out.output
    assert "not applied yet" in out.output
    sent = _inbox(settings, "live-1", want=2)
    assert decode_as(sent[0], SignalWorkflow).signal_name == "approve"
    assert decode_as(sent[1], CancelWorkflow).reason == "r"


def test_a_second_node_on_a_held_state_dir_stops_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    # What a first `orchestrator run` on the same state dir holds: its partitions' RocksDB.
    state = tmp_path / "state"
    held = [open_local_db(state / settings.namespace / f"p{n}") for n in range(N)]
    try:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *_cli(settings),
             "--state-dir", str(state), "--node-id", "second", "run",
             "--workflows", "tests.unit.sagas"],
            capture_output=True, text=True, timeout=120, env=dict(os.environ),
        )  # fmt: skip
    finally:
        for db in held:
            db.close()
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert "is in use by another process (its RocksDB lock is held)" in errors[0]
    assert "Traceback" not in done.stderr
    assert time.monotonic() - began < 110
