"""A node and the kit's services in threads, with a client and readers of the namespace's
topics: what most engine tests against the broker run on."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TypeVar

from confluent_kafka import Consumer
from pydantic import BaseModel

from contracts import codec
from contracts.envelopes import DeadLetter, HistoryEvent
from orchestrator._engine.decide import Counters
from orchestrator._kafka_config import consumer_config
from orchestrator.client import Client
from orchestrator.settings import Settings

from .kit import Kit, ThreadStack, Trip, TripResult, create_topics

E = TypeVar("E", bound=BaseModel)


class Stack(ThreadStack):
    def __init__(self, kit: Kit, settings: Settings) -> None:
        super().__init__(kit, settings)
        self.client = Client(settings)

    def close(self) -> None:
        super().close()
        self.client.close()

    def node_counters(self) -> Counters:
        assert self._node is not None
        return self._node[2].counters

    def run(self, trip: Trip, workflow_id: str, timeout: float = 30.0) -> TripResult:
        handle = self.client.start("trip", trip, workflow_id=workflow_id)
        return handle.result(TripResult, timeout=timeout)

    def history(self, workflow_id: str) -> list[HistoryEvent]:
        return self._read(self.settings.history, HistoryEvent, workflow_id + "/")

    def tombstones(self, workflow_id: str) -> list[str]:
        reader = Consumer(
            consumer_config(
                self.settings.bootstrap_servers,
                f"tombstones.{time.monotonic_ns()}",
                extra={"enable.partition.eof": True},
            )
        )
        reader.subscribe([self.settings.history])
        keys: list[str] = []
        eofs: set[int] = set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(eofs) < self.settings.partitions:
            for msg in reader.consume(500, 0.2):
                key = (msg.key() or b"").decode()
                if msg.error() is not None:
                    eofs.add(msg.partition() or 0)
                elif msg.value() is None and key.startswith(workflow_id + "/"):
                    keys.append(key)
        reader.close()
        return keys

    def dead_letters(self) -> list[DeadLetter]:
        return self._read(self.settings.dlq, DeadLetter, "")

    def _read(self, topic: str, kind: type[E], key_prefix: str) -> list[E]:
        reader = Consumer(
            consumer_config(
                self.settings.bootstrap_servers,
                f"{topic}.reader.{time.monotonic_ns()}",
                extra={"enable.partition.eof": True},
            )
        )
        reader.subscribe([topic])
        out: list[E] = []
        eofs: set[int] = set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(eofs) < self.settings.partitions:
            for msg in reader.consume(500, 0.2):
                if msg.error() is not None:
                    eofs.add(msg.partition() or 0)
                elif msg.value() and (msg.key() or b"").decode().startswith(key_prefix):
                    out.append(codec.decode_as(msg.value() or b"", kind))
            if topic == self.settings.dlq and out:
                break
        reader.close()
        return out


@contextlib.contextmanager
def running_stack(kit: Kit, settings: Settings) -> Iterator[Stack]:
    """The kit's topics, services and node, running until the block ends."""
    create_topics(kit, settings)
    stack = Stack(kit, settings)
    stack.start_services()
    stack.start_node()
    try:
        yield stack
    finally:
        stack.close()
