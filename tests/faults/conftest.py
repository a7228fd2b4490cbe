"""Fixtures for fault tests: a broker of the test's own, which the test may stop and start.

Stopping the session broker would break every other test, so a fault test that stops a broker
gets a private one (own port, own data dir) from the same jars.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.kafka import broker


def free_port_pair() -> int:
    """A port P such that P and P + 1 (the controller's) are free, as the OS hands them out."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


@dataclass
class PrivateBroker:
    layout: broker.BrokerLayout

    @property
    def bootstrap(self) -> str:
        return self.layout.bootstrap

    def start(self) -> None:
        broker.start(self.layout)

    def stop(self) -> None:
        broker.stop(self.layout)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    if broker.external_bootstrap():
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS names a cluster this test may not stop")
    port = free_port_pair()
    handle = PrivateBroker(broker.BrokerLayout(port, port + 1, "384m", tmp_path / "kafka"))
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()
