"""A node whose static inbox membership is fenced starts its processor over and goes on.

On the 3-broker cluster (tests/cluster) killing the group coordinator's broker made librdkafka
rejoin a node's static member under a new member id while a request with the old one was in
flight: the coordinator fenced the node's own consumer, which reported a fatal error. The node
logged it and read nothing more, for ever. Here a short-lived consumer with the node's
``group.instance.id`` fences it the same way; the node must start over (as a restart would) and
run the next saga.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from contracts.envelopes import WorkflowStatus
from orchestrator.client import Client
from orchestrator.errors import NodeStopped
from orchestrator.kafka_config import consumer_config
from orchestrator.node import OrchestratorNode

from .kit import Trip, TripResult, build, create_topics, settings_for
from .procs import service_threads

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def test_a_fenced_static_member_starts_the_node_over(
    kafka_bootstrap: str, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    began = time.monotonic()
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state")
    create_topics(kit, settings)
    node = OrchestratorNode(settings, kit.registry)
    stop = threading.Event()
    stopped: list[NodeStopped] = []

    def run() -> None:
        try:
            node.run(stop)
        except NodeStopped as exc:
            stopped.append(exc)

    caplog.set_level(logging.WARNING, logger="orchestrator.node")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        with service_threads(kit, settings), Client(settings) as client:
            first = client.start("trip", Trip(), workflow_id="before-fence")
            assert first.result(TripResult, timeout=60).refs

            # A twin with the node's static identity joins: the coordinator fences the node.
            group = f"{namespace}.orchestrator"
            twin = Consumer(
                consumer_config(
                    kafka_bootstrap,
                    group,
                    extra={
                        "group.instance.id": f"{group}.{settings.node_id}",
                        "session.timeout.ms": 6000,
                    },
                )
            )
            twin.subscribe([settings.inbox])
            deadline = time.monotonic() + 30
            while not twin.assignment() and time.monotonic() < deadline:
                twin.poll(0.2)
            assert twin.assignment(), "the twin never joined"
            twin.close()  # gone; its membership expires after its session timeout

            second = client.start("trip", Trip(), workflow_id="after-fence")
            assert second.result(TripResult, timeout=90).refs
            assert client.describe("after-fence").status is WorkflowStatus.COMPLETED
    finally:
        stop.set()
        thread.join(60)
    assert not stopped, f"the node stopped: {stopped}"
    restarts = [
        r.getMessage() for r in caplog.records if "starting the processor over" in r.message
    ]
    assert restarts, "the node was not fenced (the test proves nothing)"
    print(f"\nnode fenced as a static member, started over, ran the next saga; "
          f"{time.monotonic() - began:.1f}s")  # fmt: skip
