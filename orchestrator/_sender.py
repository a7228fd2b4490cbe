"""One producer shared by every caller of a client, and one thread serving its delivery reports.

A start (signal, cancel) returns once the broker has acknowledged it, so every call waits for its
own delivery report. Before, each calling thread ran ``producer.poll`` itself until its report
came: with many threads starting at once, they all spun on the same producer. Here one thread
polls, and a report wakes exactly the caller it belongs to, through the callback it gave
(``threading.Event`` for the sync client, ``loop.call_soon_threadsafe`` for the asyncio one).
Records of concurrent callers share librdkafka's batches (``linger.ms``), so N callers cost about
one round trip, not N.

confluent-kafka stays private here and in ``client.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)

OnDelivery = Callable[[KafkaError | None, int, int], None]
"""Called once per record, on the sender's thread, with ``(error, partition, offset)``: error
``None`` if the broker acknowledged the record at that partition and offset."""

_POLL_S = 0.2  # poll() returns as soon as a report is served; this only bounds the idle wait
_FULL_QUEUE_WAIT_S = 5.0


class Sender:
    """A producer plus the thread that serves its delivery callbacks. Thread-safe."""

    def __init__(self, conf: dict[str, Any], name: str = "orchestrator-sender") -> None:
        self._producer = Producer(conf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def producer(self) -> Producer:
        """For metadata requests (``list_topics``); produce through :meth:`send`."""
        return self._producer

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, str | bytes | None]] | None,
        on_delivery: OnDelivery,
    ) -> None:
        """Queue one record; ``on_delivery`` gets its report. Raises KafkaException/BufferError
        if it cannot be queued (e.g. the local queue stays full for seconds)."""

        def report(err: KafkaError | None, msg: Message) -> None:
            try:
                on_delivery(err, msg.partition() or 0, msg.offset() or -1)
            except Exception:  # a waiter's callback must not kill the sender's thread
                log.exception("delivery callback failed")

        deadline = time.monotonic() + _FULL_QUEUE_WAIT_S
        while True:
            try:
                # No partition: librdkafka's murmur2 partitioner picks the workflow's partition.
                self._producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=report
                )
                return
            except BufferError:
                # The local queue is full: the serving thread drains it; wait a little.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def close(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for queued records; stop the thread. Returns how many
        records were still unacknowledged (their callbacks got no report)."""
        left = int(self._producer.flush(timeout))
        self._stop.set()
        self._thread.join(timeout=_POLL_S * 5)
        return left

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(_POLL_S)
            except KafkaException as exc:  # pragma: no cover - poll raises only on fatal errors
                log.error("producer: %s", exc)
                time.sleep(_POLL_S)
