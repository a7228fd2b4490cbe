"""The benchmark's services: fast responders that answer every command at once.

A responder runs in its own process (``multiprocessing``, spawn) so that it does not compete
with the orchestrator for the GIL. It consumes command topics with a ``read_committed`` consumer,
answers each ``ActivityCommand`` with a successful ``ActivityReply`` on the command's reply topic
(keyed by the workflow id, non-transactional, like a simple service), and keeps one record per
command for the latency figures::

    (workflow id, seq, command sent_at_ms, consumed at [ms], reply produced at [ms])

Times are wall-clock milliseconds (``time.time()``), comparable across processes on one machine.
The parent asks for the records over a pipe ("dump") and stops the responder with an event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from confluent_kafka import Consumer, Producer
from pydantic import BaseModel

from contracts import codec
from contracts.envelopes import ActivityCommand, ActivityReply, ReplyOutcome
from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator._payloads import to_payload

Record = tuple[str, int, int, float, float]
"""workflow id, activity seq, command ``sent_at_ms``, consumed at ms, reply produced at ms."""


class Step(BaseModel):
    n: int


class Done(BaseModel):
    n: int
    ref: str = ""


@dataclass(frozen=True)
class ResponderSpec:
    bootstrap: str
    topics: tuple[str, ...]
    group: str
    fetch_wait_ms: int = 5
    linger_ms: int = 2
    max_batch: int = 1000


def _now_ms() -> float:
    return time.time() * 1000.0


def run_responder(spec: ResponderSpec, conn: Connection, ready: Event, stop: Event) -> None:
    """The responder's main loop (the target of its process)."""
    consumer = Consumer(
        consumer_config(spec.bootstrap, spec.group, fetch_wait_max_ms=spec.fetch_wait_ms)
    )
    producer = Producer(producer_config(spec.bootstrap, linger_ms=spec.linger_ms))

    def on_assign(_consumer: Any, partitions: list[Any]) -> None:
        if partitions:
            ready.set()

    consumer.subscribe(list(spec.topics), on_assign=on_assign)
    result = to_payload(Done(n=0, ref="ok"))
    records: list[Record] = []
    try:
        while not stop.is_set():
            if conn.poll():
                request = conn.recv()
                if request == "dump":
                    conn.send(records)
                    records = []
            # poll() returns as soon as one record is there; consume(n, timeout) would wait for
            # the whole timeout unless n records arrive. Then take what else is already fetched.
            first = consumer.poll(0.05)
            if first is None:
                producer.poll(0)
                continue
            msgs = [first, *consumer.consume(spec.max_batch, 0)]
            consumed_at = _now_ms()
            for msg in msgs:
                if msg.error() is not None:
                    continue
                cmd = codec.decode_as(msg.value() or b"", ActivityCommand)
                sent_at = _now_ms()
                reply = ActivityReply(
                    workflow_id=cmd.workflow_id,
                    seq=cmd.seq,
                    attempt=cmd.attempt,
                    idempotency_key=cmd.idempotency_key,
                    outcome=ReplyOutcome.SUCCESS,
                    sent_at_ms=int(sent_at),
                    result=result,
                    service="bench",
                )
                value = codec.encode(reply)
                while True:
                    try:
                        producer.produce(cmd.reply_topic, key=cmd.workflow_id.encode(), value=value)
                        break
                    except BufferError:
                        producer.poll(0.01)
                records.append((cmd.workflow_id, cmd.seq, cmd.sent_at_ms, consumed_at, sent_at))
            producer.poll(0)
    finally:
        producer.flush(10)
        consumer.close()
        conn.close()
