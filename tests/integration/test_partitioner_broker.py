"""Our partition_for picks the partition librdkafka's murmur2_random partitioner picks.

The orchestrator writes history events to an explicit partition computed with ``partition_for``
from the workflow id, while clients and services produce to the inbox with the key alone. Both
must agree, or a workflow's history and its input land in different partitions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError, Message, Producer

from orchestrator._partitioner import murmur2, partition_for
from orchestrator.topics import TopicAdmin, ensure_service_topic

pytestmark = pytest.mark.broker

N = 6

KEYS = [
    *(f"wf-{i}" for i in range(100)),
    *(f"order-{i:08x}-{i * 7919 % 10007}" for i in range(50)),
    "",
    "a",
    "ab",
    "abc",
    "place-order/2f1c9a4e-7d5b-4c1e-9b3a-0c6d8e2f4a1b",
    "ünïcødé-wörkflow-✓",
]


@pytest.fixture
def topic(kafka_bootstrap: str, namespace: str) -> Iterator[str]:
    name = f"{namespace}.keys"
    ensure_service_topic(kafka_bootstrap, name, N)
    yield name
    TopicAdmin(kafka_bootstrap).delete([name])


def test_broker_assigned_partitions_match_partition_for(kafka_bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    delivered: dict[str, int] = {}
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
            return
        key = msg.key()
        assert isinstance(key, bytes)
        delivered[key.decode()] = msg.partition() or 0

    for key in KEYS:
        # No partition argument: librdkafka's partitioner decides.
        producer.produce(topic, key=key.encode(), value=b"v", on_delivery=on_delivery)
    assert producer.flush(30) == 0

    assert errors == []
    assert set(delivered) == set(KEYS)
    assert {k: p for k, p in delivered.items() if p != partition_for(k, N)} == {}
    # partition_for may use librdkafka's own hash function; check the pure-Python transcription of
    # Java's Utils.murmur2 with Java's toPositive(hash) % n as well.
    java = {k: (murmur2(k.encode()) & 0x7FFFFFFF) % N for k in KEYS}
    assert {k: p for k, p in delivered.items() if p != java[k]} == {}
    # The keys spread over every partition, so the agreement above is not a coincidence of one.
    assert set(delivered.values()) == set(range(N))
