"""A service's record of the operations it has finished, by idempotency key.

When a command arrives for an operation whose final reply (SUCCESS or BUSINESS_FAILURE) has
already been committed to Kafka, the service sends that reply again instead of running the handler
a second time. Retryable failures are never stored: the next attempt must run.

Keys are the commands' idempotency keys (UTF-8); values are the final ``ActivityReply`` as first
sent, framed by ``contracts.codec`` (so a stored reply survives schema evolution like any record).
Nothing is ever removed yet: the store grows by one small record per finished operation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from contracts import codec
from contracts.envelopes import ActivityReply, ReplyOutcome
from orchestrator._local_db import open_local_db

log = logging.getLogger(__name__)

FINAL_OUTCOMES = frozenset({ReplyOutcome.SUCCESS, ReplyOutcome.BUSINESS_FAILURE})


class ReplyStore(Protocol):
    def get(self, key: str) -> ActivityReply | None: ...

    def put(self, key: str, reply: ActivityReply, encoded: bytes | None = None) -> None: ...

    def close(self) -> None: ...


def _check_final(reply: ActivityReply) -> None:
    if reply.outcome not in FINAL_OUTCOMES:
        raise ValueError(f"only final replies are stored, not {reply.outcome.value}")


class DedupeStore:
    """Final replies by idempotency key in a local RocksDB database (raw mode) at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_local_db(path)
        self._open = True

    def get(self, key: str) -> ActivityReply | None:
        raw = self._db.get(key.encode())
        if not isinstance(raw, bytes):
            return None
        try:
            return codec.decode_as(raw, ActivityReply)
        except codec.CodecError as exc:  # treat as unknown: at worst the handler runs again
            log.warning("dedupe store %s: unreadable entry for %r: %s", self.path, key, exc)
            return None

    def put(self, key: str, reply: ActivityReply, encoded: bytes | None = None) -> None:
        """``encoded``: the reply as framed for its record, when the caller has it already
        (encoding it again was an eighth of a service's CPU per command)."""
        _check_final(reply)
        self._db[key.encode()] = encoded if encoded is not None else codec.encode(reply)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._db.close()


class MemoryDedupeStore:
    """The same contract in a dict, for unit tests."""

    def __init__(self) -> None:
        self._replies: dict[str, ActivityReply] = {}

    def get(self, key: str) -> ActivityReply | None:
        return self._replies.get(key)

    def put(self, key: str, reply: ActivityReply, encoded: bytes | None = None) -> None:
        _check_final(reply)
        self._replies[key] = reply

    def close(self) -> None:
        self._replies.clear()
