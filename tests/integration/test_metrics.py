"""The /metrics endpoints of a node and of its services, scraped over HTTP: the counters match
what the test did."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from orchestrator._kafka_config import producer_config
from orchestrator.errors import WorkflowFailedError

from .kit import Trip, build, create_topics, settings_for
from .test_tracing import ObservedStack

pytestmark = pytest.mark.broker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    """A port the OS says is free now (it is released for the server to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def measured(
    kafka_bootstrap: str, namespace: str, tmp_path: Path, ports: tuple[int, int]
) -> Iterator[ObservedStack]:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state", metrics_port=ports[0])
    create_topics(kit, settings)
    stack = ObservedStack(kit, settings, service_metrics_port=ports[1])
    stack.start_services()
    stack.start_node()
    try:
        yield stack
    finally:
        stack.close()


def test_scraped_counters_match_what_the_test_did(
    measured: ObservedStack, ports: tuple[int, int]
) -> None:
    p = measured.kit.prefix
    node_port, service_port = ports
    for wf, trip in (
        ("ok-1", Trip()),
        ("ok-2", Trip()),
        ("flaky-1", Trip(flaky_at=1, flaky=1)),
        ("fail-2", Trip(fail_at=2)),
    ):
        measured.start(trip, wf)
    for wf in ("ok-1", "ok-2", "flaky-1"):
        measured.result(wf)
    with pytest.raises(WorkflowFailedError):
        measured.result("fail-2")
    producer = Producer(producer_config(measured.settings.bootstrap_servers))
    producer.produce(measured.settings.inbox, key=b"junk", value=b"not an envelope")
    producer.flush(10)

    deadline = time.monotonic() + 20
    node = scrape(node_port)
    while value(node, "saga_dead_letters_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        node = scrape(node_port)

    assert value(node, "saga_workflows_started_total") == 4
    assert value(node, "saga_workflows_finished_total", status="COMPLETED") == 3
    assert value(node, "saga_workflows_finished_total", status="COMPENSATED") == 1
    assert total(node, "saga_workflows_finished_total") == 4
    assert value(node, "saga_dead_letters_total") == 1
    attempts = "saga_activity_attempts_total"
    assert value(node, attempts, activity=f"{p}-a.do", compensation="false") == 5  # 4 + 1 retry
    assert value(node, attempts, activity=f"{p}-b.do", compensation="false") == 4
    assert value(node, attempts, activity=f"{p}-c.do", compensation="false") == 3
    assert value(node, attempts, activity=f"{p}-a.undo", compensation="true") == 1
    assert total(node, attempts) == 13
    # Every attempt ended with a reply: 12 successes or refusals, 1 retryable failure.
    assert total(node, "saga_step_seconds_count") == 13
    assert total(node, "saga_step_seconds_count", outcome="ActivityAttemptFailed") == 1
    assert total(node, "saga_step_seconds_count", outcome="ActivityFailed") == 1
    assert value(node, "saga_restore_seconds_count") == measured.settings.partitions
    assert value(node, "saga_transactions_total", result="committed") >= 1
    # Committed transactions are timed (the node may commit another one while it is scraped,
    # so the two counts are not compared), each within the 10 s the broker allows.
    timed = value(node, "saga_transaction_seconds_count")
    assert timed >= 1
    assert 0 < value(node, "saga_transaction_seconds_sum") < timed * 10
    lags = [v for (n, _), v in node.items() if n == "saga_inbox_consumer_lag"]
    assert len(lags) == measured.settings.partitions and all(v >= 0 for v in lags)

    svc = scrape(service_port)
    commands = "saga_service_commands_total"
    assert value(svc, commands, activity=f"{p}-a.do", outcome="RETRYABLE_FAILURE") == 1
    assert value(svc, commands, activity=f"{p}-a.do", outcome="SUCCESS") == 4
    assert value(svc, commands, activity=f"{p}-b.do", outcome="BUSINESS_FAILURE") == 1
    assert value(svc, commands, activity=f"{p}-a.undo", outcome="SUCCESS") == 1
    assert total(svc, commands) == 13
    assert value(svc, "saga_dead_letters_total") == 0
