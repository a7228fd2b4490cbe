"""Orchestrator nodes paused, fenced and killed mid-transaction: nothing doubled, nothing lost.

Each test runs real node processes against the real broker and checks the same invariants: every
saga ends in its expected state, every service effect is applied once, no history key is written
twice (two writers deciding the same (workflow, seq)), and every node is still alive or exited with
one clear line.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.envelopes import WorkflowStatus
from orchestrator.client import Client
from tests.faults.conftest import PrivateBroker
from tests.integration.kit import Kit, Trip, build, create_topics, mixed_trip, settings_for
from tests.integration.procs import (
    NodeProcess,
    ResultWatcher,
    assert_history_sound,
    service_threads,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SESSION_TIMEOUT_S = 10.0  # kafka_config.consumer_config's session.timeout.ms


@pytest.fixture
def services(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Kit]:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "svc-state")
    create_topics(kit, settings)
    with service_threads(kit, settings):
        yield kit


def _wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} within {timeout}s")


@pytest.mark.timeout(240)
def test_a_paused_node_writes_nothing_after_it_lost_its_partitions(
    services: Kit, kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    """SIGSTOP a node past the session timeout while its sagas sleep, twice: the other node
    finishes them; when the paused node wakes, its due timers and retention must not write."""
    kit = services
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "a")
    env = {"SAGA_RETENTION_MS": "6000"}  # finished sagas expire while the node is paused
    paused = NodeProcess(kit, namespace, tmp_path / "a", "a", kafka_bootstrap, env)
    other = NodeProcess(kit, namespace, tmp_path / "b", "b", kafka_bootstrap, env)
    watcher = ResultWatcher(settings)
    watcher.start()
    ids: list[str] = []
    try:
        paused.start()
        _wait_for_text(paused.log, "restored", 30)
        other.start()
        _wait_for_text(other.log, "restored", 30)
        time.sleep(2)  # the rebalance that split the partitions is over
        with Client(settings) as client:
            for round_ in range(2):
                batch = [f"pause-{round_}-{i}" for i in range(40)]
                for i, wf in enumerate(batch):
                    # Some finish at once (retention falls due during the pause), most sleep
                    # past the moment the node is paused (their timers fall due then).
                    client.start("trip", Trip(sleep_ms=0 if i % 4 == 0 else 3000), workflow_id=wf)
                ids.extend(batch)
                time.sleep(1.5)
                paused.signal(signal.SIGSTOP)
                time.sleep(SESSION_TIMEOUT_S + 6)  # the other node owns everything by now
                paused.signal(signal.SIGCONT)
                watcher.wait_for(len(ids), timeout=40)
                time.sleep(SESSION_TIMEOUT_S)  # the woken node rejoins and restores
                assert paused.alive(), paused.log.read_text()[-3000:]
                assert other.alive(), other.log.read_text()[-3000:]
        results = dict(watcher.found)
    finally:
        paused.stop()
        other.stop()
        watcher.close()
    assert set(results) == set(ids), f"{len(set(ids) - set(results))} sagas never finished"
    assert {r.status for r in results.values()} == {WorkflowStatus.COMPLETED}
    for wf in ids:
        assert kit.steps_of(wf) == ["do", "do", "do"], wf
    assert set(kit.effects.values()) == {1}, "a service effect was applied twice"
    assert_history_sound(settings, ids)


@pytest.mark.timeout(240)
def test_a_broker_restart_under_load_neither_kills_nor_stalls_the_node(
    private_broker: PrivateBroker, namespace: str, tmp_path: Path
) -> None:
    """The broker stops for 10 s while sagas are in flight and starts again: the node rides it
    out (no exit), and every saga ends once, started before, during or after the outage."""
    bootstrap = private_broker.bootstrap
    kit = build(namespace)
    settings = settings_for(bootstrap, namespace, tmp_path / "orch")
    create_topics(kit, settings)
    node = NodeProcess(kit, namespace, tmp_path / "orch", "n1", bootstrap)
    watcher = ResultWatcher(settings)
    ids = [f"outage-{i}" for i in range(60)]
    with service_threads(kit, settings):
        watcher.start()
        node.start()
        try:
            with Client(settings) as client:
                for i, wf in enumerate(ids[:40]):
                    # Spread over the outage: some finish before, most are asleep through it.
                    # Steps wait 30 s for an answer: the services are away as long as the broker.
                    trip = Trip(sleep_ms=(i % 8) * 1000, timeout_ms=30_000)
                    client.start("trip", trip, workflow_id=wf)
            watcher.wait_for(5, timeout=30)
            private_broker.stop()
            time.sleep(10)
            assert node.alive(), node.log.read_text()[-3000:]
            private_broker.start()
            back = time.monotonic()
            seen = len(watcher.found)
            with Client(settings) as client:
                for wf in ids[40:]:
                    client.start("trip", Trip(timeout_ms=30_000), workflow_id=wf)
            watcher.wait_for(seen + 1, timeout=60)
            print(f"first result {time.monotonic() - back:.1f}s after the broker was back")
            watcher.wait_for(len(ids), timeout=90)
            assert node.alive(), node.log.read_text()[-3000:]
            results = dict(watcher.found)
        finally:
            node.stop()
            watcher.close()
    assert set(results) == set(ids), f"{len(set(ids) - set(results))} sagas never finished"
    assert {r.status for r in results.values()} == {WorkflowStatus.COMPLETED}
    assert set(kit.effects.values()) == {1}, "a service effect was applied twice"
    assert_history_sound(settings, ids)


@pytest.mark.timeout(180)
def test_a_second_process_with_the_same_node_id_is_refused(
    services: Kit, kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    """A second process with a running node's id (elsewhere, or on the same state dir) exits
    with one clear line before it could fence the first; the first runs on undisturbed."""
    kit = services
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "a")
    first = NodeProcess(kit, namespace, tmp_path / "a", "a", kafka_bootstrap)
    elsewhere = NodeProcess(kit, namespace, tmp_path / "elsewhere" / "a", "a", kafka_bootstrap)
    same_dir = NodeProcess(kit, namespace, tmp_path / "a", "a", kafka_bootstrap)
    same_dir.log = tmp_path / "same-dir.log"
    watcher = ResultWatcher(settings)
    watcher.start()
    ids = [f"twin-{i}" for i in range(20)]
    try:
        first.start()
        _wait_for_text(first.log, "restored", 30)
        with Client(settings) as client:
            for wf in ids:
                client.start("trip", Trip(sleep_ms=3000), workflow_id=wf)
        same_dir.start()
        elsewhere.start()
        assert same_dir.proc is not None and elsewhere.proc is not None
        assert same_dir.proc.wait(30) == 1
        assert elsewhere.proc.wait(SESSION_TIMEOUT_S + 30) == 1
        watcher.wait_for(len(ids), timeout=60)
        assert first.alive(), first.log.read_text()[-3000:]
        results = dict(watcher.found)
    finally:
        first.stop()
        elsewhere.stop()
        same_dir.stop()
        watcher.close()
    last_line = same_dir.log.read_text().strip().splitlines()[-1]
    assert last_line.startswith("Error: another process runs a node on the state dir"), last_line
    last_line = elsewhere.log.read_text().strip().splitlines()[-1]
    assert last_line.startswith("Error: node id a is in use by a running process"), last_line
    assert "fenced" not in first.log.read_text()
    assert set(results) == set(ids)
    assert {r.status for r in results.values()} == {WorkflowStatus.COMPLETED}
    assert set(kit.effects.values()) == {1}
    assert_history_sound(settings, ids)


@pytest.mark.timeout(300)
def test_sigkill_inside_an_open_transaction_24_times(
    services: Kit, kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    """The node kills itself inside a transaction (records and offsets sent, commit not yet) 24
    times in a row while 120 sagas run; each restart aborts the open transaction and redoes it."""
    kit = services
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "orch")
    ids: dict[str, int] = {}
    rng = random.Random(11)
    watcher = ResultWatcher(settings)
    watcher.start()
    kills = 0
    node: NodeProcess | None = None
    try:
        with Client(settings) as client:
            while kills < 24:
                # New sagas before each incarnation, so it always has transactions to die in.
                for i in range(len(ids), len(ids) + 5):
                    ids[f"txn-kill-{i}"] = i
                    client.start(
                        "trip", mixed_trip(i, max_sleep_s=3)[0], workflow_id=f"txn-kill-{i}"
                    )
                env = {"SAGA_TEST_CRASH_IN_TXN": str(rng.randint(1, 4))}
                node = NodeProcess(kit, namespace, tmp_path / "orch", "n1", kafka_bootstrap, env)
                node.start()
                assert node.proc is not None
                assert node.proc.wait(60) == -signal.SIGKILL, node.log.read_text()[-3000:]
                kills += 1
        finished_during_kills = len(watcher.found)
        node = NodeProcess(kit, namespace, tmp_path / "orch", "n1", kafka_bootstrap)
        node.start()
        watcher.wait_for(len(ids), timeout=120)
        assert node.alive(), node.log.read_text()[-3000:]
        results = dict(watcher.found)
    finally:
        if node is not None:
            node.stop()
        watcher.close()
    print(f"{kills} kills inside a transaction; {finished_during_kills} sagas ended meanwhile")
    assert 0 < finished_during_kills < len(ids)  # the kills hit sagas in flight
    assert set(results) == set(ids), f"{len(set(ids) - set(results))} sagas never finished"
    for wf, i in ids.items():
        _, status, steps = mixed_trip(i, max_sleep_s=3)
        assert results[wf].status == status, (wf, results[wf])
        assert kit.steps_of(wf) == steps, wf
    assert set(kit.effects.values()) == {1}, "a service effect was applied twice"
    assert_history_sound(settings, list(ids))
