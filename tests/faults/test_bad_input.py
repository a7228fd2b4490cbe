"""Bad records on the inbox and on a command topic while 100 sagas run (issue #9, "Done when").

Every class of bad record we could think of is written next to live traffic: bytes that are no
envelope, envelopes of the wrong kind or for the wrong place, records too large, ids the node
refuses, starts on a partition that is not their workflow id's, forged commands. The node runs in
its own process, the services in threads. Nothing may exit, the inbox must be consumed to its end,
every saga must end as it should, and every bad record must be accounted for: a dead letter that
names it (its source topic, partition and offset) with the error type its class calls for.

The checks are gathered per class and asserted together, so one run tells every class that fails.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from contracts import codec
from contracts.envelopes import (
    ActivityCommand,
    ActivityReply,
    CancelWorkflow,
    DeadLetter,
    HistoryEvent,
    Payload,
    ReplyOutcome,
    SignalWorkflow,
    StartWorkflow,
    WorkflowResult,
    WorkflowStarted,
    WorkflowStatus,
)
from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator._partitioner import partition_for
from orchestrator._payloads import to_payload
from orchestrator.client import Client
from orchestrator.errors import UnknownWorkflow
from orchestrator.settings import Settings
from tests.integration.kit import Kit, Step, Trip, build, create_topics, settings_for
from tests.integration.procs import NodeProcess, ResultWatcher, service_threads

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SAGAS = 100
TRIP_TIMEOUT_MS = 10_000  # each step's attempt timeout: generous under load on a small machine
OVERSIZED = 999_000  # bytes: the broker takes up to ~1 MB, the node's own limit is 512 KiB
RESULTS_WAIT_S = 100.0
SETTLE_WAIT_S = 20.0


# --------------------------------------------------------------------------- expected outcomes


@dataclass(frozen=True)
class Letter:
    """A dead letter naming the record (source topic, partition, offset) with one of these types."""

    error_types: frozenset[str]


@dataclass(frozen=True)
class Rejected:
    """A start the node refuses: a dead letter for the record and a FAILED result of that type."""

    workflow_id: str
    error_type: str


@dataclass(frozen=True)
class ReplyLetter:
    """A well-formed command the service has no reason to refuse: it answers, and the node
    dead-letters the reply (found by its idempotency key) with one of these types."""

    idempotency_key: str
    error_types: frozenset[str]


@dataclass(frozen=True)
class MisroutedStart:
    """A start whose record key is not its workflow id (issue 9.1). It must not strand the
    workflow: either it runs to completion where ``describe`` finds it (forwarded to the right
    partition), or it gets a FAILED result of type WrongPartition and a dead letter."""

    workflow_id: str


Expect = Letter | Rejected | ReplyLetter | MisroutedStart


def letter(*error_types: str) -> Letter:
    return Letter(frozenset(error_types))


@dataclass(frozen=True)
class Bad:
    name: str
    topic: str
    key: bytes | None
    value: bytes | None
    expect: Expect
    partition: int | None = None  # None: the producer's partitioner decides from the key


# --------------------------------------------------------------------------- bad records


def _now() -> int:
    return int(time.time() * 1000)


def _start(workflow_id: str, workflow_type: str = "trip", input: Payload | None = None) -> bytes:
    return codec.encode(
        StartWorkflow(
            workflow_id=workflow_id,
            workflow_type=workflow_type,
            request_id=f"bad-{workflow_id[:40]}",
            input=input or to_payload(Trip(timeout_ms=TRIP_TIMEOUT_MS)),
            sent_at_ms=_now(),
        )
    )


def _command(workflow_id: str, activity: str, reply_topic: str) -> ActivityCommand:
    return ActivityCommand(
        workflow_id=workflow_id,
        activity_name=activity,
        seq=1,
        attempt=1,
        idempotency_key=f"{workflow_id}/1",
        is_compensation=False,
        input=to_payload(Step(n=1)),
        reply_topic=reply_topic,
        sent_at_ms=_now(),
    )


def _reply(workflow_id: str, seq: int) -> bytes:
    return codec.encode(
        ActivityReply(
            workflow_id=workflow_id,
            seq=seq,
            attempt=1,
            idempotency_key=f"{workflow_id}/{seq}",
            outcome=ReplyOutcome.SUCCESS,
            sent_at_ms=_now(),
            result=to_payload(Step(n=seq)),
        )
    )


def _noise(size: int, seed: int) -> bytes:
    """Random bytes that cannot pass for the Avro single-object marker."""
    return b"\x00" + random.Random(seed).randbytes(size - 1)


def _unknown_fingerprint(valid: bytes) -> bytes:
    return codec.MAGIC + b"\xde\xad\xbe\xef\xde\xad\xbe\xef" + valid[10:]


def _key_elsewhere(workflow_id: str, partitions: int) -> str:
    """Another workflow id whose partition is not ``workflow_id``'s."""
    home = partition_for(workflow_id, partitions)
    return next(
        key
        for key in (f"{workflow_id}-other-{i}" for i in range(100))
        if partition_for(key, partitions) != home
    )


def bad_records(settings: Settings, kit: Kit, live_workflow: str) -> list[Bad]:
    """One row per class: where it goes, what it is, and what must become of it."""
    inbox, n = settings.inbox, settings.partitions
    commands = f"{kit.services[0]}.commands"
    activity = f"{kit.services[0]}.do"
    valid_start = _start("bad-truncated")
    valid_command = codec.encode(_command("bad-cmd-truncated", activity, inbox))
    misrouted, unkeyed = "bad-misrouted", "bad-unkeyed"
    wrong_key = _key_elsewhere(misrouted, n)
    not_home = (partition_for(unkeyed, n) + 1) % n
    long_id, nul_id = "L" * 300, "bad\0id"
    history_event = HistoryEvent(
        workflow_id="bad-history",
        event_seq=1,
        recorded_at_ms=_now(),
        event=WorkflowStarted(
            workflow_type="trip", request_id="r", input=to_payload(Trip()), random_seed=1
        ),
    )
    result = WorkflowResult(
        workflow_id="bad-result", status=WorkflowStatus.COMPLETED, finished_at_ms=_now()
    )
    dead = DeadLetter(
        source_topic=inbox,
        source_partition=0,
        source_offset=0,
        reason="r",
        error_type="E",
        failed_at_ms=_now(),
    )

    def cmd(workflow_id: str, activity_name: str = activity, reply_to: str = inbox) -> bytes:
        return codec.encode(_command(workflow_id, activity_name, reply_to))

    k = str.encode
    return [
        # ---- the inbox: the orchestrator node
        Bad("inbox random bytes", inbox, b"bad-random", _noise(200, 1), letter("BadMagic")),
        Bad("inbox empty value", inbox, b"bad-empty", b"", letter("TruncatedRecord")),
        Bad("inbox null value", inbox, b"bad-null", None, letter("EmptyRecord")),
        Bad(
            "inbox null key (signal for an unknown workflow)", inbox, None,
            codec.encode(SignalWorkflow(
                workflow_id="bad-null-key", signal_name="s", request_id="r",
                payload=to_payload(Step(n=1)), sent_at_ms=_now(),
            )),
            letter("UnknownWorkflow"),
        ),
        Bad(
            "inbox truncated start", inbox, b"bad-truncated", valid_start[: len(valid_start) // 2],
            letter("TruncatedRecord", "MalformedRecord"),
        ),
        Bad(
            "inbox unknown schema fingerprint", inbox, b"bad-fp",
            _unknown_fingerprint(valid_start), letter("UnknownSchema"),
        ),
        Bad(
            "inbox HistoryEvent", inbox, b"bad-history", codec.encode(history_event),
            letter("WrongTopic"),
        ),
        Bad(
            "inbox ActivityCommand", inbox, b"bad-cmd-on-inbox", cmd("bad-cmd-on-inbox"),
            letter("WrongTopic"),
        ),
        Bad(
            "inbox WorkflowResult", inbox, b"bad-result", codec.encode(result),
            letter("WrongTopic"),
        ),
        Bad(
            "inbox DeadLetter (no workflow id)", inbox, b"bad-dead", codec.encode(dead),
            letter("InvalidId"),
        ),
        Bad(
            "inbox oversized start (~1 MB)", inbox, b"bad-oversized",
            _start("bad-oversized", input=Payload(encoding="json/plain", data=b"7" * OVERSIZED)),
            letter("Oversized"),
        ),
        Bad("inbox workflow id > 256", inbox, k(long_id), _start(long_id), letter("InvalidId")),
        Bad("inbox workflow id with NUL", inbox, k(nul_id), _start(nul_id), letter("InvalidId")),
        Bad(
            "inbox start keyed by another id", inbox, k(wrong_key), _start(misrouted),
            MisroutedStart(misrouted),
        ),
        Bad(
            "inbox start with a null key", inbox, None, _start(unkeyed),
            MisroutedStart(unkeyed), partition=not_home,
        ),
        Bad(
            "inbox reply for an unknown workflow", inbox, b"bad-ghost", _reply("bad-ghost", 1),
            letter("UnknownWorkflow"),
        ),
        Bad(
            "inbox reply for an unknown activity", inbox, k(live_workflow),
            _reply(live_workflow, 99), letter("UnknownActivity"),
        ),
        Bad(
            "inbox cancel for an unknown workflow", inbox, b"bad-cancel",
            codec.encode(CancelWorkflow(
                workflow_id="bad-cancel", request_id="r", reason="x", sent_at_ms=_now()
            )),
            letter("UnknownWorkflow"),
        ),
        Bad(
            "inbox start of an unknown type", inbox, b"bad-type", _start("bad-type", "no-such"),
            Rejected("bad-type", "UnknownWorkflowType"),
        ),
        Bad(
            "inbox start with invalid input", inbox, b"bad-input",
            _start("bad-input", input=Payload(encoding="json/plain", data=b'{"fail_at": "x"}')),
            Rejected("bad-input", "InvalidInput"),
        ),
        # ---- a command topic: a service
        Bad("command random bytes", commands, b"bad-c-random", _noise(200, 2), letter("BadMagic")),
        Bad("command empty value", commands, b"bad-c-empty", b"", letter("TruncatedRecord")),
        Bad("command null value", commands, b"bad-c-null", None, letter("EmptyRecord")),
        Bad(
            "command truncated", commands, b"bad-c-trunc", valid_command[: len(valid_command) // 2],
            letter("TruncatedRecord", "MalformedRecord"),
        ),
        Bad(
            "command unknown schema fingerprint", commands, b"bad-c-fp",
            _unknown_fingerprint(valid_command), letter("UnknownSchema"),
        ),
        Bad(
            "command StartWorkflow", commands, b"bad-c-start", _start("bad-c-start"),
            letter("UnexpectedEnvelope"),
        ),
        Bad(
            "command oversized (~1 MB)", commands, b"bad-c-big", _noise(OVERSIZED, 3),
            letter("BadMagic"),
        ),
        Bad(
            "command forged reply topic <ns>.history", commands, b"bad-c-forged",
            cmd("bad-c-forged", reply_to=settings.history), letter("ForbiddenReplyTopic"),
        ),
        Bad(
            "command reply topic that does not exist", commands, b"bad-c-noinbox",
            cmd("bad-c-noinbox", reply_to=f"{settings.namespace}-none.inbox"),
            letter("UnknownReplyTopic"),
        ),
        Bad(
            "command unknown activity", commands, b"bad-c-act", cmd("bad-c-act", "nope.do"),
            letter("UnknownActivity"),
        ),
        Bad(
            "command null key (unknown workflow)", commands, None, cmd("bad-c-nullkey"),
            ReplyLetter("bad-c-nullkey/1", frozenset({"UnknownWorkflow"})),
        ),
        Bad(
            "command workflow id > 256", commands, k(long_id), cmd(long_id),
            ReplyLetter(f"{long_id}/1", frozenset({"InvalidId"})),
        ),
        Bad(
            "command workflow id with NUL", commands, k(nul_id), cmd(nul_id),
            ReplyLetter(f"{nul_id}/1", frozenset({"InvalidId"})),
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------- reading the topics

Where = tuple[str, int, int]  # topic, partition, offset


def inject(bootstrap: str, records: list[Bad]) -> dict[str, Where]:
    """Write every bad record; returns where each one landed."""
    producer = Producer(producer_config(bootstrap, extra={"message.max.bytes": 1_048_000}))
    landed: dict[str, Where] = {}
    errors: dict[str, str] = {}

    def on_delivery(name: str) -> Callable[[KafkaError | None, Message], None]:
        def done(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors[name] = str(err)
            else:
                landed[name] = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)

        return done

    for bad in records:
        partition = -1 if bad.partition is None else bad.partition  # -1: the partitioner's choice
        producer.produce(
            bad.topic, bad.value, bad.key, partition=partition, on_delivery=on_delivery(bad.name)
        )
        producer.poll(0)
    assert producer.flush(30) == 0, "bad records still unsent after 30 s"
    assert not errors, f"the broker refused test records: {errors}"
    return landed


def _read_all(consumer: Consumer, partitions: list[TopicPartition]) -> list[Message]:
    """Every committed record of ``partitions`` from their offsets to the end."""
    consumer.assign(partitions)
    pending = {tp.partition for tp in partitions}
    out: list[Message] = []
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.3):
            err = msg.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                pending.discard(msg.partition() or 0)
            elif err is None:
                out.append(msg)
    assert not pending, f"partitions {sorted(pending)} were not read to their end"
    return out


def _eof_reader(bootstrap: str) -> Consumer:
    conf = consumer_config(bootstrap, f"check.{time.time_ns()}")
    conf["enable.partition.eof"] = True
    return Consumer(conf)


def inbox_backlog(settings: Settings) -> int:
    """Inbox records past the orchestrator group's committed offsets.

    Counted by reading, not as high watermark minus committed offset: the services reply in
    transactions, and each commit marker takes an offset that no consumer ever commits past.
    """
    group = Consumer(
        consumer_config(settings.bootstrap_servers, f"{settings.namespace}.orchestrator")
    )
    try:
        wanted = [TopicPartition(settings.inbox, p) for p in range(settings.partitions)]
        committed = group.committed(wanted, timeout=10)
    finally:
        group.close()
    starts = [
        TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
        for tp in committed
    ]
    reader = _eof_reader(settings.bootstrap_servers)
    try:
        return len(_read_all(reader, starts))
    finally:
        reader.close()


def dead_letters(settings: Settings) -> list[DeadLetter]:
    reader = _eof_reader(settings.bootstrap_servers)
    try:
        meta = reader.list_topics(settings.dlq, timeout=10).topics[settings.dlq]
        parts = [TopicPartition(settings.dlq, p, OFFSET_BEGINNING) for p in meta.partitions]
        return [codec.decode_as(m.value() or b"", DeadLetter) for m in _read_all(reader, parts)]
    finally:
        reader.close()


# --------------------------------------------------------------------------- judging


@dataclass
class Evidence:
    letters: list[DeadLetter]
    results: dict[str, WorkflowResult]
    describe: Callable[[str], str]  # a workflow's status as describe() sees it

    def at(self, where: Where) -> DeadLetter | None:
        """The letter of the record at ``where``, or of its forwarded copy (a record on another
        partition than its workflow's is moved there first: its letter names the original)."""
        topic, partition, offset = where
        forwarded = f"forwarded from {topic}[{partition}]@{offset}"
        return next(
            (
                d
                for d in self.letters
                if (d.source_topic, d.source_partition, d.source_offset) == where
                or forwarded in d.reason
            ),
            None,
        )

    def reply_letter(self, inbox: str, idempotency_key: str) -> DeadLetter | None:
        for d in self.letters:
            if d.source_topic != inbox or not d.value:
                continue
            try:
                reply = codec.decode_as(d.value, ActivityReply)
            except codec.CodecError:
                continue
            if reply.idempotency_key == idempotency_key:
                return d
        return None


def judge(bad: Bad, where: Where, ev: Evidence, inbox: str) -> tuple[str | None, DeadLetter | None]:
    """What is wrong with the outcome of ``bad`` (None: nothing), and the letter it used."""
    expect = bad.expect
    if isinstance(expect, Letter):
        found = ev.at(where)
        if found is None:
            return f"no dead letter for {where}", None
        if found.error_type not in expect.error_types:
            return f"dead letter {found.error_type} ({found.reason[:160]})", found
        return None, found
    if isinstance(expect, ReplyLetter):
        found = ev.reply_letter(inbox, expect.idempotency_key)
        if found is None:
            return "no dead letter for the service's reply", None
        if found.error_type not in expect.error_types:
            return f"reply dead-lettered as {found.error_type} ({found.reason[:160]})", found
        return None, found
    result = ev.results.get(expect.workflow_id)
    if isinstance(expect, Rejected):
        found = ev.at(where)
        problems = []
        if found is None or found.error_type != expect.error_type:
            problems.append(f"dead letter {found.error_type if found else 'missing'}")
        if result is None or result.error is None or result.error.type != expect.error_type:
            problems.append(f"result {_result(result)}")
        return ("; ".join(problems) or None), found
    found = ev.at(where)
    seen = ev.describe(expect.workflow_id)
    if result is not None and result.status is WorkflowStatus.COMPLETED:
        ok = seen == WorkflowStatus.COMPLETED.value
        return (None if ok else f"COMPLETED, but describe() says {seen}"), found
    if result is not None and result.error is not None and result.error.type == "WrongPartition":
        if found is None or found.error_type != "WrongPartition":
            return "FAILED WrongPartition without its dead letter", found
        ok = seen == "unknown"
        return (None if ok else f"FAILED WrongPartition, but describe() says {seen}"), found
    return f"result {_result(result)}; describe() says {seen}", found


def _result(result: WorkflowResult | None) -> str:
    if result is None:
        return "none"
    error = f" {result.error.type}: {result.error.message[:120]}" if result.error else ""
    return f"{result.status.value}{error}"


def _describer(client: Client) -> Callable[[str], str]:
    def describe(workflow_id: str) -> str:
        try:
            status = client.describe(workflow_id, timeout=15).status
        except UnknownWorkflow:
            return "unknown"
        return status.value if status else "not started"

    return describe


# --------------------------------------------------------------------------- the test


def _wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} within {timeout}s")


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def _expected_status(i: int) -> WorkflowStatus:
    return WorkflowStatus.COMPENSATED if i % 10 == 3 else WorkflowStatus.COMPLETED


@pytest.mark.timeout(240)
def test_bad_records_on_the_inbox_and_a_command_topic_are_each_accounted_for(
    kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    kit = build(namespace)
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "svc")
    create_topics(kit, settings)
    ids = [f"saga-{i}" for i in range(SAGAS)]
    records = bad_records(settings, kit, live_workflow=ids[0])
    node = NodeProcess(kit, namespace, tmp_path / "orch", "n1", kafka_bootstrap)
    watcher = ResultWatcher(settings)
    problems: dict[str, str] = {}
    node.start()
    try:
        _wait_for_text(node.log, "restored", 60)
        with service_threads(kit, settings) as services, Client(settings) as client:
            watcher.start()
            for i, wf in enumerate(ids[: SAGAS // 2]):
                trip = Trip(fail_at=2 if i % 10 == 3 else 0, timeout_ms=TRIP_TIMEOUT_MS)
                client.start("trip", trip, workflow_id=wf)
            landed = inject(kafka_bootstrap, records)  # amid the traffic
            for i, wf in enumerate(ids[SAGAS // 2 :], start=SAGAS // 2):
                trip = Trip(fail_at=2 if i % 10 == 3 else 0, timeout_ms=TRIP_TIMEOUT_MS)
                client.start("trip", trip, workflow_id=wf)

            waited_for = set(ids) | {
                b.expect.workflow_id
                for b in records
                if isinstance(b.expect, Rejected | MisroutedStart)
            }
            _wait_until(lambda: waited_for <= set(watcher.found), RESULTS_WAIT_S)
            if not _wait_until(lambda: inbox_backlog(settings) == 0, SETTLE_WAIT_S):
                problems["inbox lag"] = f"{inbox_backlog(settings)} records never committed"

            if not node.alive():
                problems["node process"] = "exited: " + node.log.read_text(errors="replace")[-2000:]
            stopped = [t.name for t in services if not t.is_alive()]
            if stopped:
                problems["services"] = f"{len(stopped)} service thread(s) stopped"

            results = dict(watcher.found)
            wrong = {
                wf: _result(results.get(wf))
                for i, wf in enumerate(ids)
                if results.get(wf) is None or results[wf].status is not _expected_status(i)
            }
            if wrong:
                problems["the 100 sagas"] = f"{len(wrong)} ended wrong: {sorted(wrong.items())[:5]}"
            effects = set(kit.effects.values())
            if effects - {1}:
                problems["service effects"] = f"an effect was applied {effects} times"

            letters: list[DeadLetter] = []

            def all_letters_in() -> bool:
                letters[:] = dead_letters(settings)
                ev = Evidence(letters, dict(watcher.found), lambda _: "")
                return all(
                    judge(b, landed[b.name], ev, settings.inbox)[1] is not None
                    for b in records
                    if not isinstance(b.expect, MisroutedStart)
                )

            _wait_until(all_letters_in, SETTLE_WAIT_S)
            evidence = Evidence(letters, dict(watcher.found), _describer(client))
            used: set[int] = set()
            for bad in records:
                problem, found = judge(bad, landed[bad.name], evidence, settings.inbox)
                if found is not None:
                    used.add(id(found))
                if problem is not None:
                    problems[bad.name] = problem
            strays = [d for d in letters if id(d) not in used]
            if strays:
                problems["unaccounted dead letters"] = "; ".join(
                    f"{d.error_type} from {d.source_topic}[{d.source_partition}]@"
                    f"{d.source_offset}: {d.reason[:100]}"
                    for d in strays[:8]
                ) + (f" (+{len(strays) - 8} more)" if len(strays) > 8 else "")
    finally:
        watcher.close()
        node.stop()
    report = "\n".join(f"- {name}: {why}" for name, why in problems.items())
    assert not problems, f"{len(problems)} of the checks failed:\n{report}"


def test_the_table_covers_both_topics_and_every_expectation_kind() -> None:
    """The table itself: unique names, both targets, and oversized records really ~1 MB."""
    kit = build("table")
    records = bad_records(settings_for("h:1", "table", Path("/tmp")), kit, "saga-0")
    assert len({b.name for b in records}) == len(records)
    assert {b.topic for b in records} == {"table.inbox", "table-a.commands"}
    assert {type(b.expect) for b in records} == {Letter, Rejected, ReplyLetter, MisroutedStart}
    big = [b for b in records if "oversized" in b.name]
    assert len(big) == 2 and all(OVERSIZED <= len(b.value or b"") < 1_000_000 for b in big)
    for b in records:
        if isinstance(b.expect, MisroutedStart):
            home = partition_for(b.expect.workflow_id, 3)
            assert (b.partition if b.key is None else partition_for(b.key, 3)) != home
