"""A schedule across node kills and a partition move: one start per tick, no gap.

Real node processes (``tests.integration.node_main``) run the kit's saga and the schedule
workflow every node runs; the schedule starts the kit's ``trip`` every second. The test SIGKILLs
the node (with transactions open, most likely), starts it again, then adds a second node and
kills the first, so the partitions it held move. The inbox must hold exactly one
``StartWorkflow`` per tick, for every tick from the first to the last (the catch-up window, one
hour, covers the outages), and every started saga must end once.
"""

from __future__ import annotations

import calendar
import time
from datetime import timedelta
from pathlib import Path

import pytest

from contracts.envelopes import WorkflowStatus
from orchestrator.client import Client
from orchestrator.schedule import create_schedule, delete_schedule, list_schedules, target_id
from orchestrator.settings import Settings
from tests.integration.kit import Trip, build, create_topics, settings_for
from tests.integration.procs import NodeProcess, ResultWatcher, inbox_starts, service_threads

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _wait_for_more(settings: Settings, prefix: str, more: int, timeout: float) -> int:
    before = len(inbox_starts(settings, prefix))
    deadline = time.monotonic() + timeout
    while (now := len(inbox_starts(settings, prefix))) < before + more:
        assert time.monotonic() < deadline, f"{now - before} of {more} new ticks in {timeout}s"
        time.sleep(0.5)
    return now


@pytest.mark.timeout(300)
def test_a_schedule_starts_once_per_tick_across_kills_and_a_move(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "svc-state")
    create_topics(kit, settings)
    a = NodeProcess(kit, namespace, tmp_path / "a", "a", kafka_bootstrap)
    b = NodeProcess(kit, namespace, tmp_path / "b", "b", kafka_bootstrap)
    watcher = ResultWatcher(settings)
    with service_threads(kit, settings), Client(settings) as client:
        watcher.start()
        a.start()
        try:
            create_schedule(client, "beat", "trip", Trip().model_dump(), every=timedelta(seconds=1))
            _wait_for_more(settings, "beat-", 3, timeout=90)
            a.kill()  # SIGKILL: whatever transaction it had open is aborted
            time.sleep(2)
            a.start()  # the same node id: its partitions come back, restored
            _wait_for_more(settings, "beat-", 3, timeout=90)
            b.start()
            _wait_for_more(settings, "beat-", 2, timeout=90)
            a.kill()  # its partitions move to b after the session timeout
            _wait_for_more(settings, "beat-", 3, timeout=120)
            assert b.alive(), b.log.read_text()[-3000:]
            delete_schedule(client, "beat")
            deadline = time.monotonic() + 60
            while list_schedules(client):
                assert time.monotonic() < deadline, "the schedule was not deleted"
                time.sleep(0.5)
            starts = inbox_starts(settings, "beat-")
            watcher.wait_for(len(starts), timeout=120)
        finally:
            a.stop()
            b.stop()
            watcher.close()
    assert set(starts.values()) == {1}, f"a tick started twice: {starts.most_common(3)}"
    ticks = sorted(starts)
    first = calendar.timegm(time.strptime(ticks[0], "beat-%Y-%m-%dT%H:%M:%SZ"))
    expected = [target_id("beat", (first + k) * 1000) for k in range(len(ticks))]
    assert ticks == expected, f"gaps: {sorted(set(expected) - set(ticks))[:10]}"
    print(f"{len(ticks)} ticks started once each across two kills and a move")
    results = {wf: r for wf, r in watcher.found.items() if wf.startswith("beat-")}
    assert set(results) == set(ticks)
    assert {r.status for r in results.values()} == {WorkflowStatus.COMPLETED}
    assert set(kit.effects.values()) == {1}, "a service effect was applied twice"
