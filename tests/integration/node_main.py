"""Run an orchestrator node for the kit's saga in its own process (for tests that kill it).

python -m tests.integration.node_main PREFIX NAMESPACE STATE_DIR NODE_ID BOOTSTRAP
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.node import OrchestratorNode

from .kit import build, settings_for


def main() -> None:
    prefix, namespace, state_dir, node_id, bootstrap = sys.argv[1:6]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kit = build(prefix)
    settings = settings_for(bootstrap, namespace, Path(state_dir), node_id)
    try:
        OrchestratorNode(settings, kit.registry).run()
    except OrchestratorError as exc:
        raise SystemExit(f"Error: {exc}") from None  # one line, as `orchestrator run` prints


if __name__ == "__main__":
    main()
