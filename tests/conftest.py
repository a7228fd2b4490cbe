"""Session-wide Kafka broker and per-test namespaces.

The broker comes from, in order: ``KAFKA_BOOTSTRAP_SERVERS``; a testcontainers Kafka when a
Docker engine answers; else the project's own single-node broker (``deploy/kafka/broker.py``),
started once and left running for the next run.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterator

import pytest

from deploy.kafka import broker


def _docker_engine_answers() -> bool:
    """A Docker engine listens on its socket (docker's own client leaks a socket when none does)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return True  # a remote engine: let testcontainers try
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"200" in sock.recv(64)
        except OSError:
            return False


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
