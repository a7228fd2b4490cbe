"""Session-wide Kafka broker and per-test namespaces.

The broker comes from, in order: ``KAFKA_BOOTSTRAP_SERVERS``; a testcontainers Kafka when a
Docker engine answers; else the project's own single-node broker (``deploy/kafka/broker.py``),
started once and left running for the next run.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from deploy.kafka import broker


def _docker_engine_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = broker.external_bootstrap()
    if external:
        yield external
        return
    if os.environ.get("SAGA_TEST_TESTCONTAINERS", "1") == "1" and _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    yield broker.start(broker.BrokerLayout.from_env())


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A topic-name prefix no other test uses, so tests never see each other's records."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:8]}"
