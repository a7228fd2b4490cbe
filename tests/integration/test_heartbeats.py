"""Heartbeats against a real broker: a service that heartbeats and is then SIGKILLed is noticed
within the heartbeat timeout, not the attempt timeout, and the retry resumes from its details."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contracts import codec
from contracts.envelopes import (
    ActivityAttemptFailed,
    ActivityAttemptStarted,
    HistoryEvent,
    RetryPolicy,
)
from orchestrator._kafka_config import consumer_config
from orchestrator.client import Client
from orchestrator.errors import RetryableError
from orchestrator.node import OrchestratorNode
from orchestrator.service import CommandInfo, Service, serving
from orchestrator.settings import Settings
from orchestrator.topics import ensure_service_topic, ensure_topics
from orchestrator.workflow import WorkflowContext, WorkflowRegistry, defn, run
from tests.integration.heartbeat_service import Pages, Resumed, contract

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_TIMEOUT = timedelta(seconds=2)


def _history(settings: Settings, workflow_id: str) -> list[HistoryEvent]:
    reader = Consumer(consumer_config(settings.bootstrap_servers, f"{settings.history}.read"))
    reader.assign(
        [TopicPartition(settings.history, p, OFFSET_BEGINNING) for p in range(settings.partitions)]
    )
    events: list[HistoryEvent] = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for msg in reader.consume(500, 0.2):
            if msg.error() is None and (msg.key() or b"").startswith(workflow_id.encode() + b"/"):
                events.append(codec.decode_as(msg.value() or b"", HistoryEvent))
    reader.close()
    return sorted(events, key=lambda e: e.event_seq)


def _wait_for_failure(settings: Settings, workflow_id: str, timeout: float) -> HistoryEvent | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in _history(settings, workflow_id):
            if isinstance(event.event, ActivityAttemptFailed):
                return event
    return None


def test_a_killed_service_is_noticed_by_heartbeat_timeout_and_the_retry_gets_the_details(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    name = f"{namespace}-beats"
    scan = contract(name)
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        namespace=namespace,
        partitions=2,
        state_dir=tmp_path / "node",
        node_id="n1",
    )
    ensure_topics(kafka_bootstrap, namespace, 2)
    ensure_service_topic(kafka_bootstrap, scan.topic, 2)

    @defn(name="scan")
    class Scan:
        @run
        async def run(self, ctx: WorkflowContext, pages: Pages) -> Resumed:
            return await ctx.call(
                scan,
                pages,
                timeout=None,  # an hour-long activity: only its heartbeats tell it is alive
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry=RetryPolicy(max_attempts=20, initial_interval_ms=100, max_interval_ms=500),
            )

    node = OrchestratorNode(settings, WorkflowRegistry([Scan]))
    stop = threading.Event()
    node_thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    node_thread.start()
    beats = tmp_path / "beats.txt"
    beats.touch()
    log_file = tmp_path / "service.log"
    args = [sys.executable, "-m", "tests.integration.heartbeat_service",
            kafka_bootstrap, namespace, name, str(tmp_path / "svc1"), str(beats)]  # fmt: skip
    with log_file.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    client = Client(settings)
    try:
        handle = client.start("scan", Pages(count=100_000), workflow_id="scan-1")
        deadline = time.monotonic() + 60
        while len(beats.read_text().splitlines()) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(beats.read_text().splitlines()) >= 8, log_file.read_text()
        proc.kill()  # SIGKILL mid-activity
        proc.wait(10)
        killed_at_ms = time.time() * 1000
        pages_sent = [int(line.split()[1]) for line in beats.read_text().splitlines()]

        failed = _wait_for_failure(settings, "scan-1", timeout=30)

        # Another instance of the service takes over: attempt 1 comes back to it too (never
        # answered) and fails; a later attempt gets the details of attempt 1's last heartbeat.
        got: list[CommandInfo] = []
        other = Service(
            name,
            settings.model_copy(update={"kafka": {"session.timeout.ms": "6000"}}),
            state_dir=tmp_path / "svc2",
        )

        @other.handler(scan)
        def resume(arg: Pages, info: CommandInfo) -> Resumed:
            got.append(info)
            if info.attempt == 1:
                raise RetryableError("attempt 1 was given up: the workflow retries")
            return Resumed(attempt=info.attempt, details=info.heartbeat_details)

        with serving(other):
            result = handle.result(Resumed, timeout=60)
    finally:
        client.close()
        proc.kill()
        stop.set()
        node_thread.join(30)

    assert failed is not None, [
        (e.event.kind, e.recorded_at_ms - killed_at_ms, getattr(e.event, "error", None))
        for e in _history(settings, "scan-1")
    ]
    assert isinstance(failed.event, ActivityAttemptFailed)
    assert failed.event.attempt == 1
    assert failed.event.error.type == "HeartbeatTimeout", failed.event.error
    noticed_s = (failed.recorded_at_ms - killed_at_ms) / 1000
    limit = HEARTBEAT_TIMEOUT.total_seconds()
    print(f"the killed service was noticed {noticed_s:.1f} s after SIGKILL "
          f"(heartbeat_timeout {limit:.0f} s, no attempt timeout)")  # fmt: skip
    assert noticed_s < 15, "noticed by its heartbeats, within seconds"

    history = _history(settings, "scan-1")
    kinds = [e.event.kind for e in history]
    print(f"{len(pages_sent)} heartbeats handed to the SDK; the history: {kinds}")
    # Heartbeats record nothing: the history holds the attempts (a retry sent before the new
    # instance joined the group times out too: nobody heartbeats for it) and the late answers.
    assert set(kinds) <= {
        "WorkflowStarted", "ActivityScheduled", "ActivityAttemptFailed",
        "ActivityAttemptStarted", "LateReplyIgnored", "ActivityCompleted", "WorkflowCompleted",
    }, kinds  # fmt: skip
    # At most three events an attempt (started, failed, a late answer) besides the four of any
    # run. Counted from the history, not from the result: when retries time out before the new
    # instance joins, its dedupe store answers the later attempts with attempt 2's stored
    # result (seen: attempts 1-4 in the history, Resumed(attempt=2) as the result).
    attempts = max(
        [1, *(e.event.attempt for e in history if isinstance(e.event, ActivityAttemptStarted))]
    )
    assert attempts >= result.attempt
    assert len(history) <= 4 + 3 * attempts, kinds

    assert result.attempt >= 2
    assert result.details is not None
    # The last heartbeat sent (sends are throttled) is one of the pages the handler reached.
    assert 1 <= result.details["page"] <= max(pages_sent)
    assert result.details["page"] >= max(pages_sent) - 5, "a recent heartbeat, not the first"
