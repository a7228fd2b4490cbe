"""The console's HTTP server: server-rendered pages (Jinja2) on the stdlib's threading server.

Routes::

    GET  /                      the list: ?status=&type=&prefix=&limit=&cursor=
    GET  /workflows/<id>        a workflow: timeline, steps, input/output/errors, timers, signals,
                                trace link and span tree, the actions
    POST /action                id, action, token, confirmed + the action's fields; 303 back
    GET  /static/<file>         CSS and the few lines of JS (auto-refresh, confirmation dialogs)
    GET  /healthz               "ok"

One process, no build step. Every form carries a per-process token, so another site's page
cannot post an action through an operator's browser.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape

from orchestrator.client import Client, _operator_name
from orchestrator.errors import OrchestratorError, UnknownWorkflow
from orchestrator.tracing import format_trace_tree, load_spans

from .actions import ACTIONS, BY_NAME, ActionError, perform
from .source import STATUSES, Detail, Filters, Source

__all__ = ["Console", "ConsoleServer", "serve"]

log = logging.getLogger(__name__)

_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_MAX_FORM = 64 * 1024


@dataclass
class Console:
    """What the pages need: a client, and optional tracing links.

    ``trace_url``: a backend's URL template with ``{trace_id}``, e.g. Jaeger's
    ``http://jaeger:16686/trace/{trace_id}``. ``traces_file``: the JSON-lines span file
    (``SAGA_TRACES_FILE``) whose spans of the workflow are shown as a tree. ``refresh``: seconds
    between the pages' background refreshes (0: never).
    """

    client: Client
    trace_url: str | None = None
    traces_file: Path | None = None
    refresh: float = 5.0
    operator: str = ""
    timeout: float = 30.0

    def __post_init__(self) -> None:
        self.source = Source(self.client, timeout=self.timeout)
        self.operator = self.operator or _operator_name()  # as the CLI: SAGA_OPERATOR, user@host
        self.token = secrets.token_urlsafe(24)
        self.templates = Environment(
            loader=PackageLoader("orchestrator.console", "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = _when
        self.templates.filters["ago"] = _ago
        self.templates.filters["ms"] = lambda ms: datetime.fromtimestamp(ms / 1000, UTC)
        self.templates.globals["quote"] = lambda s: quote(s, safe="")

    # -- pages ---------------------------------------------------------------------------

    def render(self, template: str, **values: Any) -> str:
        return self.templates.get_template(template).render(
            refresh=self.refresh,
            token=self.token,
            now=datetime.now(UTC),
            namespace=self.client.settings.namespace,
            **values,
        )

    def list_page(self, query: Mapping[str, str]) -> str:
        try:
            limit = int(query.get("limit") or 50)
            filters = Filters(
                status=query.get("status", "").upper(),
                type=query.get("type", "").strip(),
                prefix=query.get("prefix", "").strip(),
                limit=limit,
                cursor=query.get("cursor", ""),
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        overview = self.source.overview(filters)
        keep = {k: v for k, v in query.items() if k in ("type", "prefix", "limit") and v}
        return self.render(
            "list.html",
            filters=filters,
            overview=overview,
            statuses=STATUSES,
            total=sum(overview.counts.values()),
            status_link=lambda s: "/?" + urlencode({**keep, "status": s} if s else keep),
            next_link=(
                "/?" + urlencode({**query, "cursor": overview.next_cursor})
                if overview.next_cursor
                else None
            ),
        )

    def workflow_page(self, workflow_id: str, query: Mapping[str, str]) -> str:
        detail = self.source.workflow(workflow_id)
        return self.render(
            "workflow.html",
            d=detail,
            # Only the actions for this status; those the client lacks are shown disabled.
            actions=[(a, a.available(self.client)) for a in ACTIONS if a.applies(detail)],
            trace_link=(
                self.trace_url.replace("{trace_id}", detail.trace_id)
                if self.trace_url and detail.trace_id
                else None
            ),
            span_tree=self._span_tree(detail),
            sent=query.get("sent"),
            request=query.get("request"),
            refused=query.get("refused"),
        )

    def _span_tree(self, detail: Detail) -> list[str] | None:
        if self.traces_file is None:
            return None
        if not self.traces_file.exists():
            return [f"(no span file at {self.traces_file} yet)"]
        lines = format_trace_tree(load_spans(self.traces_file), workflow_id=detail.workflow_id)
        return lines or ["(no span of this workflow in the file)"]

    def act(self, form: Mapping[str, str]) -> tuple[str, str | None]:
        """Handle an action's POST: where to redirect to, or ``""`` and a page to show instead
        (the confirmation page, when the dialog did not confirm it)."""
        if not secrets.compare_digest(form.get("token", ""), self.token):
            raise BadRequest("the form's token is not this console's (a stale page?): reload it")
        workflow_id = form.get("id", "")
        action = BY_NAME.get(form.get("action", ""))
        if not workflow_id or action is None:
            raise BadRequest("an action needs a workflow id and a known action")
        back = f"/workflows/{quote(workflow_id, safe='')}"
        if form.get("confirmed") != "yes":
            page = self.render(
                "confirm.html",
                action=action,
                workflow_id=workflow_id,
                question=action.confirm.format(id=workflow_id),
                form={k: v for k, v in form.items() if k not in ("token", "confirmed")},
                back=back,
            )
            return "", page
        detail = self.source.workflow(workflow_id)  # as it is now, not as the page showed it
        try:
            request_id = perform(self.client, action, detail, form, self.operator)
        except ActionError as exc:
            return back + "?" + urlencode({"refused": str(exc)}), None
        log.info("console: %s of %s sent by %s", action.name, workflow_id, self.operator)
        return back + "?" + urlencode({"sent": action.label, "request": request_id}), None


class BadRequest(ValueError):
    """A request the console cannot serve as asked: 400 with the message."""


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment else "-"


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = (datetime.now(UTC) - moment).total_seconds()
    later, seconds = seconds < 0, abs(seconds)
    if seconds < 60:
        text = f"{seconds:.0f}s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f}h"
    else:
        text = f"{seconds / 86400:.1f}d"
    return f"in {text}" if later else f"{text} ago"


# --------------------------------------------------------------------------- HTTP


def _handler(console: Console) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "orchestrator-console"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            path = url.path
            if path == "/healthz":
                self._send(HTTPStatus.OK, "ok\n", "text/plain")
            elif path.startswith("/static/") and path[8:] in _STATIC:
                body = resources.files(__package__).joinpath("static", path[8:]).read_text()
                self._send(HTTPStatus.OK, body, _STATIC[path[8:]])
            elif path == "/":
                self._page(lambda: console.list_page(query))
            elif path.startswith("/workflows/") and len(path) > len("/workflows/"):
                workflow_id = unquote(path[len("/workflows/") :])
                self._page(lambda: console.workflow_page(workflow_id, query))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page at {url.path}")

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/action":
                self._error(HTTPStatus.NOT_FOUND, f"nothing to post to at {self.path}")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_FORM:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the form is too large")
                return
            raw = self.rfile.read(length).decode("utf-8", errors="replace")
            form = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
            outcome: dict[str, Any] = {}

            def run() -> str:
                target, page = console.act(form)
                outcome["target"] = target
                return page or ""

            page = self._render(run)
            if page is None:
                return
            if outcome["target"]:
                self.send_response(HTTPStatus.SEE_OTHER)
                self.send_header("Location", outcome["target"])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(HTTPStatus.OK, page, "text/html")

        def _page(self, make: Any) -> None:
            page = self._render(make)
            if page is not None:
                self._send(HTTPStatus.OK, page, "text/html")

        def _render(self, make: Any) -> str | None:
            """The page, or None once an error page was sent instead."""
            try:
                return str(make())
            except BadRequest as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
            except UnknownWorkflow as exc:
                self._error(HTTPStatus.NOT_FOUND, str(exc))
            except (OrchestratorError, TimeoutError) as exc:  # Kafka unreachable, slow, missing
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
            except Exception:
                log.exception("console: %s %s failed", self.command, self.path)
                self._error(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the console's log"
                )
            return None

        def _error(self, status: HTTPStatus, message: str) -> None:
            page = console.render("error.html", status=status, message=message)
            self._send(status, page, "text/html")

        def _send(self, status: HTTPStatus, body: str, kind: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)

    return Handler


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], console: Console) -> None:
        super().__init__(address, _handler(console))
        self.console = console

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host if isinstance(host, str) else host.decode()}:{self.port}/"


def make_server(console: Console, host: str = "127.0.0.1", port: int = 8080) -> ConsoleServer:
    return ConsoleServer((host, port), console)


@contextlib.contextmanager
def serve(console: Console, host: str = "127.0.0.1", port: int = 0) -> Iterator[ConsoleServer]:
    """The console served from a thread until the block ends (``port=0``: a free one)."""
    server = make_server(console, host, port)
    thread = threading.Thread(target=server.serve_forever, name="console", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
