"""The ``orchestrator`` command: topics, running a node, and talking to workflows.

    orchestrator [--bootstrap HOST:PORT] [--namespace NS] [--partitions N] COMMAND ...

Settings come from the environment (see ``orchestrator.settings``); the global flags override it.
Exit codes: 0 success, 1 failure (a workflow that did not complete, a missing workflow, topics
that do not match, Kafka errors), 2 wrong usage or settings, 3 timeout.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from contracts.envelopes import HistoryEvent, IdReusePolicy, OperatorActed, WorkflowStarted
from orchestrator._engine.state import fold
from orchestrator.client import Client, WorkflowDescription
from orchestrator.errors import (
    NonDeterminismError,
    OrchestratorError,
    StateDirError,
    UnknownWorkflow,
    WorkflowFailedError,
    WorkflowIdConflict,
)
from orchestrator.kafka_config import LIBRDKAFKA_LOGGER
from orchestrator.local_db import ensure_state_dir
from orchestrator.payloads import PayloadError
from orchestrator.settings import Settings, parse_duration_ms
from orchestrator.testing import workflow_type
from orchestrator.topics import (
    TopicError,
    TopicMismatch,
    TopicReport,
    ensure_topics,
    verify_topics,
)
from orchestrator.workflow import WorkflowRegistry

__all__ = ["EXIT_FAILURE", "EXIT_TIMEOUT", "EXIT_USAGE", "main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

# Settings field -> how a user sets it (the flag, then the environment variable).
_SOURCES = {
    "bootstrap_servers": "--bootstrap or KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_BOOTSTRAP_SERVERS": "--bootstrap or KAFKA_BOOTSTRAP_SERVERS",
    "SAGA_BOOTSTRAP_SERVERS": "--bootstrap or SAGA_BOOTSTRAP_SERVERS",
    "namespace": "--namespace or SAGA_NAMESPACE",
    "partitions": "--partitions or SAGA_PARTITIONS",
    "state_dir": "--state-dir or SAGA_STATE_DIR",
    "node_id": "--node-id or SAGA_NODE_ID",
    "kafka": "SAGA_KAFKA__<KEY>",
    "activity_timeout_ms": "SAGA_ACTIVITY_TIMEOUT",
}


# --------------------------------------------------------------------------- settings


def _settings(ctx: click.Context) -> Settings:
    """The settings of this invocation: environment, overridden by the global flags."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    cached = obj.get("settings")
    if isinstance(cached, Settings):
        return cached
    overrides = {k: v for k, v in obj.get("overrides", {}).items() if v is not None}
    if "bootstrap_servers" in overrides:
        # The field is read through its environment aliases, so it is passed by alias.
        overrides["KAFKA_BOOTSTRAP_SERVERS"] = overrides.pop("bootstrap_servers")
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise click.UsageError(_explain(exc), ctx=ctx) from None
    obj["settings"] = settings
    return settings


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        source = _SOURCES.get(field, f"SAGA_{field.upper()}")
        message = str(error["msg"]).removeprefix("Value error, ")
        name = "bootstrap_servers" if "BOOTSTRAP" in field else field
        lines.append(f"invalid setting {name} ({source}): {message}")
    return "\n".join(lines)


@contextmanager
def _client(ctx: click.Context) -> Iterator[Client]:
    """A client for the command, with the client's errors turned into exit codes."""
    settings = _settings(ctx)
    try:
        with Client(settings) as client:
            yield client
    except TimeoutError as exc:
        click.echo(f"timeout: {exc}", err=True)
        ctx.exit(EXIT_TIMEOUT)
    except WorkflowFailedError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(EXIT_FAILURE)
    except WorkflowIdConflict as exc:
        click.echo(f"rejected: {exc}", err=True)
        ctx.exit(EXIT_FAILURE)
    except (OrchestratorError, PayloadError) as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def _one_line() -> Iterator[None]:
    """Our errors as one `Error:` line and exit 1, not a traceback."""
    try:
        yield
    except OrchestratorError as exc:
        raise click.ClickException(str(exc)) from None


# --------------------------------------------------------------------------- JSON arguments


def _json_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Parse a JSON value given inline, or ``@path`` to read it from a file (``@-``: stdin)."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        source = value[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text("utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise click.BadParameter(f"{shown!r} is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kafka-saga-orchestrator", prog_name="orchestrator")
@click.option("--bootstrap", help="Kafka bootstrap servers [env: KAFKA_BOOTSTRAP_SERVERS]")
@click.option("--namespace", help="topic prefix of the orchestrator [env: SAGA_NAMESPACE]")
@click.option("--partitions", type=int, help="partitions of inbox/history [env: SAGA_PARTITIONS]")
@click.option(
    "--state-dir", type=click.Path(path_type=Path), help="local state [env: SAGA_STATE_DIR]"
)
@click.option("--node-id", help="stable id of this node [env: SAGA_NODE_ID]")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="logging level (default: INFO for run, WARNING otherwise)",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="also log librdkafka's own lines (connection attempts, ...) at the logging level",
)
@click.pass_context
def main(
    ctx: click.Context,
    bootstrap: str | None,
    namespace: str | None,
    partitions: int | None,
    state_dir: Path | None,
    node_id: str | None,
    log_level: str | None,
    verbose: bool,
) -> None:
    """Durable sagas on Kafka: manage topics, run a node, start and inspect workflows."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    obj["overrides"] = {
        "bootstrap_servers": bootstrap,
        "namespace": namespace,
        "partitions": partitions,
        "state_dir": state_dir,
        "node_id": node_id,
    }
    obj["log_level"] = log_level.upper() if log_level else None
    # Before any client exists: librdkafka retries a dead broker every few milliseconds and
    # would bury the one line that says what is wrong.
    LIBRDKAFKA_LOGGER.setLevel(logging.NOTSET if verbose else _SILENT)
    if ctx.invoked_subcommand != "run":
        _logging(obj["log_level"] or "WARNING")


_SILENT = logging.CRITICAL + 1


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command("config")
@click.pass_context
def config_cmd(ctx: click.Context) -> None:
    """Print the effective settings (secrets masked) as JSON."""
    settings = _settings(ctx)
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True))


# --------------------------------------------------------------------------- topics


@main.group()
def topics() -> None:
    """Create or check the topics of the namespace."""


def _print_report(report: TopicReport) -> None:
    for name in report.verified:
        click.echo(f"{'created' if name in report.created else 'ok':8} {name}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)


def _topic_failure(ctx: click.Context, exc: TopicError) -> NoReturn:
    if isinstance(exc, TopicMismatch):
        click.echo(f"{len(exc.problems)} problem(s) with the topics:", err=True)
        for problem in exc.problems:
            click.echo(f"  - {problem}", err=True)
        ctx.exit(EXIT_FAILURE)
    raise click.ClickException(str(exc))


_replication = click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    help="[env: SAGA_REPLICATION_FACTOR; default: min(3, brokers)]",
)
_min_isr = click.option(
    "--min-insync-replicas",
    type=click.IntRange(min=1),
    help="[env: SAGA_MIN_INSYNC_REPLICAS; default: min(2, replication factor)]",
)
_topic_timeout = click.option("--timeout", type=float, default=30.0, show_default=True)


@topics.command("create")
@_replication
@_min_isr
@_topic_timeout
@click.pass_context
def topics_create(
    ctx: click.Context,
    replication_factor: int | None,
    min_insync_replicas: int | None,
    timeout: float,
) -> None:
    """Create the missing topics of the namespace and check the existing ones."""
    _topics_command(
        ctx, ensure_topics, replication_factor, min_insync_replicas, timeout, "are ready"
    )


@topics.command("verify")
@_replication
@_min_isr
@_topic_timeout
@click.pass_context
def topics_verify(
    ctx: click.Context,
    replication_factor: int | None,
    min_insync_replicas: int | None,
    timeout: float,
) -> None:
    """Check the topics of the namespace; exit 1 listing every mismatch and every
    under-replicated partition."""
    _topics_command(
        ctx, verify_topics, replication_factor, min_insync_replicas, timeout, "are as required"
    )


def _topics_command(
    ctx: click.Context,
    action: Callable[..., TopicReport],
    replication_factor: int | None,
    min_insync_replicas: int | None,
    timeout: float,
    outcome: str,
) -> None:
    s = _settings(ctx)
    rf = replication_factor if replication_factor is not None else s.replication_factor
    isr = min_insync_replicas if min_insync_replicas is not None else s.min_insync_replicas
    try:
        report = action(
            s.bootstrap_servers,
            s.namespace,
            s.partitions,
            rf,
            min_insync_replicas=isr,
            client_config=s.client_extra(),
            timeout_s=timeout,
        )
    except TopicError as exc:
        _topic_failure(ctx, exc)
    except ValueError as exc:  # min.insync.replicas above the replication factor
        raise click.UsageError(str(exc), ctx=ctx) from None
    _print_report(report)
    click.echo(
        f"topics of namespace {s.namespace} {outcome} ({s.partitions} partitions, "
        f"replication factor {report.replication_factor}, "
        f"min.insync.replicas {report.min_insync_replicas})"
    )


# --------------------------------------------------------------------------- run


def _import_workflows(names: tuple[str, ...]) -> WorkflowRegistry:
    # Like `python -m`, find modules in the current directory too.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    registry = WorkflowRegistry()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                raise click.BadParameter(
                    f"no module named {name!r} (give an importable module, e.g. "
                    "myapp.workflows, run from the directory that holds it)",
                    param_hint="'--workflows'",
                ) from None
            raise click.ClickException(f"importing {name} failed: {exc}") from None
        except Exception as exc:
            raise click.ClickException(
                f"importing {name} failed: {type(exc).__name__}: {exc}"
            ) from None
        try:
            found = WorkflowRegistry.from_module(module)
            for workflow_type in found.names():
                definition = found.get(workflow_type)
                if definition is not None:
                    registry.add(definition.cls)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--workflows'") from None
    return registry


@main.command()
@click.option(
    "--workflows",
    "modules",
    multiple=True,
    required=True,
    metavar="MODULE",
    help="module defining @workflow.defn classes (repeatable)",
)
@click.pass_context
def run(ctx: click.Context, modules: tuple[str, ...]) -> None:
    """Run an orchestrator node until SIGTERM / SIGINT."""
    settings = _settings(ctx)
    registry = _import_workflows(modules)
    try:
        # Found now, not after joining the group and restoring partitions.
        ensure_state_dir(settings.state_dir / settings.namespace)
    except StateDirError as exc:
        raise click.ClickException(str(exc)) from None
    _logging(ctx.ensure_object(dict).get("log_level") or "INFO")
    try:
        from orchestrator.node import OrchestratorNode, tune_gc
    except ImportError as exc:
        raise click.ClickException(f"the orchestrator node is not available: {exc}") from None
    click.echo(
        f"node {settings.node_id}: running {', '.join(registry.names())} on "
        f"{settings.bootstrap_servers} (namespace {settings.namespace})",
        err=True,
    )
    from orchestrator import tracing

    tune_gc()
    provider = tracing.setup(f"orchestrator-{settings.namespace}", span_file=settings.traces_file)
    try:
        node_provider = provider if tracing.recording(provider) else None
        OrchestratorNode(settings, registry, tracer_provider=node_provider).run()
    except TopicMismatch as exc:
        if any(problem.endswith(" does not exist") for problem in exc.problems):
            raise click.ClickException(
                f"{exc}\nCreate the namespace's topics with: orchestrator topics create"
            ) from None
        raise click.ClickException(str(exc)) from None
    except OrchestratorError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        provider.shutdown()  # flushes the spans still buffered


@main.command("trace")
@click.argument("span_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workflow", "workflow_id", default=None, help="only this workflow's trace")
def trace_cmd(span_file: Path, workflow_id: str | None) -> None:
    """Print the traces in a JSON-lines span file (setting traces_file) as trees with timings."""
    from orchestrator import tracing

    tracing.print_trace_tree(tracing.load_spans(span_file), workflow_id=workflow_id)


# --------------------------------------------------------------------------- workflows


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@main.command()
@click.argument("workflow_type", metavar="TYPE")
@click.option(
    "--input",
    "input_",
    metavar="JSON",
    callback=_json_option,
    help="the input, as JSON (or @file); default: no input (null)",
)
@click.option("--id", "workflow_id", help="the workflow id (default: a new UUID)")
@click.option("--wait", is_flag=True, help="wait for the result and print it")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="with --wait")
@click.option(
    "--execution-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="fail the workflow (WorkflowTimedOut, its saga compensates) if not done by then",
)
@click.option(
    "--id-reuse",
    type=click.Choice([p.value for p in IdReusePolicy], case_sensitive=False),
    default=IdReusePolicy.REJECT_DUPLICATE.value,
    show_default=True,
    help="when a workflow with this id exists (docs/workflows.md, Id reuse)",
)
@click.pass_context
def start(
    ctx: click.Context,
    workflow_type: str,
    input_: Any,
    workflow_id: str | None,
    wait: bool,
    timeout: float,
    execution_timeout: float | None,
    id_reuse: str,
) -> None:
    """Start a workflow of type TYPE; print its id (or, with --wait, its result)."""
    if workflow_id == "":
        raise click.BadParameter("must not be empty", param_hint="'--id'")
    with _client(ctx) as client:
        handle = client.start(
            workflow_type,
            input_,
            workflow_id=workflow_id,
            execution_timeout=execution_timeout,
            id_reuse=IdReusePolicy(id_reuse.upper()),
        )
        if not wait:
            click.echo(handle.workflow_id)
            return
        click.echo(
            f"started {workflow_type} as {handle.workflow_id} (request {handle.request_id})",
            err=True,
        )
        click.echo(_dump(handle.result(timeout=timeout)))


_force = click.option(
    "--force",
    is_flag=True,
    help="send without first checking in the history that the workflow exists and runs",
)


def _check_running(client: Client, workflow_id: str, what: str) -> None:
    """Refuse ``what`` for a workflow the history does not show running.

    The node would dead-letter it (UnknownWorkflow / WorkflowFinished in ``<ns>.dlq``), which
    the sender never sees; the history is what the client can read.
    """
    try:
        description = client.describe(workflow_id, dead_letters=False)
    except UnknownWorkflow as exc:
        raise click.ClickException(
            f"{exc}; the {what} was not sent (just started? the node may not have processed "
            "the start yet: retry, or send it anyway with --force)"
        ) from None
    if description.finished:
        status = description.status.value if description.status else "?"
        raise click.ClickException(
            f"workflow {workflow_id} has already ended {status}; the {what} was not sent "
            "(a finished workflow ignores it)"
        )


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.argument("name")
@click.option(
    "--payload",
    metavar="JSON",
    callback=_json_option,
    help="the signal's payload, as JSON (or @file); default: null",
)
@_force
@click.pass_context
def signal(ctx: click.Context, workflow_id: str, name: str, payload: Any, force: bool) -> None:
    """Send signal NAME to a running workflow ID (exit 1 if it is unknown or has ended)."""
    with _client(ctx) as client:
        if not force:
            _check_running(client, workflow_id, f"signal {name}")
        request_id = client.signal(workflow_id, name, payload)
    click.echo(
        f"sent signal {name} to {workflow_id} (request {request_id}); not applied yet: "
        f"`orchestrator describe {workflow_id}` shows it once the node has"
    )


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.option("--reason", default="", help="recorded in the workflow's history")
@_force
@click.pass_context
def cancel(ctx: click.Context, workflow_id: str, reason: str, force: bool) -> None:
    """Ask the orchestrator to cancel a running workflow ID (its compensations run)."""
    with _client(ctx) as client:
        if not force:
            _check_running(client, workflow_id, "cancel")
        request_id = client.cancel(workflow_id, reason)
    click.echo(
        f"sent the cancel of {workflow_id} (request {request_id}); not applied yet: "
        f"`orchestrator describe {workflow_id}` shows it once the node has"
    )


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.pass_context
def result(ctx: click.Context, workflow_id: str, timeout: float) -> None:
    """Wait for the result of workflow ID and print it as JSON."""
    with _client(ctx) as client:
        value = client.result(workflow_id, timeout=timeout)
    click.echo(_dump(value))


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.argument("name")
@click.option(
    "--arg",
    "arg",
    metavar="JSON",
    callback=_json_option,
    help="the query's argument, as JSON (or @file); default: none",
)
@click.option(
    "--url",
    metavar="URL",
    help="the HTTP server of the node that owns the workflow (default: found from the group)",
)
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_context
def query(
    ctx: click.Context, workflow_id: str, name: str, arg: Any, url: str | None, timeout: float
) -> None:
    """Ask workflow ID its @workflow.query NAME and print the answer as JSON (nothing is
    recorded; the node that owns the workflow answers from its state)."""
    with _client(ctx) as client:
        value = client.query(workflow_id, name, arg, timeout=timeout, url=url)
    click.echo(_dump(value))


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_context
def describe(ctx: click.Context, workflow_id: str, as_json: bool, timeout: float) -> None:
    """Show the status, current step and timeline of workflow ID (reads its history)."""
    with _client(ctx) as client:
        description = client.describe(workflow_id, timeout=timeout)
    if as_json:
        click.echo(_dump(description.to_dict()))
    else:
        click.echo(render_description(description))


# --------------------------------------------------------------------------- finding workflows


def _moment(text: str | None, option: str) -> int | None:
    """``1h`` / ``30m`` / ``2d`` ago, or an ISO date-time (UTC unless it says), as epoch ms."""
    if text is None:
        return None
    try:
        return int(time.time() * 1000) - parse_duration_ms(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration ago (30m, 1h, 2d) nor an ISO date-time "
            "(2026-11-27T09:00)",
            param_hint=f"'{option}'",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _ms_iso(ms: int | None) -> str:
    if not ms:
        return "-"
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


@main.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    metavar="STATUS",
    help="RUNNING, BLOCKED, PARKED, COMPLETED, FAILED, COMPENSATED, CANCELLED or TERMINATED "
    "(repeatable, or comma-separated)",
)
@click.option("--type", "types", multiple=True, metavar="TYPE", help="workflow type (repeatable)")
@click.option("--since", metavar="WHEN", help="started at or after: 1h (ago), 2d, or ISO time")
@click.option("--until", metavar="WHEN", help="started at or before: like --since")
@click.option("--prefix", default=None, help="workflow ids starting with this")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", default=None, help="the next page: the cursor the previous one printed")
@click.option("--json", "as_json", is_flag=True, help="the page as JSON (docs/operations.md)")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_context
def list_cmd(
    ctx: click.Context,
    statuses: tuple[str, ...],
    types: tuple[str, ...],
    since: str | None,
    until: str | None,
    prefix: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
    timeout: float,
) -> None:
    """List workflows of every node, newest start first, one page at a time."""
    since_ms, until_ms = _moment(since, "--since"), _moment(until, "--until")
    with _client(ctx) as client:
        page = client.list(
            status=statuses,
            type=types,
            since=since_ms,
            until=until_ms,
            prefix=prefix,
            limit=limit,
            cursor=cursor,
            timeout=timeout,
        )
    if as_json:
        click.echo(page.model_dump_json(indent=2))
    else:
        click.echo(f"{'ID':36} {'TYPE':16} {'STATUS':11} {'STARTED':20} WAITING FOR / REASON")
        for row in page.items:
            detail = row.reason if row.reason and not row.waiting_for else row.waiting_for
            click.echo(
                f"{row.workflow_id:36} {row.workflow_type:16} {row.status:11} "
                f"{_ms_iso(row.started_at_ms):20} {(detail or '')[:80]}"
            )
        if page.next_cursor:
            click.echo(f"more: add --cursor {page.next_cursor}", err=True)
    _coverage_warnings(page.missing_partitions, page.errors)


def _coverage_warnings(missing: list[int], errors: list[str]) -> None:
    for error in errors:
        click.echo(f"warning: {error}", err=True)
    if missing:
        click.echo(
            f"warning: no node answered for partition(s) {', '.join(map(str, missing))}: "
            "their workflows are not in this answer",
            err=True,
        )


@main.command("counts")
@click.option("--json", "as_json", is_flag=True, help="the counts as JSON (docs/operations.md)")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_context
def counts_cmd(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """How many workflows the nodes hold, by status and by type."""
    with _client(ctx) as client:
        counts = client.counts(timeout=timeout)
    if as_json:
        click.echo(counts.model_dump_json(indent=2))
    else:
        click.echo(f"{counts.total} workflows")
        for status, n in counts.by_status.items():
            click.echo(f"  {status or '(not started)':12} {n}")
        click.echo("by type:")
        for kind, n in counts.by_type.items():
            click.echo(f"  {kind:24} {n}")
    _coverage_warnings(counts.missing_partitions, counts.errors)


# --------------------------------------------------------------------------- operator actions

_reason = click.option("--reason", default="", help="why; recorded in the workflow's history")
_operator = click.option(
    "--operator",
    default="",
    help="who acts, recorded in the history [env: SAGA_OPERATOR; default: user@host]",
)
_wait = click.option(
    "--wait",
    type=float,
    default=10.0,
    show_default=True,
    help="seconds to wait for the node to record the action (0: do not wait)",
)


def _check_action(client: Client, workflow_id: str, what: str, step: int | None) -> None:
    """Refuse an action the history shows cannot apply, before sending it: the node would
    dead-letter it (OperatorRefused), which the sender does not see."""
    try:
        d = client.describe(workflow_id, dead_letters=False)
    except UnknownWorkflow as exc:
        raise click.ClickException(f"{exc}; the {what} was not sent") from None
    if d.finished and what != "terminate":
        raise click.ClickException(
            f"workflow {workflow_id} has ended {d.operator_status}; the {what} was not sent"
        )
    if what == "skip" and step not in d.parked_steps:
        parked = ", ".join(f"#{seq}" for seq in d.parked_steps) or "none"
        raise click.ClickException(
            f"step #{step} of {workflow_id} is not a parked compensation (parked: {parked}); "
            "the skip was not sent"
        )


def _await_action(client: Client, workflow_id: str, request_id: str, wait: float) -> None:
    """Print the action's event once the node has recorded it (or say it has not yet)."""
    deadline = time.monotonic() + wait
    while wait > 0 and time.monotonic() < deadline:
        events = client.history(workflow_id)
        acted = [
            e for e in events
            if isinstance(e.event, OperatorActed) and e.event.request_id == request_id
        ]  # fmt: skip
        if acted:
            d = client.describe(workflow_id, dead_letters=False)
            for event in acted:
                click.echo(f"recorded as event #{event.event_seq}; status now {d.operator_status}")
            return
        time.sleep(0.3)
    click.echo(
        f"sent (request {request_id}); not recorded yet: `orchestrator describe {workflow_id}` "
        f"shows it once the node has, `orchestrator dlq list` if it was refused"
    )


@main.command()
@click.argument("workflow_id", metavar="ID")
@_reason
@_operator
@_force
@_wait
@click.pass_context
def terminate(
    ctx: click.Context, workflow_id: str, reason: str, operator: str, force: bool, wait: float
) -> None:
    """End workflow ID now, without compensations (status TERMINATED)."""
    with _client(ctx) as client:
        if not force:
            _check_action(client, workflow_id, "terminate", None)
        request_id = client.terminate(workflow_id, reason, operator=operator)
        _await_action(client, workflow_id, request_id, wait)


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.option("--step", type=int, default=None, help="the step (seq in describe); default: all")
@click.option(
    "--input",
    "input_",
    metavar="JSON",
    callback=_json_option,
    help="with --step: the step's new input, as JSON (or @file) (a redrive with an edit)",
)
@_reason
@_operator
@_force
@_wait
@click.pass_context
def retry(
    ctx: click.Context,
    workflow_id: str,
    step: int | None,
    input_: Any,
    reason: str,
    operator: str,
    force: bool,
    wait: float,
) -> None:
    """Run the parked or retry-pending steps of workflow ID now (a BLOCKED one: re-run its
    code). Also named retry-now and redrive."""
    if input_ is not None and step is None:
        raise click.BadParameter("a new input needs --step", param_hint="'--input'")
    with _client(ctx) as client:
        if not force:
            _check_action(client, workflow_id, "retry", step)
        request_id = client.retry(
            workflow_id, step=step, input=input_, reason=reason, operator=operator
        )
        _await_action(client, workflow_id, request_id, wait)


main.add_command(retry, "retry-now")
main.add_command(retry, "redrive")


@main.command()
@click.argument("workflow_id", metavar="ID")
@click.option("--step", type=int, required=True, help="the parked compensation (seq in describe)")
@_reason
@_operator
@_force
@_wait
@click.pass_context
def skip(
    ctx: click.Context,
    workflow_id: str,
    step: int,
    reason: str,
    operator: str,
    force: bool,
    wait: float,
) -> None:
    """Mark parked compensation STEP of workflow ID done without running it; the saga goes on."""
    with _client(ctx) as client:
        if not force:
            _check_action(client, workflow_id, "skip", step)
        request_id = client.skip(workflow_id, step, reason=reason, operator=operator)
        _await_action(client, workflow_id, request_id, wait)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--refresh", type=click.FloatRange(min=0), default=5.0, show_default=True,
    help="seconds between the pages' background refreshes (0: never)",
)  # fmt: skip
@click.option(
    "--trace-url", envvar="SAGA_CONSOLE_TRACE_URL", default=None, metavar="TEMPLATE",
    help="link each workflow to its trace, e.g. http://jaeger:16686/trace/{trace_id}",
)  # fmt: skip
@click.option(
    "--traces-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="show each workflow's span tree from this JSON-lines span file "
    "(default: the traces_file setting, SAGA_TRACES_FILE)",
)  # fmt: skip
@click.option(
    "--operator", default="",
    help="who the actions are recorded as (default: SAGA_OPERATOR, else user@host)",
)  # fmt: skip
@click.pass_context
def console(
    ctx: click.Context,
    host: str,
    port: int,
    refresh: float,
    trace_url: str | None,
    traces_file: Path | None,
    operator: str,
) -> None:
    """Serve the web console: list, inspect and act on workflows (docs/operations.md)."""
    from orchestrator.console import Console, make_server

    if trace_url is not None and "{trace_id}" not in trace_url:
        raise click.BadParameter("must contain {trace_id}", param_hint="'--trace-url'")
    settings = _settings(ctx)
    with _client(ctx) as client:
        app = Console(
            client,
            trace_url=trace_url,
            traces_file=traces_file or settings.traces_file,
            refresh=refresh,
            operator=operator,
        )
        try:
            server = make_server(app, host, port)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
        # The first line, flushed: scripts and tests read the port from it (--port 0).
        click.echo(f"console of namespace {settings.namespace} on {server.url}")
        sys.stdout.flush()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


# --------------------------------------------------------------------------- dead letters


@main.group()
def dlq() -> None:
    """Read the dead-letter topic and replay letters once their cause is fixed."""


_DLQ_TOPIC = click.option(
    "--topic", default=None, help="a dead-letter topic other than <namespace>.dlq (a service's)"
)


@dlq.command("list")
@_DLQ_TOPIC
@click.option("--json", "as_json", is_flag=True, help="one JSON object per letter")
@click.pass_context
def dlq_list(ctx: click.Context, topic: str | None, as_json: bool) -> None:
    """One line per dead letter: where it is, when, its error type, its source and reason."""
    from orchestrator.dlq import read_letters

    with _one_line():
        letters = read_letters(_settings(ctx), topic=topic)
    for found in letters:
        letter = found.letter
        source = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
        if as_json:
            click.echo(json.dumps({"where": found.where, "error_type": letter.error_type,
                                   "source": source, "reason": letter.reason,
                                   "failed_at_ms": letter.failed_at_ms}))  # fmt: skip
            continue
        when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC).isoformat(timespec="seconds")
        click.echo(
            f"{found.where:10} {when}  {letter.error_type:22} {source}  {letter.reason[:90]}"
        )


@dlq.command("show")
@click.argument("where", metavar="PARTITION:OFFSET")
@_DLQ_TOPIC
@click.pass_context
def dlq_show(ctx: click.Context, where: str, topic: str | None) -> None:
    """Everything a letter holds, with its record decoded when it is one of ours."""
    from contracts import codec
    from orchestrator.dlq import find_letter

    with _one_line():
        found = find_letter(_settings(ctx), where, topic=topic)
    letter = found.letter
    rows = {
        "letter": f"{found.topic}[{found.partition}]@{found.offset}",
        "source": f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}",
        "error_type": letter.error_type,
        "reason": letter.reason,
        "key": (letter.key or b"").decode(errors="replace"),
        "value_bytes": len(letter.value or b""),
    }
    try:
        rows["record"] = codec.decode(letter.value or b"").model_dump(mode="json")
    except codec.CodecError as exc:
        rows["record"] = f"(not decodable: {exc})"
    click.echo(_dump(rows))


@dlq.command("replay")
@click.argument("where", metavar="PARTITION:OFFSET")
@_DLQ_TOPIC
@click.option("--to", "to_topic", default=None, help="another topic than the letter's source")
@click.pass_context
def dlq_replay(ctx: click.Context, where: str, topic: str | None, to_topic: str | None) -> None:
    """Produce the letter's original record again, to where it came from (after a fix)."""
    from orchestrator.dlq import find_letter, replay

    settings = _settings(ctx)
    with _one_line():
        found = find_letter(settings, where, topic=topic)
        target = replay(settings, found, to_topic=to_topic)
    click.echo(f"replayed {found.where} ({found.letter.error_type}) to {target}")


# --------------------------------------------------------------------------- history, replay


@main.group()
def history() -> None:
    """Read workflows' histories from the history topic."""


@history.command("export")
@click.argument("workflow_id", metavar="ID")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="write the history file that `orchestrator replay --file` and "
    "orchestrator.testing.Replayer read (default: one line per event)",
)
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_context
def history_export(ctx: click.Context, workflow_id: str, as_json: bool, timeout: float) -> None:
    """Print the events of workflow ID (read from its partition of the history topic)."""
    from orchestrator.client import _summaries
    from orchestrator.testing import dump_histories

    with _client(ctx) as client:
        events = client.history(workflow_id, timeout=timeout)
    if as_json:
        document = dump_histories({workflow_id: events}, namespace=_settings(ctx).namespace)
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    for summary in _summaries(events):
        when = summary.time.isoformat(timespec="milliseconds")
        click.echo(f"#{summary.seq:<4} {when}  {summary.kind:22} {summary.summary}")


@main.command()
@click.option(
    "--workflows",
    "modules",
    multiple=True,
    required=True,
    metavar="MODULE",
    help="module defining the @workflow.defn classes to check (repeatable)",
)
@click.option(
    "--namespace", "replay_namespace", default=None, help="replay this namespace's histories"
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="replay the histories of this file (`orchestrator history export ID --json`) instead",
)
@click.option("--type", "types", multiple=True, metavar="TYPE", help="only this workflow type")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="at most N histories")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.pass_context
def replay(
    ctx: click.Context,
    modules: tuple[str, ...],
    replay_namespace: str | None,
    files: tuple[Path, ...],
    types: tuple[str, ...],
    limit: int | None,
    timeout: float,
) -> None:
    """Replay histories against the code in MODULE, as a node would after a deploy.

    Without --file, every history on the namespace's history topic (running workflows first,
    then the most recently started). Prints OK or the first non-determinism of each, with the
    line of workflow code; exits 1 if any history does not replay.
    """
    from orchestrator.testing import HistoryFileError, Replayer, load_histories

    if files and replay_namespace:
        raise click.UsageError("give --file or --namespace, not both", ctx=ctx)
    registry = _import_workflows(modules)
    for kind in types:
        if registry.get(kind) is None:
            raise click.BadParameter(
                f"{kind!r} is not defined in {', '.join(modules)} "
                f"(it defines: {', '.join(registry.names())})",
                param_hint="'--type'",
            )
    if replay_namespace:
        ctx.ensure_object(dict)["overrides"]["namespace"] = replay_namespace
    replayer = Replayer(registry)
    histories: list[list[HistoryEvent]] = []
    if files:
        source = ", ".join(str(f) for f in files)
        for path in files:
            try:
                histories += load_histories(path)
            except HistoryFileError as exc:
                raise click.ClickException(str(exc)) from None
    else:
        source = f"namespace {_settings(ctx).namespace}"
        with _client(ctx) as client:
            found = client.histories(timeout=timeout)
        histories = sorted(found.values(), key=_running_then_recent)
    outcome = {"ok": 0, "failed": 0, "skipped": 0}
    for events in histories:
        if types and workflow_type(events) not in types:
            continue
        if limit is not None and outcome["ok"] + outcome["failed"] >= limit:
            break
        wf = events[0].workflow_id if events else "?"
        if not replayer.knows(events):
            outcome["skipped"] += 1
            click.echo(
                f"SKIPPED {wf}: type {workflow_type(events)!r} is not in {', '.join(modules)}"
            )
            continue
        try:
            done = replayer.replay(events)
        except NonDeterminismError as exc:
            outcome["failed"] += 1
            click.echo(f"FAILED  {wf}: {exc}")
            continue
        except (LookupError, ValueError) as exc:
            outcome["skipped"] += 1
            click.echo(f"SKIPPED {wf}: {exc}")
            continue
        outcome["ok"] += 1
        status = done.status.value if done.status else "?"
        click.echo(f"OK      {wf} ({done.workflow_type}, {done.events} events, {status})")
    click.echo(
        f"{outcome['ok'] + outcome['failed']} histories of {source} replayed against "
        f"{', '.join(modules)}: {outcome['ok']} ok, {outcome['failed']} non-deterministic"
        + (f", {outcome['skipped']} skipped" if outcome["skipped"] else "")
    )
    if outcome["failed"]:
        ctx.exit(EXIT_FAILURE)


def _running_then_recent(events: list[HistoryEvent]) -> tuple[bool, int]:
    finished = fold(events[0].workflow_id, _gapless(events)).finished
    return finished, -events[0].recorded_at_ms


def _gapless(events: list[HistoryEvent]) -> list[HistoryEvent]:
    out: list[HistoryEvent] = []
    if not events:
        return out
    # A later run of the id starts at its WorkflowStarted's seq (continue-as-new, id reuse).
    first = events[0].event_seq if isinstance(events[0].event, WorkflowStarted) else 1
    for expected, event in enumerate(events, start=first):
        if event.event_seq != expected:
            break
        out.append(event)
    return out


def _relative(seconds: float) -> str:
    sign = "-" if seconds < 0 else "+"
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.3f}s"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{sign}{days}d{hours:02d}h{minutes:02d}m{secs:02.0f}s"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m{secs:06.3f}s"
    return f"{sign}{minutes}m{secs:06.3f}s"


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds") if moment else "-"


def render_description(d: WorkflowDescription) -> str:
    """The human-readable form of ``orchestrator describe``."""
    data = d.to_dict()
    rows = [
        ("workflow", d.workflow_id),
        ("type", d.workflow_type or "?"),
        ("status", d.operator_status),
        ("step", d.current_step),
        ("started", _when(d.started_at)),
        ("finished", _when(d.finished_at)),
        ("input", json.dumps(data["input"], ensure_ascii=False)),
    ]
    if d.result is not None:
        rows.append(("result", json.dumps(data["result"], ensure_ascii=False)))
    if d.error is not None:
        rows.append(("error", f"{d.error.type}: {d.error.message}"))
    if d.blocked is not None:
        rows.append(("blocked", f"{d.blocked.type}: {d.blocked.message}"))
    if d.parked_steps:
        steps = " ".join(f"--step {seq}" for seq in d.parked_steps)
        rows.append(("parked", f"{steps}: `orchestrator retry|skip ID --step N`"))
    if d.cancel_requested:
        rows.append(("cancel", "requested"))
    if not d.complete:
        rows.append(("warning", "the history has gaps; the state is folded up to the first gap"))
    rows.append(("source", d.source))
    lines = [f"{label:9} {value}" for label, value in rows]
    if d.dead_letters:
        lines.append("")
        lines.append(f"dead letters ({len(d.dead_letters)}; `orchestrator dlq show WHERE`):")
        for letter in d.dead_letters:
            when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC)
            lines.append(
                f"  {letter.where:8} {when.isoformat(timespec='seconds')}  {letter.kind:16} "
                f"{letter.error_type}: {letter.reason[:100]}"
            )
    lines.append("")
    lines.append(f"events ({len(d.events)}):")
    origin = d.started_at or (d.events[0].time if d.events else None)
    kind_width = max((len(e.kind) for e in d.events), default=0)
    for event in d.events:
        offset = (event.time - origin).total_seconds() if origin else 0.0
        lines.append(
            f"  {_relative(offset):>10}  #{event.seq:<4} {event.kind:{kind_width}}  {event.summary}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- schedules


@main.group()
def schedule() -> None:
    """Durable cron schedules: start a workflow at every tick (docs/operations.md)."""


@schedule.command("create")
@click.argument("name")
@click.option("--cron", help="a cron expression in UTC: 5 fields, or 6 with seconds first")
@click.option(
    "--every",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="a fixed interval instead of --cron (ticks aligned to the Unix epoch)",
)
@click.option("--type", "workflow_type", required=True, help="the workflow type to start")
@click.option(
    "--input",
    "input_",
    metavar="JSON",
    callback=_json_option,
    help="the input of every start, as JSON (or @file); default: null",
)
@click.option(
    "--catch-up",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="after an outage, start missed ticks at most this old; older ones are skipped",
)
@click.pass_context
def schedule_create(
    ctx: click.Context,
    name: str,
    cron: str | None,
    every: float | None,
    workflow_type: str,
    input_: Any,
    catch_up: float,
) -> None:
    """Create schedule NAME: starts TYPE with id NAME-<tick time> at every tick."""
    from datetime import timedelta

    from orchestrator.schedule import create_schedule

    if (cron is None) == (every is None):
        raise click.UsageError("give one of --cron and --every")
    with _client(ctx) as client:
        handle = create_schedule(
            client,
            name,
            workflow_type,
            input_,
            cron=cron,
            every=None if every is None else timedelta(seconds=every),
            catch_up=timedelta(seconds=catch_up),
        )
    click.echo(f"created schedule {name} (workflow {handle.workflow_id})")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
@click.pass_context
def schedule_list(ctx: click.Context, as_json: bool) -> None:
    """The running schedules: name, cadence, workflow type, next tick, starts so far."""
    from orchestrator.schedule import list_schedules

    with _client(ctx) as client:
        found = list_schedules(client)
    for s in found:
        when = s.next_tick.isoformat(timespec="seconds") if s.next_tick else "-"
        if as_json:
            row = {"name": s.name, "cadence": s.cadence, "type": s.workflow_type}
            click.echo(json.dumps({**row, "next_tick": when, "started": s.started}))
        else:
            click.echo(
                f"{s.name}\t{s.cadence}\t{s.workflow_type}\tnext {when}\t{s.started} started"
            )
    if not found and not as_json:
        click.echo("no schedules", err=True)


@schedule.command("delete")
@click.argument("name")
@click.pass_context
def schedule_delete(ctx: click.Context, name: str) -> None:
    """Delete schedule NAME (no more ticks; what it started goes on)."""
    from orchestrator.schedule import delete_schedule

    with _client(ctx) as client:
        request_id = delete_schedule(client, name)
    click.echo(f"deleting schedule {name} (request {request_id})")


if __name__ == "__main__":  # pragma: no cover
    main()
