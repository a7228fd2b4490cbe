"""Opening a local RocksDB database the one way every component does (raw bytes in and out).

The orchestrator's partition stores, the services SDK's dedupe store and the example services'
own stores all keep local state this way, so a database written by one version of the code is
read the same way by the next.
"""

from __future__ import annotations

from pathlib import Path

from rocksdict import Options, Rdict


def open_local_db(path: Path) -> Rdict:
    """A RocksDB database at ``path`` (created with its parent folders if missing), raw mode."""
    path.mkdir(parents=True, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    return Rdict(str(path), options)
