"""A service in its own process while its broker stops and starts, is fenced, or is signalled."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from contracts import codec
from contracts.envelopes import ActivityCommand, ActivityReply, ReplyOutcome
from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator._payloads import to_payload
from orchestrator.topics import ensure_service_topic, ensure_topics
from tests.faults.conftest import PrivateBroker
from tests.faults.service_main import Work, contract

PARTITIONS = 2
SERVICE = "faultsvc"
REPO = Path(__file__).resolve().parents[2]

# The private broker is started detached on purpose: its Popen object warns when collected.


@dataclass
class Replies:
    """Reads the inbox (read_committed) in a thread; remembers every reply and when it came."""

    bootstrap: str
    topic: str
    got: list[tuple[float, ActivityReply]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        reader = Consumer(consumer_config(self.bootstrap, f"{self.topic}.test"))
        reader.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        try:
            while not self._stop.is_set():
                for msg in reader.consume(num_messages=100, timeout=0.1):
                    if msg.error() is None:
                        reply = codec.decode_as(msg.value() or b"", ActivityReply)
                        self.got.append((time.monotonic(), reply))
        finally:
            reader.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def keys(self) -> set[str]:
        return {reply.idempotency_key for _, reply in self.got}

    def wait_for(self, keys: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not keys <= self.keys() and time.monotonic() < deadline:
            time.sleep(0.1)
        return keys <= self.keys()


@dataclass
class Load:
    """Sends commands at a steady rate from a thread, through the outage (the producer buffers)."""

    bootstrap: str
    namespace: str
    rate: float = 20.0
    sent: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _producer: Producer | None = None

    def start(self) -> None:
        self._producer = Producer(producer_config(self.bootstrap))
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()

    def send_one(self, n: int | None = None) -> str:
        assert self._producer is not None
        n = len(self.sent) if n is None else n
        workflow_id = f"wf-{len(self.sent):05d}"
        cmd = ActivityCommand(
            workflow_id=workflow_id,
            activity_name=contract(SERVICE).name,
            seq=1,
            attempt=1,
            idempotency_key=f"{workflow_id}/1",
            is_compensation=False,
            input=to_payload(Work(n=n)),
            reply_topic=f"{self.namespace}.inbox",
            sent_at_ms=int(time.time() * 1000),
        )
        topic = contract(SERVICE).topic
        self._producer.produce(topic, key=workflow_id.encode(), value=codec.encode(cmd))
        self._producer.poll(0)
        self.sent.append(cmd.idempotency_key)
        return cmd.idempotency_key

    def _send(self) -> None:
        while not self._stop.wait(1 / self.rate):
            self.send_one()

    def stop(self, *, flush: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        assert self._producer is not None
        if flush:
            assert self._producer.flush(30) == 0, "every command reached the broker"


@dataclass
class ServiceProcess:
    args: list[str]
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = {**os.environ, **self.env}
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def service_process(
    private_broker: PrivateBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ServiceProcess, str, Path]]:
    namespace = "faults"
    ensure_topics(private_broker.bootstrap, namespace, PARTITIONS)
    ensure_service_topic(private_broker.bootstrap, contract(SERVICE).topic, PARTITIONS)
    effects = tmp_path / "effects.sqlite"
    args = [
        sys.executable, "-m", "tests.faults.service_main",
        private_broker.bootstrap, namespace, SERVICE, str(tmp_path / "state"), str(effects),
    ]  # fmt: skip
    service = ServiceProcess(args, tmp_path / "service.log")
    try:
        yield service, namespace, effects
    finally:
        service.kill()


def _effects(path: Path) -> tuple[dict[str, int], int]:
    with sqlite3.connect(path) as db:
        effects = dict(db.execute("SELECT key, count(*) FROM effects GROUP BY key").fetchall())
        (total,) = db.execute("SELECT value FROM total").fetchone()
    return effects, int(total)


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(150)
def test_a_service_rides_out_a_broker_restart_under_load(
    private_broker: PrivateBroker, service_process: tuple[ServiceProcess, str, Path]
) -> None:
    service, namespace, effects_db = service_process
    service.start()
    replies = Replies(private_broker.bootstrap, f"{namespace}.inbox")
    replies.start()
    load = Load(private_broker.bootstrap, namespace)
    load.start()
    try:
        assert replies.wait_for({load.send_one()}, timeout=30), service.log()
        time.sleep(3)

        private_broker.stop()
        during = len(load.sent)  # from here on, commands wait in the load's producer
        time.sleep(10)
        private_broker.start()
        back = time.monotonic()
        time.sleep(10)
        load.stop()

        sent = set(load.sent)
        answered = replies.wait_for(sent, timeout=30)
        # Replies committed just before the stop may only show once the broker is back: the
        # first reply that counts answers a command sent while the broker was away.
        late = set(load.sent[during:])
        after = [at - back for at, r in replies.got if r.idempotency_key in late]
        first = min(after) if after else float("inf")
        print(f"first new reply {first:.1f} s after the broker was back")
        assert answered, f"{len(sent - replies.keys())} of {len(sent)} unanswered\n{service.log()}"
        # A figure, not a race: under load (15.5 s seen at load 13) it varies; what must not
        # happen is a service that never answers again (the hang this test was written for).
        assert first != float("inf"), "no command sent while the broker was away was answered"

        counts: dict[str, int] = {}
        for _, reply in replies.got:
            assert reply.outcome is ReplyOutcome.SUCCESS, reply.error
            counts[reply.idempotency_key] = counts.get(reply.idempotency_key, 0) + 1
        assert {k: c for k, c in counts.items() if c != 1} == {}, "one reply per command"
        effects, total = _effects(effects_db)
        assert set(effects) == sent and total == len(sent), "each effect applied once"

        assert service.proc is not None and service.proc.poll() is None, service.log()
        assert replies.wait_for({load.send_one()}, timeout=10), "still answering"
    finally:
        replies.stop()

    assert service.proc is not None
    began = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    code = service.proc.wait(10)
    print(f"SIGTERM ended the service in {time.monotonic() - began:.1f} s")
    assert code == 0, service.log()
    assert time.monotonic() - began < 5


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(90)
def test_sigterm_stops_a_service_while_the_broker_is_away(
    private_broker: PrivateBroker, service_process: tuple[ServiceProcess, str, Path]
) -> None:
    service, namespace, _ = service_process
    service.start()
    replies = Replies(private_broker.bootstrap, f"{namespace}.inbox")
    replies.start()
    load = Load(private_broker.bootstrap, namespace)
    load.start()
    try:
        assert replies.wait_for({load.send_one()}, timeout=30), service.log()
    finally:
        replies.stop()
    load.stop()
    load.send_one(n=-3)  # its handler runs while the broker stops: the commit finds it away
    time.sleep(1)
    private_broker.stop()
    time.sleep(4)  # the service is now retrying against a broker that is not there

    assert service.proc is not None and service.proc.poll() is None, service.log()
    began = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    code = service.proc.wait(15)
    took = time.monotonic() - began
    print(f"SIGTERM ended the service in {took:.1f} s with the broker away")
    assert code == 0, service.log()
    assert took < 5, service.log()


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(180)
@pytest.mark.parametrize("transactional", [True, False], ids=["transactional", "at-least-once"])
def test_sigkill_with_concurrent_handlers_loses_nothing_and_applies_nothing_twice(
    private_broker: PrivateBroker,
    service_process: tuple[ServiceProcess, str, Path],
    transactional: bool,
) -> None:
    """Eight 300-ms handlers at once under a steady load; SIGKILL the service mid-way and start
    it again: every command is answered, every effect applied once, and only the commands that
    were not answered at the kill run again. In the at-least-once mode too: there the replies
    flushed before the kill whose offsets were not yet committed (they go without waiting for
    the group coordinator) are read again, and answered from the dedupe store or run again."""
    service, namespace, effects_db = service_process
    concurrency = 8
    service.env = {
        "SERVICE_SLEEP_MS": "300",
        "SERVICE_MAX_CONCURRENCY": str(concurrency),
        "SERVICE_TRANSACTIONAL": "1" if transactional else "0",
    }
    service.start()
    replies = Replies(private_broker.bootstrap, f"{namespace}.inbox")
    replies.start()
    load = Load(private_broker.bootstrap, namespace, rate=25.0)
    load.start()
    try:
        assert replies.wait_for({load.send_one()}, timeout=30), service.log()
        time.sleep(3)
        service.kill()  # SIGKILL: handlers mid-sleep, answers not yet committed
        killed_at = len(load.sent)
        time.sleep(1)
        service.start()
        time.sleep(3)
        load.stop()

        sent = set(load.sent)
        answered = replies.wait_for(sent, timeout=60)
        assert answered, f"{len(sent - replies.keys())} of {len(sent)} unanswered\n{service.log()}"
        for _, reply in replies.got:
            assert reply.outcome is ReplyOutcome.SUCCESS, reply.error
        effects, total = _effects(effects_db)
        assert set(effects) == sent and total == len(sent), "each effect applied once"
        with sqlite3.connect(effects_db) as db:
            (runs,) = db.execute("SELECT count(*) FROM runs").fetchone()
        again = runs - len(sent)
        duplicates = len(replies.got) - len(replies.keys())
        print(
            f"{len(sent)} commands ({killed_at} sent before the kill): {again} handler runs again, "
            f"{duplicates} replies sent twice"
        )
        # Only what was in flight at the kill may run again: at most the running handlers and
        # the answers not yet committed (the rest is skipped by the offsets' metadata).
        assert again <= 2 * concurrency, f"{again} commands ran again"
        # And only those replies go twice: an at-least-once service whose offsets never
        # committed would answer every command before the kill again.
        assert duplicates <= 2 * concurrency, f"{duplicates} replies sent twice"
    finally:
        replies.stop()
