"""Replication settings of the namespace's topics against the session's (single) broker: the
default follows the cluster (one broker: one replica, min.insync.replicas 1), and ``orchestrator
topics verify`` reports topics with fewer replicas than the setting asks for. The 3-broker side
(RF 3, under-replication while a broker is down) is in ``tests/cluster``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.topics import delete_topics, ensure_topics, verify_topics

pytestmark = pytest.mark.broker


@pytest.fixture
def ns(kafka_bootstrap: str, namespace: str) -> Iterator[str]:
    yield namespace
    delete_topics(kafka_bootstrap, namespace)


def test_the_default_replication_follows_the_cluster(kafka_bootstrap: str, ns: str) -> None:
    report = ensure_topics(kafka_bootstrap, ns, 2)
    assert (report.replication_factor, report.min_insync_replicas) == (1, 1)
    assert verify_topics(kafka_bootstrap, ns, 2).warnings == ()


def test_verify_reports_fewer_replicas_than_the_setting(kafka_bootstrap: str, ns: str) -> None:
    ensure_topics(kafka_bootstrap, ns, 2)
    runner = CliRunner()
    args = ["--bootstrap", kafka_bootstrap, "--namespace", ns, "--partitions", "2"]

    ok = runner.invoke(main, [*args, "topics", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "replication factor 1, min.insync.replicas 1" in ok.output

    wrong = runner.invoke(main, [*args, "topics", "verify"], env={"SAGA_REPLICATION_FACTOR": "3"})
    assert wrong.exit_code == 1, wrong.output
    assert f"{ns}.inbox has replication factor 1, expected at least 3" in wrong.output
    assert f"{ns}.inbox: min.insync.replicas is '1', expected '2'" in wrong.output
