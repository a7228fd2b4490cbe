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

TRACE_HEADERS = ("traceparent", "tracestate")
"""Kafka headers copied from a command to its reply (W3C trace context)."""

_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
_TXN_TIMEOUT_S = 10.0
_CALL_ATTEMPTS = 5
_IDLE_POLL_S = 0.1
_REDO_BACKOFF_S = 0.2
_DETAILS_MAX = 2000

_Headers = list[tuple[str, bytes]]


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


@dataclass
class _Batch:
    """The answer to one consumed batch: what to produce, which offsets it covers, what to store."""

    records: list[_Record] = field(default_factory=list)
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    next: dict[tuple[str, int], int] = field(default_factory=dict)
    finals: dict[str, ActivityReply] = field(default_factory=dict)

    def consumed(self, msg: Message) -> None:
        tp, offset = (msg.topic() or "", msg.partition() or 0), msg.offset() or 0
        self.first.setdefault(tp, offset)
        self.next[tp] = offset + 1

    def offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.next.items()]


class _Abortable(Exception):
    """The open transaction must be aborted and the batch redone."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


# --------------------------------------------------------------------------- Kafka clients


class _Kafka:
    """The consumer and producer of one running service, and how a batch is committed."""

    def __init__(self, settings: Settings, group: str, transactional_id: str | None) -> None:
        extra = settings.client_extra()
        self.transactional = transactional_id is not None
        self._known_topics: set[str] = set()
        self._in_txn = False
        self.producer = Producer(
            producer_config(
                settings.bootstrap_servers, transactional_id=transactional_id, extra=extra
            )
        )
        if self.transactional:
            # Fences an earlier incarnation with the same transactional id and aborts whatever
            # transaction it left open, before we read anything.
            self._call("init_transactions", lambda: self.producer.init_transactions(_TXN_TIMEOUT_S))
        self.consumer = Consumer(consumer_config(settings.bootstrap_servers, group, extra=extra))

    def subscribe(self, topics: list[str]) -> None:
        self.consumer.subscribe(topics)

    def close(self) -> None:
        if self._in_txn:
            with contextlib.suppress(KafkaException):
                self.producer.abort_transaction(_TXN_TIMEOUT_S)
        self.producer.flush(_TXN_TIMEOUT_S)
        self.consumer.close()

    # -- reading ---------------------------------------------------------------------------

    def next_batch(self, max_batch: int) -> list[Message]:
        """Wait briefly for a record, then take whatever else is already fetched."""
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
        if err.fatal():
            raise ServiceError(f"consumer failed: {err.str()} ({err.name()})")
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s (%s)", err.str(), err.name())
        return False

    def topic_exists(self, topic: str) -> bool:
        if topic in self._known_topics:
            return True
        try:
            metadata = self.producer.list_topics(timeout=_TXN_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("cannot read metadata to check topic %s: %s", topic, exc)
            return True  # let producing decide
        self._known_topics.update(
            name for name, meta in metadata.topics.items() if meta.error is None
        )
        return topic in self._known_topics

    # -- committing ------------------------------------------------------------------------

    def commit(self, batch: _Batch) -> bool:
        """Produce the batch's records and commit its offsets; False: rolled back, redo it."""
        if self.transactional:
            return self._commit_transaction(batch)
        return self._commit_plain(batch)

    def _commit_transaction(self, batch: _Batch) -> bool:
        # No poll happens between begin and commit, so no rebalance callback can find a
        # transaction open: partitions are only ever revoked between two batches.
        try:
            # 1. Open the transaction (only now: handler time does not count against its timeout).
            self._call("begin_transaction", self.producer.begin_transaction)
            self._in_txn = True
            # 2. The replies and dead letters.
            for record in batch.records:
                self._produce(record)
            # 3. The consumed offsets, fenced by the consumer's group generation (KIP-447).
            group = self.consumer.consumer_group_metadata()
            self._call(
                "send_offsets_to_transaction",
                lambda: self.producer.send_offsets_to_transaction(
                    batch.offsets(), group, _TXN_TIMEOUT_S
                ),
            )
            # 4. Commit: replies and offsets become visible together, or not at all.
            self._call(
                "commit_transaction",
                lambda: self.producer.commit_transaction(_TXN_TIMEOUT_S),
                timeout_is_fatal=True,
            )
            self._in_txn = False
            return True
        except _Abortable as exc:
            log.warning("transaction aborted, redoing the batch: %s", exc)
            self._abort()
            self._rewind(batch)
            return False

    def _abort(self) -> None:
        try:
            self._call(
                "abort_transaction",
                lambda: self.producer.abort_transaction(_TXN_TIMEOUT_S),
                timeout_is_fatal=True,
            )
        except _Abortable as exc:
            raise ServiceError(f"cannot abort the transaction: {exc}") from exc
        self._in_txn = False

    def _commit_plain(self, batch: _Batch) -> bool:
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(f"{err.str()} ({err.name()})")

        for record in batch.records:
            self._produce(record, on_delivery=delivered)
        left = self.producer.flush(_TXN_TIMEOUT_S)
        if left or failures:
            log.warning("%d record(s) undelivered (%s), redoing the batch", left, failures[:3])
            self._rewind(batch)
            return False
        try:
            result = self.consumer.commit(offsets=batch.offsets(), asynchronous=False)
            failures = [f"{tp.topic}[{tp.partition}]" for tp in result or [] if tp.error]
        except KafkaException as exc:
            failures = [str(exc)]
        if failures:  # the replies are out: a redelivery is answered from the dedupe store
            log.warning("offsets not committed for %s; the commands will come again", failures)
        return True

    def _produce(
        self,
        record: _Record,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        headers: list[tuple[str, str | bytes | None]] = list(record.headers)

        def produce() -> None:
            while True:
                try:
                    self.producer.produce(
                        record.topic,
                        value=record.value,
                        key=record.key,
                        headers=headers,
                        on_delivery=on_delivery,
                    )
                    return
                except BufferError:  # the local queue is full: let deliveries drain it
                    self.producer.poll(0.1)

        self._call("produce", produce)

    def _rewind(self, batch: _Batch) -> None:
        """Seek the batch's partitions back to their committed offsets, so it is read again."""
        partitions = [TopicPartition(t, p) for t, p in batch.first]
        try:
            committed = self.consumer.committed(partitions, timeout=_TXN_TIMEOUT_S)
            positions = {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset >= 0}
        except KafkaException as exc:
            log.warning("cannot read committed offsets (%s); rewinding to the batch start", exc)
            positions = {}
        for (topic, partition), first in batch.first.items():
            offset = positions.get((topic, partition), first)
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner reads it
                log.info("not rewinding %s[%d]: %s", topic, partition, exc)

    def _call(self, what: str, fn: Callable[[], None], *, timeout_is_fatal: bool = False) -> None:
        """Run a producer call, retrying retriable errors; abortable errors raise _Abortable."""
        for attempt in range(1, _CALL_ATTEMPTS + 1):
            try:
                fn()
                return
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is None:
                    raise ServiceError(f"{what} failed: {exc}") from exc
                if err.txn_requires_abort():
                    raise _Abortable(f"{what}: {err.str()} ({err.name()})") from exc
                # librdkafka lacks KIP-890: a commit or abort that timed out is not retried.
                timed_out = timeout_is_fatal and err.code() == KafkaError._TIMED_OUT
                retry = err.retriable() and not err.fatal() and not timed_out
                if retry and attempt < _CALL_ATTEMPTS:
                    log.info("%s: %s, retrying", what, err.str())
                    time.sleep(0.1 * attempt)
                    continue
                raise ServiceError(f"{what} failed: {err.str()} ({err.name()})") from exc


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
        self._kafka = kafka = _Kafka(self.settings, self.name, txn_id)
        try:
            if not kafka.topic_exists(self.settings.dlq):
                raise ServiceError(f"the dead-letter topic {self.settings.dlq} does not exist")
            kafka.subscribe(self.topics)
            log.info("service %s consuming %s", self.name, ", ".join(self.topics))
            self.health.set_ready(True)
            while not (stop.is_set() or self._stop.is_set()):
                self._process_batch(kafka.next_batch(self.settings.max_batch))
                self.health.beat()
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
            time.sleep(_REDO_BACKOFF_S)
            return
        for key, reply in batch.finals.items():
            try:
                self._store.put(key, reply)
            except Exception:  # losing an entry only means the handler may run again
                log.exception("service %s: cannot store the reply for %s", self.name, key)

    def _answer(self, msg: Message, batch: _Batch) -> _Record:
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
            record_reply(span, reply)
        self.metrics.answered(cmd.activity_name, reply.outcome.value, time.monotonic() - started)
        return _Record(
            topic=cmd.reply_topic,
            key=cmd.workflow_id.encode(),
            value=codec.encode(reply),
            headers=_trace_headers(msg, cmd),
        )

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
        letter = dead_letter_of(msg, reason, error_type)
        return _Record(self.settings.dlq, msg.key(), codec.encode(letter), _bytes_headers(msg))


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
