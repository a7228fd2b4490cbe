"""/ready, /healthz, /metrics of a real node and service on OS-chosen ports: ready once the
partitions are restored, the workflow and partition gauges match the sagas run, and a fenced node
says it is unhealthy."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from confluent_kafka import Producer

from orchestrator._kafka_config import producer_config
from orchestrator._metrics import NodeMetrics
from orchestrator.client import Client
from orchestrator.errors import NodeStopped, WorkflowFailedError
from orchestrator.node import OrchestratorNode
from orchestrator.service import Service
from orchestrator.settings import Settings

from .kit import (
    Kit,
    ThreadStack,
    Trip,
    TripResult,
    build,
    create_topics,
    make_service,
    settings_for,
)
from .test_metrics import Samples, scrape, value

pytestmark = pytest.mark.broker

T = TypeVar("T")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(what: str, probe: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    seen = probe()
    while not done(seen):
        assert time.monotonic() < deadline, f"{what}: last seen {seen!r}"
        time.sleep(0.1)
        seen = probe()
    return seen


class HealthStack(ThreadStack):
    """The node on port 0 with a census every 0.2 s; the first service on port 0 too."""

    def __init__(self, kit: Kit, settings: Settings) -> None:
        super().__init__(kit, settings)
        self.node: OrchestratorNode | None = None
        self.services: list[Service] = []

    def make_node(self) -> OrchestratorNode:
        self.node = OrchestratorNode(
            self.settings, self.kit.registry, metrics=NodeMetrics(census_every_s=0.2)
        )
        return self.node

    def make_service(self, index: int, name: str) -> Service:
        port = 0 if index == 0 else None
        service = make_service(
            self.kit, name, self.settings.model_copy(update={"metrics_port": port})
        )
        self.services.append(service)
        return service

    def node_port(self) -> int:
        assert self.node is not None
        return port_of(self.node)


def port_of(node: OrchestratorNode) -> int:
    """The node's HTTP port, once it serves."""
    port = wait_for("node port", lambda: node.http_port, lambda p: p is not None, 30)
    assert port is not None
    return port


@pytest.fixture
def stack(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[HealthStack]:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state", metrics_port=0)
    create_topics(kit, settings)
    stack = HealthStack(kit, settings)
    stack.start_services()
    stack.start_node()
    try:
        yield stack
    finally:
        stack.close()


def workflows(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "saga_workflows"
    }


def test_ready_after_restore_gauges_match_the_sagas_and_unknown_paths_are_404(
    stack: HealthStack,
) -> None:
    port = stack.node_port()
    answers: list[tuple[int, str]] = []

    def ready() -> tuple[int, str]:
        answers.append(get(port, "/ready"))
        return answers[-1]

    wait_for("node /ready", ready, lambda a: a[0] == 200, 60)
    # Before 200, only the reasons of a node that waits for or restores its partitions.
    assert {a for a in answers if a[0] != 200} <= {
        (503, "waiting for a partition assignment\n"),
        (503, "restoring assigned partitions\n"),
    }
    assert answers[-1] == (200, "ready\n")
    assert get(port, "/healthz") == (200, "ok\n")
    for path in ("/", "/metricz", "/ready/x", "/healthz/"):
        assert get(port, path)[0] == 404, path

    with Client(stack.settings) as client:
        handles = {
            wf: client.start("trip", trip, workflow_id=wf)
            for wf, trip in (
                ("ok-1", Trip()),
                ("ok-2", Trip()),
                ("ok-3", Trip()),
                ("fail-2", Trip(fail_at=2)),
                ("waits", Trip(wait_signal=True)),  # stays RUNNING
            )
        }
        for wf in ("ok-1", "ok-2", "ok-3"):
            handles[wf].result(TripResult, timeout=30)
        with pytest.raises(WorkflowFailedError):
            handles["fail-2"].result(TripResult, timeout=30)

    expected = {"RUNNING": 1.0, "COMPLETED": 3.0, "COMPENSATED": 1.0}
    samples = wait_for(
        "saga_workflows", lambda: scrape(port), lambda s: workflows(s) == expected, 20
    )
    assert value(samples, "saga_owned_partitions") == stack.settings.partitions
    assert value(samples, "saga_workflows_started_total") == 5
    assert get(port, "/healthz") == (200, "ok\n")

    service_port = wait_for(
        "service port", lambda: stack.services[0].http_port, lambda p: p is not None, 30
    )
    assert service_port is not None
    wait_for("service /ready", lambda: get(service_port, "/ready"), lambda a: a[0] == 200, 30)
    assert get(service_port, "/healthz") == (200, "ok\n")
    assert (
        value(
            scrape(service_port),
            "saga_service_commands_total",
            activity=f"{stack.kit.prefix}-a.do",
            outcome="SUCCESS",
        )
        == 5
    )


def test_a_fenced_node_stops_and_says_why(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    """Another producer with the node's transactional id (a second node with the same
    SAGA_NODE_ID): the node neither idles nor fences it back, it stops with one clear reason."""
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state", metrics_port=0)
    create_topics(kit, settings)
    node = OrchestratorNode(settings, kit.registry)
    stopped: list[NodeStopped] = []

    def run() -> None:
        try:
            node.run(threading.Event())
        except NodeStopped as exc:
            stopped.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    port = port_of(node)
    wait_for("node /ready", lambda: get(port, "/ready"), lambda a: a[0] == 200, 60)
    txn_id = f"{settings.namespace}.orchestrator.{settings.node_id}"
    intruder = Producer(producer_config(settings.bootstrap_servers, transactional_id=txn_id))
    intruder.init_transactions(30)
    with Client(settings) as client:
        client.start("trip", Trip(), workflow_id="after-fence")
    thread.join(60)
    assert not thread.is_alive(), "the fenced node went on running"
    assert len(stopped) == 1
    assert "fenced by another process with the same node id" in str(stopped[0])
    assert node.health.failed == str(stopped[0])


def test_a_node_assigned_no_partition_is_ready(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    kit = build(namespace)
    base = settings_for(kafka_bootstrap, namespace, tmp_path / "state", metrics_port=0)
    settings = base.model_copy(update={"partitions": 1})
    create_topics(kit, settings)
    nodes = [
        OrchestratorNode(
            settings.model_copy(update={"node_id": node_id, "state_dir": tmp_path / node_id}),
            kit.registry,
        )
        for node_id in ("n1", "n2")
    ]
    stops = [threading.Event() for _ in nodes]
    threads = [
        threading.Thread(target=node.run, args=(stop,), daemon=True)
        for node, stop in zip(nodes, stops, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        ports = [port_of(node) for node in nodes]

        def observe() -> list[tuple[int, float]]:
            return sorted(
                (get(p, "/ready")[0], value(scrape(p), "saga_owned_partitions")) for p in ports
            )

        # Once the group settles, one node owns the only partition; the other owns none and is
        # ready all the same.
        wait_for("both ready", observe, lambda seen: seen == [(200, 0.0), (200, 1.0)], 60)
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join(30)
