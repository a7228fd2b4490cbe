"""One shared subscription to ``<ns>.results`` per client, waking the callers waiting on results.

Before, every ``result()`` call opened its own consumer and read the workflow's results partition
from the beginning: 1,000 waiters were 1,000 consumers, each re-reading up to a day of results.
Now one background consumer per client reads every partition of ``<ns>.results`` forward, keeps
the records it read in a bounded cache (raw bytes, decoded only when someone asks), and wakes the
waiters of a workflow id when its result arrives.

Where it starts, and why a late waiter still gets its result:

* The subscription starts ``lookback`` seconds back in time (``offsets_for_times``), so a result
  written shortly before the first ``result()`` call is in the cache once the subscription has
  read up to the end it found at start ("ready"). Waiters that register before it is ready are
  answered at that point, from the whole cache.
* After that, registering a waiter and the consumer's thread adding a record both hold one lock:
  a waiter either finds the record in the cache or is registered before the record is added and
  woken by it. No record falls between the two.
* The cache drops records after ``cache_ttl`` seconds or beyond ``cache_max`` records. The
  subscription keeps, per partition, the lowest offset still covered (``floor``) and
  ``covered_since_ms``, the newest timestamp of a record it dropped (or the start point).
  A waiter whose start this client sent after ``covered_since_ms`` (plus a clock-skew allowance)
  cannot have its result below the floor. Any other waiter (``get_handle(id).result()`` of a
  workflow started elsewhere or long ago) gets a *backfill*: one read of its partition from the
  beginning up to the floor, filtered by key: the old cost, bounded, and only when needed.

Which result answers a waiter (the rule ``result()`` always had): the result whose request id is
the waiter's own start's, else the latest result that is not a rejected start. A rejection of
another request (e.g. a stale ``UnknownWorkflowType``) answers that request only, never a valid
workflow that later used the same id.

If the consumer fails for good (the topic deleted, an authorisation error), every waiter gets the
error and the client builds a new subscription at the next ``result()``. A broker that is down
for a while is not such a failure: librdkafka reconnects and the subscription goes on from where
it was; waiters wait (their timeout says what the consumer last reported).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from contracts.codec import CodecError, decode_as
from contracts.envelopes import IdReusePolicy, WorkflowResult
from orchestrator._partitioner import partition_for
from orchestrator.errors import Rejection

T = TypeVar("T")

log = logging.getLogger(__name__)

_REJECTIONS = frozenset(r.value for r in Rejection)

LOOKBACK_S = 120.0
"""How far back in time a new subscription starts reading."""
CACHE_TTL_S = 600.0
"""How long a result stays in the cache after the subscription read it."""
CACHE_MAX = 100_000
"""At most this many results in the cache (the oldest go first)."""
CLOCK_SKEW_MS = 30_000
"""How far a node's clock (the result's timestamp) may lag the client's (the start's time)."""

Outcome = WorkflowResult | BaseException
Deliver = Callable[["Outcome | _Confirm"], None]


class _Confirm:
    """What ``deliver`` gets (at most once, before the outcome) when a result of another
    request is there for a waiter whose own start this client sent: it is the answer only if the
    node has processed that start (a duplicate of a running or finished workflow gets no result
    of its own), else the start's own result (e.g. its rejection) may still come. The waiting
    side checks the node's progress and calls :meth:`ResultSubscription.confirm`."""


NEEDS_CONFIRM = _Confirm()


@dataclass(frozen=True)
class Sent:
    """Where and when this client's start of a request id went (its delivery report)."""

    sent_at_ms: int
    partition: int
    offset: int
    reuse: IdReusePolicy = IdReusePolicy.REJECT_DUPLICATE

    def may_take(self, other: WorkflowResult) -> bool:
        """Whether a result of another request (another run of the id) can answer this start.

        REJECT_DUPLICATE: yes, a duplicate start is answered by the workflow it duplicates,
        finished or not. TERMINATE_IF_RUNNING: never, the start always begins its own run (or
        is rejected, with its own result). ALLOW_DUPLICATE: only by a run that ended after the
        start was sent (the one it duplicated while it ran); a run that had ended before is an
        earlier run, and the start began a new one."""
        if self.reuse is IdReusePolicy.TERMINATE_IF_RUNNING:
            return False
        if self.reuse is IdReusePolicy.ALLOW_DUPLICATE:
            return other.finished_at_ms >= self.sent_at_ms
        return True


def is_rejection(result: WorkflowResult) -> bool:
    return result.error is not None and result.error.type in _REJECTIONS


def pick(results: list[WorkflowResult], request_id: str | None) -> WorkflowResult | None:
    """The result that answers a waiter of ``request_id`` among ``results`` (oldest first)."""
    latest: WorkflowResult | None = None
    for found in results:
        if request_id is not None and found.request_id == request_id:
            return found
        if not is_rejection(found):
            latest = found
    return latest


@dataclass
class _Entry:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    decoded: WorkflowResult | None = None


@dataclass(eq=False)
class Waiter:
    """One caller waiting on one workflow's result. ``deliver`` is called at most once, from
    any thread (under the subscription's lock: it must only hand the outcome over)."""

    workflow_id: str
    request_id: str | None
    deliver: Deliver
    backfill: tuple[int, int] | None = None
    """``(partition, end offset)`` to read from the beginning before the cache covers it, or
    ``None`` when the cache covers this waiter."""
    rejection: WorkflowResult | None = None
    """The last rejection of another request seen for this id (for the timeout message)."""
    sent: Sent | None = None
    confirmed: bool = False
    """Set once the node has processed this waiter's start (see :data:`NEEDS_CONFIRM`)."""
    asked: bool = False
    done: bool = False
    older: list[WorkflowResult] = field(default_factory=list)


class ResultSubscription:
    """The shared reader of ``<ns>.results``; see the module docstring."""

    def __init__(
        self,
        topic: str,
        make_consumer: Callable[[Callable[[KafkaError], None] | None], Consumer],
        *,
        partitions: int,
        lookback: float = LOOKBACK_S,
        cache_ttl: float = CACHE_TTL_S,
        cache_max: int = CACHE_MAX,
        metadata_timeout: float = 10.0,
    ) -> None:
        """Finds the start offsets (in the caller's thread: a missing topic is the caller's
        error) and starts the consumer's thread."""
        self.topic = topic
        self._ttl = cache_ttl
        self._max = cache_max
        self._lock = threading.Lock()
        self._cache: dict[bytes, list[_Entry]] = {}
        self._order: deque[tuple[float, bytes]] = deque()  # (read at, key), oldest first
        self._waiters: dict[bytes, list[Waiter]] = {}
        self._pos: dict[int, int] = {}  # per partition: the next offset not yet added
        self._closed = threading.Event()
        self.failure: BaseException | None = None
        self.last_error = ""
        """What the consumer last reported as an error, cleared when records come again."""
        self.last_error_at = 0.0  # time.monotonic() of last_error
        self.ready = False
        self._ready_event = threading.Event()

        start_ms = int(time.time() * 1000 - lookback * 1000)
        self.covered_since_ms = start_ms
        # Errors of the client as a whole (no broker reachable, ...) come to error_cb, not poll().
        self._consumer = make_consumer(self._on_error)
        try:
            wanted = [TopicPartition(topic, p, start_ms) for p in range(partitions)]
            found = _retrying_while_retriable(
                lambda: self._consumer.offsets_for_times(wanted, timeout=metadata_timeout),
                metadata_timeout,
            )
            self._floor: dict[int, int] = {}
            self._end: dict[int, int] = {}
            assignment: list[TopicPartition] = []
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, tp.partition), timeout=metadata_timeout, cached=False
                )
                # -1: no record at or after the start time; read from the end.
                offset = int(high) if tp.offset < 0 else max(int(tp.offset), int(low))
                self._floor[tp.partition] = offset
                self._pos[tp.partition] = offset
                if offset < high:
                    self._end[tp.partition] = int(high)
                assignment.append(TopicPartition(topic, tp.partition, offset))
            self._consumer.assign(assignment)
        except BaseException:
            self._consumer.close()
            raise
        if not self._end:
            self._set_ready_locked()
        self._thread = threading.Thread(target=self._run, name=f"{topic}-waiters", daemon=True)
        self._thread.start()

    # -- waiters -------------------------------------------------------------------------

    def register(
        self, workflow_id: str, request_id: str | None, sent: Sent | None, deliver: Deliver
    ) -> Waiter:
        """Register a waiter; it may be answered at once (from the cache, on this thread).

        ``sent``: this client's start of ``request_id`` (``None`` if unknown): decides whether
        the waiter needs a backfill (``waiter.backfill``), which the caller runs with
        :func:`read_older` and hands over with :meth:`offer_older`.
        """
        key = workflow_id.encode()
        waiter = Waiter(workflow_id, request_id, deliver, sent=sent)
        sent_at_ms = sent.sent_at_ms if sent is not None else None
        with self._lock:
            if self.failure is not None:
                waiter.done = True
                deliver(self.failure)
                return waiter
            if self.ready and self._answer_locked(waiter, key):
                return waiter
            self._waiters.setdefault(key, []).append(waiter)
            recent = sent_at_ms is not None and sent_at_ms - CLOCK_SKEW_MS > self.covered_since_ms
            if not recent:
                partition = self._partition_of(key)
                floor = self._floor.get(partition, 0)
                if floor > 0:
                    waiter.backfill = (partition, floor)
        return waiter

    def offer_older(self, waiter: Waiter, older: list[WorkflowResult]) -> None:
        """The backfill's results (oldest first), read below the cache's floor."""
        with self._lock:
            if waiter.done:
                return
            waiter.older = older
            if self.ready:
                self._answer_locked(waiter, waiter.workflow_id.encode())

    def confirm(self, waiter: Waiter) -> None:
        """The node has processed the waiter's start, and this subscription has read the results
        written up to then: a result of another request may now answer it."""
        with self._lock:
            waiter.confirmed = True
            if not waiter.done and self.ready:
                self._answer_locked(waiter, waiter.workflow_id.encode())

    def position(self, partition: int) -> int:
        """The next offset of ``partition`` the subscription has not yet taken in."""
        with self._lock:
            return self._pos.get(partition, 0)

    def partition_of(self, workflow_id: str) -> int:
        return self._partition_of(workflow_id.encode())

    def unregister(self, waiter: Waiter) -> None:
        with self._lock:
            waiter.done = True
            waiting = self._waiters.get(waiter.workflow_id.encode())
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiters[waiter.workflow_id.encode()]

    def wait_ready(self, timeout: float) -> bool:
        return self._ready_event.wait(timeout)

    def waiting(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def close(self) -> None:
        """Stop reading; every waiter still waiting gets an error at once."""
        self._closed.set()
        self._fail(RuntimeError("the client was closed"))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- private -------------------------------------------------------------------------

    def _partition_of(self, key: bytes) -> int:
        # Same hash as the node's producer (murmur2 over the partition count).
        return partition_for(key.decode(), len(self._floor))

    def _decoded(self, entry: _Entry) -> WorkflowResult | None:
        if entry.decoded is None:
            try:
                entry.decoded = decode_as(entry.value, WorkflowResult)
            except CodecError as exc:
                log.warning("%s: skipping an undecodable result: %s", self.topic, exc)
                entry.value = b""
                return None
        return entry.decoded

    def _answer_locked(self, waiter: Waiter, key: bytes) -> bool:
        """Answer ``waiter`` from what is known (backfill + cache) if anything answers it."""
        results = list(waiter.older)
        for entry in self._cache.get(key, ()):
            found = self._decoded(entry) if entry.value else None
            if found is not None and found.workflow_id == waiter.workflow_id:
                results.append(found)
        sent = waiter.sent
        if sent is not None and sent.reuse is not IdReusePolicy.REJECT_DUPLICATE:
            results = [r for r in results if r.request_id == waiter.request_id or sent.may_take(r)]
        for found in results:
            if is_rejection(found) and found.request_id != waiter.request_id:
                waiter.rejection = found
        answer = pick(results, waiter.request_id)
        if answer is None:
            return False
        if not self._may_answer_locked(waiter, answer):
            return False
        self._finish_locked(waiter, key, answer)
        return True

    def _may_answer_locked(self, waiter: Waiter, answer: WorkflowResult) -> bool:
        mine = waiter.request_id is not None and answer.request_id == waiter.request_id
        if mine or waiter.sent is None or waiter.confirmed:
            return True
        if not waiter.asked:
            waiter.asked = True
            waiter.deliver(NEEDS_CONFIRM)
        return False

    def _finish_locked(self, waiter: Waiter, key: bytes, outcome: Outcome) -> None:
        waiter.done = True
        waiting = self._waiters.get(key)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self._waiters[key]
        waiter.deliver(outcome)

    def _set_ready_locked(self) -> None:
        self.ready = True
        self._ready_event.set()
        for key, waiting in list(self._waiters.items()):
            for waiter in list(waiting):
                self._answer_locked(waiter, key)

    def _add_locked(self, msg: Message, now: float) -> None:
        key = msg.key()
        value = msg.value()
        if not isinstance(key, bytes) or not value:
            return
        partition = msg.partition() or 0
        offset = msg.offset() or 0
        _, timestamp = msg.timestamp()
        entry = _Entry(partition, offset, int(timestamp), value)
        self._cache.setdefault(key, []).append(entry)
        self._order.append((now, key))
        if not self.ready:
            return
        waiting = self._waiters.get(key)
        if not waiting:
            return
        found = self._decoded(entry)
        if found is None:
            return
        for waiter in list(waiting):
            if found.workflow_id != waiter.workflow_id:
                continue
            if waiter.request_id is not None and found.request_id == waiter.request_id:
                self._finish_locked(waiter, key, found)
            elif is_rejection(found):
                waiter.rejection = found  # another start's rejection: not this waiter's answer
            elif self._may_answer_locked(waiter, found):
                self._finish_locked(waiter, key, found)

    def _evict_locked(self, now: float) -> None:
        while self._order and (len(self._order) > self._max or self._order[0][0] < now - self._ttl):
            _, key = self._order.popleft()
            entries = self._cache.get(key)
            if not entries:
                continue
            entry = entries.pop(0)  # a key lives on one partition: its entries are in order
            if not entries:
                del self._cache[key]
            self._floor[entry.partition] = max(self._floor[entry.partition], entry.offset + 1)
            self.covered_since_ms = max(self.covered_since_ms, entry.timestamp_ms)

    def _on_error(self, err: KafkaError) -> None:
        self.last_error = f"{err.str()} ({err.name()})"
        self.last_error_at = time.monotonic()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            log.exception("the results subscription on %s stopped", self.topic)
            self._fail(exc)
        finally:
            self._consumer.close()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self.failure = exc
            for key, waiting in list(self._waiters.items()):
                for waiter in list(waiting):
                    self._finish_locked(waiter, key, exc)
            self._ready_event.set()

    def _loop(self) -> None:
        consumer = self._consumer
        while not self._closed.is_set():
            batch = consumer.consume(num_messages=1000, timeout=0)
            if not batch:
                msg = consumer.poll(0.2)
                batch = [msg] if msg is not None else []
            now = time.monotonic()
            with self._lock:
                for msg in batch:
                    err = msg.error()
                    if err is None:
                        self.last_error = ""
                        self._add_locked(msg, now)
                        partition = msg.partition() or 0
                        self._pos[partition] = (msg.offset() or 0) + 1
                        self._check_end_locked(partition, self._pos[partition])
                    elif err.code() == KafkaError._PARTITION_EOF:
                        self._check_end_locked(msg.partition() or 0, None)
                    elif err.fatal() or err.code() in (
                        KafkaError.UNKNOWN_TOPIC_OR_PART,
                        KafkaError.TOPIC_AUTHORIZATION_FAILED,
                    ):
                        raise KafkaException(err)
                    else:
                        self._on_error(err)
                        log.warning("%s: %s", self.topic, self.last_error)
                if not batch:
                    # Past transaction markers and aborted records the position can reach the
                    # end without a record or an EOF event. (Every record returned so far has
                    # been added: this thread added it.)
                    for tp in consumer.position(
                        [TopicPartition(self.topic, p) for p in list(self._pos)]
                    ):
                        if tp.offset >= 0:
                            self._pos[tp.partition] = max(self._pos[tp.partition], tp.offset)
                            self._check_end_locked(tp.partition, tp.offset)
                self._evict_locked(now)

    def _check_end_locked(self, partition: int, position: int | None) -> None:
        if self.ready:
            return
        end = self._end.get(partition)
        if end is not None and (position is None or position >= end):
            del self._end[partition]
            if not self._end:
                self._set_ready_locked()


def read_older(
    make_consumer: Callable[[Callable[[KafkaError], None] | None], Consumer],
    topic: str,
    workflow_id: str,
    partition: int,
    end: int,
    deadline: float,
) -> list[WorkflowResult]:
    """The results of ``workflow_id`` on ``topic [partition]`` below offset ``end``, oldest first
    (a waiter's backfill). Raises TimeoutError past ``deadline``."""
    key = workflow_id.encode()
    out: list[WorkflowResult] = []
    consumer = make_consumer(None)
    try:
        tp = TopicPartition(topic, partition)
        low, _ = consumer.get_watermark_offsets(
            tp, timeout=max(deadline - time.monotonic(), 0.5), cached=False
        )
        if low >= end:
            return out
        consumer.assign([TopicPartition(topic, partition, int(low))])
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"could not read {topic} [{partition}] to offset {end} in time")
            batch = consumer.consume(num_messages=1000, timeout=0)
            if not batch:
                msg = consumer.poll(min(remaining, 0.2))
                batch = [msg] if msg is not None else []
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        return out
                    continue
                if (msg.offset() or 0) >= end:
                    return out
                if msg.key() == key and msg.value():
                    try:
                        found = decode_as(msg.value() or b"", WorkflowResult)
                    except CodecError as exc:
                        log.warning("%s: skipping an undecodable result: %s", topic, exc)
                        continue
                    if found.workflow_id == workflow_id:
                        out.append(found)
            if not batch:
                (position,) = consumer.position([TopicPartition(topic, partition)])
                if position.offset >= end:
                    return out
    finally:
        consumer.close()


# Answers of a partition whose leader is being elected (librdkafka does not flag them retriable
# on offsets_for_times).
_ELECTING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE})


def _retriable(exc: BaseException) -> bool:
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(error, KafkaError) and (error.retriable() or error.code() in _ELECTING)


def _retrying_while_retriable(call: Callable[[], T], timeout: float) -> T:
    """``call()`` again while it fails with a retriable error (NOT_LEADER_FOR_PARTITION while a
    new topic's leaders are elected: seen on a single broker right after the topics were
    created), for up to ``timeout`` seconds; then, or on any other error, that error goes up."""
    retrying = Retrying(
        retry=retry_if_exception(_retriable),
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        reraise=True,
    )
    return retrying(call)
