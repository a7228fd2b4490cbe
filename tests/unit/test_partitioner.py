"""The murmur2 partitioner against reference values from Kafka's Java client and librdkafka."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import _partitioner as partitioner
from orchestrator._partitioner import murmur2, partition_for

# Verbatim from apache/kafka clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java
# (testMurmur2): the values Java's Utils.murmur2 returns.
KAFKA_JAVA_VECTORS: list[tuple[bytes, int]] = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]

# Verbatim from confluentinc/librdkafka src/rdmurmur2.c (unittest_murmur2, "java_murmur2_results"),
# written there as the int32 bit patterns; they add the 1-byte tail and the empty key.
_SHORT = b"1234"
_UNALIGNED = b"PreAmbleWillBeRemoved,ThePrePartThatIs"
LIBRDKAFKA_VECTORS: list[tuple[bytes, int]] = [
    (b"kafka", 0xD067CF64),
    (b"giberish123456789", 0x8F552B0C),
    (_SHORT, 0x9FC97B14),
    (_SHORT[1:], 0xE7C009CA),
    (_SHORT[2:], 0x873930DA),
    (_SHORT[3:], 0x5A4B5CA1),
    (_UNALIGNED, 0x78424F1C),
    (_UNALIGNED[1:], 0x4A62B377),
    (_UNALIGNED[2:], 0xE0E4E09E),
    (_UNALIGNED[3:], 0x62B8B43F),
    (b"", 0x106E08D9),
]


def _signed32(bits: int) -> int:
    return bits - (1 << 32) if bits & 0x80000000 else bits


@pytest.mark.parametrize(("data", "expected"), KAFKA_JAVA_VECTORS)
def test_murmur2_matches_kafka_java_utils(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@pytest.mark.parametrize(("data", "bits"), LIBRDKAFKA_VECTORS)
def test_murmur2_matches_librdkafka_java_results(data: bytes, bits: int) -> None:
    assert murmur2(data) == _signed32(bits)


def test_vectors_cover_every_tail_length() -> None:
    tails = {len(data) % 4 for data, _ in KAFKA_JAVA_VECTORS + LIBRDKAFKA_VECTORS}
    assert tails == {0, 1, 2, 3}


@pytest.mark.parametrize(("data", "expected"), KAFKA_JAVA_VECTORS)
@pytest.mark.parametrize("n", [1, 3, 6, 12, 50, 1000])
def test_partition_for_is_to_positive_mod_n(data: bytes, expected: int, n: int) -> None:
    assert partition_for(data, n) == (expected & 0x7FFFFFFF) % n
    assert partitioner._partition_py(data, n) == (expected & 0x7FFFFFFF) % n


def test_str_key_is_hashed_as_utf8() -> None:
    key = "wf-øre-🚀"
    assert partition_for(key, 7) == partition_for(key.encode("utf-8"), 7)


@pytest.mark.parametrize("n", [0, -1])
def test_partition_for_rejects_non_positive_counts(n: int) -> None:
    with pytest.raises(ValueError, match="num_partitions must be positive"):
        partition_for(b"x", n)


@given(data=st.binary(max_size=600))
def test_murmur2_is_a_signed_32_bit_int(data: bytes) -> None:
    assert -(2**31) <= murmur2(data) < 2**31


@given(key=st.one_of(st.binary(max_size=300), st.text(max_size=100)), n=st.integers(1, 100_000))
def test_partition_for_is_in_range(key: str | bytes, n: int) -> None:
    assert 0 <= partition_for(key, n) < n


@given(data=st.binary(max_size=300), n=st.integers(1, 100_000))
def test_pure_python_and_fast_path_agree(data: bytes, n: int) -> None:
    # The fast path is librdkafka's partitioner when confluent-kafka exposes it; either way it
    # must agree with the transcription of Java's Utils.murmur2.
    assert partition_for(data, n) == partitioner._partition_py(data, n)
