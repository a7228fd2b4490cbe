"""The console's server and adapters over HTTP, with a client whose reads are stubbed (no
broker): which source it reads through, the trace link and span tree, and how actions follow
what the client can do. The browser test against the broker is tests/integration/test_console.py.
"""

from __future__ import annotations

import builtins
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from contracts.envelopes import (
    ActivityParked,
    ActivityScheduled,
    ErrorInfo,
    EventBody,
    HistoryEvent,
    OperatorActed,
    Payload,
    RetryPolicy,
    SignalReceived,
    TimerStarted,
    TraceContext,
    WorkflowBlocked,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowStatus,
)
from orchestrator._payloads import to_payload
from orchestrator._visibility import NodeRecord, WorkflowCounts, WorkflowPage, WorkflowRow
from orchestrator.client import Client, ClientError
from orchestrator.console import Console, ConsoleServer, serve
from orchestrator.errors import UnknownWorkflow
from orchestrator.settings import Settings
from orchestrator.tracing import WORKFLOW_ID, JsonLinesSpanExporter, trace_context_of

T0 = 1_800_000_000_000


def _events(
    wf: str, *bodies: EventBody, start: int = T0, trace: TraceContext | None = None
) -> list[HistoryEvent]:
    started = WorkflowStarted(
        workflow_type="trip",
        request_id="r",
        input=to_payload({"wf": wf}),
        random_seed=1,
        trace=trace,
    )
    return [
        HistoryEvent(workflow_id=wf, event_seq=i, recorded_at_ms=start + i, event=body)
        for i, body in enumerate((started, *bodies), start=1)
    ]


def _failed(status: WorkflowStatus) -> WorkflowFailed:
    return WorkflowFailed(status=status, error=ErrorInfo(type="Refused", message="no"))


class StubClient(Client):
    """A client whose history reads answer from a dict instead of the broker."""

    def __init__(self, histories: dict[str, list[HistoryEvent]]) -> None:
        super().__init__(Settings(namespace="console-unit"))
        self.found = histories
        self.sent: list[tuple[str, Any]] = []

    def nodes(self, *, timeout: float = 10.0, refresh: bool = False) -> list[NodeRecord]:
        # No node registered, known without a broker: the real read waited for one (10 s
        # without a broker, longer than these tests' HTTP requests wait).
        return []

    def histories(self, *, timeout: float = 60.0) -> dict[str, list[HistoryEvent]]:
        return self.found

    def history(self, workflow_id: str, *, timeout: float = 10.0) -> list[HistoryEvent]:
        if workflow_id not in self.found:
            raise UnknownWorkflow(f"no workflow {workflow_id!r}")
        return self.found[workflow_id]

    def cancel(
        self, workflow_id: str, reason: str = "", *, trace: TraceContext | None = None
    ) -> str:
        self.sent.append(("cancel", (workflow_id, reason)))
        return "req-1"

    def terminate(self, workflow_id: str, reason: str = "", *, operator: str = "") -> str:
        self.sent.append(("terminate", (workflow_id, reason, operator)))
        return "req-2"

    def retry(
        self,
        workflow_id: str,
        *,
        step: int | None = None,
        input: object = None,
        reason: str = "",
        operator: str = "",
    ) -> str:
        self.sent.append(("retry", (workflow_id, step, input, reason, operator)))
        return "req-3"

    def skip(self, workflow_id: str, step: int, *, reason: str = "", operator: str = "") -> str:
        self.sent.append(("skip", (workflow_id, step, reason, operator)))
        return "req-4"


class QueryClient(StubClient):
    """A client that has the nodes' query API (the shapes of ``Client.list``/``counts``): the
    console must use it, not the scan."""

    def list(self, **filters: Any) -> WorkflowPage:
        self.sent.append(("list", filters))
        row = WorkflowRow(
            workflow_id="from-api", workflow_type="trip", status="PARKED",
            started_at_ms=T0, updated_at_ms=T0 + 5, finished_at_ms=None, waiting_for="",
            steps_done=1, attempts=3, retries=2, reason="Refused: the undo gave up",
            cancel_requested=False, next_due_ms=None, last_seq=7, partition=0,
        )  # fmt: skip
        return WorkflowPage(
            items=[row], next_cursor="c2", missing_partitions=[2], errors=["node n2: refused"]
        )

    def counts(self, *, timeout: float = 10.0) -> WorkflowCounts:
        return WorkflowCounts.of({("PARKED", "trip"): 7, ("COMPLETED", "trip"): 3}, [0, 1])

    def histories(self, *, timeout: float = 60.0) -> dict[str, builtins.list[HistoryEvent]]:
        raise AssertionError("the console scanned the history though the client has list()")


class NoNodeClient(StubClient):
    """A client with the query API but no node to answer it: the console scans the history."""

    def list(self, **filters: Any) -> WorkflowPage:
        raise ClientError("no orchestrator node of namespace 'console-unit' answered")

    def counts(self, *, timeout: float = 10.0) -> WorkflowCounts:
        raise AssertionError("counts() after list() failed")


class OldClient(StubClient):
    """A client from before the operator actions: the console greys out what it lacks."""

    retry = None  # type: ignore[assignment]


HISTORIES = {
    "a-done": _events("a-done", _failed(WorkflowStatus.COMPENSATED), start=T0),
    "a-wait": _events(
        "a-wait",
        TimerStarted(seq=1, fire_at_ms=T0 + 60_000),
        SignalReceived(signal_name="approve", request_id="s1", payload=to_payload({"by": "x"})),
        start=T0 + 10,
    ),
    "b-cancelled": _events("b-cancelled", _failed(WorkflowStatus.CANCELLED), start=T0 + 20),
}
UNDO = ActivityScheduled(
    seq=1, activity_name="t-a.undo", topic="t-a.commands", input=Payload(),
    idempotency_key="p/1", is_compensation=True, retry=RetryPolicy(),
)  # fmt: skip
PARKED = _events(
    "parked", UNDO, ActivityParked(seq=1, attempt=3, error=ErrorInfo(type="Down", message="x"))
)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ConsoleServer]:
    client = getattr(request, "param", StubClient)(dict(HISTORIES))
    with serve(Console(client, refresh=0, operator="ops")) as running:
        yield running


def _get(server: ConsoleServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(server: ConsoleServer, form: dict[str, str]) -> tuple[int, str, str]:
    opener = urllib.request.build_opener(_NoRedirect)
    data = urllib.parse.urlencode(form).encode()
    try:
        with opener.open(server.url + "action", data=data, timeout=10) as response:
            return response.status, response.headers.get("Location", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", ""), exc.read().decode()


def _ids(page: str) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)"', page)


def test_the_list_falls_back_to_the_history_scan_with_filters_counts_and_pages(
    server: ConsoleServer,
) -> None:
    status, page = _get(server, "/")
    assert status == 200
    assert _ids(page) == ["b-cancelled", "a-wait", "a-done"]  # newest first
    assert "read through the history scan" in page
    assert re.search(r'data-status="COMPENSATED"[^>]*>COMPENSATED <b>1</b>', page)
    assert _ids(_get(server, "/?status=RUNNING")[1]) == ["a-wait"]
    assert _ids(_get(server, "/?prefix=a-")[1]) == ["a-wait", "a-done"]
    assert _ids(_get(server, "/?type=other")[1]) == []
    first = _get(server, "/?limit=2")[1]
    assert _ids(first) == ["b-cancelled", "a-wait"]
    nxt = re.search(r'href="([^"]+)" id="next"', first)
    assert nxt is not None
    assert _ids(_get(server, nxt.group(1).replace("&amp;", "&"))[1]) == ["a-done"]


def test_a_bad_filter_is_a_400_that_says_why(server: ConsoleServer) -> None:
    status, page = _get(server, "/?status=SLEEPING")
    assert status == 400 and "unknown status &#39;SLEEPING&#39;" in page
    assert _get(server, "/?limit=0")[0] == 400


@pytest.mark.parametrize("server", [QueryClient], indirect=True)
def test_the_list_reads_through_the_query_api_when_the_client_has_one(
    server: ConsoleServer,
) -> None:
    status, page = _get(server, "/?status=PARKED&prefix=fr&limit=1")
    assert status == 200
    assert _ids(page) == ["from-api"]
    assert "read through the query API" in page
    assert re.search(r'data-status="PARKED"[^>]*>PARKED <b>7</b>', page)
    assert "Refused: the undo gave up" in page
    assert "<td>2027-01-15 08:00:00.000</td>" in page  # started_at_ms, T0
    assert "no node answered for partitions [2]" in page and "node n2: refused" in page
    assert 'href="/?status=PARKED&amp;prefix=fr&amp;limit=1&amp;cursor=c2" id="next"' in page
    assert server_client(server).sent == [
        ("list", {"status": "PARKED", "type": None, "prefix": "fr", "limit": 1, "cursor": None})
    ]


@pytest.mark.parametrize("server", [NoNodeClient], indirect=True)
def test_the_list_scans_the_history_when_no_node_answers_the_query_api(
    server: ConsoleServer,
) -> None:
    status, page = _get(server, "/")
    assert status == 200
    assert _ids(page) == ["b-cancelled", "a-wait", "a-done"]
    assert "the nodes&#39; query API did not answer: no orchestrator node" in page


def test_a_workflow_page_shows_its_timers_signals_and_a_404_for_an_unknown_one(
    server: ConsoleServer,
) -> None:
    status, page = _get(server, "/workflows/a-wait")
    assert status == 200
    assert '<ul id="timers"><li>timer #1 fires' in page
    assert "approve at" in page and "{&#34;by&#34;:&#34;x&#34;}" in page
    status, page = _get(server, "/workflows/nope")
    assert status == 404 and "no workflow &#39;nope&#39;" in page


def test_the_trace_link_and_the_span_tree_of_a_traced_workflow(tmp_path: Path) -> None:
    spans = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(spans)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("start trip", attributes={WORKFLOW_ID: "traced"}) as root:
        with tracer.start_as_current_span("send t-a.do"):
            pass
        context = trace_context_of(root)
    provider.shutdown()
    assert context is not None
    trace_id = context.traceparent.split("-")[1]
    scheduled = ActivityScheduled(
        seq=1, activity_name="t-a.do", topic="t-a.commands", input=Payload(),
        idempotency_key="traced/1", is_compensation=False, retry=RetryPolicy(),
    )  # fmt: skip
    client = StubClient({"traced": _events("traced", scheduled, trace=context)})
    console = Console(
        client,
        refresh=0,
        trace_url="http://jaeger.example:16686/trace/{trace_id}",
        traces_file=spans,
    )
    with serve(console) as server:
        page = _get(server, "/workflows/traced")[1]
    assert f'href="http://jaeger.example:16686/trace/{trace_id}"' in page
    tree = re.search(r'<pre class="spans" id="spans">(.*?)</pre>', page, re.S)
    assert tree is not None
    lines = tree.group(1).splitlines()
    assert lines[0] == f"trace 0x{trace_id}"
    assert lines[1].startswith("start trip") and lines[2].startswith("└── send t-a.do")


def _button(page: str, action: str) -> str:
    """The attributes of an action's button."""
    found = re.search(rf'<button type="submit" id="do-{action}"([^>]*)>', page)
    assert found is not None, action
    return " ".join(found.group(1).split())


def _form(server: ConsoleServer, page: str, **fields: str) -> dict[str, str]:
    token = re.search(r'name="token" value="([^"]+)"', page)
    assert token is not None
    return {"token": token.group(1), **fields}


def test_actions_need_the_token_and_a_confirmation_and_record_who(server: ConsoleServer) -> None:
    page = _get(server, "/workflows/a-wait")[1]
    for action in ("cancel", "terminate", "signal"):
        assert "disabled" not in _button(page, action)
    assert 'id="do-retry"' not in page and 'id="do-skip"' not in page  # nothing parked
    form = _form(server, page, id="a-wait", action="terminate", reason="stuck")

    assert _post(server, {**form, "token": "forged", "confirmed": "yes"})[0] == 400
    status, _, confirm = _post(server, form)  # no confirmation yet: a page that asks
    assert status == 200 and "It ends at once, WITHOUT compensations." in confirm
    assert server_client(server).sent == []

    status, location, _ = _post(server, {**form, "confirmed": "yes"})
    assert status == 303 and location.startswith("/workflows/a-wait?sent=Terminate")
    # terminate() takes the operator; cancel() does not: it goes into the reason
    _post(server, {**form, "action": "cancel", "confirmed": "yes"})
    assert server_client(server).sent == [
        ("terminate", ("a-wait", "stuck", "ops")),
        ("cancel", ("a-wait", "stuck (by ops via the console)")),
    ]

    # A cancel of a workflow that has ended is refused before anything is sent.
    status, location, _ = _post(
        server, {**form, "id": "a-done", "action": "cancel", "confirmed": "yes"}
    )
    assert status == 303 and "refused=" in location
    assert "does not apply to workflow a-done" in urllib.parse.unquote_plus(location)
    assert len(server_client(server).sent) == 2


def test_a_parked_compensation_is_retried_or_skipped_by_its_step() -> None:
    client = StubClient({**HISTORIES, "parked": PARKED})
    with serve(Console(client, refresh=0, operator="ops")) as server:
        page = _get(server, "/workflows/parked")[1]
        assert '<span class="badge status-PARKED" id="status">PARKED</span>' in page
        assert re.search(r'<tr class="compensation" data-seq="1">.*?>parked<', page, re.S)
        assert _ids(_get(server, "/?status=PARKED")[1]) == ["parked"]
        form = _form(server, page, id="parked", confirmed="yes", reason="fixed")
        for fields in (
            {"action": "skip", "step": "2"},  # not a parked step
            {"action": "retry", "input": "{}"},  # a new input without its step
            {"action": "retry", "step": "1", "input": "{oops"},
        ):
            assert "refused=" in _post(server, {**form, **fields})[1]
        _post(server, {**form, "action": "retry", "step": "1", "input": '{"n": 2}'})
        _post(server, {**form, "action": "skip", "step": "1"})
    assert client.sent == [
        ("retry", ("parked", 1, {"n": 2}, "fixed", "ops")),
        ("skip", ("parked", 1, "fixed", "ops")),
    ]


@pytest.mark.parametrize("server", [OldClient], indirect=True)
def test_an_action_the_client_lacks_is_shown_greyed_out(server: ConsoleServer) -> None:
    server_client(server).found["parked"] = PARKED
    page = _get(server, "/workflows/parked")[1]
    assert 'disabled title="not available: this client has no retry() yet"' in _button(
        page, "retry"
    )
    assert "disabled" not in _button(page, "skip")
    assert "Greyed out: not in this version" in page


def server_client(server: ConsoleServer) -> StubClient:
    client = server.console.client
    assert isinstance(client, StubClient)
    return client


def test_the_command_refuses_a_trace_url_without_the_trace_id() -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main

    outcome = CliRunner().invoke(main, ["console", "--trace-url", "http://jaeger/trace/"])
    assert outcome.exit_code == 2
    assert "must contain {trace_id}" in outcome.output


def test_a_blocked_workflow_is_listed_as_blocked_and_can_be_filtered() -> None:
    blocked = WorkflowBlocked(
        error=ErrorInfo(type="NonDeterminismError", message="step 2 changed"),
        at_seq=2,
        code_version="v2",
    )
    client = StubClient({**HISTORIES, "stuck": _events("stuck", blocked, start=T0 + 30)})
    with serve(Console(client, refresh=0)) as server:
        page = _get(server, "/?status=BLOCKED")[1]
        assert _ids(page) == ["stuck"]
        assert re.search(r'data-status="BLOCKED"[^>]*>BLOCKED <b>1</b>', page)
        assert re.search(r'data-status="RUNNING"[^>]*>RUNNING <b>1</b>', page)  # a-wait
        detail = _get(server, "/workflows/stuck")[1]
    assert '<span class="badge blocked">BLOCKED</span>' in detail
    assert "NonDeterminismError: step 2 changed" in detail


def test_a_skipped_compensation_is_shown_skipped_with_who_and_why() -> None:
    skipped = OperatorActed(
        action="skip", request_id="r9", reason="undone by hand", operator="ops", step_seq=1
    )
    events = [*PARKED, *_events("parked", skipped)[1:]]
    events[-1] = events[-1].model_copy(update={"event_seq": len(PARKED) + 1})
    with serve(Console(StubClient({"parked": events}), refresh=0)) as server:
        page = _get(server, "/workflows/parked")[1]
    row = re.search(r'<tr class="compensation" data-seq="1">(.*?)</tr>', page, re.S)
    assert row is not None
    assert ">skipped<" in row.group(1) and "by ops: undone by hand" in row.group(1)
    assert "skip #1 by ops: undone by hand" in page  # the timeline


def test_child_workflows_are_rows_of_the_steps_with_how_they_ended() -> None:
    from contracts.envelopes import (
        ChildWorkflowCompleted,
        ChildWorkflowFailed,
        ChildWorkflowStarted,
    )
    from orchestrator.console.source import detail_of

    events = _events(
        "p",
        ChildWorkflowStarted(seq=1, child_workflow_id="p-a", workflow_type="ship", input=Payload()),
        ChildWorkflowStarted(seq=2, child_workflow_id="p-b", workflow_type="ship", input=Payload()),
        ChildWorkflowCompleted(seq=1, result=to_payload({"ref": "x"})),
        ChildWorkflowFailed(
            seq=2, status=WorkflowStatus.COMPENSATED, error=ErrorInfo(type="Refused", message="no")
        ),
    )
    rows = [(s.seq, s.name, s.outcome, s.detail) for s in detail_of("p", events).steps]
    assert rows == [
        (1, "child ship p-a", "completed", '{"ref":"x"}'),
        (2, "child ship p-b", "compensated", "Refused: no"),
    ]
