"""Benchmark: saga throughput, step latency, restore rate, and the raw request->reply limit.

    python -m bench.sagas [--sagas 2000] [--commit-interval-ms 20] [--max-batch 1000] ...

One run against the broker at ``--bootstrap`` (a fresh namespace and fresh service topics, deleted
at the end), in these phases:

1. **throughput**: N three-step sagas started at once; time from the first start to the last
   ``WorkflowResult`` -> sagas/s and steps/s (one step = one activity).
2. **half load**: sagas started at half the phase-1 rate (token bucket) for a few seconds; step
   latency measured at the service: (next command of the workflow consumed) - (previous reply
   produced), p50/p99.
3. **restore**: the node stops, its state directory is deleted, and it starts again (same node
   id, so static group membership hands its partitions back at once) with an empty directory;
   restoring every partition from the history topic -> events/s.
4. **raw limit**: no orchestrator, the same broker and clients: a loop that consumes replies and,
   in one transaction per batch with ``send_offsets_to_transaction``, produces the next request
   for K keys in flight, against the same responder -> round trips/s; first with one key in
   flight (``raw_floor``: what one transactional step costs at best, the floor for latency).
5. **closed loop** (``bench/closed_loop.py``): the example's order saga with its three services on
   the Services SDK, node and services each in its own process, C = 1, 4, 32, 128, 512 sagas in
   flight -> sagas/s, steps/s, start -> result p50/p99 as the client sees it, and the per-hop
   split from the records' timestamps.

``--quick`` runs a short version of all of it (about a minute).

The services are fast responders in a separate process (``bench._services``). Figures are printed
as they come; the last line of stdout is one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import logging
import math
import multiprocessing
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from pydantic import BaseModel

from bench._services import Done, Record, ResponderSpec, Step, run_responder
from bench.closed_loop import LEVELS, parse_levels, run_phase
from bench.closed_loop import Options as ClosedLoopOptions
from contracts import codec
from contracts.activity import ActivityContract
from contracts.envelopes import (
    ActivityCommand,
    Payload,
    StartWorkflow,
    WorkflowResult,
    WorkflowStatus,
)
from orchestrator import tracing, workflow
from orchestrator._kafka_config import consumer_config, producer_config
from orchestrator._payloads import to_payload
from orchestrator.node import GC_THRESHOLD, OrchestratorNode
from orchestrator.settings import Settings
from orchestrator.topics import TopicAdmin, ensure_service_topic, ensure_topics, topic_names
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

log = logging.getLogger("bench")

TARGET_STEPS_PER_S = 2_000.0
TARGET_BURST_STEPS_PER_S = 6_000.0  # issue #13: the all-at-once burst keeps this
TARGET_P99_MS = 100.0
TARGET_RESTORE_EVENTS_PER_S = 20_000.0
QUICK_LEVELS = (1, 4, 128)
QUICK_SECONDS = 3.0
EVENTS_PER_SAGA = 8  # started, 3 x (scheduled, completed), completed


# --------------------------------------------------------------------------- the saga


class Order(BaseModel):
    n: int


# The services are named per run (fresh topics), so the workflow reads its contracts from here.
STEPS: list[tuple[ActivityContract[Step, Done], ActivityContract[Step, Done]]] = []


@workflow.defn(name="bench-three-steps")
class BenchSaga:
    @workflow.run
    async def run(self, ctx: WorkflowContext, order: Order) -> Done:
        async with ctx.saga() as saga:
            last = Done(n=0)
            for n, (do, undo) in enumerate(STEPS, start=1):
                last = await ctx.call(do, Step(n=n))
                saga.on_failure(undo, Step(n=n))
        return last


# --------------------------------------------------------------------------- helpers


def now_ms() -> float:
    return time.time() * 1000.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rnd(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def say(line: str) -> None:
    print(line, flush=True)


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, tick: float = 0.005) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(tick)


def produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            return
        except BufferError:
            producer.poll(0.01)


@dataclass
class Latency:
    """Per-step latency samples from responder records, split at the orchestrator's decision."""

    total: list[float] = field(default_factory=list)  # next command consumed - reply produced
    to_decision: list[float] = field(default_factory=list)  # command sent_at_ms - reply produced
    after_decision: list[float] = field(default_factory=list)  # consumed - command sent_at_ms

    def summary(self) -> dict[str, float | int | None]:
        return {
            "samples": len(self.total),
            "p50_ms": rnd(percentile(self.total, 50)),
            "p90_ms": rnd(percentile(self.total, 90)),
            "p99_ms": rnd(percentile(self.total, 99)),
            "max_ms": rnd(max(self.total, default=math.nan)),
            "reply_to_decision_p50_ms": rnd(percentile(self.to_decision, 50)),
            "reply_to_decision_p99_ms": rnd(percentile(self.to_decision, 99)),
            "decision_to_consumed_p50_ms": rnd(percentile(self.after_decision, 50)),
            "decision_to_consumed_p99_ms": rnd(percentile(self.after_decision, 99)),
        }


def step_latency(records: Iterable[Record], prefix: str, *, with_decision: bool = True) -> Latency:
    """Pair each command of a key with the previous reply for that key (one in flight per key)."""
    by_key: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        if rec[0].startswith(prefix):
            by_key[rec[0]].append(rec)
    out = Latency()
    for recs in by_key.values():
        recs.sort(key=lambda r: r[3])
        seen: set[int] = set()
        prev: Record | None = None
        for rec in recs:
            if with_decision and rec[1] in seen:
                continue  # a redelivered command (after an aborted transaction)
            seen.add(rec[1])
            if prev is not None:
                out.total.append(rec[3] - prev[4])
                if with_decision:
                    out.to_decision.append(rec[2] - prev[4])
                    out.after_decision.append(rec[3] - rec[2])
            prev = rec
    return out


# --------------------------------------------------------------------------- processes, threads


class Responders:
    """The service processes (spawned, so no Kafka client state is forked)."""

    def __init__(self, spec: ResponderSpec, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop: MpEvent = ctx.Event()
        self._procs: list[tuple[SpawnProcess, Connection, MpEvent]] = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            ready = ctx.Event()
            proc = ctx.Process(
                target=run_responder, args=(spec, child, ready, self._stop), daemon=True
            )
            proc.start()
            child.close()
            self._procs.append((proc, parent, ready))

    def wait_ready(self, timeout_s: float) -> None:
        for proc, _conn, ready in self._procs:
            if not ready.wait(timeout_s):
                raise TimeoutError(f"responder {proc.pid} got no partitions in {timeout_s:.0f}s")

    def dump(self) -> list[Record]:
        records: list[Record] = []
        for proc, conn, _ready in self._procs:
            if not proc.is_alive():
                raise RuntimeError(f"responder {proc.pid} died (exit code {proc.exitcode})")
            conn.send("dump")
            if not conn.poll(30):
                raise TimeoutError(f"responder {proc.pid} did not answer")
            records.extend(conn.recv())
        return records

    def stop(self) -> None:
        self._stop.set()
        for proc, conn, _ready in self._procs:
            proc.join(15)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            conn.close()


class ResultsReader(threading.Thread):
    """Notes when each workflow's result arrives (by key; the values are decoded afterwards)."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        super().__init__(name="results-reader", daemon=True)
        self.arrived: dict[str, float] = {}
        self.values: dict[str, bytes] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._consumer = Consumer(consumer_config(bootstrap, group))
        self._consumer.subscribe([topic])

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                msgs = [first, *self._consumer.consume(1000, 0)]
                at = now_ms()
                for msg in msgs:
                    if msg.error() is not None:
                        continue
                    key = (msg.key() or b"").decode()
                    if key in self.arrived:
                        continue
                    self.arrived[key] = at
                    self.values[key] = msg.value() or b""
                    self.counts[key.partition("-")[0]] += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def statuses(self, prefix: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for key, value in self.values.items():
            if key.startswith(prefix + "-"):
                out[codec.decode_as(value, WorkflowResult).status.value] += 1
        return dict(out)


class NodeThread:
    """An orchestrator node in a thread, optionally under cProfile."""

    def __init__(
        self,
        settings: Settings,
        profile: bool,
        *,
        tracer_provider: TracerProvider | None = None,
        with_metrics: bool = True,
    ) -> None:
        self.node = OrchestratorNode(
            settings,
            WorkflowRegistry([BenchSaga]),
            tracer_provider=tracer_provider,
            with_metrics=with_metrics,
        )
        self.stop_event = threading.Event()
        self.profile = cProfile.Profile() if profile else None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="orchestrator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.profile is not None:
                self.profile.runcall(self.node.run, self.stop_event)
            else:
                self.node.run(self.stop_event)
        except BaseException as exc:
            self.error = exc
            log.exception("the orchestrator node failed")

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the orchestrator node failed: {self.error!r}")

    def ready(self, partitions: int) -> bool:
        """Every partition assigned and restored (raises if the node failed)."""
        self.check()
        return len(self.node.counters.restores) >= partitions

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        if self.thread.is_alive():
            raise RuntimeError("the orchestrator node did not stop within 60 s")


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        run = uuid.uuid4().hex[:8]
        self.bootstrap: str = args.bootstrap
        self.ns = f"bench{run}"
        self.services = [f"bench{run}-{s}" for s in ("a", "b", "c")]
        self.ping_requests = f"bench{run}-ping.commands"
        self.ping_replies = f"bench{run}-ping.replies"
        self.state_root = Path(tempfile.mkdtemp(prefix=f"bench-{run}-"))
        self.figures: dict[str, Any] = {}
        self.responders: Responders | None = None
        self.results: ResultsReader | None = None
        self.nodes: list[NodeThread] = []
        self.empty_restore_seconds: list[float] = []
        # Extra librdkafka settings for the node's clients and the raw loop's (as Settings.kafka).
        self.kafka_extra: dict[str, str] = dict(kv.split("=", 1) for kv in args.kafka)
        self.starter = Producer(producer_config(self.bootstrap))
        self.start_times: dict[str, float] = {}
        contracts = [
            (
                ActivityContract(f"{s}.do", s, Step, Done),
                ActivityContract(f"{s}.undo", s, Step, Done),
            )
            for s in self.services
        ]
        STEPS[:] = contracts
        self.input: Payload = to_payload(Order(n=1))

    # ------------------------------------------------------------------ setup and teardown

    def settings(self, node_id: str, state_dir: Path) -> Settings:
        return Settings(
            bootstrap_servers=self.bootstrap,
            namespace=self.ns,
            partitions=self.args.partitions,
            state_dir=state_dir,
            node_id=node_id,
            commit_interval_ms=self.args.commit_interval_ms,
            max_batch=self.args.max_batch,
            kafka=self.kafka_extra,
        )

    def setup(self) -> None:
        parts = self.args.partitions
        ensure_topics(self.bootstrap, self.ns, parts)
        for s in self.services:
            ensure_service_topic(self.bootstrap, f"{s}.commands", parts)
        ensure_service_topic(self.bootstrap, self.ping_requests, parts)
        ensure_service_topic(self.bootstrap, self.ping_replies, parts)
        spec = ResponderSpec(
            bootstrap=self.bootstrap,
            topics=(*(f"{s}.commands" for s in self.services), self.ping_requests),
            group=f"{self.ns}.services",
            fetch_wait_ms=self.args.fetch_wait_ms,
        )
        self.responders = Responders(spec, self.args.responders)
        self.results = ResultsReader(self.bootstrap, f"{self.ns}.results", f"{self.ns}.client")
        self.results.start()
        node = NodeThread(self.settings("bench-1", self.state_root / "node1"), self.args.profile)
        self.nodes.append(node)
        wait_until(
            lambda: node.ready(parts),
            60,
            "the orchestrator to own every partition",
            tick=0.05,
        )
        self.responders.wait_ready(60)
        # What restoring costs with nothing to restore: the fixed part of phase 3's figure.
        self.empty_restore_seconds = [r.seconds for r in node.node.counters.restores]

    def teardown(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        if self.results is not None:
            self.results.stop()
        if self.responders is not None:
            self.responders.stop()
        with contextlib.suppress(Exception):
            self.starter.flush(5)
        if not self.args.keep_topics:
            try:
                topics = [
                    *topic_names(self.ns).all,
                    *(f"{s}.commands" for s in self.services),
                    self.ping_requests,
                    self.ping_replies,
                ]
                TopicAdmin(self.bootstrap).delete(topics)
            except Exception as exc:
                log.warning("could not delete the benchmark topics: %s", exc)
        shutil.rmtree(self.state_root, ignore_errors=True)

    # ------------------------------------------------------------------ starting sagas

    def start_payload(self, wf: str) -> bytes:
        start = StartWorkflow(
            workflow_id=wf,
            workflow_type="bench-three-steps",
            request_id=wf,
            input=self.input,
            sent_at_ms=int(now_ms()),
        )
        return codec.encode(start)

    def wait_results(self, prefix: str, count: int, timeout_s: float) -> None:
        results = self.results
        assert results is not None

        def done() -> bool:
            if results.error is not None:
                raise RuntimeError(f"results reader failed: {results.error!r}")
            for node in self.nodes:
                node.check()
            return results.counts[prefix] >= count

        wait_until(done, timeout_s, f"{count} results of {prefix!r}")

    def check_statuses(self, prefix: str, count: int) -> dict[str, int]:
        assert self.results is not None
        statuses = self.results.statuses(prefix)
        if statuses.get(WorkflowStatus.COMPLETED.value, 0) != count:
            log.warning("%s: not every saga completed: %s", prefix, statuses)
        return statuses

    def warm_up(self) -> None:
        count = 20
        for i in range(count):
            wf = f"w-{i}"
            produce(self.starter, f"{self.ns}.inbox", wf.encode(), self.start_payload(wf))
        self.starter.flush(10)
        self.wait_results("w", count, 60)
        assert self.responders is not None
        self.responders.dump()  # drop the warm-up's records

    # ------------------------------------------------------------------ phase 1

    def burst(self, prefix: str, n: int) -> tuple[float, float]:
        """Start n sagas at once; (seconds to the last result, seconds to produce the starts)."""
        payloads = [(f"{prefix}-{i}", self.start_payload(f"{prefix}-{i}")) for i in range(n)]
        inbox = f"{self.ns}.inbox"
        t0 = now_ms()
        for wf, value in payloads:
            produce(self.starter, inbox, wf.encode(), value)
        self.starter.flush(30)
        produced = now_ms()
        self.wait_results(prefix, n, max(60.0, n / 50))
        assert self.results is not None
        last = max(v for k, v in self.results.arrived.items() if k.startswith(f"{prefix}-"))
        return (last - t0) / 1000, (produced - t0) / 1000

    def throughput(self) -> float:
        n = self.args.sagas
        seconds, produce_seconds = self.burst("p1", n)
        assert self.responders is not None
        sagas_per_s = float(n / seconds)
        lat = step_latency(self.responders.dump(), "p1-")
        statuses = self.check_statuses("p1", n)
        self.figures["throughput"] = {
            "sagas": n,
            "seconds": round(seconds, 3),
            "start_produce_seconds": round(produce_seconds, 3),
            "sagas_per_s": round(sagas_per_s, 1),
            "steps_per_s": round(3 * sagas_per_s, 1),
            "statuses": statuses,
            "step_latency_at_full_load": lat.summary(),
        }
        say(
            f"[1] throughput: {n} sagas in {seconds:.2f}s = {sagas_per_s:.0f} sagas/s, "
            f"{3 * sagas_per_s:.0f} steps/s (statuses {statuses}); step latency under that "
            f"load p50 {percentile(lat.total, 50):.1f} ms, p99 {percentile(lat.total, 99):.1f} ms"
        )
        return sagas_per_s

    # ------------------------------------------------------------------ observability cost

    def observability_cost(self) -> None:
        """Phase 1 again on nodes that differ only in what they observe, in one run: nothing;
        metrics (what ``orchestrator run`` does when no span exporter is configured: trace
        context is passed on, no spans made); metrics + 10 % of workflows traced (parent-based
        ratio sampling) to a JSON-lines file; metrics + every span to the file.
        """
        n = max(self.args.sagas, 3000)
        state_dir = self.state_root / "node-observability"
        spans = self.state_root / "spans.jsonl"
        variants: dict[str, tuple[bool, float]] = {
            # label: (metrics, fraction of workflows traced)
            "none": (False, 0.0),
            "metrics": (True, 0.0),
            "metrics+10%_traced": (True, 0.1),
            "metrics+all_traced": (True, 1.0),
        }
        rates: dict[str, float] = {}
        # Each variant twice, interleaved, keeping its better run: one burst on a shared 2-core
        # machine varies by ±20 %, more than some of the differences measured here.
        rounds = [*variants.items(), *variants.items()]
        for i, (label, (metrics, traced)) in enumerate(rounds):
            provider = None
            if traced > 0:
                sampler = ParentBased(TraceIdRatioBased(traced))
                provider = tracing.setup("bench", span_file=spans, sampler=sampler)
            node = NodeThread(
                self.settings("bench-1", state_dir),
                False,
                tracer_provider=provider,
                with_metrics=metrics,
            )
            self.nodes.append(node)
            wait_until(partial(node.ready, self.args.partitions), 120, "a node", tick=0.01)
            seconds, _ = self.burst(f"o{i}", n)
            rates[label] = max(rates.get(label, 0.0), 3 * n / seconds)
            node.stop()
            if provider is not None:
                provider.shutdown()
        assert self.responders is not None
        self.responders.dump()
        base = rates["none"]
        span_count = sum(1 for _ in spans.open()) if spans.exists() else 0
        self.figures["observability"] = {
            "sagas_per_variant": n,
            "steps_per_s": {k: round(v, 1) for k, v in rates.items()},
            "ratio_to_none": {k: round(v / base, 3) for k, v in rates.items()},
            "spans_written": span_count,
        }
        say(
            "[1b] observability, steps/s (ratio to none): "
            + ", ".join(f"{k} {v:.0f} ({v / base:.0%})" for k, v in rates.items())
            + f"; {span_count} spans written"
        )

    # ------------------------------------------------------------------ phase 2

    def half_load(self, rate: float) -> None:
        duration = self.args.half_load_seconds
        count = max(1, int(rate * duration))
        payloads = [(f"p2-{i}", self.start_payload(f"p2-{i}")) for i in range(count)]
        inbox = f"{self.ns}.inbox"
        t0 = time.monotonic()
        sent = 0
        while sent < count:
            due = min(count, int((time.monotonic() - t0) * rate) + 1)  # token bucket, burst 1
            while sent < due:
                wf, value = payloads[sent]
                self.start_times[wf] = now_ms()
                produce(self.starter, inbox, wf.encode(), value)
                sent += 1
            self.starter.poll(0)
            time.sleep(0.002)
        self.starter.flush(30)
        pacing = time.monotonic() - t0
        self.wait_results("p2", count, 60 + duration)
        assert self.results is not None and self.responders is not None
        records = self.responders.dump()
        if self.args.dump_records:
            Path(self.args.dump_records).write_text(json.dumps(records))
        lat = step_latency(records, "p2-")
        e2e = [
            self.results.arrived[wf] - self.start_times[wf]
            for wf, _ in payloads
            if wf in self.results.arrived
        ]
        statuses = self.check_statuses("p2", count)
        summary = lat.summary()
        self.figures["half_load"] = {
            "rate_sagas_per_s": round(rate, 1),
            "sagas": count,
            "pacing_seconds": round(pacing, 2),
            "statuses": statuses,
            "step_latency": summary,
            "saga_latency_p50_ms": rnd(percentile(e2e, 50)),
            "saga_latency_p99_ms": rnd(percentile(e2e, 99)),
        }
        say(
            f"[2] half load ({rate:.0f} sagas/s for {pacing:.1f}s, {count} sagas): step latency "
            f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms (reply->decision p50 "
            f"{summary['reply_to_decision_p50_ms']} ms, decision->consumed p50 "
            f"{summary['decision_to_consumed_p50_ms']} ms); whole saga p50 "
            f"{percentile(e2e, 50):.0f} ms, p99 {percentile(e2e, 99):.0f} ms"
        )

    # ------------------------------------------------------------------ phase 3

    def restore(self, expected_events: int) -> None:
        first = self.nodes[0]
        first.stop()
        self.print_profile(first, "node 1 (load)")
        shutil.rmtree(self.state_root / "node1", ignore_errors=True)
        began = time.monotonic()
        node = NodeThread(self.settings("bench-1", self.state_root / "node2"), self.args.profile)
        self.nodes.append(node)
        parts = self.args.partitions
        wait_until(
            lambda: node.ready(parts),
            120,
            "the new node to restore every partition",
            tick=0.01,
        )
        wall = time.monotonic() - began
        reports = list(node.node.counters.restores)
        node.stop()
        self.print_profile(node, "node 2 (restore)")
        events = sum(r.events for r in reports)
        # Partitions assigned together are restored together; each report carries that time.
        seconds = max(r.seconds for r in reports)
        rate = events / seconds if seconds > 0 else 0.0
        per_partition = [round(r.events_per_second) for r in reports]
        fixed = max(self.empty_restore_seconds, default=0.0)
        marginal = events / (seconds - fixed) if seconds > fixed else math.nan
        self.figures["restore"] = {
            "events": events,
            "expected_events": expected_events,
            "tombstones": sum(r.tombstones for r in reports),
            "partitions": len(reports),
            "restore_seconds": round(seconds, 3),
            "events_per_s": round(rate),
            "per_partition_events_per_s": per_partition,
            "wall_seconds_from_node_start": round(wall, 3),
            "empty_restore_seconds": round(fixed, 3),
            "events_per_s_beyond_empty_restore": rnd(marginal, 0),
        }
        say(
            f"[3] restore: {events} events (expected {expected_events}) of {len(reports)} "
            f"partitions in {seconds:.2f}s = {rate:.0f} events/s (node start to restored: "
            f"{wall:.2f}s); restoring the same partitions empty took {fixed:.2f}s, so "
            f"{marginal:.0f} events/s beyond that fixed cost"
        )

    def print_profile(self, node: NodeThread, label: str) -> None:
        if node.profile is None:
            return
        out = io.StringIO()
        stats = pstats.Stats(node.profile, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        if self.args.profile_out:
            stats.dump_stats(f"{self.args.profile_out}.{label.split()[1]}")
        print(f"===== cProfile of {label}\n{out.getvalue()}", file=sys.stderr)

    # ------------------------------------------------------------------ phase 4

    def raw_limit(self, keys: int, duration: float, label: str = "raw_limit") -> None:
        producer = Producer(
            producer_config(
                self.bootstrap, transactional_id=f"{self.ns}.{label}", extra=self.kafka_extra
            )
        )
        producer.init_transactions(30)
        consumer = Consumer(
            consumer_config(self.bootstrap, f"{self.ns}.{label}", extra=self.kafka_extra)
        )
        consumer.subscribe([self.ping_replies])
        wait_until(lambda: bool(consumer.poll(0.05) is None and consumer.assignment()), 60, "")
        commands = {
            f"ping-{i}".encode(): codec.encode(
                ActivityCommand(
                    workflow_id=f"ping-{i}",
                    activity_name="ping",
                    seq=1,
                    attempt=1,
                    idempotency_key=f"ping-{i}/1",
                    is_compensation=False,
                    input=self.input,
                    reply_topic=self.ping_replies,
                    sent_at_ms=0,
                )
            )
            for i in range(keys)
        }
        trips = transactions = 0
        offsets_ms: list[float] = []  # send_offsets_to_transaction, per transaction
        commit_ms: list[float] = []  # commit_transaction, per transaction
        warm = 1.0
        mark: tuple[float, int] | None = None
        try:
            producer.begin_transaction()
            for key, value in commands.items():
                produce(producer, self.ping_requests, key, value)
            producer.commit_transaction(30)
            t0 = time.monotonic()
            while (now := time.monotonic()) - t0 < duration:
                if mark is None and now - t0 >= warm:
                    mark = (now, trips)
                first = consumer.poll(0.1)
                if first is None:
                    continue
                msgs = [first, *consumer.consume(self.args.max_batch - 1, 0)]
                offsets: dict[int, int] = {}
                producer.begin_transaction()
                for msg in msgs:
                    if msg.error() is not None:
                        continue
                    key = msg.key() or b""
                    produce(producer, self.ping_requests, key, commands[key])
                    offsets[msg.partition() or 0] = (msg.offset() or 0) + 1
                    trips += 1
                called = time.monotonic()
                producer.send_offsets_to_transaction(
                    [TopicPartition(self.ping_replies, p, o) for p, o in offsets.items()],
                    consumer.consumer_group_metadata(),
                    30,
                )
                sent = time.monotonic()
                producer.commit_transaction(30)
                if mark is not None:
                    offsets_ms.append((sent - called) * 1000)
                    commit_ms.append((time.monotonic() - sent) * 1000)
                transactions += 1
            end = time.monotonic()
        except KafkaException as exc:
            raise RuntimeError(f"the raw request/reply loop failed: {exc}") from exc
        finally:
            consumer.close()
            producer.flush(10)
        assert self.responders is not None
        if mark is None:
            mark = (t0, 0)
        rate = (trips - mark[1]) / (end - mark[0])
        lat = step_latency(self.responders.dump(), "ping-", with_decision=False)
        self.figures[label] = {
            "keys_in_flight": keys,
            "seconds": round(end - t0, 2),
            "round_trips": trips,
            "transactions": transactions,
            "round_trips_per_s": round(rate, 1),
            "round_trip_p50_ms": rnd(percentile(lat.total, 50)),
            "round_trip_p99_ms": rnd(percentile(lat.total, 99)),
            "send_offsets_p50_ms": rnd(percentile(offsets_ms, 50), 2),
            "commit_p50_ms": rnd(percentile(commit_ms, 50), 2),
        }
        say(
            f"[4] {label}: {rate:.0f} transactional round trips/s with {keys} keys in flight "
            f"({transactions} transactions, {trips / max(transactions, 1):.0f} per transaction); "
            f"reply->next request p50 {percentile(lat.total, 50):.1f} ms, "
            f"p99 {percentile(lat.total, 99):.1f} ms; per transaction p50: "
            f"send_offsets_to_transaction {percentile(offsets_ms, 50):.2f} ms, "
            f"commit_transaction {percentile(commit_ms, 50):.2f} ms"
        )

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        args = self.args
        began = time.monotonic()
        say(
            f"bench: namespace {self.ns}, {args.partitions} partitions, "
            f"commit_interval_ms={args.commit_interval_ms}, max_batch={args.max_batch}, "
            f"extra librdkafka settings {self.kafka_extra or 'none'}, responders' "
            f"fetch.wait.max.ms={args.fetch_wait_ms}, gc threshold {gc.get_threshold()}, "
            f"{args.responders} responder process(es)"
        )
        self.setup()
        self.warm_up()
        sagas_per_s = self.throughput()
        rate = args.half_rate if args.half_rate else sagas_per_s / 2
        self.half_load(rate)
        total_sagas = 20 + args.sagas + self.figures["half_load"]["sagas"]
        if not args.skip_restore:
            self.restore(total_sagas * EVENTS_PER_SAGA)
        else:
            self.nodes[0].stop()
            self.print_profile(self.nodes[0], "node 1 (load)")
        if not args.skip_observability:
            self.observability_cost()
        if args.ping_seconds > 0:
            # The floor for one step: a transactional round trip with a single key in flight.
            self.raw_limit(1, max(2.0, args.ping_seconds / 2), "raw_floor")
            self.raw_limit(args.ping_keys, args.ping_seconds)
        if not args.skip_closed_loop:
            self.closed_loop()
        self.figures["settings"] = {
            "sagas": args.sagas,
            "partitions": args.partitions,
            "commit_interval_ms": args.commit_interval_ms,
            "max_batch": args.max_batch,
            "kafka": self.kafka_extra,
            "responders_fetch_wait_max_ms": args.fetch_wait_ms,
            "gc_threshold": list(gc.get_threshold()),
            "responders": args.responders,
            "quick": args.quick,
        }
        self.figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
        self.figures["commit"] = git_commit()
        self.figures["targets"] = self.verdicts()
        self.figures["run_seconds"] = round(time.monotonic() - began, 1)
        return self.figures

    def closed_loop(self) -> None:
        """Phase 5: the example's saga and its SDK services, each in its own process, with C
        sagas in flight (``bench/closed_loop.py``)."""
        levels: tuple[int, ...] = self.args.closed_loop_levels
        seconds = self.args.closed_loop_seconds
        if self.args.quick:
            levels, seconds = QUICK_LEVELS, QUICK_SECONDS
        env = {"SAGA_COMMIT_INTERVAL_MS": str(self.args.commit_interval_ms)}
        for key, value in self.kafka_extra.items():  # as Settings.kafka reads them
            env[f"SAGA_KAFKA__{key.upper().replace('.', '_')}"] = value
        self.figures["closed_loop"] = run_phase(
            ClosedLoopOptions(
                bootstrap=self.bootstrap,
                levels=levels,
                seconds=seconds,
                partitions=self.args.partitions,
                extra_env=env,
            )
        )

    def verdicts(self) -> dict[str, str]:
        out: dict[str, str] = {}
        out.update(self.figures.get("closed_loop", {}).get("targets", {}))
        steps = self.figures["throughput"]["steps_per_s"]
        out["steps_per_s>=2000"] = "PASS" if steps >= TARGET_STEPS_PER_S else "MISS"
        out["burst_steps_per_s>=6000"] = "PASS" if steps >= TARGET_BURST_STEPS_PER_S else "MISS"
        p99 = self.figures["half_load"]["step_latency"]["p99_ms"]
        out["p99_step_ms_at_half_load<100"] = (
            "PASS" if p99 is not None and p99 < TARGET_P99_MS else "MISS"
        )
        if "restore" in self.figures:
            rate = self.figures["restore"]["events_per_s"]
            out["restore_events_per_s>=20000"] = (
                "PASS" if rate >= TARGET_RESTORE_EVENTS_PER_S else "MISS"
            )
        return out


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=False,
        )
    except OSError:
        return ""
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        cwd=Path(__file__).parent,
        check=False,
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _key_value(text: str) -> str:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return f"{key.strip()}={value.strip()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sagas", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", default="127.0.0.1:39092")
    p.add_argument("--sagas", type=int, default=2000, help="phase 1: sagas started at once")
    p.add_argument("--partitions", type=int, default=6)
    fields = Settings.model_fields
    p.add_argument(
        "--commit-interval-ms",
        type=int,
        default=fields["commit_interval_ms"].default,
        help="the node's setting (default: the Settings default)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=fields["max_batch"].default,
        help="the node's setting (default: the Settings default)",
    )
    p.add_argument(
        "--kafka",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka setting for the node's clients (Settings.kafka) and the raw "
        "loop's, e.g. retry.backoff.ms=5 or fetch.wait.max.ms=1; repeatable",
    )
    p.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=5,
        help="fetch.wait.max.ms of the responders' consumers",
    )
    p.add_argument(
        "--gc-threshold",
        default=",".join(str(n) for n in GC_THRESHOLD),
        help="gc.set_threshold for this process (which hosts the node); the default is what "
        "'orchestrator run' sets; '' keeps Python's",
    )
    p.add_argument("--responders", type=int, default=1, help="service processes")
    p.add_argument("--half-load-seconds", type=float, default=10.0)
    p.add_argument("--half-rate", type=float, default=0.0, help="override the phase-2 rate")
    p.add_argument("--ping-keys", type=int, default=2000, help="phase 4: keys in flight")
    p.add_argument("--ping-seconds", type=float, default=8.0, help="phase 4 length (0: skip)")
    p.add_argument(
        "--closed-loop-levels",
        type=parse_levels,
        default=LEVELS,
        help="phase 5: sagas in flight, one closed loop each (default 1,4,32,128,512)",
    )
    p.add_argument("--closed-loop-seconds", type=float, default=6.0, help="phase 5, per level")
    p.add_argument("--skip-closed-loop", action="store_true", help="skip phase 5")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run (about a minute): 1,000 sagas, 3 s of half load, no restore or "
        "tracing phase, 3 s raw limit, closed loop at C = 1, 4, 128 for 3 s each",
    )
    p.add_argument("--skip-restore", action="store_true")
    p.add_argument("--skip-observability", action="store_true", help="skip phase 1b (tracing cost)")
    p.add_argument("--profile", action="store_true", help="cProfile the nodes (to stderr)")
    p.add_argument("--profile-out", default="", help="also dump the pstats to this file")
    p.add_argument("--keep-topics", action="store_true")
    p.add_argument("--dump-records", default="", help="write phase 2's service records (JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.sagas = min(args.sagas, 1000)
        args.half_load_seconds = min(args.half_load_seconds, 3.0)
        args.ping_seconds = min(args.ping_seconds, 3.0)
        args.skip_restore = args.skip_observability = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    bench = Bench(args)
    try:
        figures = bench.run()
    finally:
        bench.teardown()
    for name, verdict in figures["targets"].items():
        say(f"target {name}: {verdict}")
    say(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
