"""Benchmark: what many concurrent starts and result waiters cost the client process.

    python -m bench.waiters --bootstrap HOST:PORT [--waiters 1000] [--threads 1000] [--nap-ms 4000]

A node runs in its own process (``orchestrator run --workflows bench._nap``) with a workflow that
sleeps ``--nap-ms`` (a durable timer) and returns its tag: no services, so everything a workflow
costs is in the node's process, and this process's CPU time (``time.process_time``: every thread,
librdkafka's included) is what the client spends starting and waiting. Phases:

1. **idle**: the client's results subscription open and nothing waiting, for a few seconds: what
   the background consumer costs per second on its own.
2. **async**: ``--waiters`` workflows started at once on one :class:`AsyncClient`
   (``asyncio.gather``), then one ``result()`` waiter each, all pending together until the naps
   end. Figures: starts/s, the start phase's CPU, and the wait phase's CPU (registering the
   waiters, waking them, decoding their results) minus the idle cost over the same time.
3. **sync**: ``--threads`` threads on one :class:`Client`, each starting one workflow at the same
   moment (a barrier) and then waiting for its result: starts/s, each ``start()`` call's latency
   p50/p99, and the same CPU split.

Every waiter must get its own workflow's tag; a wrong or missing one is counted and fails the run.
``--sync-only`` runs phases 1 and 3 with only ``Client.start``/``Client.result`` (so the same file
can measure an older client). The last line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench._nap import Nap, Woke
from orchestrator.client import Client
from orchestrator.settings import Settings
from orchestrator.topics import delete_topics, ensure_topics

TARGET_WAIT_CPU_S = 1.0  # issue #12: 1,000 waiters cost < 1 core-second beyond the workflows


def say(line: str) -> None:
    print(line, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Cpu:
    """Process CPU seconds and wall seconds since the last mark."""

    def __init__(self) -> None:
        self.cpu = time.process_time()
        self.wall = time.perf_counter()

    def lap(self) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        out = (cpu - self.cpu, wall - self.wall)
        self.cpu, self.wall = cpu, wall
        return out


def start_node(
    bootstrap: str, namespace: str, partitions: int, state: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SAGA_NAMESPACE": namespace,
        "SAGA_PARTITIONS": str(partitions),
        "SAGA_STATE_DIR": str(state),
        "SAGA_NODE_ID": "bench-waiters",
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
    }
    code = "from orchestrator.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--log-level", "WARNING", "run", "--workflows", "bench._nap"],
        env=env,
    )


def idle_cost(seconds: float) -> float:
    """CPU seconds per second of this process while the client has nothing to do."""
    cpu = Cpu()
    time.sleep(seconds)
    spent, wall = cpu.lap()
    return spent / wall


async def async_phase(settings: Settings, n: int, nap_ms: int, idle: float) -> dict[str, Any]:
    from orchestrator.aio import AsyncClient

    async with AsyncClient(settings) as client:
        await client.result((await client.start("nap", Nap(ms=0, tag="w"))).workflow_id, Woke)
        cpu = Cpu()
        handles = await asyncio.gather(
            *(client.start("nap", Nap(ms=nap_ms, tag=f"a{i}")) for i in range(n))
        )
        start_cpu, start_wall = cpu.lap()
        results = await asyncio.gather(
            *(h.result(Woke, timeout=nap_ms / 1000 + 120) for h in handles),
            return_exceptions=True,
        )
        wait_cpu, wait_wall = cpu.lap()
    wrong = sum(1 for i, r in enumerate(results) if not isinstance(r, Woke) or r.tag != f"a{i}")
    return {
        "waiters": n,
        "starts_per_s": round(n / start_wall, 1),
        "start_cpu_s": round(start_cpu, 3),
        "start_wall_s": round(start_wall, 3),
        "wait_wall_s": round(wait_wall, 3),
        "wait_cpu_s": round(wait_cpu, 3),
        "wait_cpu_beyond_idle_s": round(wait_cpu - idle * wait_wall, 3),
        "total_cpu_s": round(start_cpu + wait_cpu, 3),
        "wrong": wrong,
    }


def sync_phase(settings: Settings, threads: int, nap_ms: int, idle: float) -> dict[str, Any]:
    with Client(settings) as client:
        client.result(client.start("nap", Nap(ms=0, tag="w")).workflow_id, Woke, timeout=60)
        barrier = threading.Barrier(threads + 1)
        started = threading.Barrier(threads + 1)
        latencies: list[float] = []
        outcomes: dict[int, Any] = {}
        lock = threading.Lock()

        def one(i: int) -> None:
            barrier.wait()
            t0 = time.perf_counter()
            try:
                handle = client.start("nap", Nap(ms=nap_ms, tag=f"s{i}"))
            finally:
                took = time.perf_counter() - t0
                with lock:
                    latencies.append(took)
                started.wait()
            try:
                outcome: Any = handle.result(Woke, timeout=nap_ms / 1000 + 120)
            except Exception as exc:
                outcome = exc
            with lock:
                outcomes[i] = outcome

        workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        barrier.wait()
        cpu = Cpu()
        started.wait()
        start_cpu, start_wall = cpu.lap()
        for w in workers:
            w.join()
        wait_cpu, wait_wall = cpu.lap()
    wrong = sum(
        1
        for i in range(threads)
        if not isinstance(outcomes.get(i), Woke) or outcomes[i].tag != f"s{i}"
    )
    return {
        "threads": threads,
        "starts_per_s": round(threads / start_wall, 1),
        "start_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "start_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "start_cpu_s": round(start_cpu, 3),
        "start_wall_s": round(start_wall, 3),
        "wait_wall_s": round(wait_wall, 3),
        "wait_cpu_s": round(wait_cpu, 3),
        "wait_cpu_beyond_idle_s": round(wait_cpu - idle * wait_wall, 3),
        "wrong": wrong,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--nap-ms", type=int, default=4000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--sync-only", action="store_true")
    args = parser.parse_args(argv)

    namespace = f"bench-waiters-{uuid.uuid4().hex[:8]}"
    state = Path(tempfile.mkdtemp(prefix="bench-waiters-"))
    ensure_topics(args.bootstrap, namespace, args.partitions)
    settings = Settings(  # type: ignore[call-arg]  # bootstrap_servers is set by its alias
        KAFKA_BOOTSTRAP_SERVERS=args.bootstrap, namespace=namespace, partitions=args.partitions
    )
    node = start_node(args.bootstrap, namespace, args.partitions, state)
    figures: dict[str, Any] = {"namespace": namespace, "nap_ms": args.nap_ms}
    try:
        with Client(settings) as client:  # the node is up once a workflow comes back
            client.result(client.start("nap", Nap(ms=0, tag="up")).workflow_id, Woke, timeout=120)
            idle = idle_cost(3.0)
        figures["idle_cpu_per_s"] = round(idle, 4)
        say(f"idle: the client process spends {idle * 1000:.1f} ms CPU per second")
        if not args.sync_only:
            a = asyncio.run(async_phase(settings, args.waiters, args.nap_ms, idle))
            figures["async"] = a
            say(
                f"async: {a['waiters']} workflows started at {a['starts_per_s']}/s "
                f"(CPU {a['start_cpu_s']} s); {a['waiters']} waiters pending together for "
                f"{a['wait_wall_s']} s cost {a['wait_cpu_s']} s CPU "
                f"({a['wait_cpu_beyond_idle_s']} s beyond idle); wrong results: {a['wrong']}"
            )
            verdict = "met" if a["total_cpu_s"] < TARGET_WAIT_CPU_S else "MISSED"
            say(
                f"target: starts + waits of {a['waiters']} cost {a['total_cpu_s']} core-s "
                f"< {TARGET_WAIT_CPU_S}: {verdict}"
            )
        s = sync_phase(settings, args.threads, args.nap_ms, idle)
        figures["sync"] = s
        say(
            f"sync: {s['threads']} threads started at {s['starts_per_s']}/s, start() p50 "
            f"{s['start_p50_ms']} ms p99 {s['start_p99_ms']} ms (CPU {s['start_cpu_s']} s); "
            f"waits cost {s['wait_cpu_s']} s CPU over {s['wait_wall_s']} s "
            f"({s['wait_cpu_beyond_idle_s']} s beyond idle); wrong results: {s['wrong']}"
        )
    finally:
        node.terminate()
        try:
            node.wait(20)
        except subprocess.TimeoutExpired:
            node.kill()
        delete_topics(args.bootstrap, namespace)
        shutil.rmtree(state, ignore_errors=True)
    say(json.dumps(figures, sort_keys=True))
    wrong = figures.get("async", {}).get("wrong", 0) + figures["sync"]["wrong"]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
