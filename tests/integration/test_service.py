"""The Services SDK against a real broker: replies, failures, dedupe, dead letters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from pydantic import BaseModel

from contracts import codec
from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityCommand,
    ActivityReply,
    DeadLetter,
    ReplyOutcome,
    TraceContext,
)
from orchestrator import service as service_module
from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator._partitioner import partition_for
from orchestrator._payloads import from_payload, to_payload
from orchestrator.errors import BusinessError
from orchestrator.service import CommandInfo, Service, ServiceError, serving
from orchestrator.settings import Settings
from orchestrator.topics import ensure_service_topic, ensure_topics

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

PARTITIONS = 2
TRACE = TraceContext(
    traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", tracestate="vendor=x"
)


class Reserve(BaseModel):
    sku: str
    qty: int


class Reservation(BaseModel):
    hold_id: str
    qty: int


class Other(BaseModel):
    note: str


@dataclass
class Env:
    """One namespace, one service name, and the means to talk to them like the orchestrator."""

    settings: Settings
    reserve: ActivityContract[Reserve, Reservation]
    state_dir: Path
    calls: list[tuple[Reserve, CommandInfo]] = field(default_factory=list)
    _producer: Producer | None = None
    _readers: dict[str, Consumer] = field(default_factory=dict)

    def service(self, *, transactional: bool = True, settings: Settings | None = None) -> Service:
        service = Service(
            self.reserve.service,
            settings or self.settings,
            state_dir=self.state_dir,
            transactional=transactional,
        )

        @service.handler(self.reserve)
        def reserve(arg: Reserve, info: CommandInfo) -> Reservation:
            self.calls.append((arg, info))
            if arg.sku == "out-of-stock":
                raise BusinessError("none left", error_type="OutOfStock")
            if arg.sku == "flaky":
                raise ConnectionError("warehouse unreachable")
            if arg.sku == "huge":  # a reply no producer may send
                return Reservation(hold_id="x" * 1_100_000, qty=arg.qty)
            return Reservation(hold_id=f"hold-{info.idempotency_key}", qty=arg.qty)

        return service

    def command(
        self,
        workflow_id: str,
        arg: BaseModel,
        *,
        attempt: int = 1,
        activity: str | None = None,
    ) -> ActivityCommand:
        return ActivityCommand(
            workflow_id=workflow_id,
            activity_name=activity or self.reserve.name,
            seq=1,
            attempt=attempt,
            idempotency_key=f"{workflow_id}/1",
            is_compensation=False,
            input=to_payload(arg),
            reply_topic=self.settings.inbox,
            sent_at_ms=int(time.time() * 1000),
            trace=TRACE,
        )

    def send(self, *commands: ActivityCommand | bytes) -> None:
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings.bootstrap_servers))
        for cmd in commands:
            if isinstance(cmd, bytes):
                self._producer.produce(self.reserve.topic, key=b"garbage", value=cmd)
                continue
            headers: list[tuple[str, str | bytes | None]] = [
                ("traceparent", TRACE.traceparent),
                ("tracestate", TRACE.tracestate),
            ]
            self._producer.produce(
                self.reserve.topic,
                key=cmd.workflow_id.encode(),
                value=codec.encode(cmd),
                headers=headers,
            )
        assert self._producer.flush(10) == 0

    def read(self, topic: str, want: int, timeout: float = 15.0) -> list[Message]:
        """The next ``want`` records of ``topic`` (read_committed), in the order they came."""
        reader = self._readers.get(topic)
        if reader is None:
            reader = Consumer(consumer_config(self.settings.bootstrap_servers, f"{topic}.test"))
            reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
            self._readers[topic] = reader
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            for msg in reader.consume(num_messages=want - len(got), timeout=0.1):
                assert msg.error() is None, msg.error()
                got.append(msg)
        return got

    def replies(self, want: int, timeout: float = 15.0) -> dict[str, ActivityReply]:
        msgs = self.read(self.settings.inbox, want, timeout)
        assert len(msgs) == want, f"expected {want} replies, got {len(msgs)}"
        replies = [codec.decode_as(m.value() or b"", ActivityReply) for m in msgs]
        return {r.workflow_id: r for r in replies}

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


@pytest.fixture
def env(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Env]:
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        namespace=namespace,
        partitions=PARTITIONS,
        state_dir=tmp_path,
        node_id="node-1",
    )
    reserve = ActivityContract("inventory.reserve", f"{namespace}-svc", Reserve, Reservation)
    ensure_topics(kafka_bootstrap, namespace, PARTITIONS)
    ensure_service_topic(kafka_bootstrap, reserve.topic, PARTITIONS)
    env = Env(settings=settings, reserve=reserve, state_dir=tmp_path / "services")
    yield env
    env.close()


def _headers(msg: Message) -> dict[str, bytes]:
    headers = msg.headers() or []
    assert isinstance(headers, list)
    return {k: v for k, v in headers if isinstance(v, bytes)}


@pytest.mark.parametrize("transactional", [True, False], ids=["transactional", "plain"])
def test_success_reply_carries_the_typed_result_and_the_trace(
    env: Env, transactional: bool
) -> None:
    env.send(env.command("wf-ok", Reserve(sku="abc", qty=2)))
    with serving(env.service(transactional=transactional)):
        (msg,) = env.read(env.settings.inbox, 1)

    reply = codec.decode_as(msg.value() or b"", ActivityReply)
    assert reply.outcome is ReplyOutcome.SUCCESS
    assert reply.result is not None
    assert from_payload(reply.result, Reservation) == Reservation(hold_id="hold-wf-ok/1", qty=2)
    assert (reply.workflow_id, reply.seq, reply.attempt) == ("wf-ok", 1, 1)
    assert reply.idempotency_key == "wf-ok/1"
    assert reply.service == env.reserve.service
    assert reply.error is None
    assert reply.trace == TRACE
    assert msg.key() == b"wf-ok"
    assert msg.partition() == partition_for("wf-ok", PARTITIONS), "murmur2, like the inbox"
    headers = _headers(msg)
    assert headers["traceparent"] == TRACE.traceparent.encode()
    assert headers["tracestate"] == b"vendor=x"

    (arg, info) = env.calls[0]
    assert arg == Reserve(sku="abc", qty=2)
    assert info == CommandInfo(
        workflow_id="wf-ok",
        activity_name="inventory.reserve",
        seq=1,
        attempt=1,
        idempotency_key="wf-ok/1",
        is_compensation=False,
        trace=TRACE,
    )
    # The consumed offset was committed (with the transaction, or after the flush).
    committed = Consumer(
        consumer_config(env.settings.bootstrap_servers, env.reserve.service)
    ).committed([TopicPartition(env.reserve.topic, p) for p in range(PARTITIONS)], timeout=10)
    assert sorted(tp.offset for tp in committed) == [-1001, 1]


def test_failures_become_business_or_retryable_replies(env: Env) -> None:
    env.send(
        env.command("wf-business", Reserve(sku="out-of-stock", qty=1)),
        env.command("wf-flaky", Reserve(sku="flaky", qty=1)),
        env.command("wf-invalid", Other(note="not a Reserve")),
    )
    with serving(env.service()):
        replies = env.replies(3)

    business = replies["wf-business"]
    assert business.outcome is ReplyOutcome.BUSINESS_FAILURE
    assert business.error is not None and business.result is None
    assert (business.error.type, business.error.message) == ("OutOfStock", "none left")

    flaky = replies["wf-flaky"]
    assert flaky.outcome is ReplyOutcome.RETRYABLE_FAILURE
    assert flaky.error is not None
    assert (flaky.error.type, flaky.error.message) == ("ConnectionError", "warehouse unreachable")
    assert "ConnectionError" in (flaky.error.details or "")

    invalid = replies["wf-invalid"]
    assert invalid.outcome is ReplyOutcome.BUSINESS_FAILURE
    assert invalid.error is not None and invalid.error.type == "InvalidInput"
    skus = sorted(arg.sku for arg, _ in env.calls)
    assert skus == ["flaky", "out-of-stock"], "the handler never sees input that does not validate"


def test_a_duplicate_command_is_answered_from_the_dedupe_store(env: Env) -> None:
    ok, flaky = Reserve(sku="abc", qty=5), Reserve(sku="flaky", qty=1)
    with serving(env.service()):
        env.send(env.command("wf-dup", ok), env.command("wf-retry", flaky))
        first = env.replies(2)
        env.send(env.command("wf-dup", ok, attempt=2), env.command("wf-retry", flaky, attempt=2))
        second = env.replies(2)

    assert [arg.sku for arg, _ in env.calls].count("abc") == 1, "the handler ran once"
    again = second["wf-dup"]
    assert again.outcome is ReplyOutcome.SUCCESS and again.attempt == 2
    assert again.result == first["wf-dup"].result
    assert again.trace == TRACE
    # A retryable failure is not remembered: the next attempt runs the handler again.
    assert [arg.sku for arg, _ in env.calls].count("flaky") == 2
    assert second["wf-retry"].attempt == 2

    # The store outlives the process: a new incarnation still answers without the handler.
    with serving(env.service()):
        env.send(env.command("wf-dup", ok, attempt=3))
        third = env.replies(1)["wf-dup"]
    assert third.attempt == 3 and third.result == first["wf-dup"].result
    assert [arg.sku for arg, _ in env.calls].count("abc") == 1


def test_undecodable_and_unhandled_commands_go_to_the_dlq(env: Env) -> None:
    env.send(
        b"\x00not an avro record",
        env.command("wf-unknown", Reserve(sku="abc", qty=1), activity="inventory.nothing"),
        env.command("wf-lost", Reserve(sku="abc", qty=1)).model_copy(
            update={"reply_topic": f"{env.settings.namespace}-nowhere.inbox"}
        ),
        env.command("wf-after", Reserve(sku="abc", qty=1)),
    )
    with serving(env.service()):
        after = env.replies(1)["wf-after"]
        letters = env.read(env.settings.dlq, 3)

    assert after.outcome is ReplyOutcome.SUCCESS, "the service went on after the bad records"
    by_type: dict[str, tuple[Message, DeadLetter]] = {}
    for msg in letters:
        letter = codec.decode_as(msg.value() or b"", DeadLetter)
        by_type[letter.error_type] = (msg, letter)
    assert set(by_type) == {"BadMagic", "UnknownActivity", "UnknownReplyTopic"}

    msg, garbage = by_type["BadMagic"]
    assert msg.key() == b"garbage"
    assert garbage.value == b"\x00not an avro record" and garbage.key == b"garbage"
    assert garbage.source_topic == env.reserve.topic and garbage.source_offset == 0
    assert "single-object marker" in garbage.reason

    msg, unknown = by_type["UnknownActivity"]
    assert "inventory.nothing" in unknown.reason
    assert isinstance(codec.decode(unknown.value or b""), ActivityCommand)
    _, lost = by_type["UnknownReplyTopic"]
    assert f"{env.settings.namespace}-nowhere.inbox" in lost.reason
    assert env.read(env.settings.inbox, 1, timeout=1.0) == [], "no reply for a dead letter"
    assert [arg.sku for arg, _ in env.calls] == ["abc"], "only the good command ran"


def test_handlers_are_registered_once_per_activity(env: Env) -> None:
    service = env.service()
    with pytest.raises(ValueError, match="already has a handler"):
        service.handler(env.reserve)(lambda arg, info: Reservation(hold_id="x", qty=1))
    service.close()


def _fail_commits(monkeypatch: pytest.MonkeyPatch, *failures: KafkaError) -> None:
    """Make the service's producer fail its next commits with ``failures`` (then commit)."""
    pending = list(failures)

    class FailingCommits(Producer):
        def commit_transaction(self, timeout: float = -1) -> None:
            if pending:
                raise KafkaException(pending.pop(0))
            super().commit_transaction(timeout)

    monkeypatch.setattr(service_module, "Producer", FailingCommits)


def test_an_at_least_once_offset_commit_that_fails_is_logged_and_answered_again_from_the_store(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refused = [KafkaError(KafkaError._STATE, "injected: not assigned")]

    class RefusingCommits(Consumer):
        def commit(self, *args: Any, **kwargs: Any) -> Any:
            if refused:
                raise KafkaException(refused.pop(0))
            return super().commit(*args, **kwargs)

    monkeypatch.setattr(service_module, "Consumer", RefusingCommits)
    ok = Reserve(sku="abc", qty=1)
    env.send(env.command("wf-lost-offset", ok))
    with (
        caplog.at_level("WARNING", logger="orchestrator.service"),
        serving(env.service(transactional=False)),
    ):
        first = env.replies(1)["wf-lost-offset"]
    assert "offsets not committed" in caplog.text and "injected: not assigned" in caplog.text

    # The offset was lost, not the reply: the next incarnation reads the command again and
    # answers it from the dedupe store, without the handler.
    with serving(env.service(transactional=False)):
        again = env.replies(1)["wf-lost-offset"]
    assert again.result == first.result and again.outcome is ReplyOutcome.SUCCESS
    assert len(env.calls) == 1, "the handler ran once"


def test_an_aborted_transaction_is_redone(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_commits(monkeypatch, KafkaError(KafkaError._STATE, "injected", txn_requires_abort=True))
    env.send(env.command("wf-redo", Reserve(sku="abc", qty=1)))
    with serving(env.service()):
        replies = env.replies(1)
        assert env.read(env.settings.inbox, 1, timeout=0.5) == [], "the aborted reply is unseen"

    assert replies["wf-redo"].outcome is ReplyOutcome.SUCCESS
    # The answer is kept across the abort and committed again: the handler does not run twice.
    assert len(env.calls) == 1, "the aborted answer was committed again, not recomputed"


def test_a_fatal_commit_error_stops_the_service(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_commits(monkeypatch, KafkaError(KafkaError._FENCED, "injected", fatal=True))
    env.send(env.command("wf-fenced", Reserve(sku="abc", qty=1)))
    svc = env.service()
    with pytest.raises(ServiceError, match="producer fenced"), serving(svc):
        # Until the handler ran and the commit of its answer stopped the service (leaving the
        # block earlier would stop it first, before it tried to commit).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
            env.calls and svc.health.readiness() == (False, "stopped")
        ):
            time.sleep(0.05)
    assert len(env.calls) == 1
    assert env.read(env.settings.inbox, 1, timeout=0.5) == [], "nothing was committed"


def test_each_answer_is_one_transaction_though_a_commit_marker_follows_each_command(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node sends commands in transactions, so a commit marker follows each on the command
    topic and the next command's offset is one past the committed one. Moving the committed
    offset over the marker is no reason for a transaction of its own: that empty transaction,
    right after the handler started, was what the reply waited for (docs/performance.md)."""
    commits: list[int] = []

    class CountingCommits(Producer):
        def commit_transaction(self, timeout: float = -1) -> None:
            super().commit_transaction(timeout)
            commits.append(1)

    monkeypatch.setattr(service_module, "Producer", CountingCommits)
    node = Producer(
        producer_config(
            env.settings.bootstrap_servers,
            transactional_id=f"{env.settings.namespace}.test-node",
        )
    )
    node.init_transactions(30)
    with serving(env.service()):
        for n in range(3):
            cmd = env.command(f"wf-marker-{n}", Reserve(sku="abc", qty=1))
            node.begin_transaction()
            # One key for all three: one partition, each command after the previous marker.
            node.produce(env.reserve.topic, key=b"one-partition", value=codec.encode(cmd))
            node.commit_transaction(30)
            assert f"wf-marker-{n}" in env.replies(1)

    assert len(env.calls) == 3
    assert len(commits) == 3, f"{len(commits)} transactions for 3 answers"


def test_a_command_may_not_reply_to_the_history_topic(env: Env) -> None:
    forged = env.command("wf-forged", Reserve(sku="abc", qty=1)).model_copy(
        update={"reply_topic": env.settings.history}
    )
    env.send(forged, env.command("wf-after", Reserve(sku="abc", qty=1)))
    with serving(env.service()):
        after = env.replies(1)["wf-after"]
        (msg,) = env.read(env.settings.dlq, 1)

    assert after.outcome is ReplyOutcome.SUCCESS
    letter = codec.decode_as(msg.value() or b"", DeadLetter)
    assert letter.error_type == "ForbiddenReplyTopic"
    assert env.settings.history in letter.reason
    assert env.read(env.settings.history, 1, timeout=1.0) == [], "nothing in the history"
    assert [arg.sku for arg, _ in env.calls] == ["abc"], "the forged command did not run"


def test_reply_topics_replace_the_inbox_rule(env: Env) -> None:
    settings = env.settings.model_copy(update={"reply_topics": (env.settings.results,)})
    results = env.command("wf-results", Reserve(sku="abc", qty=1)).model_copy(
        update={"reply_topic": env.settings.results}
    )
    env.send(results, env.command("wf-inbox", Reserve(sku="abc", qty=1)))
    with serving(env.service(settings=settings)):
        (reply,) = env.read(env.settings.results, 1)
        (msg,) = env.read(env.settings.dlq, 1)

    assert codec.decode_as(reply.value() or b"", ActivityReply).workflow_id == "wf-results"
    letter = codec.decode_as(msg.value() or b"", DeadLetter)
    assert letter.error_type == "ForbiddenReplyTopic" and env.settings.inbox in letter.reason


def test_oversized_records_become_a_failure_reply_and_a_cut_dead_letter(env: Env) -> None:
    big = Producer(
        producer_config(env.settings.bootstrap_servers, extra={"message.max.bytes": 2**20})
    )
    huge_value = b"\x00" + b"y" * 999_999  # not a command, and as large as a record may be
    big.produce(env.reserve.topic, key=b"big", value=huge_value)
    assert big.flush(10) == 0
    env.send(
        env.command("wf-huge", Reserve(sku="huge", qty=1)),
        env.command("wf-after", Reserve(sku="abc", qty=1)),
    )
    with serving(env.service()):
        replies = env.replies(2)
        (msg,) = env.read(env.settings.dlq, 1)

    huge = replies["wf-huge"]
    assert huge.outcome is ReplyOutcome.BUSINESS_FAILURE, "final: the workflow moves on"
    assert huge.error is not None and huge.error.type == "PayloadTooLarge"
    assert "message.max.bytes" in huge.error.message
    assert replies["wf-after"].outcome is ReplyOutcome.SUCCESS

    letter = codec.decode_as(msg.value() or b"", DeadLetter)
    assert letter.error_type == "BadMagic" and letter.key == b"big"
    assert (letter.source_topic, letter.source_offset) == (env.reserve.topic, 0)
    assert letter.value is not None and huge_value.startswith(letter.value)
    assert 0 < len(letter.value) < len(huge_value) and "value cut" in letter.reason
    assert len(msg.value() or b"") < 1_000_000


def test_a_producer_fenced_by_another_instance_stops_the_service(env: Env) -> None:
    service = env.service()
    env.send(env.command("wf-1", Reserve(sku="abc", qty=1)))
    with pytest.raises(ServiceError, match="producer fenced: another instance"), serving(service):
        env.replies(1)
        twin = Producer(
            producer_config(
                env.settings.bootstrap_servers,
                transactional_id=f"{env.reserve.service}.{env.settings.node_id}",
            )
        )
        twin.init_transactions(10)
        env.send(env.command("wf-2", Reserve(sku="abc", qty=1)))
        deadline = time.monotonic() + 15
        while len(env.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
    assert env.read(env.settings.inbox, 1, timeout=0.5) == [], "the fenced reply is unseen"


def test_a_consumer_fenced_by_its_static_twin_stops_the_service(env: Env) -> None:
    static = {"group.instance.id": "instance-1"}
    settings = env.settings.model_copy(update={"kafka": static})
    service = env.service(settings=settings)
    env.send(env.command("wf-1", Reserve(sku="abc", qty=1)))
    with pytest.raises(ServiceError, match="consumer fenced"), serving(service):
        env.replies(1)
        conf = consumer_config(env.settings.bootstrap_servers, env.reserve.service, extra=static)
        twin = Consumer(conf)
        twin.subscribe([env.reserve.topic])
        deadline = time.monotonic() + 20
        while service._idle.is_set() is False and time.monotonic() < deadline:
            twin.poll(0.1)
        twin.close()


def test_an_abort_that_fails_for_good_replaces_the_producer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that must be aborted, then an abort refused with a fatal INVALID_TXN_STATE (what a
    killed broker's coordinator move gave, tests/cluster): the service used to stop; now a new
    producer settles the open transaction and the batch is redone, its reply sent once."""
    state = {"commit": 1, "abort": 1}

    class FailingThenAbortFails(Producer):
        def commit_transaction(self, timeout: float = -1) -> None:
            if state["commit"]:
                state["commit"] -= 1
                raise KafkaException(
                    KafkaError(KafkaError._STATE, "injected", txn_requires_abort=True)
                )
            super().commit_transaction(timeout)

        def abort_transaction(self, timeout: float = -1) -> None:
            if state["abort"]:
                state["abort"] -= 1
                raise KafkaException(
                    KafkaError(KafkaError.INVALID_TXN_STATE, "injected", fatal=True)
                )
            super().abort_transaction(timeout)

    monkeypatch.setattr(service_module, "Producer", FailingThenAbortFails)
    env.send(env.command("wf-abort-fails", Reserve(sku="abc", qty=1)))
    with serving(env.service()):
        replies = env.replies(1)
        assert env.read(env.settings.inbox, 1, timeout=0.5) == [], "one reply, not two"

    assert replies["wf-abort-fails"].outcome is ReplyOutcome.SUCCESS
    assert state == {"commit": 0, "abort": 0}, "the injected failures happened"
