"""Asking every registered node's query API and merging the answers (``Client.list``,
``Client.counts``, ``Client.describe``). Plain HTTP/JSON with the standard library: the nodes
serve it from their stdlib HTTP server, and the shapes are ``orchestrator.visibility``'s."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from pydantic import BaseModel, ValidationError

from orchestrator.visibility import (
    ListQuery,
    NodeRecord,
    WorkflowCounts,
    WorkflowDetail,
    WorkflowPage,
    WorkflowRow,
    encode_cursor,
)

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


class NodeAnswerError(Exception):
    """A node did not answer, or not as its API does; the message is one line for a report."""


def get_json(url: str, timeout: float) -> tuple[int, Any]:
    """(HTTP status, JSON body) of a GET; NodeAnswerError when there is no JSON answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            raise NodeAnswerError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NodeAnswerError(f"{url}: {reason}") from exc
    except ValueError as exc:
        raise NodeAnswerError(f"{url}: not JSON ({exc})") from exc


def _ask(node: NodeRecord, path: str, model: type[M], timeout: float) -> M:
    if node.url is None:
        raise NodeAnswerError(
            f"node {node.node_id} serves no query API (its metrics_port is unset)"
        )
    status, body = get_json(node.url + path, timeout)
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        raise NodeAnswerError(f"node {node.node_id}: HTTP {status}: {error or body}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise NodeAnswerError(f"node {node.node_id}: unexpected answer ({exc.error_count()} "
                              "errors)") from exc  # fmt: skip


def _each(
    nodes: Sequence[NodeRecord], call: Callable[[NodeRecord], R]
) -> tuple[list[tuple[NodeRecord, R]], list[str]]:
    """``call`` on every node at once: (answers, one error line per node that failed)."""
    if not nodes:
        return [], []

    def attempt(node: NodeRecord) -> tuple[NodeRecord, R | None, str | None]:
        try:
            return node, call(node), None
        except NodeAnswerError as exc:
            return node, None, str(exc)

    with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as pool:
        results = list(pool.map(attempt, nodes))
    answers = [(node, answer) for node, answer, error in results if error is None]
    errors = [error for _node, _answer, error in results if error is not None]
    return answers, errors  # type: ignore[return-value]  # answer is set where error is None


def _missing(covered: set[int], partitions: int) -> list[int]:
    return [n for n in range(partitions) if n not in covered]


def merged_list(
    nodes: Sequence[NodeRecord], query: ListQuery, partitions: int, timeout: float
) -> WorkflowPage:
    """Each node's page from the same cursor, merged: the first ``limit`` rows in list order.
    The cursor is a position in that order, so it means the same to every node."""
    path = "/workflows?" + urlencode(query.params(), doseq=True)
    answers, errors = _each(nodes, lambda node: _ask(node, path, WorkflowPage, timeout))
    rows: dict[str, WorkflowRow] = {}
    more = False
    covered: set[int] = set()
    for _node, page in answers:
        covered.update(page.partitions)
        more = more or page.next_cursor is not None
        for row in page.items:
            seen = rows.get(row.workflow_id)
            # Two nodes during a rebalance may both answer for a partition: the later state wins.
            if seen is None or (row.last_seq, row.updated_at_ms) > (
                seen.last_seq,
                seen.updated_at_ms,
            ):
                rows[row.workflow_id] = row
    ordered = sorted(rows.values(), key=lambda r: r.position.sort_key)
    more = more or len(ordered) > query.limit
    items = ordered[: query.limit]
    return WorkflowPage(
        items=items,
        next_cursor=encode_cursor(items[-1].position) if more and items else None,
        partitions=sorted(covered),
        missing_partitions=_missing(covered, partitions),
        errors=errors,
    )


def merged_counts(nodes: Sequence[NodeRecord], partitions: int, timeout: float) -> WorkflowCounts:
    answers, errors = _each(
        nodes, lambda node: _ask(node, "/workflows/counts", WorkflowCounts, timeout)
    )
    total: dict[tuple[str, str], int] = {}
    covered: set[int] = set()
    for node, counts in answers:
        if covered & set(counts.partitions):
            # A rebalance in flight: two nodes count one partition. Counting it twice would be
            # wrong; the later answer is left out and its other partitions show as missing.
            errors.append(f"node {node.node_id}: left out, it counts partitions another did")
            continue
        covered.update(counts.partitions)
        for row in counts.by_status_type:
            key = (row.status, row.workflow_type)
            total[key] = total.get(key, 0) + row.count
    return WorkflowCounts.of(total, sorted(covered), _missing(covered, partitions), errors)


def node_detail(
    node: NodeRecord, workflow_id: str, partition: int, timeout: float
) -> WorkflowDetail | None:
    """The node's state of the workflow; None when the node owns its ``partition`` now and does
    not hold it (it never started, or its history expired); NodeAnswerError when the node
    could not say (unreachable, or the partition is not its own any more)."""
    if node.url is None:
        raise NodeAnswerError(f"node {node.node_id} serves no query API")
    status, body = get_json(f"{node.url}/workflows/{quote(workflow_id, safe='')}", timeout)
    if status == 404 and isinstance(body, dict):
        owned = body.get("partitions")
        if isinstance(owned, list) and partition in owned:
            return None
        raise NodeAnswerError(f"node {node.node_id} does not own partition {partition} now")
    if status != 200:
        raise NodeAnswerError(f"node {node.node_id}: HTTP {status}")
    try:
        return WorkflowDetail.model_validate(body)
    except ValidationError as exc:
        raise NodeAnswerError(f"node {node.node_id}: unexpected answer") from exc
