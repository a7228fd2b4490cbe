"""Reading and replaying dead letters: what an operator does with ``<ns>.dlq`` (or a service's
dead-letter topic) once the cause is fixed.

    from orchestrator._dlq import read_letters, replay
    for found in read_letters(settings):
        print(found.where, found.letter.error_type, found.letter.reason)
    replay(settings, found)     # the original key and value, back to the topic they came from

``orchestrator dlq list | show | replay`` is the same from the shell (docs/operations.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from contracts import codec
from contracts.envelopes import DeadLetter
from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator.errors import OrchestratorError
from orchestrator.settings import Settings

__all__ = ["DeadLetterNotFound", "FoundLetter", "ReplayRefused", "read_letters", "replay"]


class DeadLetterNotFound(OrchestratorError, LookupError):
    """No dead letter at the partition and offset asked for."""


class ReplayRefused(OrchestratorError):
    """The letter cannot be replayed as it is (its copy of the record was cut, or it has none)."""


@dataclass(frozen=True)
class FoundLetter:
    topic: str
    partition: int
    offset: int
    letter: DeadLetter

    @property
    def where(self) -> str:
        """Its own coordinates, as ``show`` and ``replay`` take them: ``PARTITION:OFFSET``."""
        return f"{self.partition}:{self.offset}"

    @property
    def cut(self) -> bool:
        """Whether the letter holds only part of the original record (too large to copy)."""
        return "cut to" in self.letter.reason


def read_letters(
    settings: Settings, *, topic: str | None = None, timeout: float = 15.0
) -> list[FoundLetter]:
    """Every dead letter on ``topic`` (default ``<ns>.dlq``), oldest first per partition; a record
    that is not a ``DeadLetter`` is left out."""
    topic = topic or settings.dlq
    reader = Consumer(
        consumer_config(
            settings.bootstrap_servers,
            f"{settings.namespace}.dlq-reader.{time.time_ns()}",
            extra={"enable.partition.eof": True, **settings.client_extra()},
        )
    )
    try:
        meta = reader.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            raise DeadLetterNotFound(f"topic {topic} does not exist")
        partitions = sorted(meta.partitions)
        reader.assign([TopicPartition(topic, p, 0) for p in partitions])
        found: list[FoundLetter] = []
        ended: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ended) < len(partitions) and time.monotonic() < deadline:
            for msg in reader.consume(500, 0.2):
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        ended.add(msg.partition() or 0)
                    continue
                try:
                    letter = codec.decode_as(msg.value() or b"", DeadLetter)
                except codec.CodecError:
                    continue
                found.append(FoundLetter(topic, msg.partition() or 0, msg.offset() or 0, letter))
        return found
    finally:
        reader.close()


def find_letter(settings: Settings, where: str, *, topic: str | None = None) -> FoundLetter:
    """The letter at ``PARTITION:OFFSET`` of the dead-letter topic."""
    for found in read_letters(settings, topic=topic):
        if found.where == where:
            return found
    raise DeadLetterNotFound(f"no dead letter at {where} of {topic or settings.dlq}")


def replay(settings: Settings, found: FoundLetter, *, to_topic: str | None = None) -> str:
    """Produce the letter's original key and value again, to the topic it came from (or
    ``to_topic``); returns where it went. A node or service handles it as new input: replay a
    letter once its cause is fixed (a missing workflow type deployed, a service repaired)."""
    letter = found.letter
    if letter.value is None:
        raise ReplayRefused(f"the letter at {found.where} holds no record value")
    if found.cut:
        raise ReplayRefused(
            f"the letter at {found.where} holds a cut copy of the record; the original is at "
            f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
        )
    target = to_topic or letter.source_topic
    producer = Producer(producer_config(settings.bootstrap_servers, extra=settings.client_extra()))
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    # Keyed as it was, so the murmur2 partitioner sends it where its workflow lives.
    producer.produce(target, key=letter.key, value=letter.value, on_delivery=delivered)
    if producer.flush(15) or errors:
        raise ReplayRefused(f"replaying {found.where} to {target} failed: {errors or 'timed out'}")
    return target
