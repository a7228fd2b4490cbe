"""Queries served by the node that owns a workflow: ``GET/POST /workflows/<id>/query/<name>``.

The processing thread owns every ``WorkflowRun``; an HTTP thread never touches one. It puts a
:class:`QueryRequest` on the processor's queue and waits; the processor answers the queue at the
start of each turn of its loop (between two transactions, so the query sees committed state
only) and the query method runs on a copy of the workflow object's attributes
(``WorkflowRun.query``). Nothing is written.

The wire: the id and the name are percent-encoded path segments; the argument is JSON, as the
body of a POST or as ``?arg=<JSON>`` on a GET (none: the query takes no argument). A 200 answer
is the result as JSON; an error is ``{"error": <type>, "message": <one line>}`` with 404
(``UnknownWorkflow``, ``UnknownQuery``), 400 (``InvalidArgument``), 409 (``WorkflowBlocked``),
421 (``NotOwner``: another node owns the workflow's partition now), 500 (``QueryFailed``) or
503 (``Unavailable``: the node is starting, restoring, or did not answer in time).
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote

from contracts.envelopes import Payload
from orchestrator.payloads import JSON, NULL

__all__ = ["QueryError", "QueryRequest", "handle_http", "query_path"]

PREFIX = "/workflows/"

_STATUS = {
    "UnknownWorkflow": 404,
    "UnknownQuery": 404,
    "InvalidArgument": 400,
    "WorkflowBlocked": 409,
    "UnknownWorkflowType": 409,
    "NotOwner": 421,
    "Unavailable": 503,
}


class QueryError(Exception):
    """A query the node could not answer; ``error_type`` picks the HTTP status."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type

    @property
    def status(self) -> int:
        return _STATUS.get(self.error_type, 500)


@dataclass
class QueryRequest:
    workflow_id: str
    name: str
    arg: Payload | None
    done: threading.Event = field(default_factory=threading.Event)
    answer: Payload | None = None
    error: QueryError | None = None

    def reply(self, answer: Payload) -> None:
        self.answer = answer
        self.done.set()

    def fail(self, error_type: str, message: str) -> None:
        self.error = QueryError(error_type, message)
        self.done.set()


def query_path(workflow_id: str, name: str) -> str:
    return f"{PREFIX}{quote(workflow_id, safe='')}/query/{quote(name, safe='')}"


def _parse(path: str) -> tuple[str, str] | None:
    parts = path.split("/")
    if len(parts) != 5 or parts[0] or parts[1] != "workflows" or parts[3] != "query":
        return None
    workflow_id, name = unquote(parts[2]), unquote(parts[4])
    return (workflow_id, name) if workflow_id and name else None


def _arg(raw: bytes | None) -> Payload | None:
    if raw is None or not raw.strip():
        return None
    try:
        json.loads(raw)
    except ValueError as exc:
        raise QueryError("InvalidArgument", f"the argument is not JSON: {exc}") from None
    return Payload(encoding=JSON, data=raw.strip())


def handle_http(
    method: str,
    target: str,
    body: bytes | None,
    submit: queue.SimpleQueue[QueryRequest] | None,
    timeout_s: float,
) -> tuple[int, bytes] | None:
    """The answer to an HTTP request for a query, or None if ``target`` is no query path.

    ``submit`` is the processor's queue (None while the node has none yet)."""
    path, _, query_string = target.partition("?")
    if not path.startswith(PREFIX):
        return None
    found = _parse(path)
    if found is None:
        return None
    workflow_id, name = found
    try:
        if method == "GET":
            raw = parse_qs(query_string).get("arg", [None])[-1]
            arg = _arg(raw.encode() if raw is not None else None)
        else:
            arg = _arg(body)
        if submit is None:
            raise QueryError("Unavailable", "the node is starting: it has no partitions yet")
        request = QueryRequest(workflow_id, name, arg)
        submit.put(request)
        if not request.done.wait(timeout_s):
            raise QueryError(
                "Unavailable", f"the node's loop did not answer within {timeout_s:g} s"
            )
        if request.error is not None:
            raise request.error
        answer = request.answer or Payload(encoding=NULL)
        data = b"null" if answer.encoding == NULL else answer.data
        return 200, data
    except QueryError as exc:
        return exc.status, json.dumps({"error": exc.error_type, "message": str(exc)}).encode()
