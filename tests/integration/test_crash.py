"""Orchestrator processes killed with SIGKILL while sagas run: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from contracts import codec
from contracts.envelopes import HistoryEvent, WorkflowResult, WorkflowStatus
from orchestrator.client import Client
from orchestrator.kafka_config import consumer_config
from orchestrator.settings import Settings

from .kit import Kit, Trip, build, create_topics, make_service, settings_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class NodeProcess:
    def __init__(self, kit: Kit, namespace: str, state_dir: Path, node_id: str, bootstrap: str):
        self.args = [
            sys.executable, "-m", "tests.integration.node_main",
            kit.prefix, namespace, str(state_dir), node_id, bootstrap,
        ]  # fmt: skip
        self.log = state_dir.parent / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def services(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Kit]:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "svc-state")
    create_topics(kit, settings)
    stops: list[tuple[threading.Thread, threading.Event]] = []
    for name in kit.services:
        stop = threading.Event()
        thread = threading.Thread(
            target=make_service(kit, name, settings).run, args=(stop,), daemon=True
        )
        thread.start()
        stops.append((thread, stop))
    yield kit
    for thread, stop in stops:
        stop.set()
        thread.join(30)


def _expected(i: int) -> tuple[Trip, WorkflowStatus, list[str]]:
    """A mix of outcomes, with durable sleeps that spread the sagas over several seconds."""
    sleep_ms = (i % 12) * 1000  # 0 to 11 s: some sagas are still asleep at every kill
    if i % 5 == 0:
        trip = Trip(fail_at=3, sleep_ms=sleep_ms)
        return trip, WorkflowStatus.COMPENSATED, ["do", "do", "undo", "undo"]
    if i % 7 == 0:
        trip = Trip(flaky_at=2, flaky=1, sleep_ms=sleep_ms)
        return trip, WorkflowStatus.COMPLETED, ["do", "do", "do"]
    return Trip(sleep_ms=sleep_ms), WorkflowStatus.COMPLETED, ["do", "do", "do"]


class ResultWatcher(threading.Thread):
    """Collects ``<ns>.results`` in the background, so a test can kill nodes mid-flight."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.found: dict[str, WorkflowResult] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        reader = Consumer(
            consumer_config(self.settings.bootstrap_servers, f"check.{time.time_ns()}")
        )
        reader.subscribe([self.settings.results])
        while not self._halt.is_set():
            for msg in reader.consume(500, 0.2):
                if msg.error() is None and msg.value():
                    result = codec.decode_as(msg.value() or b"", WorkflowResult)
                    self.found.setdefault(result.workflow_id, result)
        reader.close()

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.found) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self._halt.set()
        self.join(10)


def _history_keys(settings: Settings) -> Counter[str]:
    reader = Consumer(
        consumer_config(
            settings.bootstrap_servers,
            f"hist.{time.time_ns()}",
            extra={"enable.partition.eof": True},
        )
    )
    reader.subscribe([settings.history])
    keys: Counter[str] = Counter()
    eofs: set[int] = set()
    deadline = time.monotonic() + 30
    while len(eofs) < settings.partitions and time.monotonic() < deadline:
        for msg in reader.consume(1000, 0.3):
            if msg.error() is not None:
                eofs.add(msg.partition() or 0)
            elif msg.value():
                event = codec.decode_as(msg.value() or b"", HistoryEvent)
                assert (msg.key() or b"").decode() == f"{event.workflow_id}/{event.event_seq}"
                keys[f"{event.workflow_id}/{event.event_seq}"] += 1
    reader.close()
    return keys


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    services: Kit, kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    kit = services
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "orch")
    node = NodeProcess(kit, namespace, tmp_path / "orch", "n1", kafka_bootstrap)
    watcher = ResultWatcher(settings)
    watcher.start()
    node.start()
    rng = random.Random(7)
    ids = {f"crash-{i}": i for i in range(200)}
    finished_at_kill: list[int] = []
    try:
        with Client(settings) as client:
            for wf, i in ids.items():
                client.start("trip", _expected(i)[0], workflow_id=wf)
        began = time.monotonic()
        for kill_at in (2.5, 5.0, 7.5, 10.0):  # seconds after the starts were sent
            time.sleep(max(0.0, began + kill_at + rng.uniform(0, 0.4) - time.monotonic()))
            finished_at_kill.append(len(watcher.found))
            node.kill()
            node.start()
        watcher.wait_for(len(ids), timeout=120)
        results = dict(watcher.found)
    finally:
        node.stop()
        watcher.close()
    # Every kill hit a node with sagas in flight (results can lag: a killed node's open
    # transaction hides what follows it until the restarted node aborts it).
    assert all(n < len(ids) for n in finished_at_kill), finished_at_kill
    assert finished_at_kill[-1] > 0, finished_at_kill
    assert set(results) == set(ids), f"{len(set(ids) - set(results))} sagas never finished"
    for wf, i in ids.items():
        _, status, steps = _expected(i)
        assert results[wf].status == status, (wf, results[wf])
        assert kit.steps_of(wf) == steps, wf
    assert set(kit.effects.values()) == {1}, "a service effect was applied twice"
    keys = _history_keys(settings)
    assert max(keys.values()) == 1, "a history event appears twice"
    for wf in ids:
        seqs = sorted(int(k.rsplit("/", 1)[1]) for k in keys if k.startswith(wf + "/"))
        assert seqs == list(range(1, len(seqs) + 1)), wf


def test_a_second_node_takes_over_the_partitions_of_a_killed_one(
    services: Kit, kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    kit = services
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "n1")
    first = NodeProcess(kit, namespace, tmp_path / "n1", "n1", kafka_bootstrap)
    second = NodeProcess(kit, namespace, tmp_path / "n2", "n2", kafka_bootstrap)
    first.start()
    second.start()
    ids = [f"failover-{i}" for i in range(30)]
    watcher = ResultWatcher(settings)
    watcher.start()
    try:
        time.sleep(3)  # both joined the group
        with Client(settings) as client:
            for wf in ids:
                client.start("trip", Trip(sleep_ms=4000), workflow_id=wf)
        time.sleep(2)  # the sagas sleep on both nodes
        assert len(watcher.found) == 0  # every saga is asleep when the node dies
        first.kill()
        watcher.wait_for(len(ids), timeout=90)
        results = dict(watcher.found)
    finally:
        first.stop()
        second.stop()
        watcher.close()
    assert set(results) == set(ids)
    assert {r.status for r in results.values()} == {WorkflowStatus.COMPLETED}
    assert set(kit.effects.values()) == {1}
    assert "restored" in (tmp_path / "n2.log").read_text()
