"""Which consumed commands of a service are answered, and how far each partition may commit.

A service runs handlers concurrently, so commands of one partition finish out of order. The
offset it commits is the lowest command of the partition not yet answered (the approach of
Confluent's parallel consumer): everything below it is answered, so a crash or a rebalance
re-delivers only from there. Commands above it that *are* answered are listed in the committed
offset's metadata, so whoever reads the partition next skips them instead of answering them again.

Only the service's poll thread touches a :class:`Tracker`; handlers report back through a queue.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

TP = tuple[str, int]

_META_PREFIX = "sent1:"
_META_MAX = 3_500  # the broker keeps up to offset.metadata.max.bytes (4096 by default)


class State(enum.Enum):
    QUEUED = "queued"  # consumed, waiting for a free handler slot
    RUNNING = "running"  # its handler runs (or it waits for a running twin with its key)
    DONE = "done"  # its answer is ready, not yet committed
    SENT = "sent"  # its answer is committed


@dataclass(eq=False, slots=True)
class Entry:
    """One consumed record and what became of it."""

    tp: TP
    offset: int
    msg: Any
    state: State = State.QUEUED
    record: Any = None
    """The answer to produce (a reply or a dead letter) once DONE."""
    final: Any = None
    """A final reply to remember in the dedupe store once committed."""
    cmd: Any = None
    key: str | None = None
    followers: list[Entry] = field(default_factory=list)
    """Commands with the same idempotency key that arrived while this one ran."""
    alive: bool = True
    """False once its partition was revoked: its answer is not ours to commit any more."""


@dataclass(slots=True)
class _Partition:
    entries: dict[int, Entry] = field(default_factory=dict)  # offset order: consumed in order
    committed: int = -1
    skip: frozenset[int] = frozenset()
    """Offsets answered before (from the committed metadata): not answered again."""


@dataclass(frozen=True, slots=True)
class Commit:
    """What one commit covers: the records to produce and the offsets (with metadata)."""

    entries: list[Entry]
    offsets: dict[TP, tuple[int, str]]


class Tracker:
    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def knows(self, tp: TP) -> bool:
        return tp in self._parts

    def start(self, tp: TP, committed: int, metadata: str | None) -> None:
        """Begin tracking a partition read from ``committed`` (its committed offset, or -1)."""
        self._parts[tp] = _Partition(committed=committed, skip=parse_metadata(committed, metadata))

    def add(self, tp: TP, offset: int, msg: Any) -> Entry | None:
        """Track a consumed record; None when it needs no answer (tracked, or answered before)."""
        part = self._parts[tp]
        if offset in part.entries or offset < part.committed:
            return None  # re-delivered after a rebalance: it runs or ran already
        entry = Entry(tp, offset, msg)
        part.entries[offset] = entry
        if offset in part.skip:
            entry.state = State.SENT
            return None
        return entry

    def drop(self, tps: Iterable[TP]) -> list[Entry]:
        """Forget revoked partitions; their entries are returned, marked not alive."""
        dropped: list[Entry] = []
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                for entry in part.entries.values():
                    entry.alive = False
                    dropped.append(entry)
        return dropped

    def partitions(self) -> Iterator[TP]:
        return iter(list(self._parts))

    def pending_commit(self) -> Commit | None:
        """The DONE answers and the offsets that moved, or None when there is nothing to do."""
        entries: list[Entry] = []
        offsets: dict[TP, tuple[int, str]] = {}
        for tp, part in self._parts.items():
            done = [e for e in part.entries.values() if e.state is State.DONE]
            entries.extend(done)
            mark = _watermark(part, also_sent=done)
            if mark > part.committed or done:
                offsets[tp] = (mark, _metadata(part, mark, done))
        if not entries and not offsets:
            return None
        return Commit(entries, offsets)

    def committed(self, commit: Commit) -> None:
        """The commit went through: its answers are sent and its offsets committed."""
        for entry in commit.entries:
            entry.state = State.SENT
        for tp, (mark, _) in commit.offsets.items():
            part = self._parts.get(tp)
            if part is None:
                continue
            part.committed = max(part.committed, mark)
            for offset in [o for o in part.entries if o < part.committed]:
                del part.entries[offset]

    def count(self, *states: State) -> int:
        return sum(
            1 for part in self._parts.values() for e in part.entries.values() if e.state in states
        )


def _watermark(part: _Partition, also_sent: list[Entry]) -> int:
    """The lowest offset not answered (counting ``also_sent`` as answered), or past the last."""
    sent = {id(e) for e in also_sent}
    last = part.committed
    for offset, entry in part.entries.items():
        if entry.state is not State.SENT and id(entry) not in sent:
            return offset
        last = offset + 1
    return max(last, part.committed)


def _metadata(part: _Partition, mark: int, also_sent: list[Entry]) -> str:
    """The answered offsets above ``mark``, as deltas: ``sent1:3,4,9``. Cut to what the broker
    keeps; an offset left out is answered again, from the dedupe store."""
    sent = {id(e) for e in also_sent}
    deltas: list[str] = []
    size = len(_META_PREFIX)
    for offset, entry in part.entries.items():
        if offset > mark and (entry.state is State.SENT or id(entry) in sent):
            text = str(offset - mark)
            size += len(text) + 1
            if size > _META_MAX:
                break
            deltas.append(text)
    return _META_PREFIX + ",".join(deltas) if deltas else ""


def parse_metadata(committed: int, metadata: str | None) -> frozenset[int]:
    """The offsets a committed offset's metadata lists as answered; nothing on anything odd."""
    if committed < 0 or not metadata or not metadata.startswith(_META_PREFIX):
        return frozenset()
    try:
        deltas = [int(d) for d in metadata[len(_META_PREFIX) :].split(",") if d]
    except ValueError:
        return frozenset()
    return frozenset(committed + d for d in deltas if d > 0)
