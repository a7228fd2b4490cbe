"""librdkafka configuration for every client the system builds, in one place.

confluent-kafka stays behind the modules that build clients from these dictionaries; the rest of
the engine deals in our own types.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from orchestrator.errors import ConfigurationError

#: Where librdkafka's own log lines go (instead of straight to stderr): every client built from
#: these dictionaries forwards them to this logger when it is polled. Processes decide how loud
#: it is; the ``orchestrator`` command keeps it quiet unless ``--verbose``.
LIBRDKAFKA_LOGGER = logging.getLogger("orchestrator.librdkafka")

# librdkafka's own keys that are spelled with an underscore; every other key is dotted.
_UNDERSCORE_KEYS = frozenset({"log_level"})
_SECRET_WORDS = ("password", "secret", "passphrase", "private")
_SECRET_KEYS = frozenset({"ssl.key.pem", "sasl.oauthbearer.config", "ssl_key"})

# Without a handler of its own, Python's last-resort handler would print what it drops.
_QUIET = logging.getLogger("orchestrator.librdkafka.check")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False  # "no bootstrap.servers configured" is expected there

# fixed (see DESIGN.md): every producer hashes keys like Kafka's Java client, so a reply produced
# by a Java or Go service with the workflow id as key lands on the workflow's partition.
PARTITIONER = "murmur2_random"


def librdkafka_key(name: str) -> str:
    """The librdkafka key an environment variable name stands for.

    A shell cannot export ``SAGA_KAFKA__security.protocol``, so ``SECURITY_PROTOCOL`` means
    ``security.protocol``: lower case, underscores as dots. A name that has a dot already is a
    librdkafka key as written.
    """
    key = name.strip().lower()
    if "." in key or key in _UNDERSCORE_KEYS:
        return key
    return key.replace("_", ".")


def is_secret_key(key: str) -> bool:
    """Whether the value of librdkafka ``key`` is a secret that must never be printed."""
    return key in _SECRET_KEYS or any(word in key for word in _SECRET_WORDS)


def check_client_settings(extra: Mapping[str, Any]) -> None:
    """Raise ``ConfigurationError`` if librdkafka refuses one of these keys or values.

    librdkafka checks its configuration when a client is made; making one without bootstrap
    servers finds an unknown key or a bad value at once and contacts no broker.
    """
    if not extra:
        return
    conf = {k: v for k, v in extra.items() if k != "bootstrap.servers"}
    try:
        Producer({**conf, "logger": _QUIET})
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        detail = err.str() if isinstance(err, KafkaError) else str(exc)
        raise ConfigurationError(f"librdkafka refuses it: {detail}") from None


_UNREACHABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._TIMED_OUT,
    }
)


def unreachable(err: KafkaError) -> bool:
    """Whether ``err`` says no broker answered (rather than one that answered with an error)."""
    return err.code() in _UNREACHABLE


def _base(bootstrap: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": LIBRDKAFKA_LOGGER}
    if extra:
        conf.update(extra)
    return conf


def admin_config(bootstrap: str, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return _base(bootstrap, extra)


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
        # became every step's latency (docs/performance.md). The markers take about a
        # millisecond: 5 ms made a node that commits back to back (C = 4) wait 4 ms too long
        # (closed loop C = 4 p50 58-61 ms with 5, 51-54 with 1); retry.backoff.max.ms still
        # grows the wait when the broker is away.
        conf["retry.backoff.ms"] = 1
        # A killed producer's open transaction blocks read_committed readers until it times out
        # or a producer with the same id starts again; keep the ceiling short.
        conf["transaction.timeout.ms"] = 10_000
    if extra:
        conf.update(extra)
    return conf


# How long a fetch of a consumer that serves (the node's inbox, a service's commands, the
# client's results) waits when there is nothing to read. The broker answers a waiting fetch as
# soon as records become readable, commit markers included: the closed loop's C = 1 saga took
# 30.5 ms with 500 as with 5 (docs/performance.md). Only an idle consumer's request rate
# depends on it: an idle node and three services at 5 ms kept the broker at 17 % of a core,
# at 100 ms at 4 %. Readers that read to the end of a partition (restore, describe) keep 5:
# their last, empty fetch is what tells them they are there.
SERVING_FETCH_WAIT_MS = 100


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
