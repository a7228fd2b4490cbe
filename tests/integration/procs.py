"""Real processes for tests that kill, pause or fence them, and readers that check the topics."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka import Consumer

from contracts import codec
from contracts.envelopes import HistoryEvent, StartWorkflow, WorkflowResult
from orchestrator._kafka_config import consumer_config
from orchestrator.settings import Settings

from .kit import Kit, make_service


class NodeProcess:
    """``python -m tests.integration.node_main`` for the kit's saga; ``env`` adds ``SAGA_*``
    settings (e.g. a short retention)."""

    def __init__(
        self,
        kit: Kit,
        namespace: str,
        state_dir: Path,
        node_id: str,
        bootstrap: str,
        env: dict[str, str] | None = None,
    ):
        self.args = [
            sys.executable, "-m", "tests.integration.node_main",
            kit.prefix, namespace, str(state_dir), node_id, bootstrap,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.log = state_dir.parent / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process cannot stop
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def service_threads(kit: Kit, settings: Settings) -> Iterator[list[threading.Thread]]:
    """The kit's services in threads of the test process (they are not what a test kills);
    yields the threads, so a test can check that no service stopped."""
    stops: list[tuple[threading.Thread, threading.Event]] = []
    for name in kit.services:
        stop = threading.Event()
        thread = threading.Thread(
            target=make_service(kit, name, settings).run, args=(stop,), daemon=True
        )
        thread.start()
        stops.append((thread, stop))
    try:
        yield [thread for thread, _ in stops]
    finally:
        for thread, stop in stops:
            stop.set()
            thread.join(30)


class ResultWatcher(threading.Thread):
    """Collects ``<ns>.results`` in the background, so a test can kill nodes mid-flight."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.found: dict[str, WorkflowResult] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        reader = Consumer(
            consumer_config(
                self.settings.bootstrap_servers,
                f"check.{time.time_ns()}",
                extra=self.settings.client_extra(),  # credentials, on a secured cluster
            )
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


def history_values(settings: Settings) -> dict[str, list[bytes]]:
    """Every committed value of every history key, in the order written (tombstones left out).

    A key with two different values is a (workflow, seq) that two writers decided differently.
    """
    reader = Consumer(
        consumer_config(
            settings.bootstrap_servers,
            f"hist.{time.time_ns()}",
            extra={"enable.partition.eof": True, **settings.client_extra()},
        )
    )
    reader.subscribe([settings.history])
    values: dict[str, list[bytes]] = defaultdict(list)
    eofs: set[int] = set()
    deadline = time.monotonic() + 30
    while len(eofs) < settings.partitions and time.monotonic() < deadline:
        for msg in reader.consume(1000, 0.3):
            if msg.error() is not None:
                eofs.add(msg.partition() or 0)
            elif msg.value():
                event = codec.decode_as(msg.value() or b"", HistoryEvent)
                key = (msg.key() or b"").decode()
                assert key == f"{event.workflow_id}/{event.event_seq}"
                values[key].append(msg.value() or b"")
    reader.close()
    assert len(eofs) == settings.partitions, "the history was not read to its end"
    return dict(values)


def assert_history_sound(settings: Settings, workflow_ids: list[str]) -> None:
    """No history key written twice, and each workflow's seqs run 1..n without a gap."""
    values = history_values(settings)
    doubled = {k: len(v) for k, v in values.items() if len(v) > 1}
    assert not doubled, f"history keys written more than once: {sorted(doubled.items())[:10]}"
    for wf in workflow_ids:
        seqs = sorted(int(k.rsplit("/", 1)[1]) for k in values if k.rsplit("/", 1)[0] == wf)
        assert seqs == list(range(1, len(seqs) + 1)), (wf, seqs)


def inbox_starts(settings: Settings, prefix: str) -> Counter[str]:
    """How many StartWorkflow records the inbox holds per workflow id starting with ``prefix``
    (committed ones: read_committed)."""
    reader = Consumer(
        consumer_config(
            settings.bootstrap_servers,
            f"starts.{time.monotonic_ns()}",
            extra={"enable.partition.eof": True},
        )
    )
    reader.subscribe([settings.inbox])
    found: Counter[str] = Counter()
    eofs: set[int] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(eofs) < settings.partitions:
        for msg in reader.consume(1000, 0.2):
            if msg.error() is not None:
                eofs.add(msg.partition() or 0)
            elif (msg.key() or b"").decode().startswith(prefix) and msg.value():
                envelope = codec.decode(msg.value() or b"")
                if isinstance(envelope, StartWorkflow):
                    found[envelope.workflow_id] += 1
    reader.close()
    return found
