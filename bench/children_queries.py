"""What a child workflow and a query cost against the broker: the time from start to result of
a parent (one step, then one child of one step, on another partition) next to the kit's saga of
three steps, and the round trip of a query (by URL, and with the node found from the group).

    PYTHONPATH=. python bench/children_queries.py [runs]

Prints figures; asserts nothing about them (a shared 2-core machine is noisy).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.integration.kit import Trip, build, settings_for
from tests.integration.stack import running_stack
from tests.integration.test_children import Order, Refs, family


def _bootstrap() -> str:
    found = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if found:
        return found
    out = subprocess.run(
        [sys.executable, "-m", "deploy.kafka.broker", "bootstrap"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip()


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    p50 = statistics.median(ordered)
    return f"p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms (n={len(ordered)})"


def main(runs: int) -> None:
    namespace = f"bench-children-{uuid.uuid4().hex[:8]}"
    kit = build(namespace)
    for cls in family(kit):
        kit.registry.add(cls)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(_bootstrap(), namespace, Path(tmp), metrics_port=0)
        with running_stack(kit, settings) as stack:
            client = stack.client
            stack.run(Trip(), "warm-up")
            plain, children = [], []
            for i in range(runs):
                began = time.monotonic()
                stack.run(Trip(), f"trip-{i}")
                plain.append(time.monotonic() - began)
                began = time.monotonic()
                handle = client.start("parent", Order(child_id=f"kid-{i}"), workflow_id=f"p-{i}")
                handle.result(Refs, timeout=60)
                children.append(time.monotonic() - began)
            print(f"saga of 3 steps, start to result:          {_ms(plain)}")
            print(f"parent: 1 step + a child of 1 step:        {_ms(children)}")

            client.start("parent", Order(child_id="kid-q", child_waits=True), workflow_id="q")
            node = stack._node[2] if stack._node else None
            assert node is not None and node.http_port is not None
            url = f"http://127.0.0.1:{node.http_port}"
            while client.query("q", "progress", url=url) != "waiting for kid-q":
                time.sleep(0.05)
            by_url, found = [], []
            for _ in range(runs * 5):
                began = time.monotonic()
                client.query("q", "progress", url=url)
                by_url.append(time.monotonic() - began)
            os.environ["SAGA_NODE_URLS"] = f"{settings.node_id}={url}"
            for _ in range(runs):
                began = time.monotonic()
                client.query("q", "progress")
                found.append(time.monotonic() - began)
            print(f"query by URL:                               {_ms(by_url)}")
            print(f"query, node found from the group:           {_ms(found)}")
            client.cancel("q")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
