"""Session-wide Kafka broker and per-test namespaces.

The broker comes from, in order: ``KAFKA_BOOTSTRAP_SERVERS``; a testcontainers Kafka when a
Docker engine answers; else the project's own single-node broker (``deploy/kafka/broker.py``),
started once and left running for the next run. The topics of the namespaces handed out are
deleted when the session ends (``SAGA_TEST_KEEP_TOPICS=1`` keeps them).
"""

from __future__ import annotations

import contextlib
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


# The namespaces handed out in this session: their topics are deleted when it ends, so a broker
# that outlives the run (the development broker, a shared cluster) does not collect them (one
# had 8,559 partitions of old test namespaces, and took 15 s instead of 2 to restart).
_USED_NAMESPACES: list[str] = []


def _delete_session_topics(bootstrap: str) -> None:
    """Delete the topics of this session's namespaces; ``SAGA_TEST_KEEP_TOPICS=1`` keeps them
    (to look at a failed test's records). Best effort: a cleanup never fails the run."""
    if not _USED_NAMESPACES or os.environ.get("SAGA_TEST_KEEP_TOPICS") == "1":
        return
    from confluent_kafka.admin import AdminClient

    prefixes = tuple(p for ns in _USED_NAMESPACES for p in (f"{ns}.", f"{ns}-"))
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefixes)]
        if mine:
            for future in admin.delete_topics(mine, operation_timeout=30).values():
                with contextlib.suppress(Exception):
                    future.result(60)
    except Exception as exc:  # the broker was stopped by the last test, say
        print(f"\ntest topics not deleted: {exc}")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = broker.external_bootstrap()
    if external:
        yield external
        _delete_session_topics(external)
        return
    if os.environ.get("SAGA_TEST_TESTCONTAINERS", "1") == "1" and _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    bootstrap = broker.start(broker.BrokerLayout.from_env())
    yield bootstrap
    _delete_session_topics(bootstrap)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A topic-name prefix no other test uses, so tests never see each other's records."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40].strip("-")
    used = f"t-{name}-{uuid.uuid4().hex[:8]}"
    _USED_NAMESPACES.append(used)
    return used
