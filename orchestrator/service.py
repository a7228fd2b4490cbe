"""The Services SDK: consume a service's command topic, run typed handlers, reply to the workflow.

::

    service = Service("inventory", Settings())

    @service.handler(reserve)                      # an ActivityContract[Reserve, Reservation]
    def do_reserve(arg: Reserve, info: CommandInfo) -> Reservation:
        ...

    service.run()                                  # until SIGTERM / Ctrl-C / stop.set()

Each consumed batch of commands is answered in one Kafka transaction together with its consumed
offsets (``transactional=True``, the default), or produced, flushed and then committed
(``transactional=False``, at-least-once). Final replies (SUCCESS, BUSINESS_FAILURE) are remembered
by idempotency key in a local RocksDB store once committed, and a later command for the same
operation gets the stored reply without the handler running again. See ``docs/services.md``.

confluent-kafka stays inside this module; everything public is our own types.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import queue
import re
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from opentelemetry.trace import NoOpTracer, Tracer, TracerProvider
from pydantic import BaseModel

from contracts import codec
from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityCommand,
    ActivityReply,
    ErrorInfo,
    Payload,
    ReplyOutcome,
    TraceContext,
)
from contracts.limits import MAX_INBOX_RECORD_BYTES
from orchestrator._dead_letters import dead_letter_of
from orchestrator._deadline import DeadlineCaller, Stopping, Wedged, drop_in_background
from orchestrator._dedupe import FINAL_OUTCOMES, DedupeStore, ReplyStore
from orchestrator._health import Health, HealthServer, serve_http
from orchestrator._heartbeats import Heartbeats as _Heartbeats
from orchestrator._heartbeats import details_of as _details_of
from orchestrator._inflight import Entry, State, Tracker
from orchestrator._kafka_config import SERVING_FETCH_WAIT_MS, consumer_config, producer_config
from orchestrator._metrics import ServiceMetrics
from orchestrator._payloads import PayloadError, from_payload, to_payload
from orchestrator._workers import Workers
from orchestrator.errors import BusinessError, RetryableError
from orchestrator.settings import Settings
from orchestrator.tracing import INSTRUMENTATION, handler_span, record_reply

__all__ = [
    "TRACE_HEADERS",
    "CommandInfo",
    "Handler",
    "Service",
    "ServiceError",
    "run_in_thread",
    "serving",
]

log = logging.getLogger(__name__)

I = TypeVar("I", bound=BaseModel)  # noqa: E741 - the conventional name for an input type
O = TypeVar("O", bound=BaseModel)  # noqa: E741
T = TypeVar("T")

TRACE_HEADERS = ("traceparent", "tracestate")
"""Kafka headers copied from a command to its reply (W3C trace context)."""

_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
_TXN_TIMEOUT_S = 10.0
_OFFSETS_TIMEOUT_S = 5.0  # normally milliseconds; when stuck, the sooner replaced the better
_COMMITTED_TIMEOUT_S = 1.0  # reading a partition's committed metadata (see _Kafka.committed)
_GRACE_S = 2.0  # past a call's own timeout: the call is stuck (librdkafka #5456)
# librdkafka's default backoff grows to 10 s while the broker is away, and a reconnect waits
# for it after the broker is back.
_RECONNECT = {"reconnect.backoff.max.ms": 1000}
_CLOSE_S = 2.0
_SLICE_S = 0.1
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 2.0
_MAX_REBUILDS = 5
_MAX_TRIES = 3  # a record whose answer failed to produce this often is dead-lettered
_IDLE_POLL_S = 0.1
_BUSY_WAIT_S = 0.002  # while handlers run: how long a turn waits for one before polling again
_REDO_BACKOFF_S = 0.2
_RECORD_OVERHEAD = 512  # record framing beside key, value and headers
_HEADERS_KEPT_MAX = 16_384  # a dead letter keeps larger headers only for tracing
_LETTER_OVERHEAD = 1_024  # the DeadLetter envelope beside what it copies
_FENCED_CODES = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)
_DETAILS_MAX = 2000

_Headers = list[tuple[str, bytes]]
_Source = tuple[str, int, int]


class ServiceError(RuntimeError):
    """The service cannot go on: e.g. fenced by a newer instance with the same node id."""


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """What a handler may want to know about the command besides its input."""

    workflow_id: str
    activity_name: str
    seq: int
    attempt: int
    idempotency_key: str
    """Names the logical operation; the same for every attempt: key your side effects by it."""
    is_compensation: bool
    trace: TraceContext | None = None
    deadline_ms: int | None = None
    heartbeat_details: Any = None
    """The details of the last heartbeat an earlier attempt of this operation sent (JSON
    values), or None: where a long activity resumes."""
    heartbeat_timeout_ms: int | None = None
    """The workflow fails this attempt when no heartbeat came for this long (None: no limit)."""
    _beat: Callable[[Any], None] | None = field(default=None, compare=False, repr=False)

    def heartbeat(self, details: Any = None) -> None:
        """Tell the workflow this attempt is alive; ``details`` (JSON values: how far it got)
        reach the next attempt if this one fails. Cheap to call often: sends are throttled."""
        if self._beat is not None:
            self._beat(details)

    @classmethod
    def of(cls, cmd: ActivityCommand, beat: Callable[[Any], None] | None = None) -> CommandInfo:
        return cls(
            workflow_id=cmd.workflow_id,
            activity_name=cmd.activity_name,
            seq=cmd.seq,
            attempt=cmd.attempt,
            idempotency_key=cmd.idempotency_key,
            is_compensation=cmd.is_compensation,
            trace=cmd.trace,
            deadline_ms=cmd.deadline_ms,
            heartbeat_details=_details_of(cmd),
            heartbeat_timeout_ms=getattr(cmd, "heartbeat_timeout_ms", None),
            _beat=beat,
        )


Handler = Callable[[I, CommandInfo], O]
"""A typed activity handler: takes the contract's input model and returns its output model.
It runs on a worker thread, up to ``max_concurrency`` at once: it must be thread-safe."""

AsyncHandler = Callable[[I, CommandInfo], Awaitable[O]]
"""The same as a coroutine function: runs on the service's event loop."""


@dataclass(frozen=True, slots=True)
class _Registration:
    contract: ActivityContract[Any, Any]
    fn: Callable[[Any, CommandInfo], Any]
    is_async: bool


@dataclass(frozen=True, slots=True)
class _Record:
    """One record to produce: a reply or a dead letter."""

    topic: str
    key: bytes | None
    value: bytes
    headers: _Headers
    source: _Source
    """The consumed record this answers: (topic, partition, offset)."""

    @property
    def size(self) -> int:
        return _record_size(self.key, self.value, self.headers)


@dataclass
class _Batch:
    """One commit: the answers to produce and the offsets (with their metadata) to commit."""

    records: list[_Record]
    marks: dict[tuple[str, int], tuple[int, str]]
    failed: dict[_Source, str] = field(default_factory=dict)
    """Records that could not be produced, and why."""

    def offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o, metadata=meta) for (t, p), (o, meta) in self.marks.items()]


class _Abortable(Exception):
    """The open transaction must be aborted and the batch redone."""


class _Broken(Exception):
    """The producer is in an unknown state: replace it and redo the batch."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


# --------------------------------------------------------------------------- Kafka clients


class _Kafka:
    """The consumer and producer of one running service, and how a batch is committed.

    Every call that may block goes through ``_call``: with a deadline, retried with backoff while
    the error is retriable (the broker may be away for a while), and given up when ``stopping()``.
    A producer whose call got stuck, timed out in commit or abort, or whose transaction the
    coordinator aborted for its age, is replaced by a new one with the same transactional id:
    its ``init_transactions`` fences the old one and settles the open transaction, and the
    consumer rewinds to the committed offsets.
    """

    def __init__(
        self,
        settings: Settings,
        group: str,
        transactional_id: str | None,
        stopping: Callable[[], bool],
    ) -> None:
        extra = {**_RECONNECT, **settings.client_extra()}
        self.transactional = transactional_id is not None
        self._txn_id = transactional_id
        self._stopping = stopping
        self._calls = DeadlineCaller(f"kafka-{transactional_id or group}")
        self._known_topics: set[str] = set()
        self._in_txn = False
        self._txn_began = 0.0
        self._rebuilds = 0
        self._consumer_fatal: KafkaError | None = None
        # No linger: a turn's answers are produced together and flushed (or committed) at
        # once, so waiting for more records in librdkafka only delays the reply: 2 ms of
        # linger were 2 ms of every at-least-once hop (docs/performance.md, session 4).
        self._producer_conf = producer_config(
            settings.bootstrap_servers, transactional_id=transactional_id, linger_ms=0, extra=extra
        )
        self.max_record_bytes = int(self._producer_conf.get("message.max.bytes", 1_000_000))
        # A reply goes to a node's inbox, which takes no record over its limit.
        self.reply_limit = min(self.max_record_bytes, MAX_INBOX_RECORD_BYTES)
        self._txn_timeout_s = int(self._producer_conf.get("transaction.timeout.ms", 60_000)) / 1e3
        self.producer = self._new_producer()
        conf = consumer_config(
            settings.bootstrap_servers,
            group,
            fetch_wait_max_ms=SERVING_FETCH_WAIT_MS,
            extra=extra,
        )
        self.consumer = Consumer(
            {**conf, "error_cb": self._on_consumer_error, "on_commit": _log_commit_failures}
        )

    def _new_producer(self) -> Producer:
        self._brokers_lost = False
        producer = Producer({**self._producer_conf, "error_cb": self._on_producer_error})
        if self.transactional:
            # Fences an earlier incarnation with the same transactional id and aborts whatever
            # transaction it left open, before we read anything.
            self._call("init_transactions", lambda: producer.init_transactions(_TXN_TIMEOUT_S))
        return producer

    def _on_producer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_lost = True

    def _on_consumer_error(self, err: KafkaError) -> None:
        if _is_fatal(err):
            self._consumer_fatal = err

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None],
        on_revoke: Callable[[Any, list[TopicPartition]], None],
    ) -> None:
        self.consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)

    def pause(self, paused: bool) -> bool:
        """Stop (or resume) fetching every assigned partition; polling goes on, so the group
        membership stays alive while handlers run. False: not done, try again."""
        try:
            assigned = self.consumer.assignment()
            if paused:
                self.consumer.pause(assigned)
            else:
                self.consumer.resume(assigned)
            return True
        except KafkaException as exc:  # e.g. in the middle of a rebalance: the next turn retries
            log.info("cannot %s the partitions: %s", "pause" if paused else "resume", exc)
            return False

    def close(self) -> None:
        """Leave quickly, even with the broker away: each step gets a short deadline."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self._in_txn:
            steps.append(("abort", lambda: self.producer.abort_transaction(_CLOSE_S)))
        if not self.transactional:
            steps.append(("flush", lambda: self.producer.flush(_CLOSE_S)))
        steps.append(("consumer close", self.consumer.close))
        for what, step in steps:
            try:
                self._calls.call(what, step, _CLOSE_S + 1)
            except (KafkaException, Wedged) as exc:
                log.warning("closing: %s did not finish: %s", what, exc)
        drop_in_background([self.producer])
        self._calls.close()

    # -- reading ---------------------------------------------------------------------------

    def next_batch(self, max_batch: int, timeout: float = _IDLE_POLL_S) -> list[Message]:
        """Wait up to ``timeout`` for a record, then take whatever else is already fetched."""
        if self._consumer_fatal is not None:
            raise ServiceError(_consumer_failure(self._consumer_fatal))
        self.producer.poll(0)
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        rest = self.consumer.consume(num_messages=max_batch - 1, timeout=0) if max_batch > 1 else []
        return [msg for msg in [first, *rest] if self._usable(msg)]

    @staticmethod
    def _usable(msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if _is_fatal(err):
            raise ServiceError(_consumer_failure(err))
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s (%s)", err.str(), err.name())
        return False

    def topic_exists(self, topic: str) -> bool:
        if topic in self._known_topics:
            return True
        try:
            metadata = self._calls.call(
                "list_topics",
                lambda: self.producer.list_topics(timeout=_TXN_TIMEOUT_S),
                _TXN_TIMEOUT_S + _GRACE_S,
                self._stopping,
            )
        except (KafkaException, Wedged) as exc:
            log.warning("cannot read metadata to check topic %s: %s", topic, exc)
            return True  # let producing decide
        self._known_topics.update(
            name for name, meta in metadata.topics.items() if meta.error is None
        )
        return topic in self._known_topics

    # -- committing ------------------------------------------------------------------------

    def commit(self, batch: _Batch) -> bool:
        """Produce the batch's records and commit its offsets; False: rolled back, try again
        (the answers are kept: no handler runs again).

        Raises ``Stopping`` when asked to stop while waiting for the broker.
        """
        if self.transactional and self._brokers_lost:
            # After an outage librdkafka may keep a stale coordinator and wait for it for ever
            # (#5456, #5511); a fresh producer finds the current one.
            self._rebuild("it lost every broker since its last transaction")
        try:
            if self.transactional:
                self._commit_transaction(batch)
            else:
                self._commit_plain(batch)
        except _Abortable as exc:
            log.warning("transaction aborted, committing its answers again: %s", exc)
            self._abort()
            return False
        except _Broken as exc:
            self._rebuild(str(exc))
            return False
        self._rebuilds = 0
        return True

    def _commit_transaction(self, batch: _Batch) -> None:
        # No poll happens between begin and commit, so no rebalance callback can find a
        # transaction open: partitions are only ever revoked between two batches.
        producer = self.producer
        # 1. Open the transaction (only now: handler time does not count against its timeout).
        self._call("begin_transaction", producer.begin_transaction, inline=True)
        self._in_txn, self._txn_began = True, time.monotonic()
        # 2. The replies and dead letters; a record the broker refuses fails the commit.
        for record in batch.records:
            self._produce(record, batch)
        # 3. The consumed offsets, fenced by the consumer's group generation (KIP-447).
        group = self.consumer.consumer_group_metadata()
        self._call(
            "send_offsets_to_transaction",
            lambda: producer.send_offsets_to_transaction(
                batch.offsets(), group, _OFFSETS_TIMEOUT_S
            ),
            timeout=_OFFSETS_TIMEOUT_S,
        )
        # 4. Commit: replies and offsets become visible together, or not at all.
        self._call(
            "commit_transaction",
            lambda: producer.commit_transaction(_TXN_TIMEOUT_S),
            timeout_breaks=True,
        )
        self._in_txn = False

    def _abort(self) -> None:
        producer = self.producer
        try:
            self._call(
                "abort_transaction",
                lambda: producer.abort_transaction(_TXN_TIMEOUT_S),
                timeout_breaks=True,
                fatal_breaks=True,
            )
            self._in_txn = False
        except (_Abortable, _Broken) as exc:
            self._rebuild(f"cannot abort the transaction: {exc}")

    def _rebuild(self, why: str) -> None:
        """Replace the producer; its successor's init_transactions settles the open transaction."""
        self._rebuilds += 1
        if self._rebuilds > _MAX_REBUILDS + 1:
            raise ServiceError(f"the producer failed {_MAX_REBUILDS} times in a row: {why}")
        log.warning("replacing the producer: %s", why)
        old, self._in_txn = self.producer, False
        drop_in_background([old])
        del old
        self.producer = self._new_producer()

    def _commit_plain(self, batch: _Batch) -> None:
        for record in batch.records:
            self._produce(record, batch)
        producer = self.producer
        try:
            left = self._calls.call(
                "flush",
                lambda: producer.flush(_TXN_TIMEOUT_S),
                _TXN_TIMEOUT_S + _GRACE_S,
                self._stopping,
            )
        except Wedged as exc:
            raise _Abortable(f"flush: {exc}") from exc
        if left or batch.failed:
            raise _Abortable(f"{left} record(s) undelivered ({list(batch.failed.values())[:3]})")
        # The replies are acknowledged, so the offsets may go without waiting for the group
        # coordinator: a synchronous commit held the next command back by a round trip (1 ms
        # of every at-least-once hop at C = 4, docs/performance.md, session 5). librdkafka
        # sends a consumer's commits in order, and closing the consumer waits for them; a
        # failure is logged by _log_commit_failures from the next poll.
        try:
            self.consumer.commit(offsets=batch.offsets(), asynchronous=True)
        except KafkaException as exc:  # refused before it was sent (e.g. no longer assigned)
            _log_commit_failures(exc.args[0], batch.offsets())

    def _produce(self, record: _Record, batch: _Batch) -> None:
        headers: list[tuple[str, str | bytes | None]] = list(record.headers)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None and _blames_the_record(err):
                batch.failed[record.source] = f"{err.str()} ({err.name()})"

        delay = _BACKOFF_MIN_S
        while True:
            try:
                self.producer.produce(
                    record.topic,
                    value=record.value,
                    key=record.key,
                    headers=headers,
                    on_delivery=delivered,
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(_SLICE_S)
                if self._stopping():
                    raise Stopping from None
                continue
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is not None and err.fatal():
                    self._fatal("produce", err)
                if err is not None and err.txn_requires_abort():
                    raise _Abortable(f"produce: {err.str()} ({err.name()})") from exc
                if err is None or not err.retriable():
                    # This record, not the transaction, is the problem: the batch is redone,
                    # and the service dead-letters the command once it failed often enough.
                    why = f"{err.str()} ({err.name()})" if err is not None else str(exc)
                    batch.failed[record.source] = why
                    raise _Abortable(f"produce to {record.topic}: {why}") from exc
                log.info("produce: %s, retrying in %.1f s", err.str(), delay)
            self._sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def committed(self, tp: tuple[str, int]) -> tuple[int, str | None]:
        """A partition's committed offset and metadata, asked once with a short deadline;
        (-1, None) when it cannot be read now (the metadata only spares answering commands
        again, which the dedupe store does too: not worth waiting for a coordinator)."""
        consumer = self.consumer
        try:
            found = self._calls.call(
                "committed",
                lambda: consumer.committed([TopicPartition(*tp)], timeout=_COMMITTED_TIMEOUT_S),
                _COMMITTED_TIMEOUT_S + _GRACE_S,
                self._stopping,
            )
        except (KafkaException, Wedged) as exc:
            log.info("committed offset of %s[%d] not read: %s", *tp, exc)
            return -1, None
        if not found or found[0].offset < 0 or found[0].error is not None:
            return -1, None
        return found[0].offset, found[0].metadata

    def _call(
        self,
        what: str,
        fn: Callable[[], object],
        *,
        timeout_breaks: bool = False,
        fatal_breaks: bool = False,
        inline: bool = False,
        timeout: float = _TXN_TIMEOUT_S,
    ) -> None:
        """Run a client call until it succeeds; retriable errors are retried with backoff.

        Raises ``_Abortable`` (abort and redo), ``_Broken`` (replace the producer),
        ``ServiceError`` (stop the service) or ``Stopping``.
        """
        delay = _BACKOFF_MIN_S
        while True:
            try:
                if inline:  # local calls that cannot block
                    fn()
                else:
                    self._calls.call(what, fn, timeout + _GRACE_S, self._stopping)
                return
            except Wedged as exc:
                raise _Broken(f"{what}: {exc} (librdkafka #5456)") from exc
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is None:
                    raise ServiceError(f"{what} failed: {exc}") from exc
                if err.fatal() and fatal_breaks and err.code() not in _FENCED_CODES:
                    # An abort that fails for good (INVALID_TXN_STATE once a killed broker's
                    # coordinator moved) leaves nothing worth keeping: a new producer's
                    # init_transactions aborts what is open. Fenced stays fatal: another
                    # instance has this transactional id.
                    raise _Broken(f"{what}: {err.str()} ({err.name()})") from exc
                if err.fatal():
                    self._fatal(what, err)
                if err.txn_requires_abort():
                    raise _Abortable(f"{what}: {err.str()} ({err.name()})") from exc
                # librdkafka lacks KIP-890: a commit or abort that timed out may have happened
                # or not; a new producer's init_transactions settles it either way.
                if timeout_breaks and err.code() == KafkaError._TIMED_OUT:
                    raise _Broken(f"{what} timed out") from exc
                if not err.retriable():
                    raise ServiceError(f"{what} failed: {err.str()} ({err.name()})") from exc
                log.info("%s: %s, retrying in %.1f s", what, err.str(), delay)
            self._sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _fatal(self, what: str, err: KafkaError) -> None:
        """Decide what a fatal producer error means: our own late transaction, or the end."""
        fenced = err.code() in _FENCED_CODES
        age = time.monotonic() - self._txn_began
        if fenced and self._in_txn and age > self._txn_timeout_s:
            # The coordinator aborted our transaction for its age (the broker was away) and
            # bumped the epoch: no other instance is involved, so a new producer may take over.
            raise _Broken(f"{what}: the transaction outlived transaction.timeout.ms ({err.str()})")
        if fenced:
            raise ServiceError(
                f"producer fenced: another instance uses the transactional id {self._txn_id} "
                f"({what}: {err.str()})"
            )
        raise ServiceError(f"producer failed for good: {what}: {err.str()} ({err.name()})")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stopping():
                raise Stopping
            time.sleep(min(_SLICE_S, seconds))


_NOT_THE_RECORDS_FAULT = frozenset(
    {
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._STATE,
    }
)


def _blames_the_record(err: KafkaError) -> bool:
    """A delivery error that will come again for this record (too large, refused), as opposed
    to one that an outage or an aborted transaction gave every record in flight."""
    if err.code() in _NOT_THE_RECORDS_FAULT or err.code() in _FENCED_CODES:
        return False
    return not (err.retriable() or err.fatal() or err.txn_requires_abort())


def _record_size(key: bytes | None, value: bytes | None, headers: _Headers) -> int:
    heads = sum(len(k) + len(v) for k, v in headers)
    return len(key or b"") + len(value or b"") + heads + _RECORD_OVERHEAD


def _is_fatal(err: KafkaError) -> bool:
    # A consumer reports its fatal error (e.g. a fenced static member) as an event with code
    # _FATAL whose fatal() is False.
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


def _log_commit_failures(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
    """An at-least-once service's offsets that did not commit. Its replies are out already:
    the commands come again, and the dedupe store answers them without a handler."""
    failed = [f"{tp.topic}[{tp.partition}]" for tp in partitions if tp.error is not None]
    if err is not None or failed:
        log.warning(
            "offsets not committed for %s (%s); the commands will come again",
            failed or [f"{tp.topic}[{tp.partition}]" for tp in partitions],
            err.str() if err is not None else "per partition",
        )


def _consumer_failure(err: KafkaError) -> str:
    if err.code() == KafkaError.FENCED_INSTANCE_ID or "fenced" in err.str().lower():
        return (
            "consumer fenced: another instance joined the group with the same group.instance.id "
            f"({err.str()})"
        )
    return f"consumer failed for good: {err.str()} ({err.name()})"


# --------------------------------------------------------------------------- the service


class Service:
    """A service: typed handlers for the activities of its command topic.

    ``name`` is the consumer group and the ``<name>.<node_id>`` transactional id; the dedupe
    store lives in ``state_dir/<name>/dedupe`` (default ``settings.state_dir / "services"``).
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        *,
        state_dir: Path | None = None,
        transactional: bool = True,
        tracer_provider: TracerProvider | None = None,
        metrics: ServiceMetrics | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        """``tracer_provider``: a span per handled command, a child of the command's span;
        ``metrics``: served on ``settings.metrics_port`` (none = not served) with ``/healthz``
        and ``/ready`` (:attr:`health`); ``max_concurrency``: how many handlers run at once
        (default ``settings.max_concurrency``)."""
        if not _NAME.match(name) or name in (".", ".."):
            raise ValueError(f"service name {name!r} may hold only letters, digits, '.', '_', '-'")
        concurrency = max_concurrency if max_concurrency is not None else settings.max_concurrency
        if concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {concurrency}")
        self.name = name
        self.settings = settings
        self.transactional = transactional
        self.max_concurrency = concurrency
        self._tracer: Tracer = (
            tracer_provider.get_tracer(INSTRUMENTATION) if tracer_provider else NoOpTracer()
        )
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.health = Health(settings.health_stale_ms / 1000)
        self._http: HealthServer | None = None
        root = state_dir if state_dir is not None else settings.state_dir / "services"
        self._store: ReplyStore = DedupeStore(root / name / "dedupe")
        self._handlers: dict[str, _Registration] = {}
        self._kafka: _Kafka | None = None
        self._failures: dict[_Source, tuple[int, str, bool]] = {}
        """Consumed records whose answer failed to produce: tries, last error, was a letter."""
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        # The state of one run(), touched only by the poll thread (handlers report through
        # _done): see _inflight.py for how offsets follow out-of-order answers.
        self._tracker = Tracker()
        self._backlog: collections.deque[Entry] = collections.deque()
        self._done: queue.SimpleQueue[tuple[Entry, _Outcome]] = queue.SimpleQueue()
        self._leaders: dict[str, Entry] = {}
        """The running command of each idempotency key: a twin waits for its outcome."""
        self._finals: dict[str, ActivityReply] = {}
        """Final replies made but not yet committed (then they move to the dedupe store)."""
        self._jobs = 0
        self._paused = False
        self._resync = False
        self._workers: Workers | None = None
        self._reply_limit = MAX_INBOX_RECORD_BYTES
        self._beats: _Heartbeats | None = None

    # -- registration ----------------------------------------------------------------------

    def handler(
        self, contract: ActivityContract[I, O]
    ) -> Callable[[Handler[I, O] | AsyncHandler[I, O]], Handler[I, O] | AsyncHandler[I, O]]:
        """Register ``fn`` as the handler of ``contract``'s activity (one per activity name):
        a plain function runs on a worker thread, an ``async def`` on the service's event loop."""

        def register(fn: Handler[I, O] | AsyncHandler[I, O]) -> Handler[I, O] | AsyncHandler[I, O]:
            if contract.name in self._handlers:
                raise ValueError(f"service {self.name} already has a handler for {contract.name}")
            is_async = inspect.iscoroutinefunction(fn)
            self._handlers[contract.name] = _Registration(contract, fn, is_async)
            return fn

        return register

    @property
    def http_port(self) -> int | None:
        """The port of ``/metrics``, ``/healthz``, ``/ready`` while it serves (the one the OS
        picked when ``metrics_port`` is 0), else None."""
        return self._http.port if self._http is not None else None

    @property
    def topics(self) -> list[str]:
        """The command topics this service consumes: those of its contracts."""
        return sorted({reg.contract.topic for reg in self._handlers.values()})

    # -- lifecycle -------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set, ``close()`` is called, SIGTERM or Ctrl-C."""
        if self._closed:
            raise RuntimeError(f"service {self.name} is closed")
        if not self._handlers:
            raise ValueError(f"service {self.name} has no handlers")
        if not self._idle.is_set():
            raise RuntimeError(f"service {self.name} is already running")
        stop = stop if stop is not None else threading.Event()
        self._idle.clear()
        try:
            with (
                _sigterm_sets(stop),
                serve_http(self.health, self.metrics.registry, self.settings.metrics_port) as http,
            ):
                self._http = http
                self._serve(stop)
        except ServiceError as exc:
            self.health.fail(str(exc))
            raise
        except KeyboardInterrupt:
            log.info("service %s interrupted", self.name)
        finally:
            self._http = None
            self._idle.set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop (if running, wait for it) and close the dedupe store. Idempotent."""
        self._stop.set()
        if not self._idle.wait(timeout):
            log.warning("service %s did not stop within %.0f s", self.name, timeout)
            return
        if not self._closed:
            self._closed = True
            self._store.close()

    def _serve(self, stop: threading.Event) -> None:
        txn_id = f"{self.name}.{self.settings.node_id}" if self.transactional else None

        def stopping() -> bool:
            return stop.is_set() or self._stop.is_set()

        try:
            self._kafka = kafka = _Kafka(self.settings, self.name, txn_id, stopping)
        except Stopping:
            return
        self._reply_limit = kafka.reply_limit
        self._reset()
        self._workers = Workers(f"svc-{self.name}", self.max_concurrency)
        self._beats = _Heartbeats(self.settings, kafka.reply_limit)
        try:
            if not kafka.topic_exists(self.settings.dlq):
                raise ServiceError(f"the dead-letter topic {self.settings.dlq} does not exist")
            kafka.subscribe(self.topics, self._on_assign, self._on_revoke)
            log.info(
                "service %s consuming %s, up to %d handlers at once",
                self.name,
                ", ".join(self.topics),
                self.max_concurrency,
            )
            self.health.set_ready(True)
            while not stopping():
                self._turn(kafka)
                self.health.beat()
        except Stopping:
            log.info("service %s stopping while waiting for the broker", self.name)
        finally:
            self.health.set_ready(False, "stopped")
            self._kafka = None
            if self._jobs:
                # Their commands were not committed: whoever reads the partitions next
                # answers them (the handlers are idempotent by key).
                log.info("service %s leaves %d handler(s) running", self.name, self._jobs)
            self._workers.close()
            self._beats.close()
            kafka.close()
            self._reset()

    def _reset(self) -> None:
        self._tracker = Tracker()
        self._backlog.clear()
        self._done = queue.SimpleQueue()  # answers of a previous run's handlers are dropped
        self._leaders.clear()
        self._finals.clear()
        self._jobs = 0
        self._paused = False
        self._resync = False

    # -- one turn of the poll loop ---------------------------------------------------------

    def _turn(self, kafka: _Kafka) -> None:
        """Read what may be started, start it, collect finished handlers, commit their answers.

        The poll thread never runs a handler, so the consumer polls (and stays in its group)
        however long handlers take; when ``max_concurrency`` commands are waiting or running,
        the partitions are paused instead of read.
        """
        # Commands are read ahead of the running ones (up to max_batch, at least
        # max_concurrency), so a freed slot starts the next one at once; beyond that the
        # partitions are paused. Rarely: a pause drops what librdkafka fetched ahead, and the
        # fetch after a resume waits up to a second (measured), which paused once per slot
        # made a service of max_concurrency 1 answer one command a second.
        ahead = max(self.settings.max_batch, self.max_concurrency)
        room = self.max_concurrency + ahead - self._jobs - len(self._backlog)
        full = room <= 0
        if full != self._paused or self._resync:
            # After a rebalance the pause state of the partitions is not known (librdkafka
            # may keep a partition paused across its revocation): set it again.
            self._resync = not kafka.pause(full)
            self._paused = full
        first: tuple[Entry, _Outcome] | None = None
        if self._jobs:
            # A finished handler must be noticed at once (a fast one takes microseconds and
            # its reply is a hop of the saga): wait on the handlers, not in the consumer's
            # poll, which nothing can interrupt; then take what the consumer has without
            # waiting. Paused, nothing is fetched anyway: the poll keeps the membership alive.
            with contextlib.suppress(queue.Empty):
                first = self._done.get(timeout=_IDLE_POLL_S if full else _BUSY_WAIT_S)
            messages = kafka.next_batch(max(1, min(room, self.settings.max_batch)), timeout=0)
        else:
            messages = kafka.next_batch(max(1, min(room, self.settings.max_batch)), _IDLE_POLL_S)
        for msg in messages:
            self._take(msg)
        self._collect(first)
        self._start_queued()
        self._gather_answers()
        self._commit(kafka)

    def _gather_answers(self) -> None:
        """While commands wait and handlers finish quickly, run more before committing, for
        up to commit_interval_ms: one transaction per answer would bound a service with few
        slots to one answer per commit round trip (a backlog after an outage drained at
        ~10 a second on a loaded machine)."""
        deadline = time.monotonic() + max(self.settings.commit_interval_ms, 1) / 1000
        answers = 0
        while self._backlog and self._jobs and answers < self.settings.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                item = self._done.get(timeout=left)
            except queue.Empty:
                return
            self._collect(item)
            self._start_queued()
            answers += 1

    def _on_assign(self, _consumer: Any, _partitions: list[TopicPartition]) -> None:
        self._resync = True  # the next turn pauses or resumes every assigned partition

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Forget the partitions. Nothing is committed here: this runs inside the consumer's
        poll, when the broker may be away (a lost session) and the partitions may be gone
        already; the answers made since the last turn's commit are left to the next owner
        (their handlers run again there). Handlers still running keep running; a twin command
        that comes back to this instance waits for their outcome instead of running again."""
        dropped = self._tracker.drop((tp.topic, tp.partition) for tp in partitions)
        unsent = [e for e in dropped if e.state is State.DONE]
        for entry in dropped:
            if entry.key is not None and entry.state is State.DONE:
                self._finals.pop(entry.key, None)
        if unsent:
            log.info(
                "service %s: %d answer(s) left to the partitions' next owner",
                self.name,
                len(unsent),
            )
        self._resync = True

    def _take(self, msg: Message) -> None:
        tp = (msg.topic() or "", msg.partition() or 0)
        if not self._tracker.knows(tp):
            assert self._kafka is not None
            self._tracker.start(tp, *self._kafka.committed(tp))
        entry = self._tracker.add(tp, msg.offset() or 0, msg)
        if entry is not None:
            self._backlog.append(entry)

    def _start_queued(self) -> None:
        while self._backlog and self._jobs < self.max_concurrency:
            entry = self._backlog.popleft()
            if entry.alive:
                self._start(entry)

    def _start(self, entry: Entry) -> None:
        """Answer at once what needs no handler; else run the handler (or wait for a twin)."""
        msg = entry.msg
        source = _source(msg)
        tries, why, was_letter = self._failures.get(source, (0, "", False))
        if tries >= _MAX_TRIES:
            if was_letter:
                raise ServiceError(
                    f"cannot write to the dead-letter topic {self.settings.dlq}: {why}"
                )
            reason = f"its answer could not be produced in {tries} tries: {why}"
            return self._answered(entry, self._dead_letter(msg, reason, "ProduceFailed"))
        value = msg.value()
        if value is None:
            letter = self._dead_letter(msg, "no record value (a tombstone?)", "EmptyRecord")
            return self._answered(entry, letter)
        try:
            cmd = codec.decode_as(value, ActivityCommand)
        except codec.CodecError as exc:
            return self._answered(entry, self._dead_letter(msg, str(exc), type(exc).__name__))
        reg = self._handlers.get(cmd.activity_name)
        if reg is None:
            reason = f"service {self.name} has no handler for activity {cmd.activity_name!r}"
            return self._answered(entry, self._dead_letter(msg, reason, "UnknownActivity"))
        if not self._may_reply_to(cmd.reply_topic):
            reason = f"reply topic {cmd.reply_topic!r} is not an inbox this service may answer"
            return self._answered(entry, self._dead_letter(msg, reason, "ForbiddenReplyTopic"))
        assert self._kafka is not None
        if not cmd.reply_topic or not self._kafka.topic_exists(cmd.reply_topic):
            reason = f"reply topic {cmd.reply_topic!r} does not exist"
            return self._answered(entry, self._dead_letter(msg, reason, "UnknownReplyTopic"))
        entry.cmd, entry.key = cmd, cmd.idempotency_key
        entry.state = State.RUNNING
        done = self._finals.get(entry.key) or self._store.get(entry.key)
        if done is not None:
            log.info(
                "service %s: %s already done, resending %s", self.name, entry.key, done.outcome
            )
            reply, record = self._finish(msg, cmd, (done.outcome, done.result, done.error))
            return self._answered(entry, record, reply)
        leader = self._leaders.get(entry.key)
        if leader is not None:
            # The same operation runs already (an attempt the workflow gave up on while its
            # handler still runs): never run one operation twice at once.
            leader.followers.append(entry)
            return
        self._leaders[entry.key] = entry
        self._jobs += 1
        assert self._workers is not None
        if reg.is_async:
            self._workers.submit_async(lambda: self._run_async(entry, reg, cmd))
        else:
            self._workers.submit(lambda: self._run(entry, reg, cmd))

    def _answered(self, entry: Entry, record: _Record, reply: ActivityReply | None = None) -> None:
        entry.record, entry.state = record, State.DONE
        if reply is not None and reply.outcome in FINAL_OUTCOMES and entry.key is not None:
            entry.final = reply
            self._finals[entry.key] = reply

    def _collect(self, first: tuple[Entry, _Outcome] | None) -> None:
        """Take the answers of the handlers that finished."""
        while True:
            if first is not None:
                item, first = first, None
            else:
                try:
                    item = self._done.get_nowait()
                except queue.Empty:
                    return
            entry, (reply, record) = item
            self._jobs -= 1
            assert entry.key is not None
            if self._leaders.get(entry.key) is entry:
                del self._leaders[entry.key]
            final = reply.outcome in FINAL_OUTCOMES
            if entry.alive:
                self._answered(entry, record, reply)
            elif final and entry.followers:
                self._finals[entry.key] = reply  # its twins are answered with it
            # Twins go first: answered from the final reply, or (after a retryable failure)
            # the first of them runs the handler again.
            self._backlog.extendleft(reversed(entry.followers))
            entry.followers = []

    def _run(self, entry: Entry, reg: _Registration, cmd: ActivityCommand) -> None:
        """On a worker thread: run the handler, make its reply and record, hand them over."""
        started = time.monotonic()
        try:
            with self._span(entry.msg, cmd) as span:
                outcome = _execute(reg, cmd, self._info(cmd))
                reply, record = self._finish(entry.msg, cmd, outcome)
                record_reply(span, reply)
            self.metrics.answered(
                cmd.activity_name, reply.outcome.value, time.monotonic() - started
            )
        except BaseException as exc:  # never leave the poll thread waiting for this job
            log.exception("service %s: %s failed in the SDK", self.name, cmd.idempotency_key)
            error = ErrorInfo(type=type(exc).__name__, message=str(exc))
            reply, record = self._finish(
                entry.msg, cmd, (ReplyOutcome.RETRYABLE_FAILURE, None, error)
            )
        self._done.put((entry, (reply, record)))

    async def _run_async(self, entry: Entry, reg: _Registration, cmd: ActivityCommand) -> None:
        """On the event loop: the same as :meth:`_run` for an ``async def`` handler."""
        started = time.monotonic()
        try:
            with self._span(entry.msg, cmd) as span:
                outcome = await _execute_async(reg, cmd, self._info(cmd))
                reply, record = self._finish(entry.msg, cmd, outcome)
                record_reply(span, reply)
            self.metrics.answered(
                cmd.activity_name, reply.outcome.value, time.monotonic() - started
            )
        except BaseException as exc:  # never leave the poll thread waiting for this job
            log.exception("service %s: %s failed in the SDK", self.name, cmd.idempotency_key)
            error = ErrorInfo(type=type(exc).__name__, message=str(exc))
            outcome = (ReplyOutcome.RETRYABLE_FAILURE, None, error)
            reply, record = self._finish(entry.msg, cmd, outcome)
        self._done.put((entry, (reply, record)))

    def _span(self, msg: Message, cmd: ActivityCommand) -> contextlib.AbstractContextManager[Any]:
        return handler_span(
            self._tracer, self.name, cmd, _bytes_headers(msg),
            topic=msg.topic() or "", partition=msg.partition() or 0, offset=msg.offset() or 0,
        )  # fmt: skip

    def _info(self, cmd: ActivityCommand) -> CommandInfo:
        beats = self._beats
        beat = (lambda details: beats.beat(cmd, self.name, details)) if beats is not None else None
        return CommandInfo.of(cmd, beat)

    def _finish(
        self, msg: Message, cmd: ActivityCommand, outcome: _Result
    ) -> tuple[ActivityReply, _Record]:
        """The reply to ``cmd`` and its record; one too large becomes a PayloadTooLarge."""
        reply = self._reply(cmd, *outcome)
        record = self._reply_record(msg, cmd, reply)
        if record.size > self._reply_limit:
            reply = self._too_large(cmd, record.size)
            record = self._reply_record(msg, cmd, reply)
        return reply, record

    def _commit(self, kafka: _Kafka) -> None:
        """Commit the answers ready and the offsets they free; on failure keep them for the
        next turn (no handler runs again), and dead-letter a record refused too often."""
        commit = self._tracker.pending_commit()
        if commit is None:
            return
        if not commit.entries and (self._jobs or self._backlog):
            # Only offsets moved: over the commit marker that follows every command the node
            # sends in a transaction, or over records answered before. They go with the next
            # answers. Committing them now was an empty transaction right after each command's
            # handler started, which its reply then waited for (1.5 ms a step at C = 1).
            return
        batch = _Batch([e.record for e in commit.entries], dict(commit.offsets))
        if not kafka.commit(batch):
            self._count_failures(batch, commit.entries)
            kafka._sleep(_REDO_BACKOFF_S)
            return
        self._tracker.committed(commit)
        for entry in commit.entries:
            self._failures.pop(entry.record.source, None)
            if entry.final is not None and entry.key is not None:
                self._finals.pop(entry.key, None)
                try:
                    self._store.put(entry.key, entry.final, entry.record.value)
                except Exception:  # losing an entry only means the handler may run again
                    log.exception("service %s: cannot store the reply for %s", self.name, entry.key)
            # A sent entry may stay tracked for long (above a slow command): keep it small.
            entry.msg = entry.record = entry.cmd = entry.final = None

    def _count_failures(self, batch: _Batch, entries: list[Entry]) -> None:
        letters = {r.source for r in batch.records if r.topic == self.settings.dlq}
        by_source = {e.record.source: e for e in entries}
        for source, why in batch.failed.items():
            tries = self._failures.get(source, (0, "", False))[0] + 1
            self._failures[source] = (tries, why, source in letters)
            log.warning("service %s: answering %s failed (%d): %s", self.name, source, tries, why)
            entry = by_source.get(source)
            if entry is not None and tries >= _MAX_TRIES:
                # Answer it anew: a dead letter instead of the refused record.
                if entry.key is not None:
                    self._finals.pop(entry.key, None)
                entry.final, entry.state = None, State.QUEUED
                self._start(entry)

    def _reply_record(self, msg: Message, cmd: ActivityCommand, reply: ActivityReply) -> _Record:
        key, value = cmd.workflow_id.encode(), codec.encode(reply)
        return _Record(cmd.reply_topic, key, value, _trace_headers(msg, cmd), _source(msg))

    def _too_large(self, cmd: ActivityCommand, size: int) -> ActivityReply:
        """A reply no producer may send becomes a final failure, so the workflow moves on."""
        limit = self._reply_limit
        message = (
            f"the reply of {cmd.activity_name} is {size} bytes, over the {limit} bytes a reply "
            "may have (contracts.limits, message.max.bytes): return less, e.g. a reference"
        )
        log.warning("service %s: %s (%s)", self.name, message, cmd.idempotency_key)
        error = ErrorInfo(type="PayloadTooLarge", message=message)
        return self._reply(cmd, ReplyOutcome.BUSINESS_FAILURE, None, error)

    def _may_reply_to(self, topic: str) -> bool:
        """Only to inboxes: a forged command must not write into a history or any other topic."""
        allowed = self.settings.reply_topics
        return topic in allowed if allowed is not None else topic.endswith(".inbox")

    def _reply(
        self,
        cmd: ActivityCommand,
        outcome: ReplyOutcome,
        result: Payload | None,
        error: ErrorInfo | None,
    ) -> ActivityReply:
        return ActivityReply(
            workflow_id=cmd.workflow_id,
            seq=cmd.seq,
            attempt=cmd.attempt,
            idempotency_key=cmd.idempotency_key,
            outcome=outcome,
            sent_at_ms=_now_ms(),
            result=result,
            error=error,
            service=self.name,
            trace=cmd.trace,
        )

    def _dead_letter(self, msg: Message, reason: str, error_type: str) -> _Record:
        self.metrics.dead_letters.inc()
        log.warning(
            "service %s: %s[%s]@%s to the DLQ: %s",
            self.name,
            msg.topic(),
            msg.partition(),
            msg.offset(),
            reason,
        )
        headers = _bytes_headers(msg)
        if sum(len(k) + len(v) for k, v in headers) > _HEADERS_KEPT_MAX:
            headers = [(k, v) for k, v in headers if k in TRACE_HEADERS]
        key = msg.key()
        limit = self._kafka.max_record_bytes if self._kafka is not None else 1_000_000
        room = limit - _record_size(key, None, headers) - _LETTER_OVERHEAD
        letter = dead_letter_of(msg, reason, error_type, max_bytes=room)
        return _Record(self.settings.dlq, key, codec.encode(letter), headers, _source(msg))


# --------------------------------------------------------------------------- helpers


_Result = tuple[ReplyOutcome, Payload | None, ErrorInfo | None]
_Outcome = tuple[ActivityReply, "_Record"]


def _execute(reg: _Registration, cmd: ActivityCommand, info: CommandInfo) -> _Result:
    """Run the handler; every outcome, including a crash of the handler, becomes a reply."""
    try:
        arg: Any = from_payload(cmd.input, reg.contract.input)
    except PayloadError as exc:
        return ReplyOutcome.BUSINESS_FAILURE, None, ErrorInfo(type="InvalidInput", message=str(exc))
    try:
        return _succeeded(reg, reg.fn(arg, info))
    except Exception as exc:
        return _failed(cmd, exc)


async def _execute_async(reg: _Registration, cmd: ActivityCommand, info: CommandInfo) -> _Result:
    try:
        arg: Any = from_payload(cmd.input, reg.contract.input)
    except PayloadError as exc:
        return ReplyOutcome.BUSINESS_FAILURE, None, ErrorInfo(type="InvalidInput", message=str(exc))
    try:
        return _succeeded(reg, await reg.fn(arg, info))
    except Exception as exc:  # asyncio.CancelledError is a BaseException: the loop is closing
        return _failed(cmd, exc)


def _succeeded(reg: _Registration, result: Any) -> _Result:
    output = reg.contract.output
    if not isinstance(result, output):
        result = output.model_validate(result)
    return ReplyOutcome.SUCCESS, to_payload(result), None


def _failed(cmd: ActivityCommand, exc: Exception) -> _Result:
    if isinstance(exc, BusinessError):
        return ReplyOutcome.BUSINESS_FAILURE, None, ErrorInfo(type=exc.error_type, message=str(exc))
    expected = isinstance(exc, RetryableError)  # a crash gets its traceback in the log
    log.log(
        logging.INFO if expected else logging.WARNING,
        "%s (%s) failed, retryable: %s",
        cmd.activity_name,
        cmd.idempotency_key,
        exc,
        exc_info=not expected,
    )
    details = "".join(traceback.format_exception(exc))[-_DETAILS_MAX:]
    error = ErrorInfo(type=type(exc).__name__, message=str(exc), details=details)
    return ReplyOutcome.RETRYABLE_FAILURE, None, error


def _source(msg: Message) -> _Source:
    return msg.topic() or "", msg.partition() or 0, msg.offset() or 0


def _bytes_headers(msg: Message) -> _Headers:
    headers = msg.headers() or []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in items if v is not None]


def _trace_headers(msg: Message, cmd: ActivityCommand) -> _Headers:
    """The command's trace headers, or, when it has none, headers made from its envelope."""
    found = [(k, v) for k, v in _bytes_headers(msg) if k in TRACE_HEADERS]
    if found or cmd.trace is None:
        return found
    made = [("traceparent", cmd.trace.traceparent.encode())]
    if cmd.trace.tracestate:
        made.append(("tracestate", cmd.trace.tracestate.encode()))
    return made


@contextlib.contextmanager
def _sigterm_sets(stop: threading.Event) -> Iterator[None]:
    """Make SIGTERM set ``stop`` while the block runs (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_in_thread(service: Service) -> tuple[threading.Thread, threading.Event]:
    """Start ``service.run`` in a daemon thread; set the event (or ``service.close()``) to stop."""
    stop = threading.Event()
    thread = threading.Thread(
        target=service.run, args=(stop,), name=f"service-{service.name}", daemon=True
    )
    thread.start()
    return thread, stop


@contextlib.contextmanager
def serving(service: Service, *, timeout: float = 30.0) -> Iterator[Service]:
    """Run ``service`` in a thread for the block, then stop and close it.

    An error that ended the service's loop is raised when the block exits.
    """
    errors: list[BaseException] = []
    stop = threading.Event()

    def target() -> None:
        try:
            service.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"service-{service.name}", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(timeout)
        service.close(timeout)
    if errors:
        raise errors[0]
