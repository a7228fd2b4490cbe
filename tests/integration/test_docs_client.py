"""The asyncio example of docs/client.md runs as written: ``shop.py`` (the page's service and saga)
as a service process and a node process, then ``order_async.py``; its output is the page's.

The only change to the page's code: the service is renamed ``inventory-<unique>`` so that runs on
a shared broker never meet on one ``inventory.commands`` topic; and its command topic is created
before the processes start (see the fixture).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.topics import TopicAdmin, delete_topics, ensure_service_topic, ensure_topics

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

DOC = Path(__file__).parents[2] / "docs" / "client.md"
ROOT = Path(__file__).parents[2]


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture
def shop(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    service = f"inventory-{uuid.uuid4().hex[:8]}"
    (shop_py,) = [b for b in _blocks("python") if "def serve()" in b]
    (tmp_path / "shop.py").write_text(shop_py.replace('"inventory', f'"{service}'))
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SAGA_NAMESPACE": namespace,
        "SAGA_PARTITIONS": "3",
        "SAGA_STATE_DIR": str(tmp_path / "state"),
        "SAGA_NODE_ID": "n1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
    }
    ensure_topics(kafka_bootstrap, namespace, 3)
    # The page's service creates its command topic as it starts; the node started beside it
    # may send a command first, and an activity whose topic is missing fails (UnknownTopic).
    ensure_service_topic(kafka_bootstrap, f"{service}.commands", 3)
    cli = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
    procs = [
        subprocess.Popen([sys.executable, "shop.py"], cwd=tmp_path, env=env),
        subprocess.Popen([*cli, "run", "--workflows", "shop"], cwd=tmp_path, env=env),
    ]
    try:
        yield env
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_topics(kafka_bootstrap, namespace)
        TopicAdmin(kafka_bootstrap).delete([f"{service}.commands", f"{service}.dlq"])


def test_the_asyncio_example_prints_what_the_page_says(
    shop: dict[str, str], tmp_path: Path
) -> None:
    (example,) = [b for b in _blocks("python") if "AsyncClient(Settings())" in b]
    (tmp_path / "order_async.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "order_async.py"],
        cwd=tmp_path,
        env=shop,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (expected,) = [b for b in _blocks("text") if b.startswith("True\n")]
    assert done.stdout == expected
