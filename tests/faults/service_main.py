"""Run a service in its own process, for fault tests that stop its broker or signal it.

python -m tests.faults.service_main BOOTSTRAP NAMESPACE SERVICE STATE_DIR EFFECTS_DB [KAFKA_JSON]

The handler applies its effect once per idempotency key in a SQLite file the test reads: a row
per key, and a total that only grows when a row was new (what a real service's database does).
A negative ``n`` makes the handler sleep that many seconds first; ``SERVICE_SLEEP_MS`` makes
every handler sleep that long, ``SERVICE_MAX_CONCURRENCY`` sets how many run at once, and
``SERVICE_TRANSACTIONAL=0`` runs the service in the SDK's at-least-once mode.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel

from contracts.activity import ActivityContract
from orchestrator.service import CommandInfo, Service, ServiceError
from orchestrator.settings import Settings

log = logging.getLogger("service_main")


class Work(BaseModel):
    n: int


class Done(BaseModel):
    n: int
    key: str


def contract(service: str) -> ActivityContract[Work, Done]:
    return ActivityContract("faults.work", service, Work, Done)


def _effects(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, n INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS runs (key TEXT)")
    db.execute("CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY, value INTEGER)")
    db.execute("INSERT OR IGNORE INTO total VALUES (1, 0)")
    return db


def main() -> None:
    bootstrap, namespace, name, state_dir, effects_db = sys.argv[1:6]
    kafka = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings(
        bootstrap_servers=bootstrap,
        namespace=namespace,
        state_dir=Path(state_dir),
        node_id="node-1",
        kafka=kafka,
    )
    sleep_s = int(os.environ.get("SERVICE_SLEEP_MS", "0")) / 1000
    concurrency = int(os.environ.get("SERVICE_MAX_CONCURRENCY", "1"))
    lock = threading.Lock()  # one connection, handlers on several threads
    db = _effects(Path(effects_db))
    transactional = os.environ.get("SERVICE_TRANSACTIONAL", "1") != "0"
    service = Service(name, settings, max_concurrency=concurrency, transactional=transactional)

    @service.handler(contract(name))
    def work(arg: Work, info: CommandInfo) -> Done:
        key = info.idempotency_key
        if arg.n < 0:  # a slow handler: the test stops the broker meanwhile
            time.sleep(-arg.n)
        time.sleep(sleep_s)
        with lock:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO runs VALUES (?)", (key,))
            new = db.execute("INSERT OR IGNORE INTO effects VALUES (?, ?)", (key, arg.n)).rowcount
            db.execute("UPDATE total SET value = value + ? WHERE id = 1", (new,))
            db.execute("COMMIT")
        return Done(n=arg.n, key=key)

    try:
        service.run()
    except ServiceError as exc:
        log.error("service %s stopped: %s", name, exc)
        sys.exit(1)
    finally:
        service.close()
    log.info("service %s stopped", name)


if __name__ == "__main__":
    main()
