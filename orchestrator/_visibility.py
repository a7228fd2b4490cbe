"""Finding workflows: the JSON a node's query API answers, and the queries behind it.

Each node keeps a visibility index of the workflows of the partitions it owns, in the same
RocksDB batch as the rest of its state (``orchestrator/_engine/store.py``). Its HTTP server (the
``metrics_port`` one, beside ``/metrics``) answers:

* ``GET /workflows?status=&type=&since=&until=&prefix=&limit=&cursor=`` - a :class:`WorkflowPage`,
  newest start first. ``status`` and ``type`` may repeat (or hold a comma-separated list);
  ``since``/``until`` bound the start time (epoch milliseconds); ``cursor`` is the page's
  ``next_cursor``.
* ``GET /workflows/counts`` - :class:`WorkflowCounts`.
* ``GET /workflows/<id>`` (the id percent-encoded) - :class:`WorkflowDetail`, or 404.

The models below are the one definition of those shapes: ``orchestrator.client.Client.list``
and ``counts`` return them merged over every node, and the console reads them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts import codec
from contracts.envelopes import HistoryEvent
from orchestrator._engine.state import WorkflowState
from orchestrator._engine.store import IndexPosition, IndexQuery, PartitionStore, WorkflowSummary
from orchestrator.errors import OrchestratorError

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "STATUSES",
    "ActivityInfo",
    "ListQuery",
    "NodeRecord",
    "OwnedStores",
    "QueryError",
    "StatusTypeCount",
    "TimerInfo",
    "VisibilityApi",
    "WorkflowCounts",
    "WorkflowDetail",
    "WorkflowPage",
    "WorkflowRow",
    "decode_cursor",
    "encode_cursor",
]

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: What ``status`` may be: RUNNING; BLOCKED and PARKED (running, but waiting for new code, or for
#: an operator to retry or skip a compensation that gave up); and the end states.
STATUSES = (
    "RUNNING",
    "BLOCKED",
    "PARKED",
    "COMPLETED",
    "FAILED",
    "COMPENSATED",
    "CANCELLED",
    "TERMINATED",
)


class QueryError(OrchestratorError, ValueError):
    """A list query that cannot be answered as asked (a bad status, limit, time or cursor)."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


# --------------------------------------------------------------------------- JSON shapes


class WorkflowRow(_Model):
    """One workflow in a list: what its node's index holds. Times are epoch milliseconds."""

    workflow_id: str
    workflow_type: str
    status: str = Field(description="one of STATUSES ('' for a history with no start)")
    started_at_ms: int
    updated_at_ms: int = Field(description="when its last event was recorded")
    finished_at_ms: int | None
    waiting_for: str = Field(description="the step(s) it waits for while it runs, in words")
    steps_done: int
    attempts: int = Field(description="activity attempts started, compensations included")
    retries: int = Field(description="of those, the attempts after each activity's first")
    reason: str | None = Field(description="why BLOCKED, PARKED, FAILED, ...: '<type>: <message>'")
    cancel_requested: bool
    next_due_ms: int | None = Field(description="its next timer, retry or timeout")
    last_seq: int = Field(description="how many history events it has")
    partition: int

    @classmethod
    def of(cls, summary: WorkflowSummary, partition: int) -> WorkflowRow:
        return cls(**vars(summary), partition=partition)

    @property
    def position(self) -> IndexPosition:
        return IndexPosition(self.started_at_ms, self.workflow_id)


class WorkflowPage(_Model):
    """A page of a list. ``next_cursor`` is None on the last page. ``partitions``: those the
    answer covers; ``missing_partitions`` (client side): those no node answered for, so the
    list may lack their workflows; ``errors``: one line per node that did not answer."""

    items: list[WorkflowRow]
    next_cursor: str | None = None
    partitions: list[int] = []
    missing_partitions: list[int] = []
    errors: list[str] = []


class StatusTypeCount(_Model):
    status: str
    workflow_type: str
    count: int


class WorkflowCounts(_Model):
    """How many workflows, by status, by type and by both (same coverage fields as a page)."""

    total: int
    by_status: dict[str, int]
    by_type: dict[str, int]
    by_status_type: list[StatusTypeCount]
    partitions: list[int] = []
    missing_partitions: list[int] = []
    errors: list[str] = []

    @classmethod
    def of(
        cls,
        counts: Mapping[tuple[str, str], int],
        partitions: Sequence[int],
        missing: Sequence[int] = (),
        errors: Sequence[str] = (),
    ) -> WorkflowCounts:
        by_status: dict[str, int] = {}
        by_type: dict[str, int] = {}
        for (status, kind), n in counts.items():
            by_status[status] = by_status.get(status, 0) + n
            by_type[kind] = by_type.get(kind, 0) + n
        return cls(
            total=sum(counts.values()),
            by_status=dict(sorted(by_status.items())),
            by_type=dict(sorted(by_type.items())),
            by_status_type=[
                StatusTypeCount(status=s, workflow_type=t, count=n)
                for (s, t), n in sorted(counts.items())
            ],
            partitions=sorted(partitions),
            missing_partitions=sorted(missing),
            errors=list(errors),
        )


class TimerInfo(_Model):
    seq: int
    fire_at_ms: int


class ActivityInfo(_Model):
    """An activity (or compensation) still waited for."""

    seq: int
    name: str
    attempt: int
    is_compensation: bool
    attempt_started_ms: int
    retry_at_ms: int | None = Field(description="set between attempts: when the next starts")


class WorkflowDetail(_Model):
    """What a node holds of one workflow. ``description`` is the JSON of
    ``orchestrator describe --json`` (status, current step, input, result, error, the timeline
    of events in words). ``events`` are the history events as the history topic holds them
    (Avro single-object encoding, base64): ``contracts.codec`` decodes them, and
    ``orchestrator.client.Client.describe`` folds them into a ``WorkflowDescription``."""

    node_id: str
    partition: int
    summary: WorkflowRow
    description: dict[str, Any]
    pending_timers: list[TimerInfo]
    pending_activities: list[ActivityInfo]
    events: list[str]

    def history(self) -> list[HistoryEvent]:
        return [codec.decode_as(base64.b64decode(e), HistoryEvent) for e in self.events]


class NodeRecord(_Model):
    """A node's registration on ``<ns>.nodes`` (key: the node id; JSON): where its query API
    is and which partitions it owned when it wrote this. ``url`` is None when the node serves
    no HTTP (no ``metrics_port``)."""

    v: int = 1
    node_id: str
    namespace: str
    url: str | None
    partitions: list[int]
    started_at_ms: int
    updated_at_ms: int


# --------------------------------------------------------------------------- the query


def encode_cursor(position: IndexPosition) -> str:
    raw = json.dumps([position.started_at_ms, position.workflow_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> IndexPosition:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started, workflow_id = json.loads(raw)
        if not isinstance(started, int) or not isinstance(workflow_id, str):
            raise ValueError("not [int, str]")
    except (ValueError, TypeError, binascii.Error) as exc:
        raise QueryError(f"cursor {cursor[:40]!r} is not one a list returned") from exc
    return IndexPosition(started, workflow_id)


class ListQuery(_Model):
    """The filters of a list (every one optional) and its page."""

    statuses: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    prefix: str = ""
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT
    cursor: str | None = None

    @classmethod
    def build(
        cls,
        *,
        status: str | Sequence[str] | None = None,
        type: str | Sequence[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        prefix: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> ListQuery:
        """Checked: a :class:`QueryError` names what is wrong."""
        statuses = tuple(s.upper() for s in _names(status))
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise QueryError(f"unknown status {', '.join(unknown)} (one of {', '.join(STATUSES)})")
        if not 1 <= limit <= MAX_LIMIT:
            raise QueryError(f"limit must be 1 to {MAX_LIMIT}, not {limit}")
        if cursor:
            decode_cursor(cursor)
        return cls(
            statuses=statuses,
            types=tuple(_names(type)),
            since_ms=since_ms,
            until_ms=until_ms,
            prefix=prefix or "",
            limit=limit,
            cursor=cursor or None,
        )

    def params(self) -> dict[str, str | list[str]]:
        """As the query string of ``GET /workflows`` (for ``urllib.parse.urlencode(doseq)``)."""
        out: dict[str, str | list[str]] = {"limit": str(self.limit)}
        if self.statuses:
            out["status"] = list(self.statuses)
        if self.types:
            out["type"] = list(self.types)
        if self.since_ms is not None:
            out["since"] = str(self.since_ms)
        if self.until_ms is not None:
            out["until"] = str(self.until_ms)
        if self.prefix:
            out["prefix"] = self.prefix
        if self.cursor:
            out["cursor"] = self.cursor
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, list[str]]) -> ListQuery:
        def one(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        def number(name: str) -> int | None:
            value = one(name)
            if value is None or value == "":
                return None
            try:
                return int(value)
            except ValueError:
                raise QueryError(f"{name} must be an integer, not {value[:40]!r}") from None

        return cls.build(
            status=params.get("status", []),
            type=params.get("type", []),
            since_ms=number("since"),
            until_ms=number("until"),
            prefix=one("prefix"),
            limit=DEFAULT_LIMIT if (limit := number("limit")) is None else limit,
            cursor=one("cursor"),
        )

    def matches(self, summary: WorkflowSummary) -> bool:
        """Whether ``summary`` passes the filters (the page itself aside)."""
        started = summary.started_at_ms
        return (
            (not self.statuses or summary.status in self.statuses)
            and (not self.types or summary.workflow_type in self.types)
            and (self.since_ms is None or started >= self.since_ms)
            and (self.until_ms is None or started <= self.until_ms)
            and summary.workflow_id.startswith(self.prefix)
        )

    def index_query(self) -> IndexQuery:
        return IndexQuery(
            statuses=self.statuses,
            types=self.types,
            since_ms=self.since_ms,
            until_ms=self.until_ms,
            prefix=self.prefix,
            after=decode_cursor(self.cursor) if self.cursor else None,
        )


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def list_stores(stores: Sequence[tuple[int, PartitionStore]], query: ListQuery) -> WorkflowPage:
    """A page of the workflows of ``stores``, newest first: reads the index keys up to the
    page's end and the summaries of the page's rows only."""
    iq = query.index_query()
    streams = [_tagged(number, store.positions(iq)) for number, store in stores]
    wanted = list(islice(heapq.merge(*streams), query.limit + 1))
    more = len(wanted) > query.limit
    wanted = wanted[: query.limit]
    by_store: dict[int, list[str]] = {}
    for _key, number, pos in wanted:
        by_store.setdefault(number, []).append(pos.workflow_id)
    found: dict[tuple[int, str], WorkflowSummary] = {}
    for number, store in stores:
        ids = by_store.get(number, [])
        for wf, summary in zip(ids, store.summaries_of(ids), strict=True):
            # The processing thread may have written since the keys were read: a workflow
            # removed (retention) or moved to a status the filter leaves out is not shown.
            if summary is not None and query.matches(summary):
                found[(number, wf)] = summary
    items = [
        WorkflowRow.of(found[(number, pos.workflow_id)], number)
        for _key, number, pos in wanted
        if (number, pos.workflow_id) in found
    ]
    return WorkflowPage(
        items=items,
        next_cursor=encode_cursor(wanted[-1][2]) if more and wanted else None,
        partitions=sorted(number for number, _ in stores),
    )


def _tagged(
    number: int, positions: Iterator[IndexPosition]
) -> Iterator[tuple[tuple[int, str], int, IndexPosition]]:
    for pos in positions:
        yield pos.sort_key, number, pos


def count_stores(stores: Sequence[tuple[int, PartitionStore]]) -> WorkflowCounts:
    total: dict[tuple[str, str], int] = {}
    for _number, store in stores:
        for key, n in store.counts().items():
            total[key] = total.get(key, 0) + n
    return WorkflowCounts.of(total, [number for number, _ in stores])


def detail_of(store: PartitionStore, number: int, node_id: str, wf: str) -> WorkflowDetail | None:
    summary = store.summary(wf)
    records = store.event_records(wf)
    if summary is None or not records:
        return None
    # The client's describe folds events the same way; imported here, as the client imports
    # this module for its models.
    from orchestrator.client import describe_events

    events = [codec.decode_as(record, HistoryEvent) for record in records]
    # The pending timers and steps of the newest run (after a continue-as-new), folded up to a
    # gap, as describe does.
    state = WorkflowState(wf)
    for event in events:
        try:
            state.apply(event)
        except ValueError:
            break
    description = describe_events(wf, events).to_dict()
    description["source"] = f"node {node_id}"
    del description["dead_letters"]  # the node does not read the dead-letter topic
    return WorkflowDetail(
        node_id=node_id,
        partition=number,
        summary=WorkflowRow.of(summary, number),
        description=description,
        pending_timers=[TimerInfo(seq=s, fire_at_ms=at) for s, at in sorted(state.timers.items())],
        pending_activities=[
            ActivityInfo(
                seq=a.seq,
                name=a.name,
                attempt=a.attempt,
                is_compensation=a.is_compensation,
                attempt_started_ms=a.attempt_started_ms,
                retry_at_ms=a.retry_at_ms,
            )
            for a in state.activities.values()
            if not a.done and not state.finished
        ],
        events=[base64.b64encode(record).decode() for record in records],
    )


# --------------------------------------------------------------------------- a node's side


_SETTLE_WAIT_S = 2.0  # a commit takes milliseconds; past this, answer from what is written


class OwnedStores:
    """The stores of the partitions a node owns, as its HTTP threads may read them.

    The processing thread adds a partition once it is restored and removes it when it is
    revoked (before closing it); listeners hear the new set of partitions (the node's
    registration). Readers take :meth:`reading`: the stores it yields stay open until the block
    ends, and a store closed before is left out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[int, PartitionStore] = {}
        self._listeners: list[Callable[[list[int]], None]] = []
        # Clear while a transaction is committed and not yet written to the stores: a client
        # that saw its result (committed) must not then read the state from before it.
        self._settled = threading.Event()
        self._settled.set()

    def committing(self) -> None:
        self._settled.clear()

    def settled(self) -> None:
        self._settled.set()

    def wait_settled(self, timeout: float = _SETTLE_WAIT_S) -> None:
        """Until the transaction in flight (if any) is in the stores too; bounded, as a node
        stuck in a commit must still answer."""
        self._settled.wait(timeout)

    def listen(self, listener: Callable[[list[int]], None]) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[list[int]], None]) -> None:
        self._listeners.remove(listener)

    def add(self, number: int, store: PartitionStore) -> None:
        with self._lock:
            self._stores[number] = store
        self._changed()

    def remove(self, number: int) -> None:
        with self._lock:
            gone = self._stores.pop(number, None)
        if gone is not None:
            self._changed()

    def numbers(self) -> list[int]:
        with self._lock:
            return sorted(self._stores)

    def _changed(self) -> None:
        numbers = self.numbers()
        for listener in self._listeners:
            listener(numbers)

    @contextlib.contextmanager
    def reading(self) -> Iterator[list[tuple[int, PartitionStore]]]:
        with self._lock:
            stores = sorted(self._stores.items())
        with contextlib.ExitStack() as stack:
            # In partition order in every thread, so two readers never wait on each other.
            open_ = [(n, s) for n, s in stores if stack.enter_context(s.reading())]
            yield open_


_JSON = "application/json"


class VisibilityApi:
    """The ``/workflows`` endpoints of a node, for :func:`orchestrator._health.serve_http`."""

    def __init__(self, owned: OwnedStores, node_id: str) -> None:
        self.owned = owned
        self.node_id = node_id

    def route(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes] | None:
        """As ``orchestrator._health.Routes``: (status, JSON body), or None for a request that
        is not this API's."""
        if method != "GET":
            return None
        path, _, query = target.partition("?")
        answer = self(path, query)
        return (answer[0], answer[1]) if answer is not None else None

    def __call__(self, path: str, query: str) -> tuple[int, bytes, str] | None:
        """(status, body, content type), or None for a path that is not this API's."""
        if path != "/workflows" and not path.startswith("/workflows/"):
            return None
        try:
            return self._answer(path, query)
        except Exception as exc:  # one request's bug must not take the server down
            log.exception("GET %s failed", path)
            return _error(500, f"{type(exc).__name__}: {exc}")

    def _answer(self, path: str, query: str) -> tuple[int, bytes, str]:
        self.owned.wait_settled()
        try:
            if path in ("/workflows", "/workflows/"):
                params = parse_qs(query, keep_blank_values=False)
                list_query = ListQuery.from_params(params)
                with self.owned.reading() as stores:
                    return _ok(list_stores(stores, list_query))
            if path == "/workflows/counts":
                with self.owned.reading() as stores:
                    return _ok(count_stores(stores))
            wf = unquote(path.removeprefix("/workflows/"))
            with self.owned.reading() as stores:
                for number, store in stores:
                    found = detail_of(store, number, self.node_id, wf)
                    if found is not None:
                        return _ok(found)
                owned = [number for number, _ in stores]
            return _error(404, f"node {self.node_id} holds no workflow {wf!r}", partitions=owned)
        except (QueryError, ValidationError) as exc:
            return _error(400, str(exc).splitlines()[0] if isinstance(exc, QueryError) else
                          _first_error(exc))  # fmt: skip


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}"


def _ok(model: BaseModel) -> tuple[int, bytes, str]:
    return 200, model.model_dump_json().encode(), _JSON


def _error(status: int, message: str, **extra: object) -> tuple[int, bytes, str]:
    return status, json.dumps({"error": message, **extra}).encode(), _JSON
