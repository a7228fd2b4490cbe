"""A partition's local state in RocksDB: events, workflow summaries, the timer index, checkpoint.

One database per inbox/history partition, so a partition that moves to another node takes its
directory's worth of state with it and nothing else. The history topic is the changelog: this
store is written only after the Kafka transaction that produced the same events has committed,
together with the history offset it has applied, in one write batch.

Keys (raw bytes):
    e<workflow id>\\0<seq: 8 bytes BE>  -> the HistoryEvent (Avro, as on the topic)
    w<workflow id>                     -> the workflow's summary (JSON)
    t<due ms: 8 bytes BE><workflow id> -> b"" (the timer index)
    c                                  -> the next history offset to restore from (8 bytes BE)
    i<kind><group>\\0<pos: 8 bytes BE><workflow id> -> b"" (the visibility index, below)
    ip<workflow id>                    -> <pos><status>\\0<type> (the index by id prefix)
    n<status>\\0<type>                  -> how many summaries have that status and type (8 bytes BE)
    f<finished ms: 8 bytes BE><workflow id> -> b"" (the retention index: finished, by when)
    v                                  -> the layout version of these keys (``LAYOUT``)

The visibility index lets an operator's filtered list read only the keys of the rows it returns:
``pos`` is the start time inverted (newest first in key order), and each workflow has one key
per kind: ``a`` (all, empty group), ``s`` (group: its status), ``t`` (its type) and ``x``
(status ``\\0`` type). A filter by status and/or type walks one key range per group, a time range
is a seek and a stop, an id prefix is checked on the key; only the page's summaries are decoded.
A filter by id prefix reads the ``ip`` range of that prefix instead (ordered by id, each value
says where the workflow is in time and what it is), unless the prefix matches many workflows.
The index and the counts are written in the same write batch as the summary they follow, so they
are exactly as durable and are rebuilt with it by a restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import shutil
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from rocksdict import WriteBatch

from contracts import codec
from contracts.envelopes import HistoryEvent
from orchestrator._local_db import open_local_db

from .state import WorkflowState

_CHECKPOINT = b"c"
_LAYOUT_KEY = b"v"
#: The layout of the keys above. A store of another layout (written by an older release) is
#: rebuilt from the history topic on restore, which writes every key of this one.
LAYOUT = b"3"
_TEXT_MAX = 300  # of ``waiting_for`` and ``reason``: a list row, not the whole story
_NEWEST = (1 << 64) - 1
# A prefix that matches more workflows than this is filtered on the time-ordered keys instead.
# Reading a match by prefix costs about 7 µs (value, sort), walking a time key about 1 µs: for
# more matches than this the walk finds a page's rows sooner, and its worst case (a prefix whose
# matches are all old) is one pass over the keys.
_PREFIX_SCAN_MAX = 500


@dataclass(frozen=True)
class WorkflowSummary:
    """What the store knows of a workflow without replaying it: the timer index's entry,
    retention, and the visibility index's row (``docs/operations.md``, "Finding workflows")."""

    workflow_id: str
    workflow_type: str
    status: str
    last_seq: int
    next_due_ms: int | None
    finished_at_ms: int | None
    run_start_seq: int = 1  # the seq of the current run's WorkflowStarted (continue-as-new)
    started_at_ms: int = 0
    updated_at_ms: int = 0  # the recorded time of its last event
    waiting_for: str = ""  # the current step(s) while it runs
    steps_done: int = 0
    attempts: int = 0  # activity attempts started, compensations included
    retries: int = 0  # of those, attempts after the first of their activity
    reason: str | None = None  # why it is BLOCKED, PARKED, FAILED, ... ("<type>: <message>")
    cancel_requested: bool = False

    @classmethod
    def of(cls, state: WorkflowState) -> WorkflowSummary:
        attempts = sum(a.attempt for a in state.activities.values())
        return cls(
            workflow_id=state.workflow_id,
            workflow_type=state.workflow_type,
            status=_status(state),
            last_seq=state.last_seq,
            next_due_ms=state.next_due_ms(),
            finished_at_ms=state.finished_at_ms,
            run_start_seq=max(state.run_start_seq, 1),
            started_at_ms=state.started_at_ms,
            updated_at_ms=state.updated_at_ms,
            waiting_for="" if state.finished else _cut(state.current_step),
            steps_done=state.steps_done,
            attempts=attempts,
            retries=attempts - len(state.activities),
            reason=_reason(state),
            cancel_requested=state.cancel_requested,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> WorkflowSummary:
        data = json.loads(raw)
        # Fields of a newer release are left out rather than refused.
        return cls(**{k: v for k, v in data.items() if k in _SUMMARY_FIELDS})

    def to_json(self) -> bytes:
        return json.dumps(vars(self)).encode()

    @property
    def position(self) -> IndexPosition:
        """Where this workflow is in the newest-first order of every list."""
        return IndexPosition(self.started_at_ms, self.workflow_id)


_SUMMARY_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkflowSummary))


def _cut(text: str) -> str:
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 3] + "..."


@dataclass(frozen=True, order=True)
class IndexPosition:
    """A place in the order of every list: newest start first, then by workflow id. It means the
    same on every partition and every node, so it is also the cursor of a merged list."""

    started_at_ms: int
    workflow_id: str

    @property
    def sort_key(self) -> tuple[int, str]:
        """Ascending in list order."""
        return (-self.started_at_ms, self.workflow_id)


@dataclass(frozen=True)
class IndexQuery:
    """A filtered list: empty ``statuses`` / ``types`` mean any; ``since_ms`` / ``until_ms``
    bound the start time (inclusive); ``after`` resumes a list past a row it returned."""

    statuses: Collection[str] = ()
    types: Collection[str] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    prefix: str = ""
    after: IndexPosition | None = None


def _reason(state: WorkflowState) -> str | None:
    """Why the workflow is BLOCKED, PARKED or ended other than COMPLETED, in one line."""
    if not state.finished:
        if state.blocked is not None:
            return _cut(f"{state.blocked.type}: {state.blocked.message}")
        for act in state.parked:
            if act.parked is not None:
                return _cut(f"{act.name} #{act.seq}: {act.parked.type}: {act.parked.message}")
        return None
    error = state.error
    return _cut(f"{error.type}: {error.message}") if error is not None else None


def _status(state: WorkflowState) -> str:
    # BLOCKED and PARKED are no end states (the workflow is RUNNING, waiting for new code or
    # for an operator), but operators count them apart and alert on them.
    if not state.finished:
        if state.blocked is not None:
            return "BLOCKED"
        if state.parked:
            return "PARKED"
    return state.status.value if state.status else ""


def _event_prefix(workflow_id: str) -> bytes:
    return b"e" + workflow_id.encode() + b"\0"


def _event_key(workflow_id: str, seq: int) -> bytes:
    return _event_prefix(workflow_id) + seq.to_bytes(8, "big")


def _timer_key(due_ms: int, workflow_id: str) -> bytes:
    return b"t" + max(due_ms, 0).to_bytes(8, "big") + workflow_id.encode()


def _finished_key(finished_at_ms: int, workflow_id: str) -> bytes:
    return b"f" + max(finished_at_ms, 0).to_bytes(8, "big") + workflow_id.encode()


def _pos(started_at_ms: int) -> bytes:
    return (_NEWEST - min(max(started_at_ms, 0), _NEWEST)).to_bytes(8, "big")


def _groups(statuses: Collection[str], types: Collection[str]) -> list[bytes]:
    """The index key prefixes whose rows a filter by these statuses and types reads."""
    if statuses and types:
        return [b"ix" + f"{s}\0{t}\0".encode() for s in sorted(statuses) for t in sorted(types)]
    if statuses:
        return [b"is" + f"{s}\0".encode() for s in sorted(statuses)]
    if types:
        return [b"it" + f"{t}\0".encode() for t in sorted(types)]
    return [b"ia\0"]


def _identity(summary: WorkflowSummary) -> bytes:
    """What the index files a workflow under (the value of its ``ip`` key): its position in
    time, status and type. Most writes leave it as it was, and then the index is not touched."""
    return _pos(summary.started_at_ms) + f"{summary.status}\0{summary.workflow_type}".encode()


def _index_keys(workflow_id: bytes, identity: bytes) -> tuple[bytes, ...]:
    tail = identity[:8] + workflow_id
    status, kind = identity[8:].split(b"\0", 1)
    return (
        b"ia\0" + tail,
        b"is" + status + b"\0" + tail,
        b"it" + kind + b"\0" + tail,
        b"ix" + status + b"\0" + kind + b"\0" + tail,
    )


def _count_key(status: str, workflow_type: str) -> bytes:
    return b"n" + f"{status}\0{workflow_type}".encode()


class StoreBatch:
    """Changes to apply in one RocksDB write: events, summaries, timer index, checkpoint."""

    def __init__(self) -> None:
        self.events: list[tuple[HistoryEvent, bytes]] = []
        self.summaries: dict[str, tuple[WorkflowSummary, int | None]] = {}  # new, old due
        self.removed: dict[str, tuple[int, int | None]] = {}  # workflow -> (last seq, due)
        self.truncated: dict[str, int] = {}  # workflow -> its events below this seq go
        self.unfinished: list[tuple[int, str]] = []  # retention index keys to drop
        self.checkpoint: int | None = None

    def add_event(self, event: HistoryEvent, encoded: bytes) -> None:
        self.events.append((event, encoded))

    def set_summary(self, summary: WorkflowSummary, previous_due_ms: int | None) -> None:
        earlier = self.summaries.get(summary.workflow_id)
        old_due = earlier[1] if earlier is not None else previous_due_ms
        self.summaries[summary.workflow_id] = (summary, old_due)

    def drop_finished(self, finished_at_ms: int, workflow_id: str) -> None:
        """Drop a retention index key: its workflow is removed, or the key is stale (a later
        run of the same id, a removal that could not say when it had finished)."""
        self.unfinished.append((finished_at_ms, workflow_id))

    def remove_workflow(self, workflow_id: str, last_seq: int, due_ms: int | None) -> None:
        self.removed[workflow_id] = (last_seq, due_ms)

    def truncate(self, workflow_id: str, below_seq: int) -> None:
        """Drop the workflow's events below ``below_seq``: the runs before its current one."""
        self.truncated[workflow_id] = max(below_seq, self.truncated.get(workflow_id, 0))

    def __bool__(self) -> bool:
        return bool(
            self.events
            or self.summaries
            or self.removed
            or self.truncated
            or self.checkpoint is not None
        )


class PartitionStore:
    """One partition's database. The processing thread writes it; the node's HTTP threads may
    read it at the same time (RocksDB reads are thread-safe) through :meth:`reading`, which
    keeps :meth:`close` from closing it under them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_local_db(path)
        self._closed = False
        # Held by a reader from another thread and by close: never close under a read.
        self._gate = threading.Lock()

    def close(self) -> None:
        with self._gate:
            self._closed = True
            self._db.close()

    @staticmethod
    def destroy(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- reads

    def checkpoint(self) -> int | None:
        """The next history offset to restore from, if this store has applied any."""
        raw = self._db.get(_CHECKPOINT)
        return int.from_bytes(raw[:8], "big") if isinstance(raw, bytes) else None

    def checkpoint_written_ms(self) -> int | None:
        """When the checkpoint was last written (wall clock ms)."""
        raw = self._db.get(_CHECKPOINT)
        return (
            int.from_bytes(raw[8:16], "big") if isinstance(raw, bytes) and len(raw) >= 16 else None
        )

    def layout_current(self) -> bool:
        """Whether the keys are of this release's layout (an empty store is)."""
        if self._db.get(_LAYOUT_KEY) == LAYOUT:
            return True
        return next(iter(self._db.keys()), None) is None

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self._db.items(from_key=prefix):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if not key.startswith(prefix):
                return
            yield key, value

    def events(self, workflow_id: str) -> list[HistoryEvent]:
        return [
            codec.decode_as(value, HistoryEvent)
            for _, value in self._scan(_event_prefix(workflow_id))
        ]

    def event_records(self, workflow_id: str) -> list[bytes]:
        """The stored encodings of a workflow's events, in order, as the history topic holds
        them."""
        return [value for _, value in self._scan(_event_prefix(workflow_id))]

    def event_bytes(self, workflow_id: str, seq: int) -> bytes | None:
        """The stored encoding of one event, as the history topic holds it."""
        value = self._db.get(_event_key(workflow_id, seq))
        assert value is None or isinstance(value, bytes)
        return value

    def has_timer(self, due_ms: int, workflow_id: str) -> bool:
        """Whether the timer index holds ``workflow_id`` at ``due_ms``."""
        return self._db.get(_timer_key(due_ms, workflow_id)) is not None

    def summary(self, workflow_id: str) -> WorkflowSummary | None:
        raw = self._db.get(b"w" + workflow_id.encode())
        return WorkflowSummary.from_json(raw) if isinstance(raw, bytes) else None

    def summaries_of(self, workflow_ids: list[str]) -> list[WorkflowSummary | None]:
        """The summaries of ``workflow_ids`` (None for one it does not hold), in one read."""
        if not workflow_ids:
            return []
        raws = self._multi_get([b"w" + wf.encode() for wf in workflow_ids])
        return [WorkflowSummary.from_json(raw) if raw is not None else None for raw in raws]

    def _multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        wanted: list[str | int | float | bytes | bool] = list(keys)
        found = self._db.get(wanted)
        assert isinstance(found, list)  # a list asked: a list answered
        return [raw if isinstance(raw, bytes) else None for raw in found]

    def finished_by(self, cutoff_ms: int) -> Iterator[tuple[int, str]]:
        """(finished at, workflow id) from the retention index, oldest first, up to
        ``cutoff_ms``: what retention reads, however many younger workflows the store holds.
        A key may be stale (see :meth:`StoreBatch.drop_finished`): check the summary."""
        for key, _ in self._scan(b"f"):
            finished_at = int.from_bytes(key[1:9], "big")
            if finished_at > cutoff_ms:
                return
            yield finished_at, key[9:].decode()

    def summaries(self) -> Iterator[WorkflowSummary]:
        for _, value in self._scan(b"w"):
            yield WorkflowSummary.from_json(value)

    def counts(self) -> dict[tuple[str, str], int]:
        """How many workflows this store holds, by (status, type): kept with every write, so
        counting reads a few keys, not every summary."""
        out: dict[tuple[str, str], int] = {}
        for key, value in self._scan(b"n"):
            status, _, kind = key[1:].decode().partition("\0")
            out[(status, kind)] = int.from_bytes(value, "big")
        return out

    def status_counts(self) -> dict[str, int]:
        """How many workflows this store holds, by summary status."""
        counts: dict[str, int] = {}
        for (status, _kind), count in self.counts().items():
            counts[status] = counts.get(status, 0) + count
        return counts

    def positions(self, query: IndexQuery) -> Iterator[IndexPosition]:
        """The workflows that match ``query``, newest first, read from the index keys alone
        (lazily: take what a page needs)."""
        if query.prefix:
            found = self._by_prefix(query)
            if found is not None:
                return found
        ranges = [self._range(group, query) for group in _groups(query.statuses, query.types)]
        if len(ranges) == 1:
            return ranges[0]
        return heapq.merge(*ranges, key=lambda p: p.sort_key)

    def _by_prefix(self, query: IndexQuery) -> Iterator[IndexPosition] | None:
        """The matches of a query with an id prefix, in list order, from the ``ip`` keys; None
        when the prefix matches over ``_PREFIX_SCAN_MAX`` workflows."""
        start = b"ip" + query.prefix.encode()
        statuses, types = set(query.statuses), set(query.types)
        since = query.since_ms if query.since_ms is not None else -1
        until = query.until_ms if query.until_ms is not None else _NEWEST
        after = query.after.sort_key if query.after is not None else None
        # Counting the keys first is ten times cheaper than reading the values of a common
        # prefix only to give up on it.
        for seen, key in enumerate(self._db.keys(from_key=start)):
            assert isinstance(key, bytes)
            if not key.startswith(start):
                break
            if seen >= _PREFIX_SCAN_MAX:
                return None
        found: list[tuple[int, str]] = []  # sort keys: plain tuples sort fastest
        for key, value in self._db.items(from_key=start):
            assert isinstance(key, bytes) and isinstance(value, bytes)
            if not key.startswith(start):
                break
            started = _NEWEST - int.from_bytes(value[:8], "big")
            if not since <= started <= until:
                continue
            if statuses or types:
                status, _, kind = value[8:].decode().partition("\0")
                if (statuses and status not in statuses) or (types and kind not in types):
                    continue
            sort_key = (-started, key[2:].decode())
            if after is None or sort_key > after:
                found.append(sort_key)
        found.sort()
        return (IndexPosition(-negative, wf) for negative, wf in found)

    def _range(self, group: bytes, query: IndexQuery) -> Iterator[IndexPosition]:
        start = group
        if query.until_ms is not None:
            start = group + _pos(query.until_ms)
        if query.after is not None:
            # The smallest key past the cursor's own: the rows after it, in list order.
            after = group + _pos(query.after.started_at_ms) + query.after.workflow_id.encode()
            start = max(start, after + b"\0")
        stop = group + _pos(query.since_ms) + b"\xff" if query.since_ms is not None else None
        prefix = query.prefix.encode()
        tail = len(group) + 8
        for key in self._db.keys(from_key=start):
            assert isinstance(key, bytes)
            if not key.startswith(group) or (stop is not None and key > stop):
                return
            if prefix and not key.startswith(prefix, tail):
                continue
            started = _NEWEST - int.from_bytes(key[len(group) : tail], "big")
            yield IndexPosition(started, key[tail:].decode())

    def timers(self) -> Iterator[tuple[int, str]]:
        """(due ms, workflow id) in due order."""
        for key, _ in self._scan(b"t"):
            yield int.from_bytes(key[1:9], "big"), key[9:].decode()

    # ----------------------------------------------------------------- reads from other threads

    @contextlib.contextmanager
    def reading(self) -> Iterator[bool]:
        """``with store.reading() as is_open:`` for a read from another thread than the
        processing one: the store is not closed while the block runs; ``is_open`` is False when
        it was closed before (the partition moved away, or the node stops)."""
        with self._gate:
            yield not self._closed

    # ----------------------------------------------------------------- the one write

    def write(self, batch: StoreBatch) -> None:
        wb = WriteBatch(raw_mode=True)
        for event, encoded in batch.events:
            wb.put(_event_key(event.workflow_id, event.event_seq), encoded)
        # The index follows each summary: it needs what it filed the workflow under (the
        # ``ip`` values, one read for all), and changes only where that changed.
        touched = list(dict.fromkeys([*batch.summaries, *batch.removed]))
        filed = self._multi_get([b"ip" + wf.encode() for wf in touched])
        current = dict(zip(touched, filed, strict=True))
        counts: dict[tuple[str, str], int] = {}
        for summary, old_due in batch.summaries.values():
            wf = summary.workflow_id
            if old_due is not None and old_due != summary.next_due_ms:
                wb.delete(_timer_key(old_due, wf))
            if summary.next_due_ms is not None:
                wb.put(_timer_key(summary.next_due_ms, wf), b"")
            wb.put(b"w" + wf.encode(), summary.to_json())
            if summary.finished_at_ms is not None:
                wb.put(_finished_key(summary.finished_at_ms, wf), b"")
            identity = _identity(summary)
            if identity != current[wf]:
                _reindex(wb, wf, current[wf], identity, counts)
                current[wf] = identity
        for wf, below in batch.truncated.items():
            wb.delete_range(_event_key(wf, 0), _event_key(wf, below))
        for wf, (last_seq, due) in batch.removed.items():
            wb.delete_range(_event_key(wf, 0), _event_key(wf, last_seq + 1))
            if due is not None:
                wb.delete(_timer_key(due, wf))
            wb.delete(b"w" + wf.encode())
            if current[wf] is not None:
                _reindex(wb, wf, current[wf], None, counts)
                current[wf] = None
        for finished_at_ms, wf in batch.unfinished:
            wb.delete(_finished_key(finished_at_ms, wf))
        self._add_counts(wb, counts)
        if batch.checkpoint is not None:
            written = int(time.time() * 1000)
            wb.put(_CHECKPOINT, batch.checkpoint.to_bytes(8, "big") + written.to_bytes(8, "big"))
        wb.put(_LAYOUT_KEY, LAYOUT)
        self._db.write(wb)

    def _add_counts(self, wb: WriteBatch, deltas: dict[tuple[str, str], int]) -> None:
        changed = [(key, delta) for key, delta in deltas.items() if delta]
        if not changed:
            return
        keys = [_count_key(*key) for key, _ in changed]
        for key, raw, (_, delta) in zip(keys, self._multi_get(keys), changed, strict=True):
            total = (int.from_bytes(raw, "big") if raw is not None else 0) + delta
            if total > 0:
                wb.put(key, total.to_bytes(8, "big"))
            else:
                wb.delete(key)


def _reindex(
    wb: WriteBatch,
    workflow_id: str,
    before: bytes | None,
    after: bytes | None,
    counts: dict[tuple[str, str], int],
) -> None:
    """Move a workflow's index keys and counts from identity ``before`` to ``after`` (None: not
    indexed / removed)."""
    wf = workflow_id.encode()
    if before is not None:
        for key in _index_keys(wf, before):
            wb.delete(key)
        group = _group_of(before)
        counts[group] = counts.get(group, 0) - 1
    if after is not None:
        for key in _index_keys(wf, after):
            wb.put(key, b"")
        wb.put(b"ip" + wf, after)
        group = _group_of(after)
        counts[group] = counts.get(group, 0) + 1
    else:
        wb.delete(b"ip" + wf)


def _group_of(identity: bytes) -> tuple[str, str]:
    status, _, kind = identity[8:].decode().partition("\0")
    return status, kind
