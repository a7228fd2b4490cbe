"""Prometheus metrics of an orchestrator node or a service, each with its own registry.

No process-wide registry: a :class:`NodeMetrics` or :class:`ServiceMetrics` owns a
``CollectorRegistry`` (or is given one), and :func:`orchestrator._health.serve_http` exposes it
over HTTP on the ``metrics_port`` setting, beside ``/healthz`` and ``/ready``. Two nodes in one
process (tests) never share a counter.

The processor feeds the node metrics from the same places as its ``Counters``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CENSUS_EVERY_S", "NodeMetrics", "ServiceMetrics"]

#: How often the node counts its workflows by status. The count reads the count keys the
#: visibility index keeps per status and type (a few keys per partition); it once read every
#: summary, which is why it runs far less often than each turn. A Prometheus scrape every 15-30 s
#: sees a count at most this old.
CENSUS_EVERY_S = 10.0

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_TRANSACTION_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
    0.25, 1, 5, 15,
)  # fmt: skip


class NodeMetrics:
    """What an orchestrator node counts. Names start with ``saga_``."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        census_every_s: float = CENSUS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        # Milliseconds matter here: a transaction takes 2-4 ms on a healthy broker, and each
        # step of a saga waits for one (docs/performance.md); the latency buckets start at 5.
        self.transaction_seconds = Histogram(
            "saga_transaction_seconds",
            "Time of a committed transaction, from its begin to its commit returning: "
            "producing, sending the inbox offsets, committing",
            buckets=_TRANSACTION_BUCKETS,
            registry=r,
        )
        self.workflows = Gauge(
            "saga_workflows",
            "Workflows in the local state of the owned partitions, by status (RUNNING, or a "
            "final status until the retention removes them); counted every few seconds",
            ["status"],
            registry=r,
        )
        self.partitions_owned = Gauge(
            "saga_owned_partitions",
            "Inbox partitions assigned to this node and restored",
            registry=r,
        )
        self._finished: dict[tuple[str, ...], Any] = {}
        self._attempts: dict[tuple[str, ...], Any] = {}
        self._steps: dict[tuple[str, ...], Any] = {}
        self._census_every_s = census_every_s
        self._clock = clock
        self._last_census: float | None = None
        self._statuses: set[str] = set()

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

    def owned_partitions(self, count: int) -> None:
        self.partitions_owned.set(count)
        self._last_census = None  # other partitions, other workflows: count at the next turn

    def workflows_by_status(self, counts: Mapping[str, int]) -> None:
        """Set ``saga_workflows``; a status counted before and absent now reads 0, not stale."""
        for status in self._statuses - counts.keys():
            self.workflows.labels(status=status).set(0)
        for status, count in counts.items():
            self.workflows.labels(status=status).set(count)
        self._statuses.update(counts)

    def count_workflows(self, stores: Iterable[_StatusCounting], *, force: bool = False) -> bool:
        """Count the workflows of ``stores`` by status, at most every ``census_every_s`` and at
        the first call after :meth:`owned_partitions`.

        Call it every turn of the loop with a lazy iterable: when the count is not due, the
        stores are not touched. Returns whether it counted.
        """
        now = self._clock()
        last = self._last_census
        if not force and last is not None and now - last < self._census_every_s:
            return False
        self._last_census = now
        counts: dict[str, int] = {}
        for store in stores:
            for status, count in store.status_counts().items():
                counts[status] = counts.get(status, 0) + count
        self.workflows_by_status(counts)
        return True


class _StatusCounting(Protocol):
    def status_counts(self) -> dict[str, int]: ...


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
