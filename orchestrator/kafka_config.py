"""librdkafka configuration for every client the system builds, in one place.

confluent-kafka stays behind the modules that build clients from these dictionaries; the rest of
the engine deals in our own types.
"""

from __future__ import annotations

from typing import Any

# fixed (see DESIGN.md): every producer hashes keys like Kafka's Java client, so a reply produced
# by a Java or Go service with the workflow id as key lands on the workflow's partition.
PARTITIONER = "murmur2_random"


def _base(bootstrap: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap}
    if extra:
        conf.update(extra)
    return conf


def producer_config(
    bootstrap: str,
    *,
    transactional_id: str | None = None,
    linger_ms: int = 2,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    conf = {
        "partitioner": PARTITIONER,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        **_base(bootstrap, None),
    }
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
        # Right after a commit the broker answers AddOffsetsToTxn with CONCURRENT_TRANSACTIONS
        # until the commit markers are written; librdkafka's default 100 ms before retrying
        # became every step's latency (docs/performance.md).
        conf["retry.backoff.ms"] = 5
        # A killed producer's open transaction blocks read_committed readers until it times out
        # or a producer with the same id starts again; keep the ceiling short.
        conf["transaction.timeout.ms"] = 10_000
    if extra:
        conf.update(extra)
    return conf


def consumer_config(
    bootstrap: str,
    group_id: str,
    *,
    fetch_wait_max_ms: int = 5,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    conf = {
        "group.id": group_id,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # librdkafka's default of 500 ms dominates a request -> reply step loop.
        "fetch.wait.max.ms": fetch_wait_max_ms,
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "max.poll.interval.ms": 60_000,
        **_base(bootstrap, None),
    }
    if extra:
        conf.update(extra)
    return conf
