"""How the node's loop gathers one transaction's input (no broker: a stand-in consumer).

With the default ``commit_interval_ms`` (0) the loop must take what has already arrived and ask
the consumer to wait for nothing more: any wait there is added to every step of every saga at low
load (it was 5 ms, 4 node steps a 3-step saga; docs/performance.md, "Closed loop").
"""

from __future__ import annotations

from typing import Any

from orchestrator._engine.processor import Processor
from orchestrator.settings import Settings


class StubConsumer:
    """Hands out queued records; notes the timeouts it was asked to wait."""

    def __init__(self, queued: list[str]) -> None:
        self.queued = queued
        self.consume_timeouts: list[float] = []

    def poll(self, timeout: float) -> Any:
        return self.queued.pop(0) if self.queued else None

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.consume_timeouts.append(timeout)
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken


def processor(settings: Settings, consumer: StubConsumer) -> Processor:
    # Only the fields _next_records reads: building a real Processor needs a broker.
    proc = Processor.__new__(Processor)
    proc.settings = settings
    proc._consumer = consumer  # type: ignore[assignment]
    proc._partitions = {}
    proc._restored = False
    return proc


def test_the_default_takes_what_has_arrived_without_waiting() -> None:
    settings = Settings()
    assert settings.commit_interval_ms == 0
    consumer = StubConsumer(["r1", "r2", "r3"])

    records: list[Any] = list(processor(settings, consumer)._next_records())

    assert records == ["r1", "r2", "r3"]
    assert consumer.consume_timeouts == [0.0]


def test_a_commit_interval_still_gathers_for_that_long() -> None:
    consumer = StubConsumer(["r1", "r2"])

    records: list[Any] = list(processor(Settings(commit_interval_ms=50), consumer)._next_records())

    assert records == ["r1", "r2"]
    assert consumer.consume_timeouts and 0.0 < consumer.consume_timeouts[0] <= 0.05


def test_max_batch_bounds_the_batch() -> None:
    consumer = StubConsumer([f"r{n}" for n in range(10)])

    records: list[Any] = list(processor(Settings(max_batch=4), consumer)._next_records())

    assert records == ["r0", "r1", "r2", "r3"]
    assert consumer.queued == ["r4", "r5", "r6", "r7", "r8", "r9"]


class StubDecider:
    def __init__(self) -> None:
        self.fired = 0

    def fire_timers(self, partitions: Any, batch: Any, now: int) -> None:
        self.fired += 1

    def expire_finished(self, partitions: Any, batch: Any, now: int) -> None:
        pass

    def repair_history(self, partitions: Any, batch: Any) -> None:
        pass

    def wake_blocked(self, partitions: Any, batch: Any, now: int) -> None:
        pass


class OverduePartition:
    def next_due_ms(self) -> int:
        return 0  # a timer that fell due long ago


def test_after_a_restore_the_inbox_is_read_before_overdue_timers_fire() -> None:
    """Replies that came in time while no node ran must be read before the attempt timeouts
    that fell due meanwhile fire; else answered attempts are retried (or the saga compensated
    after max_attempts: seen in tests/faults/test_node_faults.py's kill loop)."""
    consumer = StubConsumer([])
    proc = processor(Settings(), consumer)
    decider = StubDecider()
    proc._decider = decider  # type: ignore[assignment]
    proc.metrics = None
    proc.health = None
    proc._to_restore = {0}

    def restore() -> None:
        proc._to_restore.clear()
        proc._partitions = {0: OverduePartition()}  # type: ignore[dict-item]

    proc._restore_assigned = restore  # type: ignore[method-assign]
    proc._answer_queries = lambda: None  # type: ignore[method-assign]

    proc.step()  # the turn that restores: no timers yet
    assert decider.fired == 0
    # The next poll waits for the first fetch although a timer is overdue ...
    assert proc._poll_timeout() > 0
    # ... and after that, overdue timers make the loop poll without waiting again.
    assert proc._poll_timeout() == 0

    proc.step()
    assert decider.fired == 1
