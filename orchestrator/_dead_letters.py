"""Turning a Kafka record that cannot be processed into a ``DeadLetter`` for ``<ns>.dlq``.

Everyone who consumes (orchestrator, services) parks bad records the same way: the original key
and bytes, where they came from, and why. A letter must always fit in one produce request, so an
original too large for that is cut, the reason says so, and topic/partition/offset still find it.
"""

from __future__ import annotations

import time
from typing import Protocol

from contracts.envelopes import DeadLetter

DEAD_LETTER_MAX_BYTES = 900_000
"""Default ceiling of a letter's copied key, value and reason together: under librdkafka's
default ``message.max.bytes`` (1,000,000) with room for the envelope, the record key and headers."""

_REASON_MAX = 4_000


class SourceRecord(Protocol):
    """What a dead letter needs of the record it parks: a confluent-kafka ``Message`` has it."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(
        self,
    ) -> dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None: ...


def dead_letter_of(
    msg: SourceRecord, reason: str, error_type: str, *, max_bytes: int = DEAD_LETTER_MAX_BYTES
) -> DeadLetter:
    key, value = msg.key(), msg.value()
    reason = reason[:_REASON_MAX]
    room = max(0, max_bytes - len(reason.encode()) - 200)  # 200: the note added below
    if key is not None and len(key) > room // 2:
        reason += f" (key cut to {room // 2} of {len(key)} bytes)"
        key = key[: room // 2]
    room -= len(key or b"")
    if value is not None and len(value) > room:
        reason += (
            f" (value cut to {room} of {len(value)} bytes; the original is at the source offset)"
        )
        value = value[:room]
    return DeadLetter(
        source_topic=msg.topic() or "",
        source_partition=msg.partition() or 0,
        source_offset=msg.offset() or 0,
        reason=reason,
        error_type=error_type,
        failed_at_ms=int(time.time() * 1000),
        key=key,
        value=value,
    )
