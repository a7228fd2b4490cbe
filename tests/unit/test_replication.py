"""Replication of the namespace's topics: the defaults, the settings, and what ``verify`` reports
(under-replicated partitions, a replication factor or min.insync.replicas below the setting);
and the cluster layout of the broker launcher. No broker: ``tests/cluster`` runs them on one."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.kafka import broker
from orchestrator.settings import Settings
from orchestrator.topics import (
    ObservedTopic,
    compare_topics,
    default_min_insync_replicas,
    default_replication_factor,
    namespace_topic_specs,
    service_topic_spec,
)


@pytest.mark.parametrize(("brokers", "rf", "isr"), [(1, 1, 1), (2, 2, 2), (3, 3, 2), (9, 3, 2)])
def test_defaults_follow_the_cluster_size(brokers: int, rf: int, isr: int) -> None:
    assert default_replication_factor(brokers) == rf
    assert default_min_insync_replicas(rf) == isr


def test_specs_carry_min_insync_replicas_from_the_setting_or_the_default() -> None:
    for spec in namespace_topic_specs("saga", 3, 3):
        assert spec.replication_factor == 3
        assert spec.config["min.insync.replicas"] == "2"
    for spec in namespace_topic_specs("saga", 3, 5, min_insync_replicas=3):
        assert spec.config["min.insync.replicas"] == "3"
    assert service_topic_spec("s.commands", 3, 1).config["min.insync.replicas"] == "1"


def test_min_insync_replicas_above_the_replicas_is_refused() -> None:
    with pytest.raises(ValueError, match="between 1 and the replication factor 2, got 3"):
        namespace_topic_specs("saga", 3, 2, min_insync_replicas=3)


def test_settings_read_replication_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().replication_factor, Settings().min_insync_replicas) == (None, None)
    monkeypatch.setenv("SAGA_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("SAGA_MIN_INSYNC_REPLICAS", "2")
    assert (Settings().replication_factor, Settings().min_insync_replicas) == (3, 2)
    monkeypatch.setenv("SAGA_MIN_INSYNC_REPLICAS", "4")
    with pytest.raises(ValidationError, match="may not exceed replication_factor"):
        Settings()


def _healthy(rf: int) -> dict[str, ObservedTopic]:
    return {
        s.name: ObservedTopic(s.name, s.partitions, rf, dict(s.config))
        for s in namespace_topic_specs("saga", 3, rf)
    }


def test_an_under_replicated_partition_is_a_problem_for_verify_and_a_warning_otherwise() -> None:
    specs = namespace_topic_specs("saga", 3, 3)
    observed = _healthy(3)
    inbox = observed["saga.inbox"]
    observed["saga.inbox"] = ObservedTopic(
        inbox.name, 3, 3, inbox.config, under_replicated=((0, 2, 3), (2, 1, 3))
    )
    expected = "saga.inbox is under-replicated: partition(s) 0 (2 of 3 in sync), 2 (1 of 3 in sync)"

    problems, warnings = compare_topics(specs, observed, under_replicated_is_problem=True)
    assert problems == [expected] and warnings == []

    problems, warnings = compare_topics(specs, observed)
    assert problems == [] and warnings == [expected]


def test_fewer_replicas_or_a_weaker_min_insync_replicas_than_the_setting_are_problems() -> None:
    specs = namespace_topic_specs("saga", 3, 3)
    observed = _healthy(3)
    history = observed["saga.history"]
    observed["saga.history"] = ObservedTopic(
        history.name, 3, 1, {**history.config, "min.insync.replicas": "1"}
    )
    results = observed["saga.results"]  # stricter than asked: tuning, not a problem
    observed["saga.results"] = ObservedTopic(
        results.name, 3, 3, {**results.config, "min.insync.replicas": "3"}
    )
    problems, warnings = compare_topics(specs, observed)
    assert problems == [
        "saga.history has replication factor 1, expected at least 3",
        "saga.history: min.insync.replicas is '1', expected '2'",
    ]
    assert warnings == ["saga.results: min.insync.replicas is '3', expected '2'"]


def test_a_cluster_layout_gives_each_node_its_ports_dir_and_the_replicated_internal_topics(
    tmp_path: Path,
) -> None:
    cluster = broker.ClusterLayout(3, 40000, "384m", tmp_path)
    assert cluster.bootstrap == "127.0.0.1:40000,127.0.0.1:40002,127.0.0.1:40004"
    assert cluster.ports == list(range(40000, 40006))
    node = cluster.node(2)
    assert (node.port, node.controller_port, node.node_id) == (40002, 40003, 2)
    assert node.run_dir == tmp_path / "node-2"
    props = dict(
        line.split("=", 1)
        for line in node.server_properties().splitlines()
        if "=" in line and not line.startswith("#")
    )  # later keys win, as in java.util.Properties
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:40001,2@127.0.0.1:40003,3@127.0.0.1:40005"
    )
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:40002,CONTROLLER://127.0.0.1:40003"
    assert props["log.dirs"] == str(tmp_path / "node-2" / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert props[key] == "3", key
    assert props["transaction.state.log.min.isr"] == "2"
    assert props["min.insync.replicas"] == "2"
    with pytest.raises(ValueError, match=r"node 4 is not in 1\.\.3"):
        cluster.node(4)


def test_the_single_broker_configuration_is_unchanged(tmp_path: Path) -> None:
    layout = broker.BrokerLayout(39092, 39093, "512m", tmp_path)
    text = layout.server_properties()
    assert "node.id=1\ncontroller.quorum.voters=1@127.0.0.1:39093\n" in text
    assert "transaction.state.log.replication.factor=1" in text
    assert "min.insync.replicas" not in text.replace("transaction.state.log.min.isr", "")
