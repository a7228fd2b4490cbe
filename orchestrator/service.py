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

import contextlib
import logging
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
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
from orchestrator._deadline import DeadlineCaller, Stopping, Wedged, drop_in_background
from orchestrator._dedupe import FINAL_OUTCOMES, DedupeStore, ReplyStore
from orchestrator.dead_letters import dead_letter_of
from orchestrator.errors import BusinessError, RetryableError
from orchestrator.health import Health, HealthServer, serve_http
from orchestrator.kafka_config import consumer_config, producer_config
from orchestrator.metrics import ServiceMetrics
from orchestrator.payloads import PayloadError, from_payload, to_payload
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

    @classmethod
    def of(cls, cmd: ActivityCommand) -> CommandInfo:
        return cls(
            workflow_id=cmd.workflow_id,
            activity_name=cmd.activity_name,
            seq=cmd.seq,
            attempt=cmd.attempt,
            idempotency_key=cmd.idempotency_key,
            is_compensation=cmd.is_compensation,
            trace=cmd.trace,
            deadline_ms=cmd.deadline_ms,
        )


Handler = Callable[[I, CommandInfo], O]
"""A typed activity handler: takes the contract's input model and returns its output model."""


@dataclass(frozen=True, slots=True)
class _Registration:
    contract: ActivityContract[Any, Any]
    fn: Callable[[Any, CommandInfo], Any]


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
    """The answer to one consumed batch: what to produce, which offsets it covers, what to store."""

    records: list[_Record] = field(default_factory=list)
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    next: dict[tuple[str, int], int] = field(default_factory=dict)
    finals: dict[str, ActivityReply] = field(default_factory=dict)
    failed: dict[_Source, str] = field(default_factory=dict)
    """Records that could not be produced, and why."""

    def consumed(self, msg: Message) -> None:
        tp, offset = (msg.topic() or "", msg.partition() or 0), msg.offset() or 0
        self.first.setdefault(tp, offset)
        self.next[tp] = offset + 1

    @property
    def sources(self) -> set[_Source]:
        return {r.source for r in self.records}

    def offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.next.items()]


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
        self._producer_conf = producer_config(
            settings.bootstrap_servers, transactional_id=transactional_id, extra=extra
        )
        self.max_record_bytes = int(self._producer_conf.get("message.max.bytes", 1_000_000))
        # A reply goes to a node's inbox, which takes no record over its limit.
        self.reply_limit = min(self.max_record_bytes, MAX_INBOX_RECORD_BYTES)
        self._txn_timeout_s = int(self._producer_conf.get("transaction.timeout.ms", 60_000)) / 1e3
        self.producer = self._new_producer()
        conf = consumer_config(settings.bootstrap_servers, group, extra=extra)
        self.consumer = Consumer({**conf, "error_cb": self._on_consumer_error})

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

    def subscribe(self, topics: list[str]) -> None:
        self.consumer.subscribe(topics)

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

    def next_batch(self, max_batch: int) -> list[Message]:
        """Wait briefly for a record, then take whatever else is already fetched."""
        if self._consumer_fatal is not None:
            raise ServiceError(_consumer_failure(self._consumer_fatal))
        self.producer.poll(0)
        first = self.consumer.poll(_IDLE_POLL_S)
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
        """Produce the batch's records and commit its offsets; False: rolled back, redo it.

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
            log.warning("transaction aborted, redoing the batch: %s", exc)
            self._abort()
            self._rewind(batch)
            return False
        except _Broken as exc:
            self._rebuild(str(exc))
            self._rewind(batch)
            return False
        self._rebuilds = 0
        return True

    def _commit_transaction(self, batch: _Batch) -> None:
        # No poll happens between begin and commit, so no rebalance callback can find a
        # transaction open: partitions are only ever revoked between two batches.
        producer = self.producer
        # 1. Open the transaction (only now: handler time does not count against its timeout).
        self._call("begin_transaction", producer.begin_transaction)
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
        try:
            result = self.consumer.commit(offsets=batch.offsets(), asynchronous=False)
            failures = [f"{tp.topic}[{tp.partition}]" for tp in result or [] if tp.error]
        except KafkaException as exc:
            failures = [str(exc)]
        if failures:  # the replies are out: a redelivery is answered from the dedupe store
            log.warning("offsets not committed for %s; the commands will come again", failures)

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

    def _rewind(self, batch: _Batch) -> None:
        """Seek the batch's partitions back to their committed offsets, so it is read again."""
        partitions = [TopicPartition(t, p) for t, p in batch.first]
        committed: list[TopicPartition] = []
        consumer = self.consumer

        def read() -> None:
            committed[:] = consumer.committed(partitions, timeout=_TXN_TIMEOUT_S)

        try:
            self._call("committed", read)
        except (ServiceError, _Abortable, _Broken) as exc:
            log.warning("cannot read committed offsets (%s); rewinding to the batch start", exc)
        positions = {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset >= 0}
        for (topic, partition), first in batch.first.items():
            offset = positions.get((topic, partition), first)
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner reads it
                log.info("not rewinding %s[%d]: %s", topic, partition, exc)

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
    ) -> None:
        """``tracer_provider``: a span per handled command, a child of the command's span;
        ``metrics``: served on ``settings.metrics_port`` (none = not served) with ``/healthz``
        and ``/ready`` (:attr:`health`)."""
        if not _NAME.match(name) or name in (".", ".."):
            raise ValueError(f"service name {name!r} may hold only letters, digits, '.', '_', '-'")
        self.name = name
        self.settings = settings
        self.transactional = transactional
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

    # -- registration ----------------------------------------------------------------------

    def handler(self, contract: ActivityContract[I, O]) -> Callable[[Handler[I, O]], Handler[I, O]]:
        """Register ``fn`` as the handler of ``contract``'s activity (one per activity name)."""

        def register(fn: Handler[I, O]) -> Handler[I, O]:
            if contract.name in self._handlers:
                raise ValueError(f"service {self.name} already has a handler for {contract.name}")
            self._handlers[contract.name] = _Registration(contract, fn)
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
        try:
            if not kafka.topic_exists(self.settings.dlq):
                raise ServiceError(f"the dead-letter topic {self.settings.dlq} does not exist")
            kafka.subscribe(self.topics)
            log.info("service %s consuming %s", self.name, ", ".join(self.topics))
            self.health.set_ready(True)
            while not stopping():
                self._process_batch(kafka.next_batch(self.settings.max_batch))
                self.health.beat()
        except Stopping:
            log.info("service %s stopping while waiting for the broker", self.name)
        finally:
            self.health.set_ready(False, "stopped")
            self._kafka = None
            kafka.close()

    # -- one batch -------------------------------------------------------------------------

    def _process_batch(self, messages: list[Message]) -> None:
        """Answer ``messages``, commit the answers with their offsets, then remember them."""
        if not messages or self._kafka is None:
            return
        batch = _Batch()
        for msg in messages:
            batch.consumed(msg)
            batch.records.append(self._answer(msg, batch))
        if not self._kafka.commit(batch):
            self._count_failures(batch)
            time.sleep(_REDO_BACKOFF_S)
            return
        for source in batch.sources:
            self._failures.pop(source, None)
        for key, reply in batch.finals.items():
            try:
                self._store.put(key, reply)
            except Exception:  # losing an entry only means the handler may run again
                log.exception("service %s: cannot store the reply for %s", self.name, key)

    def _count_failures(self, batch: _Batch) -> None:
        letters = {r.source for r in batch.records if r.topic == self.settings.dlq}
        for source, why in batch.failed.items():
            tries = self._failures.get(source, (0, "", False))[0] + 1
            self._failures[source] = (tries, why, source in letters)
            log.warning("service %s: answering %s failed (%d): %s", self.name, source, tries, why)

    def _answer(self, msg: Message, batch: _Batch) -> _Record:
        source = _source(msg)
        tries, why, was_letter = self._failures.get(source, (0, "", False))
        if tries >= _MAX_TRIES:
            if was_letter:
                raise ServiceError(
                    f"cannot write to the dead-letter topic {self.settings.dlq}: {why}"
                )
            reason = f"its answer could not be produced in {tries} tries: {why}"
            return self._dead_letter(msg, reason, "ProduceFailed")
        value = msg.value()
        if value is None:
            return self._dead_letter(msg, "no record value (a tombstone?)", "EmptyRecord")
        try:
            cmd = codec.decode_as(value, ActivityCommand)
        except codec.CodecError as exc:
            return self._dead_letter(msg, str(exc), type(exc).__name__)
        reg = self._handlers.get(cmd.activity_name)
        if reg is None:
            reason = f"service {self.name} has no handler for activity {cmd.activity_name!r}"
            return self._dead_letter(msg, reason, "UnknownActivity")
        if not self._may_reply_to(cmd.reply_topic):
            reason = f"reply topic {cmd.reply_topic!r} is not an inbox this service may answer"
            return self._dead_letter(msg, reason, "ForbiddenReplyTopic")
        assert self._kafka is not None
        if not cmd.reply_topic or not self._kafka.topic_exists(cmd.reply_topic):
            reason = f"reply topic {cmd.reply_topic!r} does not exist"
            return self._dead_letter(msg, reason, "UnknownReplyTopic")
        started = time.monotonic()
        with handler_span(
            self._tracer, self.name, cmd, _bytes_headers(msg),
            topic=msg.topic() or "", partition=msg.partition() or 0, offset=msg.offset() or 0,
        ) as span:  # fmt: skip
            reply = self._reply_for(cmd, reg, batch)
            record = self._reply_record(msg, cmd, reply)
            if record.size > self._kafka.reply_limit:
                reply = self._too_large(cmd, record.size, batch)
                record = self._reply_record(msg, cmd, reply)
            record_reply(span, reply)
        self.metrics.answered(cmd.activity_name, reply.outcome.value, time.monotonic() - started)
        return record

    def _reply_record(self, msg: Message, cmd: ActivityCommand, reply: ActivityReply) -> _Record:
        key, value = cmd.workflow_id.encode(), codec.encode(reply)
        return _Record(cmd.reply_topic, key, value, _trace_headers(msg, cmd), _source(msg))

    def _too_large(self, cmd: ActivityCommand, size: int, batch: _Batch) -> ActivityReply:
        """A reply no producer may send becomes a final failure, so the workflow moves on."""
        assert self._kafka is not None
        limit = self._kafka.reply_limit
        message = (
            f"the reply of {cmd.activity_name} is {size} bytes, over the {limit} bytes a reply "
            "may have (contracts.limits, message.max.bytes): return less, e.g. a reference"
        )
        log.warning("service %s: %s (%s)", self.name, message, cmd.idempotency_key)
        error = ErrorInfo(type="PayloadTooLarge", message=message)
        reply = self._reply(cmd, ReplyOutcome.BUSINESS_FAILURE, None, error)
        batch.finals[cmd.idempotency_key] = reply
        return reply

    def _may_reply_to(self, topic: str) -> bool:
        """Only to inboxes: a forged command must not write into a history or any other topic."""
        allowed = self.settings.reply_topics
        return topic in allowed if allowed is not None else topic.endswith(".inbox")

    def _reply_for(self, cmd: ActivityCommand, reg: _Registration, batch: _Batch) -> ActivityReply:
        key = cmd.idempotency_key
        done = batch.finals.get(key) or self._store.get(key)
        if done is not None:
            log.info("service %s: %s already done, resending %s", self.name, key, done.outcome)
            return self._reply(cmd, done.outcome, done.result, done.error)
        reply = self._reply(cmd, *_execute(reg, cmd))
        if reply.outcome in FINAL_OUTCOMES:
            batch.finals[key] = reply
        return reply

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


def _execute(
    reg: _Registration, cmd: ActivityCommand
) -> tuple[ReplyOutcome, Payload | None, ErrorInfo | None]:
    """Run the handler; every outcome, including a crash of the handler, becomes a reply."""
    try:
        arg: Any = from_payload(cmd.input, reg.contract.input)
    except PayloadError as exc:
        return ReplyOutcome.BUSINESS_FAILURE, None, ErrorInfo(type="InvalidInput", message=str(exc))
    try:
        result = reg.fn(arg, CommandInfo.of(cmd))
        output = reg.contract.output
        if not isinstance(result, output):
            result = output.model_validate(result)
        return ReplyOutcome.SUCCESS, to_payload(result), None
    except BusinessError as exc:
        error = ErrorInfo(type=exc.error_type, message=str(exc))
        return ReplyOutcome.BUSINESS_FAILURE, None, error
    except Exception as exc:
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
