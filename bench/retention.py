"""What a node's retention check costs with 100,000 workflows held.

Every 5 s the node looks for workflows that finished longer ago than ``retention_ms`` (7 days by
default). It fills six partition stores as ``bench/list_query.py`` does (summaries over a week,
so some have finished before the cutoff and most have not), then times one pass of each way of
finding what expires:

* the retention index (``PartitionStore.finished_by``: the keys up to the cutoff, each checked
  against its summary), as the node reads it since session 4;
* decoding every summary and filtering (what the node did before).

    PYTHONPATH=. python bench/retention.py [--workflows 100000] [--partitions 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.list_query import fill
from orchestrator._engine.store import PartitionStore

_RETENTION_MS = 7 * 24 * 3600 * 1000


def by_index(stores: list[PartitionStore], cutoff: int) -> int:
    due = 0
    for store in stores:
        for finished_at, wf in store.finished_by(cutoff):
            summary = store.summary(wf)
            due += summary is not None and summary.finished_at_ms == finished_at
    return due


def by_scan(stores: list[PartitionStore], cutoff: int) -> int:
    return sum(
        1
        for store in stores
        for s in store.summaries()
        if s.finished_at_ms is not None and s.finished_at_ms <= cutoff
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    now_ms = int(time.time() * 1000)
    # A pass right after the previous one (nothing due yet), and one that finds the first 6
    # hours of the filled week due (and the older ``legacy-`` workflows) at once.
    cutoffs = {
        "nothing due": now_ms - 2 * _RETENTION_MS,
        "6 h due": now_ms - _RETENTION_MS + 6 * 3_600_000,
    }
    with tempfile.TemporaryDirectory() as tmp:
        stores = [PartitionStore(Path(tmp) / f"p{n}") for n in range(args.partitions)]
        fill(stores, args.workflows, now_ms)
        for label, cutoff in cutoffs.items():
            for name, find in (("retention index", by_index), ("every summary", by_scan)):
                times, found = [], 0
                for _ in range(args.runs):
                    began = time.perf_counter()
                    found = find(stores, cutoff)
                    times.append(time.perf_counter() - began)
                print(
                    f"{label:12} {name:16} {found:6,} due of {args.workflows:,}: median "
                    f"{statistics.median(times) * 1000:8.1f} ms, max {max(times) * 1000:8.1f} ms"
                )
        for store in stores:
            store.close()


if __name__ == "__main__":
    main()
