"""An operator reads the dead letters and replays one once its cause is gone: a signal that
arrived before its workflow existed is dead-lettered UnknownWorkflow; after the start, `orchestrator
dlq replay` sends it again and the workflow goes on with it."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from contracts import codec
from contracts.envelopes import SignalWorkflow
from orchestrator._dlq import FoundLetter, ReplayRefused, read_letters, replay
from orchestrator._kafka_config import producer_config
from orchestrator._payloads import to_payload
from orchestrator.cli import main
from orchestrator.settings import Settings

from .kit import Approval, Trip, TripResult
from .stack import Stack

pytestmark = pytest.mark.broker


def _cli(settings: Settings, *args: str) -> list[str]:
    return ["--bootstrap", settings.bootstrap_servers, "--namespace", settings.namespace, *args]


def _letters(settings: Settings, error_type: str, timeout: float = 20.0) -> list[FoundLetter]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [f for f in read_letters(settings) if f.letter.error_type == error_type]
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {error_type} dead letter within {timeout}s")


def test_a_dead_letter_is_listed_shown_and_replayed_once_its_cause_is_gone(stack: Stack) -> None:
    settings = stack.settings
    early = SignalWorkflow(
        workflow_id="early", signal_name="approve", request_id="sig-early",
        payload=to_payload(Approval(by="ops")), sent_at_ms=int(time.time() * 1000),
    )  # fmt: skip
    producer = Producer(producer_config(settings.bootstrap_servers))
    producer.produce(settings.inbox, key=b"early", value=codec.encode(early))
    producer.flush(10)
    (found,) = _letters(settings, "UnknownWorkflow")
    runner = CliRunner()

    listed = runner.invoke(main, _cli(settings, "dlq", "list"))
    assert listed.exit_code == 0, listed.output
    assert found.where in listed.output and "UnknownWorkflow" in listed.output
    as_json = runner.invoke(main, _cli(settings, "dlq", "list", "--json"))
    assert json.loads(as_json.output.splitlines()[0])["error_type"] == "UnknownWorkflow"
    shown = runner.invoke(main, _cli(settings, "dlq", "show", found.where))
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.output)["record"]
    assert record["signal_name"] == "approve" and record["workflow_id"] == "early"
    missing = runner.invoke(main, _cli(settings, "dlq", "show", "0:999999"))
    assert missing.exit_code != 0 and "no dead letter at 0:999999" in missing.output

    handle = stack.client.start("trip", Trip(wait_signal=True), workflow_id="early")
    replayed = runner.invoke(main, _cli(settings, "dlq", "replay", found.where))
    assert replayed.exit_code == 0, replayed.output
    assert f"replayed {found.where} (UnknownWorkflow) to {settings.inbox}" in replayed.output
    assert handle.result(TripResult, timeout=30).approved_by == "ops"


def test_a_letter_whose_copy_was_cut_is_not_replayed(stack: Stack) -> None:
    settings = stack.settings
    producer = Producer(producer_config(settings.bootstrap_servers))
    producer.produce(settings.inbox, key=b"huge", value=b"\x00" * 950_000)
    producer.flush(10)
    (found,) = _letters(settings, "Oversized")
    assert found.cut
    with pytest.raises(ReplayRefused, match="cut copy"):
        replay(settings, found)
