"""A 3-node KRaft cluster of the tests' own (``deploy/kafka/broker.py``), which they may kill.

One cluster for the session: starting three JVMs takes 15-30 s on two cores. Its ports are found
free at start, its data lives in the session's temporary directory, and it is killed at the end.
It is started even when ``KAFKA_BOOTSTRAP_SERVERS`` names another cluster: this one is private.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from deploy.kafka import broker


def free_port_run(count: int) -> int:
    """A port P such that P .. P + count - 1 are all free (the cluster's listeners)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + count < 65535 and all(broker._port_free(base + n) for n in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.ClusterLayout]:
    nodes = 3
    cluster = broker.ClusterLayout(
        nodes, free_port_run(2 * nodes), "384m", tmp_path_factory.mktemp("kafka-cluster")
    )
    began = time.monotonic()
    broker.start_cluster(cluster)
    print(f"\n3-node cluster up in {time.monotonic() - began:.1f}s at {cluster.bootstrap}")
    try:
        yield cluster
    finally:
        # Thrown away with its temporary directory: no controlled shutdown to wait for.
        for node_id in cluster.node_ids:
            broker.kill_node(cluster, node_id)
