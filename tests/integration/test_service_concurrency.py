"""Concurrent handlers against a real broker: parallel activities, slow handlers, long handlers,
twins of a running operation, and offsets that skip what was answered above a slow command."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from pydantic import BaseModel

from contracts import codec
from contracts.activity import ActivityContract
from contracts.envelopes import ActivityCommand, ActivityReply, ReplyOutcome
from orchestrator import workflow
from orchestrator.client import Client
from orchestrator.kafka_config import consumer_config, producer_config
from orchestrator.node import OrchestratorNode
from orchestrator.payloads import to_payload
from orchestrator.service import CommandInfo, Service, serving
from orchestrator.settings import Settings
from orchestrator.topics import ensure_service_topic, ensure_topics
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

PARTITIONS = 2


class Work(BaseModel):
    n: int
    sleep_ms: int = 0


class Done(BaseModel):
    n: int


class Fan(BaseModel):
    width: int
    sleep_ms: int


class Fanned(BaseModel):
    ns: list[int]


@dataclass
class Env:
    settings: Settings
    work: ActivityContract[Work, Done]
    state_dir: Path
    runs: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _producer: Producer | None = None
    _reader: Consumer | None = None

    def service(
        self, *, is_async: bool = False, state_dir: Path | None = None, **opts: Any
    ) -> Service:
        settings = opts.pop("settings", self.settings)
        service = Service(
            self.work.service, settings, state_dir=state_dir or self.state_dir, **opts
        )

        def count(info: CommandInfo) -> None:
            with self.lock:
                self.runs[info.idempotency_key] += 1

        if is_async:

            @service.handler(self.work)
            async def work_async(arg: Work, info: CommandInfo) -> Done:
                count(info)
                await asyncio.sleep(arg.sleep_ms / 1000)
                return Done(n=arg.n)

        else:

            @service.handler(self.work)
            def work(arg: Work, info: CommandInfo) -> Done:
                count(info)
                time.sleep(arg.sleep_ms / 1000)
                return Done(n=arg.n)

        return service

    def command(self, n: int, sleep_ms: int = 0, *, attempt: int = 1) -> ActivityCommand:
        wf = f"wf-{n:04d}"
        return ActivityCommand(
            workflow_id=wf,
            activity_name=self.work.name,
            seq=1,
            attempt=attempt,
            idempotency_key=f"{wf}/1",
            is_compensation=False,
            input=to_payload(Work(n=n, sleep_ms=sleep_ms)),
            reply_topic=self.settings.inbox,
            sent_at_ms=int(time.time() * 1000),
        )

    def send(self, *commands: ActivityCommand, partition: int | None = None) -> None:
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings.bootstrap_servers))
        for cmd in commands:
            key, value = cmd.workflow_id.encode(), codec.encode(cmd)
            if partition is None:
                self._producer.produce(self.work.topic, key=key, value=value)
            else:
                self._producer.produce(self.work.topic, key=key, value=value, partition=partition)
        assert self._producer.flush(10) == 0

    def replies(self, want: int, timeout: float = 30.0) -> list[ActivityReply]:
        if self._reader is None:
            self._reader = Consumer(
                consumer_config(self.settings.bootstrap_servers, f"{self.settings.inbox}.test")
            )
            self._reader.assign(
                [
                    TopicPartition(self.settings.inbox, p, OFFSET_BEGINNING)
                    for p in range(PARTITIONS)
                ]
            )
        got: list[ActivityReply] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            for msg in self._reader.consume(num_messages=want - len(got), timeout=0.1):
                assert msg.error() is None, msg.error()
                got.append(codec.decode_as(msg.value() or b"", ActivityReply))
        return got

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


@pytest.fixture
def env(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Env]:
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        namespace=namespace,
        partitions=PARTITIONS,
        state_dir=tmp_path,
        node_id="node-1",
    )
    work = ActivityContract("conc.work", f"{namespace}-svc", Work, Done)
    ensure_topics(kafka_bootstrap, namespace, PARTITIONS)
    ensure_service_topic(kafka_bootstrap, work.topic, PARTITIONS)
    env = Env(settings=settings, work=work, state_dir=tmp_path / "services")
    yield env
    env.close()


def test_three_parallel_activities_of_one_saga_take_one_handler_time(env: Env) -> None:
    """A workflow gathers three 1-s calls to one service instance: they run side by side."""
    work = env.work

    @workflow.defn(name="fan")
    class FanOut:
        @workflow.run
        async def run(self, ctx: WorkflowContext, fan: Fan) -> Fanned:
            calls = [ctx.call(work, Work(n=i, sleep_ms=fan.sleep_ms)) for i in range(fan.width)]
            done = await ctx.gather(*calls)
            return Fanned(ns=[d.n for d in done])

    node = OrchestratorNode(env.settings, WorkflowRegistry([FanOut]))
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    client = Client(env.settings)
    try:
        with serving(env.service()):
            # A first saga warms up the group and the transactions: its time is not measured.
            client.start("fan", Fan(width=1, sleep_ms=0), workflow_id="warm").result(
                Fanned, timeout=60
            )
            began = time.monotonic()
            handle = client.start("fan", Fan(width=3, sleep_ms=1000), workflow_id="fan-1")
            result = handle.result(Fanned, timeout=60)
            took = time.monotonic() - began
    finally:
        client.close()
        stop.set()
        thread.join(30)
    print(f"3 parallel 1-s activities took {took:.2f} s")
    assert result.ns == [0, 1, 2]
    assert took < 2.5, f"the three activities ran one after another ({took:.2f} s)"


@pytest.mark.parametrize("is_async", [False, True], ids=["threads", "asyncio"])
def test_a_hundred_slow_commands_run_side_by_side(env: Env, is_async: bool) -> None:
    service = env.service(is_async=is_async, max_concurrency=16)
    with serving(service):
        # The group join is not measured: the commands go once the first one is answered.
        env.send(env.command(1000))
        assert [r.workflow_id for r in env.replies(1)] == ["wf-1000"]
        began = time.monotonic()
        env.send(*(env.command(n, sleep_ms=200) for n in range(100)))
        replies = env.replies(100, timeout=60)
        took = time.monotonic() - began
    print(f"100 commands with 200 ms handlers, 16 at once ({'async' if is_async else 'threads'}): "
          f"{took:.2f} s (one at a time: 20 s; ideal 1.4 s)")  # fmt: skip
    assert len(replies) == 100
    assert {r.outcome for r in replies} == {ReplyOutcome.SUCCESS}
    assert sorted(r.workflow_id for r in replies) == [f"wf-{n:04d}" for n in range(100)]
    assert set(env.runs.values()) == {1}, "each handler ran once"
    assert len(env.runs) == 101
    assert took < 12, f"{took:.1f} s: the handlers did not run side by side"


def test_a_handler_longer_than_max_poll_interval_runs_once(env: Env) -> None:
    """Before: the service left its group mid-handler, aborted and ran it again for ever."""
    settings = env.settings.model_copy(
        update={"kafka": {"session.timeout.ms": "6000", "max.poll.interval.ms": "6000"}}
    )
    env.send(env.command(1, sleep_ms=9_000))
    with serving(env.service(settings=settings)):
        (reply,) = env.replies(1, timeout=40)
        assert env.replies(1, timeout=3) == [], "one reply"
    assert reply.outcome is ReplyOutcome.SUCCESS
    assert env.runs == Counter({"wf-0001/1": 1}), "the handler ran once"


def test_a_twin_of_a_running_operation_waits_for_its_outcome(env: Env) -> None:
    """Attempt 2 of an operation whose attempt 1 still runs (the workflow gave up waiting)
    gets attempt 1's final outcome: one operation never runs twice at once."""
    env.send(env.command(7, sleep_ms=1500, attempt=1))
    with serving(env.service()):
        time.sleep(0.5)
        env.send(env.command(7, sleep_ms=1500, attempt=2))
        replies = env.replies(2)
    assert sorted(r.attempt for r in replies) == [1, 2]
    assert {r.outcome for r in replies} == {ReplyOutcome.SUCCESS}
    assert env.runs == Counter({"wf-0007/1": 1})


def test_commands_answered_above_a_slow_one_are_not_answered_again(
    env: Env, tmp_path: Path
) -> None:
    """A slow command holds its partition's committed offset; the answered commands after it
    are listed in the offset's metadata, so a new instance (without this one's dedupe store)
    runs only the slow one again."""
    env.send(env.command(0, sleep_ms=30_000), partition=0)
    env.send(*(env.command(n) for n in range(1, 6)), partition=0)
    with serving(env.service(), timeout=5):
        got = env.replies(5)
        assert sorted(r.workflow_id for r in got) == [f"wf-{n:04d}" for n in range(1, 6)]
        time.sleep(0.5)  # the last commit carries the metadata of all five
    # The first instance stops with wf-0000 unanswered; another one takes over the group.
    env.runs.clear()
    with serving(env.service(state_dir=tmp_path / "other"), timeout=5):
        deadline = time.monotonic() + 15
        while not env.runs and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
    assert env.runs == Counter({"wf-0000/1": 1}), "only the unanswered command ran again"
