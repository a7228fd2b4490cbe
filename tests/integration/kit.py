"""A three-step saga and its services, parameterised by a prefix so tests never share topics.

The services keep each effect in a dict keyed by the idempotency key, as a real service would:
``effects`` tells how often each logical operation was applied (must be once).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from contracts.activity import ActivityContract
from contracts.envelopes import RetryPolicy, WorkflowStatus
from orchestrator import workflow
from orchestrator.errors import BusinessError, RetryableError
from orchestrator.node import OrchestratorNode
from orchestrator.service import CommandInfo, Service
from orchestrator.settings import Settings
from orchestrator.topics import ensure_service_topic, ensure_topics
from orchestrator.workflow import Compensation, WorkflowContext, WorkflowRegistry


class Step(BaseModel):
    n: int
    fail: bool = False  # a business failure
    flaky: int = 0  # retryable failures before the first success
    silent: int = 0  # attempts that get no reply (attempt timeouts)
    slow_ms: int = 0  # how long the service works on it before it answers


class Done(BaseModel):
    n: int
    ref: str


class Trip(BaseModel):
    fail_at: int = 0
    flaky_at: int = 0
    flaky: int = 0
    silent_at: int = 0
    silent: int = 0
    sleep_ms: int = 0
    wait_signal: bool = False
    timeout_ms: int = 1000  # each step's attempt timeout


class TripResult(BaseModel):
    refs: list[str]
    approved_by: str = ""


class Approval(BaseModel):
    by: str


@dataclass
class Kit:
    prefix: str
    services: tuple[str, ...]
    registry: WorkflowRegistry
    effects: Counter[str] = field(default_factory=Counter)  # "<activity>|<idempotency key>"
    attempts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def steps_of(self, workflow_id: str) -> list[str]:
        """The activities applied for a workflow, in the order the keys' seq says."""
        mine = [k for k in self.effects if k.split("|")[1].startswith(workflow_id + "/")]
        mine.sort(key=lambda k: int(k.rsplit("/", 1)[1]))
        return [k.split("|")[0].split(".", 1)[1] for k in mine]


def build(prefix: str) -> Kit:
    svc = (f"{prefix}-a", f"{prefix}-b", f"{prefix}-c")
    do = [ActivityContract(f"{s}.do", s, Step, Done) for s in svc]
    undo = [ActivityContract(f"{s}.undo", s, Step, Done) for s in svc]

    def step(trip: Trip, n: int) -> Step:
        return Step(
            n=n,
            fail=trip.fail_at == n,
            flaky=trip.flaky if trip.flaky_at == n else 0,
            silent=trip.silent if trip.silent_at == n else 0,
        )

    @workflow.defn(name="trip")
    class TripSaga:
        @workflow.run
        async def run(self, ctx: WorkflowContext, trip: Trip) -> TripResult:
            refs: list[str] = []
            approved_by = ""
            retry = RetryPolicy(max_attempts=4, initial_interval_ms=50, max_interval_ms=200)
            undo_retry = RetryPolicy(max_attempts=10, initial_interval_ms=50)
            async with ctx.saga():
                for n in (1, 2, 3):
                    if n == 3 and trip.sleep_ms:
                        await ctx.sleep(timedelta(milliseconds=trip.sleep_ms))
                    if n == 3 and trip.wait_signal:
                        approved_by = (await ctx.wait_signal("approve", Approval)).by
                    # compensate= (not saga.on_failure after the call): a cancel that comes
                    # while the step is in flight waits for it and undoes it if it succeeded.
                    done = await ctx.call(
                        do[n - 1],
                        step(trip, n),
                        retry=retry,
                        timeout=timedelta(milliseconds=trip.timeout_ms),
                        compensate=Compensation(undo[n - 1], Step(n=n), undo_retry),
                    )
                    refs.append(done.ref)
            return TripResult(refs=refs, approved_by=approved_by)

    return Kit(prefix, svc, WorkflowRegistry([TripSaga]))


def mixed_trip(i: int, max_sleep_s: int = 12) -> tuple[Trip, WorkflowStatus, list[str]]:
    """Saga ``i`` of a mix of outcomes, with durable sleeps that spread the sagas over several
    seconds: its input, its expected status and the steps its services apply, in order."""
    sleep_ms = (i % max_sleep_s) * 1000
    if i % 5 == 0:
        trip = Trip(fail_at=3, sleep_ms=sleep_ms)
        return trip, WorkflowStatus.COMPENSATED, ["do", "do", "undo", "undo"]
    if i % 7 == 0:
        trip = Trip(flaky_at=2, flaky=1, sleep_ms=sleep_ms)
        return trip, WorkflowStatus.COMPLETED, ["do", "do", "do"]
    return Trip(sleep_ms=sleep_ms), WorkflowStatus.COMPLETED, ["do", "do", "do"]


def settings_for(
    bootstrap: str, namespace: str, state_dir: Path, node_id: str = "n1", **extra: Any
) -> Settings:
    return Settings(
        bootstrap_servers=bootstrap,
        namespace=namespace,
        partitions=3,
        state_dir=state_dir,
        node_id=node_id,
        **extra,
    )


def create_topics(kit: Kit, settings: Settings) -> None:
    ensure_topics(
        settings.bootstrap_servers,
        settings.namespace,
        settings.partitions,
        settings.replication_factor,
        min_insync_replicas=settings.min_insync_replicas,
        client_config=settings.client_extra(),
    )
    for name in kit.services:
        ensure_service_topic(
            settings.bootstrap_servers,
            f"{name}.commands",
            3,
            settings.replication_factor,
            min_insync_replicas=settings.min_insync_replicas,
            client_config=settings.client_extra(),
        )


def make_service(kit: Kit, name: str, settings: Settings, **options: Any) -> Service:
    """The service ``name`` of the kit, answering its do/undo activities (``options`` go to
    ``Service``: a tracer provider, metrics)."""
    service = Service(name, settings, state_dir=Path(settings.state_dir) / "svc", **options)
    for contract in (
        ActivityContract(f"{name}.do", name, Step, Done),
        ActivityContract(f"{name}.undo", name, Step, Done),
    ):
        service.handler(contract)(_handler(kit, contract.name))
    return service


class ThreadStack:
    """An orchestrator node and the kit's services in threads of the test process.

    Subclasses decide how a node and a service are built (tracing, metrics)."""

    def __init__(self, kit: Kit, settings: Settings) -> None:
        self.kit = kit
        self.settings = settings
        self.nodes_started = 0
        self._node: tuple[threading.Thread, threading.Event, OrchestratorNode] | None = None
        self._services: list[tuple[threading.Thread, threading.Event]] = []

    def make_node(self) -> OrchestratorNode:
        return OrchestratorNode(self.settings, self.kit.registry)

    def make_service(self, index: int, name: str) -> Service:
        return make_service(self.kit, name, self.settings)

    def start_node(self) -> OrchestratorNode:
        stop = threading.Event()
        node = self.make_node()
        thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
        thread.start()
        self._node = (thread, stop, node)
        self.nodes_started += 1
        return node

    def stop_node(self) -> None:
        assert self._node is not None
        thread, stop, _ = self._node
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        self._node = None

    def start_services(self) -> None:
        for index, name in enumerate(self.kit.services):
            stop = threading.Event()
            service = self.make_service(index, name)
            thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
            thread.start()
            self._services.append((thread, stop))

    def close(self) -> None:
        if self._node is not None:
            self.stop_node()
        for thread, stop in self._services:
            stop.set()
            thread.join(30)


def _handler(kit: Kit, activity: str) -> Any:
    def handle(arg: Step, info: CommandInfo) -> Done:
        key = f"{activity}|{info.idempotency_key}"
        with kit.lock:
            kit.attempts[key] += 1
            attempt = kit.attempts[key]
        if attempt <= arg.silent:
            # Answer after the 1 s attempt timeout: the orchestrator has moved on already.
            time.sleep(1.3)
            raise RetryableError(f"{activity} answered too late (attempt {attempt})")
        if attempt <= arg.silent + arg.flaky:
            raise RetryableError(f"{activity} is flaky (attempt {attempt})")
        if arg.slow_ms:
            time.sleep(arg.slow_ms / 1000)
        if arg.fail:
            raise BusinessError(f"{activity} refused", error_type="Refused")
        with kit.lock:
            kit.effects[key] += 1  # the service's own dedupe makes this once per key
        return Done(n=arg.n, ref=f"{activity}#{arg.n}")

    return handle
