"""500 order sagas on a 3-broker cluster while the broker that leads the inbox is SIGKILLed.

Two orchestrator nodes and the example services run as processes against the cluster
(``tests/cluster/conftest.py``); the namespace's topics get replication factor 3 and
``min.insync.replicas`` 2 by default. Mid-run, the broker leading inbox partition 0 is killed
(no clean shutdown: its leaderships, perhaps the active controller, and a third of the
transaction and group coordinators go with it), and restarted a little later. Then:

* every saga ends as its scenario says, and the services' effects are exactly those of the
  completed orders (stock, money and shipments, each once per order);
* the history topic holds each (workflow id, seq) once, with seqs 1..n and no gap;
* ``topics verify`` reported the topics as under-replicated while the broker was down, and
  passes once it is back in every ISR.

The figures (fail-over, how long results stalled, catch-up of the restarted broker) are printed.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from contracts.envelopes import WorkflowStatus
from deploy.kafka import broker
from orchestrator.client import Client
from orchestrator.settings import Settings
from orchestrator.topics import TopicAdminError, TopicMismatch, delete_topics, verify_topics
from services_example.contracts import Order
from services_example.processes import Processes
from tests.integration.procs import ResultWatcher, assert_history_sound

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SAGAS = 500
KILL_AFTER = 150  # results seen before the kill: sagas are in flight, more are still coming
CUSTOMERS = [f"c{i}" for i in range(10)]
STOCK = {"book": 100_000, "lamp": 100_000, "mug": 100_000}
BALANCE = 100_000_000


def scenario(n: int) -> tuple[Order, WorkflowStatus]:
    """Order ``n`` and how its saga must end."""
    order = Order(
        order_id=f"o{n}",
        customer=CUSTOMERS[n % len(CUSTOMERS)],
        sku=("book", "lamp", "mug")[n % 3],
        qty=1 + n % 4,
        amount=1000 + 37 * n,
    )
    kind = n % 10
    if kind == 6:  # charge declined: release the stock
        return order.model_copy(update={"card": "declined-card"}), WorkflowStatus.COMPENSATED
    if kind == 7:  # shipping refuses: refund, release
        return order.model_copy(update={"address": "Igloo 3, North Pole"}), (
            WorkflowStatus.COMPENSATED
        )
    if kind == 8:  # out of stock: nothing to undo
        return order.model_copy(update={"qty": 1_000_000}), WorkflowStatus.FAILED
    if kind == 9:  # a durable sleep after shipping, across the outage for some
        return order.model_copy(update={"settle_seconds": 2}), WorkflowStatus.COMPLETED
    if kind == 4:  # waits for a signal, sent right after the start
        return order.model_copy(update={"confirm_delivery": True}), WorkflowStatus.COMPLETED
    return order, WorkflowStatus.COMPLETED


@pytest.fixture
def procs(
    kafka_cluster: broker.ClusterLayout, namespace: str, tmp_path: Path
) -> Iterator[Processes]:
    p = Processes(
        kafka_cluster.bootstrap,
        namespace,
        tmp_path,
        nodes=2,
        extra_env={
            "INVENTORY_STOCK": ",".join(f"{k}={v}" for k, v in STOCK.items()),
            "PAYMENTS_BALANCES": ",".join(f"{c}={BALANCE}" for c in CUSTOMERS),
        },
    )
    p.create_topics()
    p.start_all()
    try:
        p.wait_ready(timeout=120)
        yield p
    finally:
        p.stop_all()
        delete_topics(kafka_cluster.bootstrap, namespace)


def _leaders(admin: AdminClient, topics: list[str]) -> dict[tuple[str, int], int]:
    metadata = admin.list_topics(timeout=5)
    return {
        (name, p.id): p.leader for name in topics for p in metadata.topics[name].partitions.values()
    }


def _missing_from_isr(admin: AdminClient, node_id: int) -> list[str]:
    """Partitions (all topics, internal ones included) whose ISR lacks ``node_id``."""
    try:
        metadata = admin.list_topics(timeout=5)
    except KafkaException:
        return ["(no metadata)"]
    return [
        f"{name}/{p.id}"
        for name, topic in metadata.topics.items()
        for p in topic.partitions.values()
        if node_id in p.replicas and node_id not in p.isrs
    ]


class Submitter(threading.Thread):
    """Starts the sagas at a steady pace, so that some are started during the outage."""

    def __init__(self, client: Client, plays: list[tuple[Order, WorkflowStatus]]) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.plays = plays
        self.error: BaseException | None = None
        self.sent = 0

    def run(self) -> None:
        try:
            for order, _ in self.plays:
                workflow_id = f"order-{order.order_id}"
                self.client.start("place-order", order, workflow_id=workflow_id)
                if order.confirm_delivery:  # buffered by the saga until it waits for it
                    self.client.signal(workflow_id, "confirm-delivery", {"by": "cluster-test"})
                self.sent += 1
                time.sleep(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc


class ArrivalClock(threading.Thread):
    """When each result was first seen (the watcher keeps only the results)."""

    def __init__(self, watcher: ResultWatcher) -> None:
        super().__init__(daemon=True)
        self.watcher = watcher
        self.arrivals: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            seen = len(self.watcher.found)
            now = time.monotonic()
            self.arrivals.extend([now] * (seen - len(self.arrivals)))
            time.sleep(0.02)


def test_500_sagas_survive_killing_the_inbox_leader(
    kafka_cluster: broker.ClusterLayout, procs: Processes, namespace: str
) -> None:
    began = time.monotonic()
    settings = Settings.model_validate(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_cluster.bootstrap,
            "namespace": namespace,
            "partitions": procs.partitions,
        }
    )
    report = verify_topics(settings.bootstrap_servers, namespace, settings.partitions)
    assert (report.replication_factor, report.min_insync_replicas) == (3, 2)

    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap, "log_level": 0})
    plays = [scenario(n) for n in range(SAGAS)]
    watcher = ResultWatcher(settings)
    watcher.start()
    clock = ArrivalClock(watcher)
    clock.start()
    with Client(settings) as client:
        submitter = Submitter(client, plays)
        submitter.start()
        while len(watcher.found) < KILL_AFTER:
            assert submitter.error is None, submitter.error
            assert time.monotonic() - began < 150, f"only {len(watcher.found)} results"
            time.sleep(0.05)

        # -- the kill ----------------------------------------------------------------------
        victim = _leaders(admin, [settings.inbox])[(settings.inbox, 0)]
        in_flight = submitter.sent - len(watcher.found)
        killed_at = time.monotonic()
        broker.kill_node(kafka_cluster, victim)
        ours = [settings.inbox, settings.history, settings.results]
        failover_s = None
        under_replicated: list[str] = []
        while time.monotonic() - killed_at < 60:
            try:
                leaders = _leaders(admin, ours)
            except Exception:  # the metadata request went to the dead broker: ask again
                time.sleep(0.2)
                continue
            if failover_s is None and all(lead not in (victim, -1) for lead in leaders.values()):
                failover_s = time.monotonic() - killed_at
            if failover_s is not None:
                try:
                    verify_topics(settings.bootstrap_servers, namespace, settings.partitions)
                except TopicMismatch as exc:
                    under_replicated = [p for p in exc.problems if "under-replicated" in p]
                except TopicAdminError:
                    pass  # a request that went to the dead broker timed out: ask again
                if under_replicated:
                    break
            time.sleep(0.2)
        assert failover_s is not None, "no new leaders within 60 s of the kill"
        assert under_replicated, "topics verify did not report the under-replicated topics"
        down_s = time.monotonic() - killed_at

        # -- the restart -------------------------------------------------------------------
        restarting_at = time.monotonic()
        broker.start_node(kafka_cluster, victim)
        restart_took_s = time.monotonic() - restarting_at
        isr_full_s = None
        while time.monotonic() - killed_at < 180:
            if isr_full_s is None and not _missing_from_isr(admin, victim):
                isr_full_s = time.monotonic() - killed_at
            if isr_full_s is not None and len(watcher.found) >= SAGAS:
                break
            time.sleep(0.2)
        submitter.join(60)
        assert submitter.error is None, submitter.error
        watcher.wait_for(SAGAS, timeout=120)
        watcher.close()
        clock.halt.set()
    assert isr_full_s is not None, f"node {victim} not back in every ISR"
    verify_topics(settings.bootstrap_servers, namespace, settings.partitions)  # healthy again

    # -- every saga ended as its scenario says -----------------------------------------------
    got = {wf: result.status for wf, result in watcher.found.items()}
    want = {f"order-{order.order_id}": status for order, status in plays}
    missing = sorted(set(want) - set(got))
    assert not missing, f"{len(missing)} sagas without a result, e.g. {missing[:5]}"
    wrong = {wf: (got[wf], want[wf]) for wf in want if got[wf] != want[wf]}
    assert not wrong, f"{len(wrong)} sagas ended wrongly, e.g. {sorted(wrong.items())[:5]}"
    assert not procs.dead(), f"a process died; see {procs.log_dir}"

    # -- no history event written twice, none missing ------------------------------------------
    assert_history_sound(settings, sorted(want))

    # -- each effect once: exactly the completed orders took stock, money and a shipment ------
    _wait_quiet(procs)
    _assert_effects(procs, plays)

    stall_s, resumed_s = _stall(clock.arrivals, killed_at)
    per_2s = Counter(int((t - killed_at) // 2) for t in clock.arrivals if t >= killed_at)
    timeline = " ".join(str(per_2s.get(n, 0)) for n in range(max(per_2s, default=0) + 1))
    print(
        f"\n{SAGAS} sagas, 2 nodes, 3 brokers (RF 3, min.insync.replicas 2); broker {victim} "
        f"(leader of {settings.inbox}/0) SIGKILLed with {in_flight} sagas in flight and "
        f"restarted {down_s:.1f}s later (it took {restart_took_s:.1f}s to rejoin):\n"
        f"  new leaders for every partition of the namespace {failover_s:.1f}s after the kill\n"
        f"  longest pause of the results after the kill {stall_s:.1f}s, ending {resumed_s:.1f}s "
        f"after the kill (time to recover)\n"
        f"  results per 2 s from the kill: {timeline}\n"
        f"  topics verify reported under-replication ({len(under_replicated)} topics) while "
        f"the broker was down ({down_s:.1f}s)\n"
        f"  restarted broker back in every ISR {isr_full_s:.1f}s after the kill\n"
        f"  all {SAGAS} sagas ended as expected, history sound, effects once each; "
        f"test took {time.monotonic() - began:.1f}s"
    )


def _stall(arrivals: list[float], killed_at: float) -> tuple[float, float]:
    """The longest pause between results after the kill, and when results came again."""
    after = [t for t in arrivals if t >= killed_at]
    if not after:
        return 0.0, 0.0
    points = [killed_at, *after]
    gap, end = max((b - a, b) for a, b in itertools.pairwise(points))
    return gap, end - killed_at


def _wait_quiet(procs: Processes, seconds: float = 2.0, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = [procs.snapshot(s) for s in ("inventory", "payments", "shipping")]
    since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < seconds:
        time.sleep(0.3)
        now = [procs.snapshot(s) for s in ("inventory", "payments", "shipping")]
        if [n and n["state"] for n in now] != [b and b["state"] for b in last]:
            last, since = now, time.monotonic()


def _assert_effects(procs: Processes, plays: list[tuple[Order, WorkflowStatus]]) -> None:
    inventory = procs.snapshot("inventory")
    payments = procs.snapshot("payments")
    shipping = procs.snapshot("shipping")
    assert inventory and payments and shipping
    done = [o for o, status in plays if status is WorkflowStatus.COMPLETED]
    undone = {o.order_id for o, status in plays if status is not WorkflowStatus.COMPLETED}
    done_ids = sorted(o.order_id for o in done)

    holds: list[dict[str, Any]] = list(inventory["state"]["holds"].values())
    pays: list[dict[str, Any]] = list(payments["state"]["payments"].values())
    ships: list[dict[str, Any]] = list(shipping["state"]["shipments"].values())
    for what, records in (("hold", holds), ("payment", pays), ("shipment", ships)):
        twice = {k: n for k, n in Counter(r["order_id"] for r in records).items() if n > 1}
        assert not twice, f"orders with more than one {what}: {sorted(twice.items())[:5]}"

    for sku, initial in STOCK.items():
        sold = sum(o.qty for o in done if o.sku == sku)
        assert inventory["state"]["stock"][sku] == initial - sold, sku
    assert sorted(h["order_id"] for h in holds if not h["released"]) == done_ids
    for customer in CUSTOMERS:
        charged = sum(o.amount for o in done if o.customer == customer)
        assert payments["state"]["balances"][customer] == BALANCE - charged, customer
    assert sorted(p["order_id"] for p in pays if not p["refunded"]) == done_ids
    assert all(p["refunded"] for p in pays if p["order_id"] in undone)
    assert sorted(s["order_id"] for s in ships if not s["cancelled"]) == done_ids
