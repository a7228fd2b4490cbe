"""Kafka's Java-compatible murmur2 partitioner, in pure Python.

Every producer in the system (ours through librdkafka's ``partitioner=murmur2_random``, Java's
default partitioner, Go's Sarama/franz-go "Java-compatible" hashers) maps a key to a partition as

    partition = toPositive(murmur2(key_bytes)) % num_partitions

where ``toPositive(x) = x & 0x7fffffff``. The orchestrator needs the same function to produce
history events to the *explicit* partition that owns their workflow (the history key is
``<workflow id>/<seq>`` but the partition is chosen by the workflow id), so the inbox and the
history stay co-partitioned.

This is a transcription of ``org.apache.kafka.common.utils.Utils.murmur2``. Java's ``int``
arithmetic wraps modulo 2**32 and ``>>>`` is an unsigned shift, so we compute on unsigned 32-bit
values (masking after each multiplication) and convert to Java's signed result once at the end.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import confluent_kafka

__all__ = ["murmur2", "partition_for"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK = 0xFFFFFFFF

# Pre-built little-endian "n words" unpackers for keys up to 256 bytes (workflow ids and history
# keys are far shorter); longer keys build one on the fly.
_WORDS = tuple(struct.Struct(f"<{n}I") for n in range(65))


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: the signed 32-bit int that Java returns for ``data``."""
    length = len(data)
    h = _SEED ^ length
    n_words = length >> 2
    unpacker = _WORDS[n_words] if n_words < len(_WORDS) else struct.Struct(f"<{n_words}I")
    for k in unpacker.unpack_from(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> _R)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k

    # The last 1-3 bytes (Java's fall-through switch).
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK

    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - 0x100000000 if h & 0x80000000 else h


def _partition_py(data: bytes, num_partitions: int) -> int:
    return (murmur2(data) & 0x7FFFFFFF) % num_partitions


# confluent-kafka >= 2.1x exposes librdkafka's own partitioner function (the one
# ``partitioner=murmur2_random`` uses), about 25x faster than the Python loop above. Older
# releases lack it; then the pure-Python transcription serves. The unit tests check that both agree.
_partition: Callable[[bytes, int], int] = getattr(confluent_kafka, "murmur2", _partition_py)


def partition_for(key: str | bytes, num_partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``.

    ``toPositive(murmur2(key)) % num_partitions``, as in Java's ``BuiltInPartitioner`` and
    librdkafka's ``murmur2_random`` partitioner. A ``str`` key is hashed as its UTF-8 bytes, which
    is what every Kafka string serializer sends.
    """
    if num_partitions <= 0:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    return _partition(key.encode() if isinstance(key, str) else key, num_partitions)
