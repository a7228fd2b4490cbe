"""A commit that timed out but went through: the node restores the batch it cannot see.

On the 3-broker cluster (tests/cluster) a broker kill made a node's ``commit_transaction`` time
out ("retry call to resume") while the coordinator moved, after which the abort failed and the
node replaced its producer. The transaction had committed: its events were on the history topic
and its inbox offsets committed, but the node had dropped the batch from memory and its stores
never got it, so the sagas of that batch ignored their next replies for ever (two orders without
a result). Here the node's producer commits for real and then reports that timeout, once, on the
transaction that starts a saga; the saga must still finish.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from contracts.envelopes import WorkflowStatus
from orchestrator._engine import processor as processor_module
from orchestrator.client import Client
from orchestrator.node import OrchestratorNode

from .kit import Trip, TripResult, build, create_topics, settings_for
from .procs import service_threads

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def test_a_commit_that_timed_out_but_went_through_is_not_lost(
    kafka_bootstrap: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    armed = threading.Event()
    fired: list[float] = []

    class CommitsThenTimesOut(Producer):
        def commit_transaction(self, timeout: float = -1) -> None:
            super().commit_transaction(timeout)
            if armed.is_set() and not fired:
                fired.append(time.monotonic())
                raise KafkaException(
                    KafkaError(
                        KafkaError._TIMED_OUT,
                        "injected: timed out waiting for operation to finish, retry call to resume",
                    )
                )

    monkeypatch.setattr(processor_module, "Producer", CommitsThenTimesOut)
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state")
    create_topics(kit, settings)
    node = OrchestratorNode(settings, kit.registry)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    caplog.set_level(logging.WARNING, logger="orchestrator._engine.processor")
    thread.start()
    try:
        with service_threads(kit, settings), Client(settings) as client:
            first = client.start("trip", Trip(), workflow_id="before")
            assert first.result(TripResult, timeout=60).refs
            armed.set()  # the next commit is the one that starts this saga
            second = client.start("trip", Trip(), workflow_id="unsettled")
            assert second.result(TripResult, timeout=60).refs
            assert client.describe("unsettled").status is WorkflowStatus.COMPLETED
    finally:
        stop.set()
        thread.join(60)
    assert fired, "the timeout was never injected (the test proves nothing)"
    assert any("again from the history" in r.getMessage() for r in caplog.records)
