"""Prometheus metrics of an orchestrator node or a service, each with its own registry.

No process-wide registry: a :class:`NodeMetrics` or :class:`ServiceMetrics` owns a
``CollectorRegistry`` (or is given one), and :func:`serve_metrics` exposes it over HTTP on the
``metrics_port`` setting (0 = off). Two nodes in one process (tests) never share a counter.

The processor feeds the node metrics from the same places as its ``Counters``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["NodeMetrics", "ServiceMetrics", "serve_metrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class NodeMetrics:
    """What an orchestrator node counts. Names start with ``saga_``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.workflows_started = Counter(
            "saga_workflows_started", "Workflows started on this node", registry=r
        )
        self.workflows_finished = Counter(
            "saga_workflows_finished",
            "Workflows finished, by final status (COMPLETED, FAILED, COMPENSATED, CANCELLED, "
            "PARKED)",
            ["status"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "saga_step_seconds",
            "Activity step latency: from the command of an attempt to the reply that ends it",
            ["activity", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.activity_attempts = Counter(
            "saga_activity_attempts",
            "Activity commands sent (every attempt), compensation=true for compensations",
            ["activity", "compensation"],
            registry=r,
        )
        self.inbox_lag = Gauge(
            "saga_inbox_consumer_lag",
            "Inbox records not yet consumed, per assigned partition",
            ["partition"],
            registry=r,
        )
        self.restore_seconds = Histogram(
            "saga_restore_seconds",
            "Time to restore a partition's state from the history topic",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.restored_events = Counter(
            "saga_restored_events", "History events read by restores", registry=r
        )
        self.dead_letters = Counter(
            "saga_dead_letters", "Records written to the dead-letter topic", registry=r
        )
        self.transactions = Counter(
            "saga_transactions", "Kafka transactions, by result", ["result"], registry=r
        )
        self._finished: dict[tuple[str, ...], Any] = {}
        self._attempts: dict[tuple[str, ...], Any] = {}
        self._steps: dict[tuple[str, ...], Any] = {}

    # ``labels()`` builds and looks up a key on every call; the loop calls these per event, so
    # each labelled child is looked up once and kept.

    def finished(self, status: str) -> None:
        _child(self._finished, self.workflows_finished, (status,)).inc()

    def attempt(self, activity: str, compensation: bool) -> None:
        key = (activity, "true" if compensation else "false")
        _child(self._attempts, self.activity_attempts, key).inc()

    def step(self, activity: str, outcome: str, seconds: float) -> None:
        _child(self._steps, self.step_seconds, (activity, outcome)).observe(max(0.0, seconds))

    def restored(self, events: int, seconds: float) -> None:
        self.restore_seconds.observe(seconds)
        self.restored_events.inc(events)

    def lag(self, partition: int, records: int) -> None:
        self.inbox_lag.labels(partition=str(partition)).set(max(0, records))

    def forget_partition(self, partition: int) -> None:
        with contextlib.suppress(KeyError):
            self.inbox_lag.remove(str(partition))


def _child(cache: dict[tuple[str, ...], Any], metric: Any, key: tuple[str, ...]) -> Any:
    child = cache.get(key)
    if child is None:
        child = cache[key] = metric.labels(*key)
    return child


class ServiceMetrics:
    """What a service counts: commands handled by outcome, handler time, dead letters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.commands = Counter(
            "saga_service_commands",
            "Commands answered, by activity and outcome",
            ["activity", "outcome"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "saga_service_handler_seconds",
            "Time spent answering one command",
            ["activity"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "saga_dead_letters", "Records written to the dead-letter topic", registry=r
        )

    def answered(self, activity: str, outcome: str, seconds: float) -> None:
        self.commands.labels(activity=activity, outcome=outcome).inc()
        self.handler_seconds.labels(activity=activity).observe(seconds)


@contextlib.contextmanager
def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Iterator[int]:
    """Serve ``registry`` at ``http://addr:port/metrics`` while the block runs (0: do not)."""
    if port == 0:
        yield 0
        return
    server, thread = start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, server.server_port)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
