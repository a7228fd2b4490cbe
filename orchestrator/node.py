"""An orchestrator node: one process of the consumer group that runs workflows.

    from orchestrator import OrchestratorNode, Settings, WorkflowRegistry
    node = OrchestratorNode(Settings(namespace="shop"), WorkflowRegistry([PlaceOrder]))
    node.run()          # until SIGTERM / SIGINT, or until ``stop`` is set

Run several nodes with different ``node_id`` values: Kafka spreads the partitions among them, and
a partition that moves is restored on its new owner from the history topic.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from types import FrameType

from opentelemetry.trace import TracerProvider

from orchestrator._engine.decide import Counters
from orchestrator._engine.processor import InboxConsumerLost, Processor
from orchestrator._queries import handle_http
from orchestrator.errors import NodeStopped
from orchestrator.health import Health, HealthServer, serve_http
from orchestrator.metrics import NodeMetrics
from orchestrator.nodes import NodeRegistrar
from orchestrator.schedule import with_schedules
from orchestrator.settings import Settings
from orchestrator.topics import verify_topics
from orchestrator.tracing import WorkflowTracer
from orchestrator.visibility import OwnedStores, VisibilityApi
from orchestrator.workflow import WorkflowRegistry

#: In-process restarts after a lost inbox consumer (a broker failover) before the node gives up.
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 600.0

log = logging.getLogger(__name__)


#: Garbage-collection thresholds for a process that hosts a node. A node keeps many small,
#: long-lived objects; with Python's defaults a full collection ran about once a second, each a
#: 50-260 ms pause of the loop, which set the p99 step latency (docs/performance.md).
GC_THRESHOLD = (50_000, 50, 1000)


def tune_gc() -> None:
    """Apply :data:`GC_THRESHOLD` to this process (``orchestrator run`` does it)."""
    gc.set_threshold(*GC_THRESHOLD)


class OrchestratorNode:
    def __init__(
        self,
        settings: Settings,
        registry: WorkflowRegistry,
        *,
        tracer_provider: TracerProvider | None = None,
        metrics: NodeMetrics | None = None,
        with_metrics: bool = True,
    ) -> None:
        """``tracer_provider``: spans of this node (none without one; ``tracing.setup`` makes
        one from the ``OTEL_*`` variables). ``metrics``: served on ``settings.metrics_port``
        with ``/healthz`` and ``/ready`` (:attr:`health`); ``with_metrics=False`` keeps no
        metrics at all (the benchmark measures what they cost)."""
        self.settings = settings
        # The node's setting is the default attempt timeout of every activity its workflows call.
        # Every node runs the schedule workflow too (orchestrator schedule create).
        self.registry = with_schedules(registry).with_activity_timeout(settings.activity_timeout)
        self.tracer_provider = tracer_provider
        self.metrics: NodeMetrics | None = None
        if with_metrics:
            self.metrics = metrics if metrics is not None else NodeMetrics()
        self._processor: Processor | None = None
        self.health = Health(
            settings.health_stale_ms / 1000, not_ready_reason="waiting for a partition assignment"
        )
        self._http: HealthServer | None = None
        # Visibility: the owned partitions' stores, read by the query API on the HTTP server.
        self.owned = OwnedStores()
        self._api = VisibilityApi(self.owned, settings.node_id)

    @property
    def http_port(self) -> int | None:
        """The port of ``/metrics``, ``/healthz``, ``/ready`` while it serves (the one the OS
        picked when ``metrics_port`` is 0), else None."""
        return self._http.port if self._http is not None else None

    @property
    def url(self) -> str | None:
        """Where clients reach this node's HTTP server (query API), while it serves."""
        port = self.http_port
        return f"http://{self.settings.advertised_host}:{port}" if port is not None else None

    @property
    def counters(self) -> Counters:
        return self._processor.counters if self._processor else Counters()

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():

            def _stop(signum: int, frame: FrameType | None) -> None:
                log.info("signal %d: stopping after the current batch", signum)
                stop.set()

            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)
        # Served from the start: a probe sees "alive, not ready" while the topics are checked
        # and init_transactions waits, instead of a refused connection.
        registry = self.metrics.registry if self.metrics is not None else None
        with serve_http(
            self.health, registry, self.settings.metrics_port, routes=self._routes
        ) as self._http:
            try:
                self._run(stop)
            except NodeStopped as exc:
                self.health.fail(str(exc))
                log.error("node %s stops: %s", self.settings.node_id, exc)
                raise
            finally:
                self._http = None

    def _routes(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes] | None:
        """``/workflows/<id>/query/<name>``: answered by the processing thread; the other
        ``/workflows`` paths (list, counts, a workflow's state): read from the stores by the
        HTTP thread (``orchestrator.visibility``)."""
        processor = self._processor
        answer = handle_http(
            method, target, body, processor.queries if processor is not None else None, 10.0
        )
        if answer is not None:
            return answer
        return self._api.route(method, target, body)

    def _run(self, stop: threading.Event) -> None:
        # Fail at once, with every problem listed, rather than wait on a missing inbox.
        verify_topics(
            self.settings.bootstrap_servers,
            self.settings.namespace,
            self.settings.partitions,
            self.settings.replication_factor,
            min_insync_replicas=self.settings.min_insync_replicas,
            client_config=self.settings.client_extra(),
            under_replicated_is_problem=False,  # a broker restarting must not stop a node
        )
        tracer = None
        if self.tracer_provider is not None:
            tracer = WorkflowTracer(self.tracer_provider, inbox=self.settings.inbox)
        restarts: list[float] = []
        registrar: NodeRegistrar | None = None
        stopped = False
        try:
            while not stop.is_set():
                self._processor = Processor(
                    self.settings,
                    self.registry,
                    tracer=tracer,
                    metrics=self.metrics,
                    health=self.health,
                    owned=self.owned,
                )
                log.info(
                    "node %s runs %s on %s (namespace %s)",
                    self.settings.node_id, ", ".join(self.registry.names()),
                    self.settings.bootstrap_servers, self.settings.namespace,
                )  # fmt: skip
                if registrar is None:
                    # Registered once the group claim (made by the processor) let this node in:
                    # a second process with the same node id is refused before it could
                    # overwrite the record.
                    registrar = NodeRegistrar(self.settings, self.url)
                    registrar.update(self.owned.numbers())
                    self.owned.listen(registrar.update)
                try:
                    self._processor.run(stop)
                    return
                except InboxConsumerLost as exc:
                    # run() closed the consumer, the partitions and the claim: a new processor
                    # restores its partitions and fences the old producer, as after a restart.
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < _RESTART_WINDOW_S] + [now]
                    if len(restarts) > _MAX_RESTARTS:
                        raise NodeStopped(
                            f"the inbox consumer was lost {len(restarts)} times within "
                            f"{_RESTART_WINDOW_S:.0f}s: {exc}"
                        ) from exc
                    log.warning("inbox consumer lost (%s); starting the processor over", exc)
                    stop.wait(1.0)
        except NodeStopped:
            stopped = True  # fenced, maybe: the record may be another process's by now
            raise
        finally:
            if registrar is not None:
                self.owned.unlisten(registrar.update)
                registrar.close(tombstone=not stopped)
