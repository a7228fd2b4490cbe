"""The processing loop of one orchestrator node, for the inbox partitions it is assigned.

poll inbox records -> decide (new history events, commands, results, dead letters) ->
one Kafka transaction with the consumed offsets -> one RocksDB batch per partition.
See :meth:`Processor._commit` for the order that makes a crash anywhere lose and duplicate nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from orchestrator._dead_letters import DEAD_LETTER_MAX_BYTES
from orchestrator._deadline import DeadlineCaller, Stopping, Wedged, drop_in_background
from orchestrator._health import Health
from orchestrator._kafka_config import (
    SERVING_FETCH_WAIT_MS,
    admin_config,
    consumer_config,
    producer_config,
)
from orchestrator._metrics import NodeMetrics
from orchestrator._partitioner import partition_for
from orchestrator._queries import QueryRequest
from orchestrator.errors import NodeStopped, QueryFailed, UnknownQuery
from orchestrator.settings import Settings
from orchestrator.tracing import WorkflowTracer
from orchestrator.workflow import WorkflowRegistry

from .decide import Batch, Counters, Decider, Out, now_ms
from .membership import NodeClaim
from .partition import Partition
from .restore import restore_partitions

if TYPE_CHECKING:
    from orchestrator._visibility import OwnedStores

log = logging.getLogger(__name__)

_IDLE_POLL_MS = 100  # an idle node looks at its timers and retention at least this often


T = TypeVar("T")

# A producer with this node's transactional id started elsewhere: the same SAGA_NODE_ID twice.
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED}


# Transactional calls: librdkafka's timeout, and the deadline past which a call is taken to be
# stuck. A commit slower than transaction.timeout.ms (10 s) is aborted by the coordinator anyway;
# the deadline bounds how long a node sits in a call that ignores its timeout (issue 5456).
_TXN_CALL_S = 10.0
_CALL_DEADLINE_S = 15.0
_INIT_CALL_S = 30.0  # init_transactions on a new broker may wait for its transaction log


# A test seam, not a setting: SIGKILL this process inside its N-th transaction, after its records
# and offsets were sent and before the commit, so fault tests can kill a node with a transaction
# open every time rather than by chance (tests/faults/test_node_faults.py).
_CRASH_IN_TXN = int(os.environ.get("SAGA_TEST_CRASH_IN_TXN", "0"))


def _crash_point(committed: int) -> None:
    if _CRASH_IN_TXN and committed + 1 >= _CRASH_IN_TXN:
        os.kill(os.getpid(), signal.SIGKILL)


def _static_member_fenced(error: KafkaError) -> bool:
    text = error.str().lower()
    return error.code() == KafkaError.FENCED_INSTANCE_ID or "static consumer fenced" in text


def _fatal_reason(error: KafkaError) -> str:
    if error.code() in _FENCED or "fenced" in error.str().lower():
        return (
            f"fenced by another process with the same node id ({error.str()}); "
            "give every node its own SAGA_NODE_ID"
        )
    return f"unrecoverable Kafka error: {error.str()}"


class InboxConsumerLost(Exception):
    """The inbox consumer failed for good although no other process has this node's id: a
    static member fenced after its group coordinator moved (a broker of the cluster was killed:
    librdkafka rejoined under a new member id while a request with the old one was in flight).
    A duplicate node id is refused by the claim (membership.py) before it could come to this, so
    the node starts its processor over, as a restart would."""


class _Refused(Exception):
    """The producer refused one record outright (e.g. MSG_SIZE_TOO_LARGE): redoing the batch
    as it is would fail the same way for ever."""

    def __init__(self, out: Out, error: KafkaException) -> None:
        super().__init__(str(error))
        self.out = out
        self.error = error


class Processor:
    def __init__(
        self,
        settings: Settings,
        registry: WorkflowRegistry,
        *,
        tracer: WorkflowTracer | None = None,
        metrics: NodeMetrics | None = None,
        health: Health | None = None,
        owned: OwnedStores | None = None,
    ) -> None:
        """``owned``: where the stores of the partitions this node owns are published for
        the node's query API (visibility), from restore until revoke."""
        self.settings = settings
        self.registry = registry
        self.counters = Counters()
        self.tracer = tracer  # spans for new events only: replay never reaches _record
        self.metrics = metrics
        self.health = health  # health (#8): /healthz and /ready
        self.owned = owned
        self._last_lag = 0.0
        self._group = f"{settings.namespace}.orchestrator"
        self._txn_id = f"{settings.namespace}.orchestrator.{settings.node_id}"
        self._state_root = Path(settings.state_dir) / settings.namespace
        self._partitions: dict[int, Partition] = {}
        self._to_restore: set[int] = set()
        self._known_topics: set[str] = set()
        self._missing_topics: dict[str, float] = {}  # topic -> when it was found missing
        self._history_offsets: dict[int, int] = {}
        # Next inbox offset per owned partition: every transaction sends it for each partition it
        # writes for, so even a batch that consumed nothing (timers, retention) is fenced by the
        # group generation (KIP-447) once the partition has moved to another node.
        self._positions: dict[int, int] = {}
        # Just restored: the next poll waits for the inbox's first fetch even if timers are due.
        self._restored = False
        self._stop = threading.Event()
        # Queries from the HTTP threads (orchestrator/_queries.py): answered by this thread, which
        # owns the WorkflowRuns, at the start of each turn.
        self.queries: queue.SimpleQueue[QueryRequest] = queue.SimpleQueue()
        # A dead letter copies its record, cut to fit what this node's producer may send.
        max_message = int(
            producer_config(settings.bootstrap_servers, extra=settings.client_extra()).get(
                "message.max.bytes", 1_000_000
            )
        )
        self._decider = Decider(
            settings,
            registry,
            self.counters,
            topic_exists=self._topic_exists,
            tracer=tracer,
            metrics=metrics,
            letter_max=min(DEAD_LETTER_MAX_BYTES, max_message - 16_384),
        )
        # Static membership: a node that restarts with the same node id takes its partitions
        # back at once instead of waiting for a rebalance. So one process per node id: the claim
        # refuses a second one before it could fence this one (membership.py).
        instance_id = f"{self._group}.{settings.node_id}"
        consumer_conf = consumer_config(
            settings.bootstrap_servers,
            self._group,
            fetch_wait_max_ms=SERVING_FETCH_WAIT_MS,
            extra={"group.instance.id": instance_id, **settings.client_extra()},
        )
        self._claim = NodeClaim(self._state_root, self._group, instance_id)
        consumer_conf["client.id"] = self._claim.acquire(
            admin_config(settings.bootstrap_servers, extra=settings.client_extra()),
            int(consumer_conf["session.timeout.ms"]) / 1000,
        )
        self._consumer = Consumer(consumer_conf)
        self._calls = DeadlineCaller(f"txn-{settings.node_id}")
        self._producer = self._new_producer()

    # ----------------------------------------------------------------- lifecycle

    def _new_producer(self) -> Producer:
        """A transactional producer whose init_transactions went through: it aborts what a
        previous incarnation left open. Waits out a broker that is away; a producer whose
        init failed or hung is let go and the next try starts with a new one."""
        conf = producer_config(
            self.settings.bootstrap_servers,
            transactional_id=self._txn_id,
            extra=self.settings.client_extra(),
        )

        def attempt() -> Producer:
            self._brokers_lost = False
            producer = Producer({**conf, "error_cb": self._on_producer_error})
            try:
                self._calls.call(
                    "init_transactions",
                    lambda: producer.init_transactions(_INIT_CALL_S),
                    2 * _INIT_CALL_S,
                    self._stop.is_set,
                )
            except (KafkaException, Wedged):
                drop_in_background([producer])
                raise
            return producer

        return self._retrying("init_transactions", attempt)

    def _replace_producer(self, why: str) -> None:
        """A new producer with the same transactional id: its init_transactions fences the old
        one and settles whatever transaction that one left open."""
        log.warning("replacing the producer: %s", why)
        drop_in_background([self._producer])
        self._producer = self._new_producer()

    def _on_producer_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # After the broker comes back, this producer's first send_offsets_to_transaction was
            # seen to hang until its deadline (librdkafka 5456): start the next batch on a new one.
            self._brokers_lost = True

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call`` until it succeeds: a broker that restarts answers NOT_COORDINATOR, times out
        or is unreachable for a while, and the node must outlast that rather than exit. Fatal
        errors (fenced, unsupported) go up at once; so does a stop request."""
        delay = 0.1
        while True:
            try:
                return call()
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or self._stop.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
            except Wedged as exc:
                if self._stop.is_set():
                    raise
                log.warning("%s; retrying in %.1fs", exc, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._consumer.subscribe(
            [self.settings.inbox],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        try:
            while not stop.is_set():
                self.step()
        except Stopping as exc:
            log.info("%s", exc)  # whatever was in flight is redone by the next owner
        finally:
            self.close()

    def close(self) -> None:
        self._calls.close()
        with contextlib.suppress(RuntimeError):  # closed already
            self._consumer.close()
        for part in self._partitions.values():
            if self.owned is not None:
                self.owned.remove(part.number)
            part.close()
        self._partitions.clear()
        self._claim.release()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Only note them: restoring is long work for the loop, not for librdkafka's callback.
        self._to_restore.update(tp.partition for tp in partitions)
        if self.health is not None:  # health (#8): ready again once _restore_assigned ran
            self.health.set_ready(not self._to_restore, "restoring assigned partitions")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._to_restore.discard(tp.partition)
            self._positions.pop(tp.partition, None)
            part = self._partitions.pop(tp.partition, None)
            if self.owned is not None:  # visibility: no more reads of it, then close it
                self.owned.remove(tp.partition)
            if part is not None:
                part.close()
            if self.metrics is not None:
                self.metrics.forget_partition(tp.partition)
        if self.metrics is not None:  # health (#8)
            self.metrics.owned_partitions(len(self._partitions))

    def _restore_assigned(self) -> None:
        # The committed offsets first: under read_committed this fetch waits for a transaction
        # of the previous owner that still holds offsets for these partitions (KIP-447), so the
        # history read below cannot stop short of events that such a transaction commits.
        numbers = sorted(self._to_restore)
        committed = self._retrying(
            "fetching committed inbox offsets",
            lambda: self._consumer.committed(
                [TopicPartition(self.settings.inbox, n) for n in numbers], timeout=30
            ),
        )
        for tp in committed:
            self._positions[tp.partition] = tp.offset if tp.offset >= 0 else self._low(tp)
        parts = [
            Partition(number, self._state_root / f"p{number}", self.registry)
            for number in sorted(self._to_restore)
        ]
        reports = restore_partitions(
            parts,
            self.settings.bootstrap_servers,
            self.settings.history,
            f"{self._group}.restore",
            client_extra=self.settings.client_extra(),
        )
        for part, report in zip(parts, reports, strict=True):
            self.counters.restores.append(report)
            self._decider.restored(report)
            if self.metrics is not None:
                self.metrics.restored(report.events, report.seconds)
            self._partitions[part.number] = part
            if self.owned is not None:
                self.owned.add(part.number, part.store)
        self._to_restore.clear()
        if self.metrics is not None:  # health (#8)
            self.metrics.owned_partitions(len(self._partitions))
        if self.health is not None:  # health (#8)
            self.health.set_ready(True)

    def _low(self, tp: TopicPartition) -> int:
        """Where a partition with no committed offset starts (auto.offset.reset=earliest)."""
        low, _high = self._retrying(
            "reading inbox watermarks",
            lambda: self._consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=30
            ),
        )
        return int(low)

    # ----------------------------------------------------------------- one turn of the loop

    def step(self) -> None:
        self._answer_queries()
        msgs = self._next_records()
        restored = bool(self._to_restore)
        if restored:
            self._restore_assigned()
            self._restored = True
        batch = Batch()
        now = now_ms()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                # A consumer reports its fatal error as an event with code _FATAL whose
                # fatal() is False; a loop that logged it would go on reading nothing for ever.
                if err.fatal() or err.code() == KafkaError._FATAL:
                    if _static_member_fenced(err):
                        raise InboxConsumerLost(err.str())
                    raise NodeStopped(_fatal_reason(err))
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("inbox consumer error: %s", err)
                continue
            part = self._partitions.get(msg.partition() or 0)
            if part is not None:  # else revoked during the poll: the new owner handles it
                self._decider.handle(part, msg, batch, now)
        # Not in the turn that restored: timers that fell due while no node ran (attempt
        # timeouts above all) would fire before the replies waiting on the inbox were read,
        # retrying attempts that were answered in time (and, after max_attempts, compensating a
        # saga that succeeded). The next turn reads the inbox first (_poll_timeout), then fires.
        if not restored:
            self._decider.fire_timers(self._partitions.values(), batch, now)
        self._decider.expire_finished(self._partitions.values(), batch, now)
        self._decider.repair_history(self._partitions, batch)
        self._decider.wake_blocked(self._partitions, batch, now)
        if batch:
            self._commit(batch)
        if self.metrics is not None and time.monotonic() - self._last_lag >= 1.0:
            self._report_lag(self.metrics)
        if self.metrics is not None:  # health (#8): a lazy iterable; counted every few seconds
            self.metrics.count_workflows(p.store for p in self._partitions.values())
        if self.health is not None:  # health (#8)
            self.health.beat()

    def _answer_queries(self) -> None:
        """Answer the queries waiting on the queue, from committed state (no batch is open)."""
        while True:
            try:
                request = self.queries.get_nowait()
            except queue.Empty:
                return
            self._answer(request)

    def _answer(self, request: QueryRequest) -> None:
        wf = request.workflow_id
        number = partition_for(wf, self.settings.partitions)
        part = self._partitions.get(number)
        if part is None:
            why = "restoring it" if number in self._to_restore else "not its owner"
            kind = "Unavailable" if number in self._to_restore else "NotOwner"
            return request.fail(kind, f"workflow {wf} is on partition {number}: this node is {why}")
        try:
            cached = part.get(wf)
            if cached is None:
                return request.fail(
                    "UnknownWorkflow", f"no workflow {wf!r} on partition {number} of this node"
                )
            try:
                request.reply(cached.run.query(request.name, request.arg))
            finally:
                if cached.run.finished:
                    part.forget(wf)  # finished ones are not kept cached (see _commit)
        except UnknownQuery as exc:
            request.fail("UnknownQuery", str(exc))
        except QueryFailed as exc:
            request.fail(exc.error_type, str(exc))
        except Exception as exc:  # e.g. a history that no longer folds: the caller hears why
            log.warning("query %s of %s failed: %s", request.name, wf, exc)
            request.fail("QueryFailed", f"{type(exc).__name__}: {exc}")

    def _report_lag(self, metrics: NodeMetrics) -> None:
        """Inbox lag per partition: the high watermark seen by the fetcher minus our position."""
        assigned = [TopicPartition(self.settings.inbox, p) for p in self._partitions]
        if not assigned:
            return
        reported = 0
        try:
            for tp in self._consumer.position(assigned):
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    metrics.lag(tp.partition, high - tp.offset)
                    reported += 1
        except KafkaException as exc:
            log.debug("inbox lag not known: %s", exc)
        if reported == len(assigned):
            # Until every partition has a position (a record was fetched), try again next turn.
            self._last_lag = time.monotonic()

    def _next_records(self) -> list[Message]:
        """One transaction's worth of input: wait for a first record (at most until the next
        timer is due), then gather more for up to ``commit_interval_ms`` or ``max_batch``.

        The interval trades step latency for fewer, larger transactions (each commit costs a
        few ms of broker round trips); 0 takes only what has already arrived.
        """
        first = self._consumer.poll(self._poll_timeout())
        if first is None:
            return []
        records = [first]
        deadline = time.monotonic() + self.settings.commit_interval_ms / 1000
        while len(records) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            more = self._consumer.consume(
                num_messages=self.settings.max_batch - len(records), timeout=max(0.0, remaining)
            )
            records.extend(more)
            if remaining <= 0 or not more:
                break
        return records

    def _poll_timeout(self) -> float:
        wait_ms = _IDLE_POLL_MS
        if self._restored:  # the first fetch of the restored partitions, then the timers
            self._restored = False
            return wait_ms / 1000
        dues = [d for d in (p.next_due_ms() for p in self._partitions.values()) if d is not None]
        if dues:
            wait_ms = min(wait_ms, max(0, min(dues) - now_ms()))
        return wait_ms / 1000

    # ----------------------------------------------------------------- inbox records

    def _topic_exists(self, topic: str) -> bool:
        """Whether a command topic exists: a yes is kept, a no is asked again after 5 s."""
        if topic in self._known_topics:
            return True
        missing_since = self._missing_topics.get(topic)
        if missing_since is not None and time.monotonic() - missing_since < 5.0:
            return False
        meta = self._consumer.list_topics(topic, timeout=10)
        found = meta.topics.get(topic)
        if found is not None and found.error is None and found.partitions:
            self._known_topics.add(topic)
            self._missing_topics.pop(topic, None)
            return True
        self._missing_topics[topic] = time.monotonic()
        return False

    # ----------------------------------------------------------------- the transaction

    def _commit(self, batch: Batch) -> None:
        """Make one batch durable. The order is what makes a crash anywhere harmless:

        1. Summarise every touched workflow (its timer index entry) into the store batches.
        2. Begin a Kafka transaction.
        3. Produce the history events (to the workflow's own partition), activity commands,
           results, dead letters and retention tombstones.
        4. Send the consumed inbox offsets to the transaction (KIP-447: with the consumer's
           group metadata, so a zombie from an older generation is fenced).
        5. Commit. A crash before this point aborts everything; the inbox is re-read.
        6. Only now write the events, summaries, timer index and the applied history offset to
           RocksDB, one batch per partition. A crash before this point loses only local state
           that the restore reads back from the history topic.
        """
        for (number, _wf), cached in batch.touched.items():
            part = self._partitions.get(number)
            if part is not None:
                part.summarize(cached, batch.store(number))
        self._history_offsets.clear()
        if self.owned is not None:
            self.owned.committing()
        try:
            self._commit_and_write(batch)
        finally:
            if self.owned is not None:
                self.owned.settled()

    def _commit_and_write(self, batch: Batch) -> None:
        if self._brokers_lost:
            self._replace_producer("the brokers were unreachable since its last transaction")
        began = time.perf_counter()
        try:
            self._producer.begin_transaction()
            for out in batch.outputs:
                self._produce(out)
            offsets = self._fencing_offsets(batch)
            group = self._consumer.consumer_group_metadata()
            producer = self._producer
            self._calls.call(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(offsets, group, _TXN_CALL_S),
                _CALL_DEADLINE_S,
                self._stop.is_set,
            )
            _crash_point(self.counters.transactions)
            self._calls.call(
                "commit_transaction",
                lambda: producer.commit_transaction(_TXN_CALL_S),
                _CALL_DEADLINE_S,
                self._stop.is_set,
            )
        except _Refused as refused:
            self._on_refused(refused)
            self._abort(refused.error)
            return
        except (KafkaException, Wedged) as exc:
            self._abort(exc)
            return
        # A Stopping from a call above goes up to run(): the batch is not written locally, and
        # the next owner settles the transaction (init_transactions) and re-reads its input.
        self.counters.transactions += 1
        self._positions.update(batch.offsets)
        if self.tracer is not None:
            self.tracer.committed()
        if self.metrics is not None:
            self.metrics.transactions.labels(result="committed").inc()
            self.metrics.transaction_seconds.observe(time.perf_counter() - began)
        self._producer.poll(0)  # serve delivery reports: they carry the history offsets
        for number, store_batch in batch.stores.items():
            part = self._partitions.get(number)
            if part is None:
                continue
            if number in self._history_offsets:
                store_batch.checkpoint = self._history_offsets[number] + 1
            part.store.write(store_batch)
        for number, wf in batch.removed:
            part = self._partitions.get(number)
            if part is not None:
                part.forget(wf)
        for (number, wf), cached in batch.touched.items():
            part = self._partitions.get(number)
            if part is not None and cached.run.finished:
                # A finished workflow rarely hears anything again (a late reply, a repeated
                # start): it is replayed from the store then. Keeping thousands of them cached
                # made every full garbage collection a long pause (docs/performance.md).
                part.forget(wf)

    def _fencing_offsets(self, batch: Batch) -> list[TopicPartition]:
        """The inbox offsets this transaction commits: what it consumed, and for every other
        partition it writes for, the current position again. The group coordinator refuses
        them from a member of an older generation, which aborts the transaction: a node that
        lost a partition (paused past its session timeout, cut off) cannot write for it."""
        offsets = dict.fromkeys(batch.stores, -1) | batch.offsets
        return [
            TopicPartition(self.settings.inbox, p, o if o >= 0 else self._positions[p])
            for p, o in sorted(offsets.items())
            if o >= 0 or p in self._positions
        ]

    def _produce(self, out: Out) -> None:
        on_delivery = self._on_history_delivery if out.topic == self.settings.history else None
        while True:
            try:
                self._producer.produce(
                    out.topic,
                    value=out.value,
                    key=out.key,
                    partition=-1 if out.partition is None else out.partition,
                    on_delivery=on_delivery,
                    headers=out.headers,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: let it drain
            except KafkaException as exc:
                raise _Refused(out, exc) from exc

    def _on_refused(self, refused: _Refused) -> None:
        out, error = refused.out, refused.error.args[0]
        what = (
            f"{out.topic} record of {len(out.value or b'')} bytes refused by the producer: {error}"
        )
        if out.source is None:
            # Timers and retention make records of bounded size (inputs are capped at
            # MAX_RECORD_BYTES); a refusal here is a bug or a broker limit set too low.
            log.error("%s (from a timer or retention)", what)
            return
        log.error("%s; its input %s[%d]@%d goes to the DLQ", what, self.settings.inbox, *out.source)
        self._decider.refuse(out.source, what)

    def _on_history_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            number, offset = msg.partition() or 0, msg.offset() or 0
            if offset > self._history_offsets.get(number, -1):
                self._history_offsets[number] = offset

    def _abort(self, exc: KafkaException | Wedged) -> None:
        """Undo a failed batch: abort, forget what it changed in memory, rewind the inbox."""
        error: KafkaError | None = exc.args[0] if isinstance(exc, KafkaException) else None
        self.counters.aborted_transactions += 1
        if self.tracer is not None:
            self.tracer.aborted()
        if self.metrics is not None:
            self.metrics.transactions.labels(result="aborted").inc()
        log.warning("transaction failed (%s); aborting and re-reading the inbox", error or exc)
        if error is not None and error.code() in _FENCED:
            # Another process took this node's transactional id: a second node with the same
            # SAGA_NODE_ID. A new producer would fence that one in turn, and so on for ever.
            raise NodeStopped(_fatal_reason(error))
        settled_elsewhere = True
        if error is None or error.fatal():
            self._replace_producer(str(exc))
        else:
            producer = self._producer
            try:
                self._calls.call(
                    "abort_transaction",
                    lambda: producer.abort_transaction(_TXN_CALL_S),
                    _CALL_DEADLINE_S,
                    self._stop.is_set,
                )
                settled_elsewhere = False
            except (KafkaException, Wedged) as abort_exc:
                self._replace_producer(f"abort failed ({abort_exc})")
        for part in self._partitions.values():
            part.forget_all()
            part.reload_timers()
        assigned = [TopicPartition(self.settings.inbox, p) for p in self._partitions]
        if assigned:
            committed = self._retrying(
                "fetching committed inbox offsets",
                lambda: self._consumer.committed(assigned, timeout=30),
            )
            for tp in committed:
                position = tp.offset if tp.offset >= 0 else self._low(tp)
                self._positions[tp.partition] = position
                with contextlib.suppress(KafkaException):  # revoked meanwhile: nothing to read
                    self._consumer.seek(TopicPartition(tp.topic, tp.partition, position))
        if settled_elsewhere:
            self._restore_again()

    def _restore_again(self) -> None:
        """The transaction was settled by the new producer's init_transactions, not aborted by
        us: a commit that timed out ("retry call to resume") may have gone through, so the
        history and the inbox offsets may hold a batch the stores do not. Restore the owned
        partitions from the history topic again (from each store's checkpoint), as after an
        assignment; the next turn does it before it handles what it polls. Seen in
        tests/cluster: a broker kill timed out a commit that had succeeded, and the sagas of
        that batch, replayed from stores without it, ignored their next replies for ever."""
        for number, part in self._partitions.items():
            if self.owned is not None:
                self.owned.remove(number)
            part.close()
            self._to_restore.add(number)
        log.warning("restoring partitions %s again from the history", sorted(self._to_restore))
        self._partitions.clear()
        if self.health is not None:
            self.health.set_ready(False, "restoring partitions after an unsettled transaction")
