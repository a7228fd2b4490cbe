"""How fast a node answers an operator's filtered list over 100,000 workflows.

Fills the partition stores of one node (RocksDB, as the engine writes them: summaries, the
visibility index and its counts in one write batch per chunk) with summaries of a realistic mix
of statuses, types and start times, then times the first page (and a later one) of lists with
each filter, through the query API handler as the node's HTTP thread calls it (JSON included),
and the counts. For comparison it also times what a list without the index would cost: decoding
and filtering every summary.

    PYTHONPATH=. python bench/list_query.py [--workflows 100000] [--partitions 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from orchestrator._engine.store import PartitionStore, StoreBatch, WorkflowSummary
from orchestrator.partitioner import partition_for
from orchestrator.visibility import OwnedStores, VisibilityApi, WorkflowPage

_MIX = [  # status, share
    ("COMPLETED", 0.80),
    ("RUNNING", 0.10),
    ("COMPENSATED", 0.05),
    ("FAILED", 0.02),
    ("PARKED", 0.015),
    ("CANCELLED", 0.01),
    ("BLOCKED", 0.005),
]
_TYPES = ["place-order", "refund", "ship", "subscribe", "onboard"]
_WEEK_MS = 7 * 24 * 3600 * 1000
_OLD = 6_000


def fill(stores: list[PartitionStore], workflows: int, now_ms: int, seed: int = 7) -> float:
    rng = random.Random(seed)
    statuses = [s for s, _ in _MIX]
    weights = [w for _, w in _MIX]
    batches = [StoreBatch() for _ in stores]
    began = time.perf_counter()
    for i in range(workflows):
        status = rng.choices(statuses, weights)[0]
        started = now_ms - rng.randrange(_WEEK_MS)
        wf = f"order-{i:07d}"
        if i >= workflows - _OLD:
            # The worst case of a prefix list: many matches, all older than everything else.
            started, wf = now_ms - _WEEK_MS - rng.randrange(_WEEK_MS), f"legacy-{i:07d}"
        finished = None if status in ("RUNNING", "BLOCKED") else started + rng.randrange(60_000)
        summary = WorkflowSummary(
            workflow_id=wf,
            workflow_type=rng.choice(_TYPES),
            status=status,
            last_seq=12,
            next_due_ms=started + 60_000 if finished is None else None,
            finished_at_ms=finished,
            started_at_ms=started,
            updated_at_ms=finished or started + 1_000,
            waiting_for="" if finished else "charge #4 attempt 2",
            steps_done=3,
            attempts=5,
            retries=1,
            reason="Refused: out of stock" if status in ("COMPENSATED", "PARKED") else None,
        )
        number = partition_for(wf, len(stores))
        batches[number].set_summary(summary, None)
        if len(batches[number].summaries) >= 5_000:
            stores[number].write(batches[number])
            batches[number] = StoreBatch()
    for store, batch in zip(stores, batches, strict=True):
        store.write(batch)
    return time.perf_counter() - began


def timed(
    api: VisibilityApi, path: str, params: dict[str, str], runs: int
) -> tuple[list[float], bytes]:
    query = urlencode(params)
    times = []
    body = b""
    for _ in range(runs):
        began = time.perf_counter()
        status, body, _ = api(path, query) or (0, b"", "")
        times.append(time.perf_counter() - began)
        assert status == 200, body
    return times, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    now_ms = int(time.time() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        stores = [PartitionStore(Path(tmp) / f"p{n}") for n in range(args.partitions)]
        seconds = fill(stores, args.workflows, now_ms)
        print(
            f"filled {args.partitions} partition stores with {args.workflows:,} summaries in "
            f"{seconds:.1f} s ({args.workflows / seconds:,.0f}/s, index and counts included)"
        )
        owned = OwnedStores()
        for n, store in enumerate(stores):
            owned.add(n, store)
        api = VisibilityApi(owned, "bench")
        hour_ago = str(now_ms - 3_600_000)
        cases: list[tuple[str, dict[str, str]]] = [
            ("newest 50, no filter", {}),
            ("status=PARKED", {"status": "PARKED"}),
            ("status=FAILED,PARKED,BLOCKED", {"status": "FAILED,PARKED,BLOCKED"}),
            ("type=refund", {"type": "refund"}),
            ("status=RUNNING & type=ship", {"status": "RUNNING", "type": "ship"}),
            ("since 1 h ago", {"since": hour_ago}),
            ("status=COMPENSATED since 1 h ago", {"status": "COMPENSATED", "since": hour_ago}),
            ("prefix=order-00123 (100 matches)", {"prefix": "order-00123"}),
            ("prefix=order-001 (10,000 matches)", {"prefix": "order-001"}),
            ("prefix=order-0000 (1,000 matches)", {"prefix": "order-0000"}),
            ("prefix=legacy- (6,000 matches, all oldest)", {"prefix": "legacy-"}),
            ("prefix=order- (all: walks the time keys)", {"prefix": "order-"}),
            ("prefix matching nothing", {"prefix": "nope"}),
            ("limit=1000, no filter (not a first page)", {"limit": "1000"}),
        ]
        print(f"\nfirst page (limit 50 unless said), {args.runs} runs each, JSON included:")
        print(f"{'query':45} {'rows':>5} {'median':>9} {'max':>9}")
        worst = 0.0
        for name, params in cases:
            times, body = timed(api, "/workflows", params, args.runs)
            page = WorkflowPage.model_validate_json(body)
            if "limit" not in params:
                worst = max(worst, max(times))
            print(
                f"{name:45} {len(page.items):>5} {statistics.median(times) * 1000:>7.2f}ms "
                f"{max(times) * 1000:>7.2f}ms"
            )
            if name == "status=PARKED" and page.next_cursor:
                params = {**params, "cursor": page.next_cursor}
                times, body = timed(api, "/workflows", params, args.runs)
                worst = max(worst, max(times))
                print(
                    f"{'  its second page (cursor)':45} "
                    f"{len(WorkflowPage.model_validate_json(body).items):>5} "
                    f"{statistics.median(times) * 1000:>7.2f}ms {max(times) * 1000:>7.2f}ms"
                )
        times, _ = timed(api, "/workflows/counts", {}, args.runs)
        median_ms, max_ms = statistics.median(times) * 1000, max(times) * 1000
        print(f"{'counts (by status and type)':45} {'':>5} {median_ms:>7.2f}ms {max_ms:>7.2f}ms")
        began = time.perf_counter()
        parked = sorted(
            (s for store in stores for s in store.summaries() if s.status == "PARKED"),
            key=lambda s: s.position.sort_key,
        )[:50]
        brute = time.perf_counter() - began
        print(
            f"\nwithout the index (decode every summary, filter PARKED, sort): "
            f"{brute * 1000:.0f} ms for {len(parked)} rows"
        )
        print(f"slowest first page of 50 above: {worst * 1000:.1f} ms (target < 200 ms)")
        for store in stores:
            store.close()


if __name__ == "__main__":
    main()
