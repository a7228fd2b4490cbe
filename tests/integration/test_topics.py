"""Topic administration: creation, compaction settings, idempotence and mismatch detection.

The tests marked ``broker`` run against the real broker of the session; the others check the
comparison logic and the error path without one.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping

import pytest
from confluent_kafka import KafkaException

# confluent_kafka.admin re-exports these without an __all__ (see orchestrator/topics.py).
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from orchestrator.topics import (
    HISTORY_CONFIG,
    ObservedTopic,
    TopicAdmin,
    TopicAdminError,
    TopicMismatch,
    TopicSpec,
    compare_topics,
    delete_topics,
    ensure_service_topic,
    ensure_topics,
    namespace_topic_specs,
    topic_names,
    verify_topics,
)

N = 6


@pytest.fixture
def ns(kafka_bootstrap: str, namespace: str) -> Iterator[str]:
    """The test's namespace; its topics are deleted afterwards."""
    yield namespace
    delete_topics(kafka_bootstrap, namespace)


@pytest.fixture
def raw_admin(kafka_bootstrap: str) -> AdminClient:
    """A plain AdminClient, to create topics 'by hand' and to look at them independently."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def _create_by_hand(admin: AdminClient, name: str, partitions: int, **config: str) -> None:
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=config)])
    futures[name].result(timeout=30)


def _configs(admin: AdminClient, name: str) -> dict[str, str | None]:
    resource = ConfigResource(ResourceType.TOPIC, name)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {key: entry.value for key, entry in entries.items()}


def _partition_counts(admin: AdminClient, names: tuple[str, ...]) -> dict[str, int]:
    topics = admin.list_topics(timeout=30).topics
    return {name: len(topics[name].partitions) for name in names if name in topics}


# -- against the broker ----------------------------------------------------------------------


@pytest.mark.broker
def test_ensure_creates_the_namespace_topics_with_compacted_history(
    kafka_bootstrap: str, ns: str, raw_admin: AdminClient
) -> None:
    names = topic_names(ns)

    report = ensure_topics(kafka_bootstrap, ns, N)

    assert report.created == names.all
    assert report.verified == names.all
    assert report.warnings == ()
    assert _partition_counts(raw_admin, names.all) == {
        names.inbox: N,
        names.history: N,
        names.results: N,
        names.dlq: 1,
        names.nodes: 1,
    }
    metadata = raw_admin.list_topics(timeout=30).topics
    for name in names.all:
        assert all(p.leader >= 0 for p in metadata[name].partitions.values()), name

    history = _configs(raw_admin, names.history)
    assert history["cleanup.policy"] == "compact"
    for key, value in HISTORY_CONFIG.items():
        assert history[key] == value, key
    for name in (names.inbox, names.results, names.dlq):
        assert _configs(raw_admin, name)["cleanup.policy"] == "delete", name
    assert _configs(raw_admin, names.nodes)["cleanup.policy"] == "compact"


@pytest.mark.broker
def test_ensure_is_idempotent(kafka_bootstrap: str, ns: str) -> None:
    first = ensure_topics(kafka_bootstrap, ns, N)
    second = ensure_topics(kafka_bootstrap, ns, N)
    third = verify_topics(kafka_bootstrap, ns, N)

    assert first.changed
    assert not second.changed
    assert second.created == ()
    assert second.verified == first.verified
    assert second.warnings == ()
    assert third.warnings == ()


@pytest.mark.broker
def test_concurrent_ensures_create_each_topic_once(kafka_bootstrap: str, ns: str) -> None:
    # Several orchestrator instances starting together race to create the topics; the loser of
    # each race sees TOPIC_ALREADY_EXISTS and must treat the topic as existing.
    reports = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        admin = TopicAdmin(kafka_bootstrap)
        barrier.wait()
        try:
            reports.append(ensure_topics(admin, ns, N))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    created = [name for report in reports for name in report.created]
    assert sorted(created) == sorted(topic_names(ns).all)


@pytest.mark.broker
def test_history_with_delete_policy_is_a_mismatch(
    kafka_bootstrap: str, ns: str, raw_admin: AdminClient
) -> None:
    names = topic_names(ns)
    _create_by_hand(raw_admin, names.history, N, **{"cleanup.policy": "delete"})

    with pytest.raises(TopicMismatch) as caught:
        ensure_topics(kafka_bootstrap, ns, N)

    assert caught.value.problems == (
        f"{names.history}: cleanup.policy is 'delete', expected 'compact'",
    )
    assert f"{names.history}: cleanup.policy is 'delete', expected 'compact'" in str(caught.value)
    # Nothing was created next to the wrong topic.
    assert set(_partition_counts(raw_admin, names.all)) == {names.history}


@pytest.mark.broker
def test_inbox_and_history_with_different_partition_counts_are_a_mismatch(
    kafka_bootstrap: str, ns: str, raw_admin: AdminClient
) -> None:
    names = topic_names(ns)
    _create_by_hand(raw_admin, names.inbox, 4, **{"cleanup.policy": "delete"})
    _create_by_hand(raw_admin, names.history, 8, **{"cleanup.policy": "compact"})

    with pytest.raises(TopicMismatch) as caught:
        ensure_topics(kafka_bootstrap, ns, 8)

    assert caught.value.problems == (
        f"{names.inbox} has 4 partitions, expected 8",
        f"{names.inbox} has 4 partitions but {names.history} has 8: they must be co-partitioned",
    )


@pytest.mark.broker
def test_every_problem_is_listed_at_once(
    kafka_bootstrap: str, ns: str, raw_admin: AdminClient
) -> None:
    names = topic_names(ns)
    ensure_topics(kafka_bootstrap, ns, N)

    with pytest.raises(TopicMismatch) as caught:
        verify_topics(kafka_bootstrap, ns, N + 2)

    message = str(caught.value)
    assert f"{names.inbox} has {N} partitions, expected {N + 2}" in message
    assert f"{names.history} has {N} partitions, expected {N + 2}" in message
    # results and dlq may have any partition count: not problems.
    assert len(caught.value.problems) == 2


@pytest.mark.broker
def test_verify_reports_missing_topics(kafka_bootstrap: str, ns: str) -> None:
    with pytest.raises(TopicMismatch) as caught:
        verify_topics(kafka_bootstrap, ns, N)
    assert caught.value.problems == tuple(f"{name} does not exist" for name in topic_names(ns).all)


@pytest.mark.broker
def test_other_tuning_is_a_warning_not_an_error(
    kafka_bootstrap: str, ns: str, raw_admin: AdminClient
) -> None:
    names = topic_names(ns)
    _create_by_hand(
        raw_admin, names.history, N, **{"cleanup.policy": "compact", "segment.ms": "600000"}
    )

    report = ensure_topics(kafka_bootstrap, ns, N)

    assert report.created == (names.inbox, names.results, names.dlq, names.nodes)
    assert f"{names.history}: segment.ms is '600000', expected '3600000'" in report.warnings


@pytest.mark.broker
def test_service_topic(kafka_bootstrap: str, ns: str, raw_admin: AdminClient) -> None:
    topic = f"{ns}.payments.commands"
    try:
        assert ensure_service_topic(kafka_bootstrap, topic, 3).created == (topic,)
        assert ensure_service_topic(kafka_bootstrap, topic, 3).created == ()
        assert _configs(raw_admin, topic)["cleanup.policy"] == "delete"
        # The service team chose another partition count: noted, not refused.
        report = ensure_service_topic(kafka_bootstrap, topic, 5)
        assert report.warnings == (f"{topic} has 3 partitions, expected 5",)
    finally:
        TopicAdmin(kafka_bootstrap).delete([topic])

    compacted = f"{ns}.billing.commands"
    _create_by_hand(raw_admin, compacted, 1, **{"cleanup.policy": "compact"})
    try:
        with pytest.raises(TopicMismatch, match=r"cleanup\.policy is 'compact', expected 'delete'"):
            ensure_service_topic(kafka_bootstrap, compacted, 1)
    finally:
        TopicAdmin(kafka_bootstrap).delete([compacted])


@pytest.mark.broker
def test_delete_topics(kafka_bootstrap: str, ns: str, raw_admin: AdminClient) -> None:
    ensure_topics(kafka_bootstrap, ns, 2)
    assert delete_topics(kafka_bootstrap, ns) == list(topic_names(ns).all)
    assert _partition_counts(raw_admin, topic_names(ns).all) == {}
    assert delete_topics(kafka_bootstrap, ns) == []
    # Recreating right after deleting works (what tests that reuse a namespace do).
    assert ensure_topics(kafka_bootstrap, ns, 2).created == topic_names(ns).all


# -- without a broker ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_unreachable_cluster_is_a_clear_error() -> None:
    bootstrap = f"127.0.0.1:{_free_port()}"
    with pytest.raises(TopicAdminError, match=f"could not read metadata from {bootstrap}"):
        ensure_topics(bootstrap, "saga", 3, timeout_s=1.0, client_config={"log_level": 0})


def _observed(
    name: str, partitions: int, config: Mapping[str, str], replicas: int = 1
) -> ObservedTopic:
    return ObservedTopic(name, partitions, replicas, config)


def _healthy(ns: str, n: int) -> dict[str, ObservedTopic]:
    return {
        spec.name: _observed(spec.name, spec.partitions, spec.config)
        for spec in namespace_topic_specs(ns, n)
    }


def test_compare_accepts_topics_made_from_the_specs() -> None:
    names = topic_names("saga")
    specs = namespace_topic_specs("saga", 8)
    assert compare_topics(specs, _healthy("saga", 8), names.co_partitioned) == ([], [])


def test_compare_rejects_compact_delete_history() -> None:
    names = topic_names("saga")
    observed = _healthy("saga", 8)
    config = {**observed[names.history].config, "cleanup.policy": "compact,delete"}
    observed[names.history] = _observed(names.history, 8, config)

    problems, _ = compare_topics(namespace_topic_specs("saga", 8), observed)

    assert problems == ["saga.history: cleanup.policy is 'compact,delete', expected 'compact'"]


def test_compare_policy_order_does_not_matter() -> None:
    spec = TopicSpec("x.t", 1, config={"cleanup.policy": "compact,delete"})
    observed = {"x.t": _observed("x.t", 1, {"cleanup.policy": "delete,compact"})}
    assert compare_topics([spec], observed) == ([], [])


def test_compare_rejects_fewer_replicas_than_asked() -> None:
    specs = namespace_topic_specs("saga", 2, replication_factor=3)
    observed = {
        spec.name: _observed(spec.name, spec.partitions, spec.config, replicas=1) for spec in specs
    }
    problems, _ = compare_topics(specs[:1], observed)
    assert problems == ["saga.inbox has replication factor 1, expected at least 3"]


def test_specs_reject_illegal_names() -> None:
    with pytest.raises(ValueError, match="illegal topic name"):
        namespace_topic_specs("bad namespace", 3)
    with pytest.raises(ValueError, match="partitions must be at least 1"):
        namespace_topic_specs("saga", 0)


def test_kafka_exception_does_not_leak_from_unreachable_delete() -> None:
    bootstrap = f"127.0.0.1:{_free_port()}"
    with pytest.raises(TopicAdminError) as caught:
        delete_topics(bootstrap, "saga", timeout_s=1.0, client_config={"log_level": 0})
    assert not isinstance(caught.value, KafkaException)
