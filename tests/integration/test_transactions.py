"""What the engine relies on from the broker: transactions, KIP-447 offsets, read_committed."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator.topics import ensure_service_topic

pytestmark = pytest.mark.broker


def _drain(consumer: Consumer, want: int, timeout: float = 15.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=100, timeout=0.2):
            assert msg.error() is None, msg.error()
            got.append(msg)
    return got


def _reader(bootstrap: str, topic: str, group: str) -> Consumer:
    consumer = Consumer(consumer_config(bootstrap, group))
    consumer.subscribe([topic])
    return consumer


def test_consume_transform_produce_commits_offsets_in_the_transaction(
    kafka_bootstrap: str, namespace: str
) -> None:
    source, sink = f"{namespace}.in", f"{namespace}.out"
    ensure_service_topic(kafka_bootstrap, source, 1)
    ensure_service_topic(kafka_bootstrap, sink, 1)
    plain = Producer(producer_config(kafka_bootstrap))
    for i in range(3):
        plain.produce(source, key=b"wf-1", value=f"in-{i}".encode())
    plain.flush(10)

    group = f"{namespace}.processor"
    consumer = _reader(kafka_bootstrap, source, group)
    txn = Producer(producer_config(kafka_bootstrap, transactional_id=f"{namespace}.txn"))
    txn.init_transactions(10)
    inputs = _drain(consumer, 3)
    assert [m.value() for m in inputs] == [b"in-0", b"in-1", b"in-2"]

    txn.begin_transaction()
    for msg in inputs:
        txn.produce(sink, key=msg.key(), value=b"out-" + (msg.value() or b""))
    last = inputs[-1]
    offsets = [TopicPartition(source, last.partition() or 0, (last.offset() or 0) + 1)]
    txn.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 10)
    txn.commit_transaction(10)
    consumer.close()

    committed = Consumer(consumer_config(kafka_bootstrap, group)).committed(
        [TopicPartition(source, 0)], timeout=10
    )
    assert committed[0].offset == 3, "the offsets sent with the transaction were committed"

    reader = _reader(kafka_bootstrap, sink, f"{namespace}.reader")
    outputs = _drain(reader, 3)
    reader.close()
    assert [m.value() for m in outputs] == [b"out-in-0", b"out-in-1", b"out-in-2"]


def test_aborted_transaction_is_invisible_to_read_committed(
    kafka_bootstrap: str, namespace: str
) -> None:
    topic = f"{namespace}.events"
    ensure_service_topic(kafka_bootstrap, topic, 1)
    txn = Producer(producer_config(kafka_bootstrap, transactional_id=f"{namespace}.txn"))
    txn.init_transactions(10)
    txn.begin_transaction()
    txn.produce(topic, key=b"k", value=b"aborted")
    txn.flush(10)
    txn.abort_transaction(10)
    txn.begin_transaction()
    txn.produce(topic, key=b"k", value=b"committed")
    txn.commit_transaction(10)

    reader = _reader(kafka_bootstrap, topic, f"{namespace}.reader")
    seen = _drain(reader, 2, timeout=5.0)
    reader.close()
    assert [m.value() for m in seen] == [b"committed"]


def test_a_new_producer_with_the_same_transactional_id_fences_the_old_one(
    kafka_bootstrap: str, namespace: str
) -> None:
    from confluent_kafka import KafkaException

    topic = f"{namespace}.events"
    ensure_service_topic(kafka_bootstrap, topic, 1)
    conf = producer_config(kafka_bootstrap, transactional_id=f"{namespace}.txn")
    zombie = Producer(conf)
    zombie.init_transactions(10)
    zombie.begin_transaction()
    zombie.produce(topic, key=b"k", value=b"zombie")
    zombie.flush(10)

    successor = Producer(conf)
    successor.init_transactions(10)  # aborts the zombie's open transaction
    with pytest.raises(KafkaException) as info:
        zombie.commit_transaction(10)
    assert info.value.args[0].fatal() or info.value.args[0].txn_requires_abort()

    reader = _reader(kafka_bootstrap, topic, f"{namespace}.reader")
    assert _drain(reader, 1, timeout=3.0) == []
    reader.close()


def test_a_zombie_with_stale_group_metadata_cannot_commit_after_a_rebalance(
    kafka_bootstrap: str, namespace: str
) -> None:
    """KIP-447: offsets sent with the group generation of before a rebalance are refused, so a
    node that lost its partitions cannot commit the work it did for them."""
    from confluent_kafka import KafkaException

    topic = f"{namespace}.in"
    ensure_service_topic(kafka_bootstrap, topic, 2)
    group = f"{namespace}.group"
    first = _reader(kafka_bootstrap, topic, group)
    deadline = time.monotonic() + 20
    while not first.assignment() and time.monotonic() < deadline:
        first.poll(0.2)
    assert first.assignment(), "the first member got partitions"
    stale = first.consumer_group_metadata()

    second = _reader(kafka_bootstrap, topic, group)  # joins: a rebalance, a new generation
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (first.assignment() and second.assignment()):
        first.poll(0.1)
        second.poll(0.1)
    assert first.assignment() and second.assignment(), "both members own a partition"

    zombie = Producer(producer_config(kafka_bootstrap, transactional_id=f"{namespace}.zombie"))
    zombie.init_transactions(10)
    zombie.begin_transaction()
    zombie.produce(topic, key=b"k", value=b"work of the old generation")
    with pytest.raises(KafkaException) as info:
        zombie.send_offsets_to_transaction([TopicPartition(topic, 0, 1)], stale, 10)
        zombie.commit_transaction(10)
    error = info.value.args[0]
    assert error.txn_requires_abort(), error
    zombie.abort_transaction(10)

    # The same producer with the member's current metadata commits: the generation was the cause.
    owned = first.assignment()[0].partition
    zombie.begin_transaction()
    zombie.produce(topic, key=b"k", value=b"work of the current generation")
    zombie.send_offsets_to_transaction(
        [TopicPartition(topic, owned, 1)], first.consumer_group_metadata(), 10
    )
    zombie.commit_transaction(10)
    first.close()
    second.close()
