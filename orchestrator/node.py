"""An orchestrator node: one process of the consumer group that runs workflows.

    from orchestrator import OrchestratorNode, Settings, WorkflowRegistry
    node = OrchestratorNode(Settings(namespace="shop"), WorkflowRegistry([PlaceOrder]))
    node.run()          # until SIGTERM / SIGINT, or until ``stop`` is set

Run several nodes with different ``node_id`` values: Kafka spreads the partitions among them, and
a partition that moves is restored on its new owner from the history topic.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from orchestrator._engine.processor import Counters, Processor
from orchestrator.settings import Settings
from orchestrator.workflow import WorkflowRegistry

log = logging.getLogger(__name__)


class OrchestratorNode:
    def __init__(self, settings: Settings, registry: WorkflowRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._processor: Processor | None = None

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
        self._processor = Processor(self.settings, self.registry)
        log.info(
            "node %s runs %s on %s (namespace %s)",
            self.settings.node_id, ", ".join(self.registry.names()),
            self.settings.bootstrap_servers, self.settings.namespace,
        )  # fmt: skip
        self._processor.run(stop)
