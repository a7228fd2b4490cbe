"""Opening a local RocksDB database the one way every component does (raw bytes in and out).

The orchestrator's partition stores, the services SDK's dedupe store and the example services'
own stores all keep local state this way, so a database written by one version of the code is
read the same way by the next.
"""

from __future__ import annotations

from pathlib import Path

from rocksdict import Options, Rdict

from orchestrator.errors import StateDirError, StateDirLocked


def open_local_db(path: Path) -> Rdict:
    """A RocksDB database at ``path`` (created with its parent folders if missing), raw mode.

    Raises :class:`~orchestrator.errors.StateDirLocked` when another process holds the
    database, :class:`~orchestrator.errors.StateDirError` when it cannot be created or opened.
    """
    ensure_state_dir(path)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    try:
        return Rdict(str(path), options)
    except Exception as exc:  # rocksdict raises a bare Exception carrying RocksDB's status text
        text = str(exc)
        if "LOCK" in text and "lock" in text.lower():
            raise StateDirLocked(path) from exc
        raise StateDirError(path, f"cannot open the local state at {path}: {text}") from exc


def ensure_state_dir(path: Path) -> None:
    """Create ``path`` and its parents; ``StateDirError`` saying why if that is not possible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise StateDirError(
            path,
            f"cannot create the state dir {path}: {why}; set --state-dir / SAGA_STATE_DIR "
            "to a directory this user can write",
        ) from exc
