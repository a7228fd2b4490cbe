"""A service whose handler heartbeats for ever, in its own process, so a test can SIGKILL it.

python -m tests.integration.heartbeat_service BOOTSTRAP NAMESPACE SERVICE STATE_DIR BEATS_FILE

Each heartbeat's page number is appended to BEATS_FILE after it was handed to the SDK.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from contracts.activity import ActivityContract
from orchestrator.service import CommandInfo, Service
from orchestrator.settings import Settings


class Pages(BaseModel):
    count: int


class Resumed(BaseModel):
    attempt: int
    details: dict[str, int] | None = None


def contract(service: str) -> ActivityContract[Pages, Resumed]:
    return ActivityContract("beats.scan", service, Pages, Resumed)


def main() -> None:
    bootstrap, namespace, name, state_dir, beats_file = sys.argv[1:6]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings(
        bootstrap_servers=bootstrap,
        namespace=namespace,
        state_dir=Path(state_dir),
        node_id="beating",
        kafka={"session.timeout.ms": "6000"},
    )
    service = Service(name, settings)
    beats = Path(beats_file)

    @service.handler(contract(name))
    def scan(arg: Pages, info: CommandInfo) -> Resumed:
        for page in range(1, arg.count + 1):
            info.heartbeat({"page": page})
            with beats.open("a") as out:
                out.write(f"{info.attempt} {page}\n")
            time.sleep(0.3)
        return Resumed(attempt=info.attempt)

    service.run()


if __name__ == "__main__":
    main()
