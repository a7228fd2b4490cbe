"""Turning a Kafka record that cannot be processed into a ``DeadLetter`` for ``<ns>.dlq``.

Everyone who consumes (orchestrator, services) parks bad records the same way: the original key
and bytes untouched, where they came from, and why.
"""

from __future__ import annotations

import time

from confluent_kafka import Message

from contracts.envelopes import DeadLetter


def dead_letter_of(msg: Message, reason: str, error_type: str) -> DeadLetter:
    return DeadLetter(
        source_topic=msg.topic() or "",
        source_partition=msg.partition() or 0,
        source_offset=msg.offset() or 0,
        reason=reason,
        error_type=error_type,
        failed_at_ms=int(time.time() * 1000),
        key=msg.key(),
        value=msg.value(),
    )
