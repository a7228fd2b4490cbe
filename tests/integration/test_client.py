"""The client against a real broker, with the orchestrator's side played by the test.

The test writes the records the orchestrator would write (results, history events) and reads what
the client writes (inbox envelopes), so the client's wire contract is checked on its own.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from pydantic import BaseModel

from contracts.codec import decode_as, encode
from contracts.envelopes import (
    ActivityScheduled,
    CancelWorkflow,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    Payload,
    RetryPolicy,
    SignalWorkflow,
    StartWorkflow,
    TraceContext,
    WorkflowCompleted,
    WorkflowResult,
    WorkflowStarted,
    WorkflowStatus,
)
from orchestrator.cli import main
from orchestrator.client import Client, ClientError
from orchestrator.errors import UnknownWorkflow, WorkflowFailedError, WorkflowIdConflict
from orchestrator.kafka_config import consumer_config, producer_config
from orchestrator.partitioner import partition_for
from orchestrator.payloads import from_payload, to_payload
from orchestrator.settings import Settings
from orchestrator.topics import delete_topics, ensure_topics

pytestmark = pytest.mark.broker

N = 3


class Order(BaseModel):
    sku: str
    qty: int


class Receipt(BaseModel):
    order_id: str
    total_cents: int


def make_settings(bootstrap: str, **values: Any) -> Settings:
    # bootstrap_servers is read through its environment aliases, so it is passed by alias.
    return Settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(kafka_bootstrap: str, namespace: str) -> Iterator[Settings]:
    ensure_topics(kafka_bootstrap, namespace, N)
    yield make_settings(kafka_bootstrap, namespace=namespace, partitions=N)
    delete_topics(kafka_bootstrap, namespace)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@pytest.fixture
def producer(settings: Settings) -> Iterator[Producer]:
    p = Producer(producer_config(settings.bootstrap_servers))
    yield p
    p.flush(10)


def _read_partition(bootstrap: str, topic: str, partition: int, want: int) -> list[Message]:
    consumer = Consumer(consumer_config(bootstrap, f"test-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
    got: list[Message] = []
    deadline = time.monotonic() + 15
    try:
        while len(got) < want and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=0.2):
                assert msg.error() is None, msg.error()
                got.append(msg)
    finally:
        consumer.close()
    return got


def _put_result(producer: Producer, settings: Settings, result: WorkflowResult) -> None:
    producer.produce(settings.results, key=result.workflow_id.encode(), value=encode(result))
    assert producer.flush(10) == 0


def _processed_inbox(settings: Settings) -> None:
    """Commit the node's consumer group offsets at the end of the inbox, as a node does in the
    transaction that writes what it decided: the client's ``result()`` waits for that before a
    result of another start answers a duplicate start."""
    consumer = Consumer(
        consumer_config(settings.bootstrap_servers, f"{settings.namespace}.orchestrator")
    )
    try:
        ends = []
        for p in range(N):
            _, high = consumer.get_watermark_offsets(
                TopicPartition(settings.inbox, p), timeout=10, cached=False
            )
            ends.append(TopicPartition(settings.inbox, p, high))
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()


def _put_events(
    producer: Producer, settings: Settings, workflow_id: str, bodies: Sequence[EventBody]
) -> None:
    partition = partition_for(workflow_id, N)
    for seq, body in enumerate(bodies, start=1):
        event = HistoryEvent(
            workflow_id=workflow_id,
            event_seq=seq,
            recorded_at_ms=1_700_000_000_000 + 250 * seq,
            event=body,
        )
        producer.produce(
            settings.history, key=f"{workflow_id}/{seq}".encode(), value=encode(event),
            partition=partition,
        )  # fmt: skip
    assert producer.flush(10) == 0


def _started(workflow_type: str = "place-order") -> WorkflowStarted:
    return WorkflowStarted(
        workflow_type=workflow_type,
        request_id="r-1",
        input=to_payload(Order(sku="A-1", qty=2)),
        random_seed=7,
    )


def _scheduled(seq: int = 1) -> ActivityScheduled:
    return ActivityScheduled(
        seq=seq,
        activity_name="inventory.reserve",
        topic="inventory.commands",
        input=to_payload({"sku": "A-1"}),
        idempotency_key=f"wf/{seq}",
        is_compensation=False,
        retry=RetryPolicy(),
    )


# --------------------------------------------------------------------------- sending


def test_start_puts_a_start_workflow_on_the_workflows_inbox_partition(
    client: Client, settings: Settings
) -> None:
    trace = TraceContext(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    handle = client.start(
        "place-order", Order(sku="A-1", qty=2), workflow_id="order-42", trace=trace
    )
    assert handle.workflow_id == "order-42"
    assert handle.request_id and len(handle.request_id) == 32

    partition = partition_for("order-42", N)
    (msg,) = _read_partition(settings.bootstrap_servers, settings.inbox, partition, want=1)
    assert msg.key() == b"order-42"
    value = msg.value()
    assert value is not None
    start = decode_as(value, StartWorkflow)
    assert start.workflow_id == "order-42"
    assert start.workflow_type == "place-order"
    assert start.request_id == handle.request_id
    assert start.trace == trace
    assert from_payload(start.input, Order) == Order(sku="A-1", qty=2)
    assert abs(start.sent_at_ms - time.time() * 1000) < 60_000
    assert dict(msg.headers() or [])["traceparent"] == trace.traceparent.encode()


def test_start_without_an_id_uses_a_fresh_uuid_and_each_request_its_own_id(
    client: Client, settings: Settings
) -> None:
    first = client.start("place-order", {"sku": "B", "qty": 1})
    second = client.start("place-order", {"sku": "B", "qty": 1})
    assert str(uuid.UUID(first.workflow_id)) == first.workflow_id
    assert first.workflow_id != second.workflow_id
    assert first.request_id != second.request_id


def test_signal_and_cancel_go_to_the_same_partition_in_order(
    client: Client, settings: Settings
) -> None:
    client.start("place-order", Order(sku="A", qty=1), workflow_id="wf-sig")
    signal_id = client.signal("wf-sig", "approve", {"by": "ops"})
    cancel_id = client.cancel("wf-sig", reason="customer changed their mind")

    partition = partition_for("wf-sig", N)
    msgs = _read_partition(settings.bootstrap_servers, settings.inbox, partition, want=3)
    values = [m.value() for m in msgs]
    assert all(v is not None for v in values)
    start = decode_as(values[0] or b"", StartWorkflow)
    signal = decode_as(values[1] or b"", SignalWorkflow)
    cancel = decode_as(values[2] or b"", CancelWorkflow)
    assert start.workflow_id == signal.workflow_id == cancel.workflow_id == "wf-sig"
    assert (signal.signal_name, signal.request_id) == ("approve", signal_id)
    assert from_payload(signal.payload, dict) == {"by": "ops"}
    assert (cancel.reason, cancel.request_id) == ("customer changed their mind", cancel_id)


def test_start_on_a_missing_namespace_is_a_clear_error(kafka_bootstrap: str) -> None:
    settings = make_settings(kafka_bootstrap, namespace="no-such-ns-x1")
    with Client(settings, send_timeout=3) as client, pytest.raises(ClientError) as info:
        client.start("place-order", {})
    assert "no-such-ns-x1.inbox" in str(info.value)
    assert "topics create" in str(info.value)


# --------------------------------------------------------------------------- results


def test_result_returns_the_typed_output_of_a_completed_workflow(
    client: Client, settings: Settings, producer: Producer
) -> None:
    receipt = Receipt(order_id="order-7", total_cents=1999)
    _put_result(
        producer,
        settings,
        WorkflowResult(
            workflow_id="order-7",
            status=WorkflowStatus.COMPLETED,
            finished_at_ms=1,
            result=to_payload(receipt),
            request_id="r-orig",
        ),
    )
    assert client.result("order-7", Receipt, timeout=10) == receipt
    assert client.result("order-7", timeout=10) == {"order_id": "order-7", "total_cents": 1999}
    assert client.get_handle("order-7").result(Receipt, timeout=10) == receipt


def test_result_waits_for_a_result_written_later(
    client: Client, settings: Settings, producer: Producer
) -> None:
    def later() -> None:
        time.sleep(1.0)
        _put_result(
            producer,
            settings,
            WorkflowResult(
                workflow_id="slow", status=WorkflowStatus.COMPLETED, finished_at_ms=1,
                result=to_payload(42),
            ),
        )  # fmt: skip

    thread = threading.Thread(target=later)
    thread.start()
    try:
        assert client.result("slow", int, timeout=15) == 42
    finally:
        thread.join()


def test_result_raises_workflow_failed_error_for_a_compensated_workflow(
    client: Client, settings: Settings, producer: Producer
) -> None:
    _put_result(
        producer,
        settings,
        WorkflowResult(
            workflow_id="order-8",
            status=WorkflowStatus.COMPENSATED,
            finished_at_ms=1,
            error=ErrorInfo(type="ActivityError", message="card declined"),
        ),
    )
    with pytest.raises(WorkflowFailedError) as info:
        client.result("order-8", Receipt, timeout=10)
    assert info.value.workflow_id == "order-8"
    assert info.value.status == "COMPENSATED"
    assert info.value.error_type == "ActivityError"
    assert info.value.message == "card declined"


def test_result_times_out_clearly_when_there_is_none(client: Client, settings: Settings) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        client.result("never-finishes", timeout=1.5)
    assert 1.4 <= time.monotonic() - started < 10
    assert "never-finishes" in str(info.value)
    assert settings.results in str(info.value)


def test_a_handle_raises_its_own_conflict_and_skips_another_starts_conflict(
    client: Client, settings: Settings, producer: Producer
) -> None:
    original = client.start("place-order", Order(sku="A", qty=1), workflow_id="dup")
    rejected = client.start("place-order", Order(sku="A", qty=9), workflow_id="dup")
    assert original.request_id and rejected.request_id
    conflict = ErrorInfo(type="WorkflowIdConflict", message="dup exists with another input")
    _put_result(
        producer,
        settings,
        WorkflowResult(
            workflow_id="dup", status=WorkflowStatus.FAILED, finished_at_ms=1, error=conflict,
            request_id=rejected.request_id,
        ),
    )  # fmt: skip
    with pytest.raises(WorkflowIdConflict):
        rejected.result(timeout=10)
    # The original's result is not there yet: the rejection of the other start is not it.
    with pytest.raises(TimeoutError, match="a start with this id was refused"):
        original.result(timeout=1.5)
    with pytest.raises(TimeoutError):
        client.get_handle("dup").result(timeout=1.5)

    _put_result(
        producer,
        settings,
        WorkflowResult(
            workflow_id="dup", status=WorkflowStatus.COMPLETED, finished_at_ms=2,
            result=to_payload("ok"), request_id=original.request_id,
        ),
    )  # fmt: skip
    assert original.result(str, timeout=10) == "ok"
    assert client.get_handle("dup").result(str, timeout=10) == "ok"
    with pytest.raises(WorkflowIdConflict):
        rejected.result(timeout=10)


def test_a_duplicate_start_gets_the_result_of_the_original(
    client: Client, settings: Settings, producer: Producer
) -> None:
    original = client.start("place-order", Order(sku="A", qty=1), workflow_id="same")
    duplicate = client.start("place-order", Order(sku="A", qty=1), workflow_id="same")
    _put_result(
        producer,
        settings,
        WorkflowResult(
            workflow_id="same", status=WorkflowStatus.COMPLETED, finished_at_ms=1,
            result=to_payload(Receipt(order_id="same", total_cents=1)),
            request_id=original.request_id,
        ),
    )  # fmt: skip
    assert original.result(Receipt, timeout=10).total_cents == 1
    # Until the node has processed the duplicate, its own result (a rejection) may still come.
    with pytest.raises(TimeoutError, match="once the node has processed this start"):
        duplicate.result(Receipt, timeout=1.5)
    _processed_inbox(settings)
    assert duplicate.result(Receipt, timeout=10) == original.result(Receipt, timeout=10)


def test_result_ignores_aborted_transactions(
    client: Client, settings: Settings, namespace: str
) -> None:
    txn = Producer(producer_config(settings.bootstrap_servers, transactional_id=f"{namespace}.t"))
    txn.init_transactions(10)
    txn.begin_transaction()
    aborted = WorkflowResult(
        workflow_id="txn", status=WorkflowStatus.COMPLETED, finished_at_ms=1, result=to_payload(1)
    )
    txn.produce(settings.results, key=b"txn", value=encode(aborted))
    txn.abort_transaction(10)
    with pytest.raises(TimeoutError):
        client.result("txn", int, timeout=1.5)

    txn.begin_transaction()
    committed = aborted.model_copy(update={"result": to_payload(2)})
    txn.produce(settings.results, key=b"txn", value=encode(committed))
    txn.commit_transaction(10)
    assert client.result("txn", int, timeout=10) == 2


# --------------------------------------------------------------------------- describe


def test_describe_folds_the_history_of_a_running_workflow(
    client: Client, settings: Settings, producer: Producer
) -> None:
    _put_events(producer, settings, "order-9", [_started(), _scheduled()])
    # Events of other workflows in the same partition, one of them with a prefix of our id.
    partition = partition_for("order-9", N)
    other = HistoryEvent(workflow_id="order-9/x", event_seq=1, recorded_at_ms=1, event=_started())
    producer.produce(settings.history, key=b"order-9/x/1", value=encode(other), partition=partition)
    producer.flush(10)

    description = client.describe("order-9")
    assert description.workflow_id == "order-9"
    assert description.workflow_type == "place-order"
    assert description.status is WorkflowStatus.RUNNING
    assert description.current_step == "inventory.reserve #1 attempt 1"
    assert description.started_at is not None
    assert description.started_at.timestamp() == pytest.approx(1_700_000_000.25)
    assert description.finished_at is None
    assert description.result is None and description.error is None
    assert description.complete
    assert [(e.seq, e.kind) for e in description.events] == [
        (1, "WorkflowStarted"),
        (2, "ActivityScheduled"),
    ]
    assert "inventory.reserve #1 -> inventory.commands" in description.events[1].summary
    assert json.loads(json.dumps(description.to_dict()))["input"] == {"sku": "A-1", "qty": 2}


def test_describe_a_finished_workflow_and_decode_its_output(
    client: Client, settings: Settings, producer: Producer
) -> None:
    receipt = Receipt(order_id="order-10", total_cents=5)
    _put_events(
        producer,
        settings,
        "order-10",
        [_started(), _scheduled(), WorkflowCompleted(result=to_payload(receipt))],
    )
    description = client.describe("order-10")
    assert description.status is WorkflowStatus.COMPLETED
    assert description.finished
    assert description.current_step == "completed"
    assert description.finished_at is not None
    assert description.output(Receipt) == receipt


def test_describe_raises_unknown_workflow(client: Client, settings: Settings) -> None:
    with pytest.raises(UnknownWorkflow) as info:
        client.describe("no-such-workflow")
    assert "no-such-workflow" in str(info.value)


def test_describe_drops_tombstoned_events(
    client: Client, settings: Settings, producer: Producer
) -> None:
    _put_events(producer, settings, "expired", [_started(), _scheduled()])
    partition = partition_for("expired", N)
    for seq in (1, 2):
        producer.produce(
            settings.history, key=f"expired/{seq}".encode(), value=None, partition=partition
        )
    producer.flush(10)
    with pytest.raises(UnknownWorkflow):
        client.describe("expired")


def test_describe_reads_to_the_end_past_transaction_markers(
    client: Client, settings: Settings, namespace: str
) -> None:
    txn = Producer(producer_config(settings.bootstrap_servers, transactional_id=f"{namespace}.h"))
    txn.init_transactions(10)
    partition = partition_for("txn-wf", N)
    bodies: list[EventBody] = [_started(), _scheduled()]
    for seq, body in enumerate(bodies, start=1):
        txn.begin_transaction()
        event = HistoryEvent(workflow_id="txn-wf", event_seq=seq, recorded_at_ms=seq, event=body)
        txn.produce(settings.history, key=f"txn-wf/{seq}".encode(), value=encode(event),
                    partition=partition)  # fmt: skip
        txn.commit_transaction(10)
    txn.begin_transaction()
    aborted = HistoryEvent(
        workflow_id="txn-wf", event_seq=3, recorded_at_ms=3,
        event=WorkflowCompleted(result=Payload()),
    )  # fmt: skip
    txn.produce(settings.history, key=b"txn-wf/3", value=encode(aborted), partition=partition)
    txn.abort_transaction(10)

    started = time.monotonic()
    description = client.describe("txn-wf", timeout=10)
    assert time.monotonic() - started < 5
    assert description.status is WorkflowStatus.RUNNING
    assert [e.seq for e in description.events] == [1, 2]


# --------------------------------------------------------------------------- CLI on a broker


def _cli(settings: Settings, *args: str) -> list[str]:
    return [
        "--bootstrap",
        settings.bootstrap_servers,
        "--namespace",
        settings.namespace,
        "--partitions",
        str(N),
        *args,
    ]


def test_cli_start_signal_cancel_result_describe(settings: Settings, producer: Producer) -> None:
    runner = CliRunner()
    out = runner.invoke(
        main, _cli(settings, "start", "place-order", "--input", '{"sku":"A","qty":3}', "--id", "c1")
    )
    assert out.exit_code == 0, out.output
    assert "c1" in out.output
    # The orchestrator's part: signal and cancel check the history for a running workflow.
    _put_events(producer, settings, "c1", [_started(), _scheduled()])
    assert (
        runner.invoke(main, _cli(settings, "signal", "c1", "go", "--payload", "[1]")).exit_code == 0
    )
    assert runner.invoke(main, _cli(settings, "cancel", "c1", "--reason", "test")).exit_code == 0
    msgs = _read_partition(
        settings.bootstrap_servers, settings.inbox, partition_for("c1", N), want=3
    )
    start = decode_as(msgs[0].value() or b"", StartWorkflow)
    assert from_payload(start.input, Order) == Order(sku="A", qty=3)

    out = runner.invoke(main, _cli(settings, "describe", "c1"))
    assert out.exit_code == 0, out.output
    assert "RUNNING" in out.output
    assert "inventory.reserve #1 attempt 1" in out.output
    assert "+0.250s" in out.output  # the second event, relative to the start
    out = runner.invoke(main, _cli(settings, "describe", "c1", "--json"))
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["status"] == "RUNNING"

    out = runner.invoke(main, _cli(settings, "result", "c1", "--timeout", "1"))
    assert out.exit_code == 3, out.output
    _put_result(
        producer,
        settings,
        WorkflowResult(
            workflow_id="c1", status=WorkflowStatus.COMPLETED, finished_at_ms=1,
            result=to_payload({"total": 3}),
        ),
    )  # fmt: skip
    out = runner.invoke(main, _cli(settings, "result", "c1"))
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"total": 3}

    out = runner.invoke(main, _cli(settings, "describe", "unknown-wf"))
    assert out.exit_code == 1
    assert "unknown-wf" in out.output


def test_cli_topics_create_then_verify(kafka_bootstrap: str, namespace: str) -> None:
    runner = CliRunner()
    args = ["--bootstrap", kafka_bootstrap, "--namespace", namespace, "--partitions", "2"]
    try:
        out = runner.invoke(main, [*args, "topics", "create"])
        assert out.exit_code == 0, out.output
        assert ["created", f"{namespace}.inbox"] in [
            line.split() for line in out.output.splitlines()
        ]
        out = runner.invoke(main, [*args, "topics", "verify"])
        assert out.exit_code == 0, out.output
        out = runner.invoke(
            main,
            ["--bootstrap", kafka_bootstrap, "--namespace", namespace, "--partitions", "4",
             "topics", "verify"],
        )  # fmt: skip
        assert out.exit_code == 1
        assert "partitions" in out.output
    finally:
        delete_topics(kafka_bootstrap, namespace)


# --------------------------------------------------------------------------- with a real node


def _step(client: Client, workflow_id: str) -> str:
    try:
        return client.describe(workflow_id).current_step
    except UnknownWorkflow:
        return "not started yet"


def test_end_to_end_with_an_orchestrator_node(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    from orchestrator.node import OrchestratorNode

    from .kit import Trip, TripResult, build, create_topics, make_service

    kit = build(namespace)
    settings = make_settings(
        kafka_bootstrap, namespace=namespace, partitions=3, state_dir=tmp_path, node_id="n1"
    )
    create_topics(kit, settings)
    stops: list[threading.Event] = []
    threads: list[threading.Thread] = []
    runners = [make_service(kit, name, settings).run for name in kit.services]
    runners.append(OrchestratorNode(settings, kit.registry).run)
    for run in runners:
        stops.append(threading.Event())
        threads.append(threading.Thread(target=run, args=(stops[-1],), daemon=True))
        threads[-1].start()
    try:
        with Client(settings) as client:
            handle = client.start("trip", Trip(), workflow_id="e2e-1")
            assert handle.result(TripResult, timeout=60).refs == [
                f"{namespace}-{x}.do#{n}" for n, x in ((1, "a"), (2, "b"), (3, "c"))
            ]
            described = client.describe("e2e-1")
            assert described.status is WorkflowStatus.COMPLETED
            assert described.output(TripResult) == handle.result(TripResult)
            kinds = [e.kind for e in described.events]
            assert kinds[0] == "WorkflowStarted" and kinds[-1] == "WorkflowCompleted"
            assert kinds.count("ActivityScheduled") == 3

            # The same id with another input is rejected; with the same input it is the same.
            rejected = client.start("trip", Trip(fail_at=2), workflow_id="e2e-1")
            with pytest.raises(WorkflowIdConflict):
                rejected.result(timeout=30)
            again = client.start("trip", Trip(), workflow_id="e2e-1")
            assert again.result(TripResult, timeout=30) == handle.result(TripResult)

            waiting = client.start("trip", Trip(wait_signal=True), workflow_id="e2e-2")
            deadline = time.monotonic() + 30
            while _step(client, "e2e-2") != "waiting for a signal":
                assert time.monotonic() < deadline, _step(client, "e2e-2")
                time.sleep(0.2)
            out = CliRunner().invoke(
                main,
                [*_cli(settings, "signal", "e2e-2", "approve", "--payload", '{"by": "ops"}')],
            )
            assert out.exit_code == 0, out.output
            assert waiting.result(TripResult, timeout=60).approved_by == "ops"
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join(30)
