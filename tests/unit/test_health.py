"""The health endpoints over real HTTP on an OS-chosen port, with a clock the test moves; the
node's workflow and partition gauges."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator._engine.store import PartitionStore, StoreBatch, WorkflowSummary
from orchestrator.health import Health, HealthServer, serve_http
from orchestrator.metrics import NodeMetrics
from orchestrator.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, whatever the status."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("things", "Things counted", registry=registry).inc(3)
    return registry


@pytest.fixture
def served(clock: FakeClock, registry: CollectorRegistry) -> Iterator[tuple[Health, HealthServer]]:
    health = Health(30, clock=clock, not_ready_reason="waiting for partitions")
    with serve_http(health, registry, 0, addr="127.0.0.1") as server:
        assert server is not None
        yield health, server


def test_the_os_picks_the_port_and_the_server_reports_it(
    served: tuple[Health, HealthServer],
) -> None:
    _, server = served
    assert server.port > 0
    assert get(server.port, "/healthz")[0] == 200


def test_healthz_is_200_until_the_loop_has_not_turned_for_longer_than_the_limit(
    served: tuple[Health, HealthServer], clock: FakeClock
) -> None:
    health, server = served
    assert get(server.port, "/healthz")[:2] == (200, b"ok\n")
    clock.now += 30  # exactly the limit: still alive
    assert get(server.port, "/healthz")[0] == 200
    clock.now += 0.5
    status, body, content_type = get(server.port, "/healthz")
    assert status == 503
    assert body == b"loop has not turned for 30.5 s (limit 30 s)\n"
    assert content_type.startswith("text/plain")
    health.beat()
    assert get(server.port, "/healthz")[:2] == (200, b"ok\n")


def test_ready_follows_set_ready_with_the_reason(
    served: tuple[Health, HealthServer],
) -> None:
    health, server = served
    assert get(server.port, "/ready")[:2] == (503, b"waiting for partitions\n")
    health.set_ready(True)
    assert get(server.port, "/ready")[:2] == (200, b"ready\n")
    health.set_ready(False, "restoring assigned partitions")
    assert get(server.port, "/ready")[:2] == (503, b"restoring assigned partitions\n")


def test_fail_is_for_good(served: tuple[Health, HealthServer]) -> None:
    health, server = served
    health.set_ready(True)
    health.fail("fenced: another process uses transactional id ns.orchestrator.n1")
    health.fail("a later reason does not replace the first")
    health.beat()
    health.set_ready(True)
    expected = b"failed: fenced: another process uses transactional id ns.orchestrator.n1\n"
    assert get(server.port, "/healthz")[:2] == (503, expected)
    assert get(server.port, "/ready")[:2] == (503, expected)
    assert health.failed == "fenced: another process uses transactional id ns.orchestrator.n1"


def test_metrics_is_the_registry_exposition(
    served: tuple[Health, HealthServer], registry: CollectorRegistry
) -> None:
    _, server = served
    status, body, content_type = get(server.port, "/metrics")
    assert status == 200
    assert body == generate_latest(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
    }
    assert samples["things_total"] == 3
    status, zipped, _ = get(server.port, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and gzip.decompress(zipped) == body
    status, _, content_type = get(
        server.port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")


@pytest.mark.parametrize("path", ["/", "/health", "/metrics/x", "/readyz", "/favicon.ico"])
def test_any_other_path_is_404(served: tuple[Health, HealthServer], path: str) -> None:
    _, server = served
    assert get(server.port, path)[0] == 404


def test_without_a_registry_metrics_is_404_and_health_still_answers() -> None:
    with serve_http(Health(), None, 0, addr="127.0.0.1") as server:
        assert server is not None
        assert get(server.port, "/metrics")[0] == 404
        assert get(server.port, "/healthz")[0] == 200


def test_no_port_serves_nothing() -> None:
    with serve_http(Health(), None, None) as server:
        assert server is None


def test_the_server_closes_with_the_block() -> None:
    with serve_http(Health(), None, 0, addr="127.0.0.1") as server:
        assert server is not None
        port = server.port
    with pytest.raises(urllib.error.URLError):
        get(port, "/healthz")


def test_settings_serve_nothing_by_default_and_stale_after_a_minute() -> None:
    settings = Settings()
    assert settings.metrics_port is None
    assert settings.health_stale_ms == 60_000
    assert Settings(metrics_port=0).metrics_port == 0


# --------------------------------------------------------------------------- the gauges


def _store_with(path: Path, statuses: list[str]) -> PartitionStore:
    store = PartitionStore(path)
    batch = StoreBatch()
    for i, status in enumerate(statuses):
        finished = None if status == "RUNNING" else 123
        summary = WorkflowSummary(f"wf-{i}", "trip", status, 3, None, finished)
        batch.set_summary(summary, None)
    store.write(batch)
    return store


def gauge_values(metrics: NodeMetrics, name: str) -> dict[str, float]:
    body = generate_latest(metrics.registry).decode()
    return {
        s.labels.get("status", ""): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if s.name == name
    }


def test_count_workflows_sums_the_stores_by_status(tmp_path: Path) -> None:
    stores = [
        _store_with(tmp_path / "p0", ["RUNNING", "COMPLETED", "COMPLETED", "PARKED"]),
        _store_with(tmp_path / "p1", ["RUNNING", "RUNNING", "COMPENSATED"]),
    ]
    try:
        metrics = NodeMetrics()
        assert metrics.count_workflows(stores)
        assert gauge_values(metrics, "saga_workflows") == {
            "RUNNING": 3,
            "COMPLETED": 2,
            "PARKED": 1,
            "COMPENSATED": 1,
        }
    finally:
        for store in stores:
            store.close()


def test_count_workflows_reads_no_store_until_it_is_due() -> None:
    clock = FakeClock()
    metrics = NodeMetrics(census_every_s=10, clock=clock)
    reads: list[int] = []

    class Store:
        def status_counts(self) -> dict[str, int]:
            reads.append(1)
            return {"RUNNING": len(reads)}

    def stores() -> Iterator[Store]:
        yield Store()

    assert metrics.count_workflows(stores())  # the first call counts
    clock.now += 9.9
    assert not metrics.count_workflows(stores())
    assert len(reads) == 1
    clock.now += 0.1
    assert metrics.count_workflows(stores())
    assert gauge_values(metrics, "saga_workflows") == {"RUNNING": 2}
    metrics.owned_partitions(4)  # other partitions: count at once, not 10 s later
    clock.now += 1
    assert metrics.count_workflows(stores())
    assert gauge_values(metrics, "saga_workflows") == {"RUNNING": 3}
    assert gauge_values(metrics, "saga_owned_partitions") == {"": 4}


def test_a_status_no_longer_counted_reads_zero() -> None:
    metrics = NodeMetrics()
    metrics.workflows_by_status({"RUNNING": 5, "COMPLETED": 2})
    metrics.workflows_by_status({"COMPLETED": 7})
    assert gauge_values(metrics, "saga_workflows") == {"RUNNING": 0, "COMPLETED": 7}


def test_status_counts_follow_status_changes_and_removals(tmp_path: Path) -> None:
    # The counts are kept with every write (the visibility index), not read from each summary.
    store = _store_with(tmp_path / "p0", ["RUNNING", "RUNNING"])
    try:
        batch = StoreBatch()
        batch.set_summary(WorkflowSummary("wf-0", "trip", "PARKED", 9, None, 456), None)
        batch.remove_workflow("wf-1", 3, None)
        store.write(batch)
        assert store.status_counts() == {"PARKED": 1}
    finally:
        store.close()
