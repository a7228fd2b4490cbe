"""The demo: an online shop whose orders are sagas across four services, on a real Kafka broker.

    make demo                                   # or: python -m services_example.demo
    python -m services_example.demo --keep-running

Starts (as separate processes, logs under ``.run/demo/<namespace>/logs``) an orchestrator node
and the orders, inventory, payments and shipping services; places a handful of orders through
the orders HTTP API, some of which fail on purpose; prints each order's saga timeline; and checks
that no stock and no money was created or lost. Exits 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
import urllib.error
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from deploy.kafka import broker
from orchestrator import tracing
from services_example.orders.api import workflow_id_of
from services_example.processes import Processes

TERMINAL = {"COMPLETED", "FAILED", "COMPENSATED", "CANCELLED", "PARKED", "TERMINATED"}
WIDTH = 100


@dataclass
class Scenario:
    title: str
    expect: str
    order: dict[str, Any]
    then: str = ""  # "confirm" or "cancel" once the shipment is scheduled
    order_id: str = ""
    final: dict[str, Any] = field(default_factory=dict)


def scenarios(run: str) -> list[Scenario]:
    def order(n: int, **fields: Any) -> dict[str, Any]:
        return {"order_id": f"{run}-{n}", **fields}

    return [
        Scenario(
            "alice buys 2 books; she confirms the delivery (a signal)",
            "COMPLETED",
            order(1, customer="alice", sku="book", qty=2, amount=3000, confirm_delivery=True),
            then="confirm",
        ),
        Scenario(
            "bob buys 1 lamp; the saga settles with a 2 s durable sleep",
            "COMPLETED",
            order(2, customer="bob", sku="lamp", qty=1, amount=4500, settle_seconds=2),
        ),
        Scenario(
            "carol buys 3 mugs with a card that is declined",
            "COMPENSATED",
            order(3, customer="carol", sku="mug", qty=3, amount=2400, card="declined-card"),
        ),
        Scenario(
            "dave buys a poster, to be shipped to the North Pole",
            "COMPENSATED",
            order(
                4, customer="dave", sku="poster", qty=1, amount=1500, address="1 Ice Rd, North Pole"
            ),
        ),
        Scenario(
            "erin buys a book and cancels while the saga waits for delivery",
            "CANCELLED",
            order(5, customer="erin", sku="book", qty=1, amount=1500, confirm_delivery=True),
            then="cancel",
        ),
        Scenario(
            "frank buys 50 posters: only 5 are in stock",
            "FAILED",
            order(6, customer="frank", sku="poster", qty=50, amount=500),
        ),
    ]


# --------------------------------------------------------------------------- output


def rule(char: str = "-") -> str:
    return char * WIDTH


def header(text: str) -> None:
    click.echo("")
    click.echo(rule("="))
    click.echo(click.style(text, bold=True))
    click.echo(rule("="))


def money(cents: int) -> str:
    return f"${cents / 100:,.2f}"


_LABELS = {
    "WorkflowStarted": "started",
    "ActivityScheduled": "command",
    "ActivityAttemptFailed": "retrying",
    "ActivityCompleted": "reply",
    "ActivityFailed": "FAILURE",
    "LateReplyIgnored": "late reply",
    "TimerStarted": "sleeping",
    "TimerFired": "woke up",
    "SignalReceived": "signal",
    "CancelRequested": "cancel",
    "WorkflowCompleted": "DONE",
    "WorkflowFailed": "ENDED",
}


def _summary(kind: str, text: str) -> str:
    if kind == "WorkflowStarted":
        return "the orchestrator started the place-order saga"
    if kind == "ActivityScheduled":
        name = text.split(" #", 1)[0]
        if text.endswith("(compensation)"):
            return f"COMPENSATE: {name} (undo an earlier step)"
        return f"{name} sent to the {name.split('.')[0]} service"
    if kind == "ActivityCompleted" and (m := _COMPLETED.match(text)):
        name, attempt, result = m.groups()
        tries = "" if attempt == "1" else f" (attempt {attempt})"
        return f"{name} done{tries}: {_plain(result)}"
    if kind == "ActivityFailed":
        return _ACTIVITY_SEQ.sub(" ", text)
    return text


_COMPLETED = re.compile(r"^(\S+) #\d+ completed \(attempt (\d+)\): (.*)$")
_ACTIVITY_SEQ = re.compile(r" #\d+ ")


def _plain(preview: str) -> str:
    """``{"hold_id":"h-1","qty":2}`` -> ``hold_id=h-1 qty=2`` (the preview may be cut short)."""
    text = preview.strip("{}").replace('"', "")
    return " ".join(part.replace(":", "=", 1) for part in text.split(","))


def timeline(described: dict[str, Any]) -> list[str]:
    events = [e for e in described["events"] if e["kind"] != "ActivityAttemptStarted"]
    if not events:
        return []
    t0 = datetime.fromisoformat(events[0]["time"])
    lines = []
    for e in events:
        offset = (datetime.fromisoformat(e["time"]) - t0).total_seconds()
        label = _LABELS.get(e["kind"], e["kind"])
        text = _summary(e["kind"], e["summary"])
        if len(text) > WIDTH - 22:
            text = text[: WIDTH - 25] + "..."
        lines.append(f"  {offset:+7.3f}s  {label:<9} {text}")
    return lines


# --------------------------------------------------------------------------- running


def get_status(procs: Processes, order_id: str) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = procs.http("GET", f"/orders/{order_id}")
        return result
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # not started yet: the orchestrator has not read the request
            return None
        raise


def has_event(described: dict[str, Any] | None, text: str) -> bool:
    return described is not None and any(text in e["summary"] for e in described["events"])


def drive(procs: Processes, plays: list[Scenario], timeout: float) -> None:
    """Place the orders, signal or cancel the waiting ones, wait until every saga has ended."""
    for play in plays:
        placed = procs.http("POST", "/orders", play.order)
        play.order_id = placed["order_id"]
        click.echo(f"  placed order {play.order_id:<12} {play.title}")
    deadline = time.monotonic() + timeout
    pending = list(plays)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"orders still running after {timeout:.0f}s: "
                               + ", ".join(p.order_id for p in pending))  # fmt: skip
        if dead := procs.dead():
            raise RuntimeError(f"{', '.join(dead)} exited; see {procs.log_dir}")
        for play in list(pending):
            described = get_status(procs, play.order_id)
            if described is None:
                continue
            if described["status"] in TERMINAL:
                play.final = described
                pending.remove(play)
            elif play.then and has_event(described, "shipping.schedule #3 completed"):
                if play.then == "confirm":
                    procs.http("POST", f"/orders/{play.order_id}/confirm-delivery", {"by": "alice"})
                    click.echo(f"  order {play.order_id}: the customer confirms the delivery")
                else:
                    reason = "the customer changed her mind"
                    procs.http("POST", f"/orders/{play.order_id}/cancel", {"reason": reason})
                    click.echo(f"  order {play.order_id}: cancelled ({reason})")
                play.then = ""
        time.sleep(0.3)


def check(
    plays: list[Scenario], before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> list[str]:
    """Print the invariant tables; return what does not hold."""
    problems: list[str] = []
    done = [p for p in plays if p.final.get("status") == "COMPLETED"]
    failed_ids = {p.order["order_id"] for p in plays if p not in done}

    header("Invariant 1: stock - units sold by completed orders, nothing else")
    click.echo(f"  {'sku':<8} {'before':>8} {'sold':>6} {'expected':>9} {'after':>7}   check")
    stock0, stock1 = before["inventory"]["stock"], after["inventory"]["stock"]
    for sku in sorted(stock0):
        sold = sum(p.order["qty"] for p in done if p.order["sku"] == sku)
        ok = stock1.get(sku) == stock0[sku] - sold
        click.echo(f"  {sku:<8} {stock0[sku]:>8} {sold:>6} {stock0[sku] - sold:>9} "
                   f"{stock1.get(sku, 0):>7}   {'ok' if ok else 'WRONG'}")  # fmt: skip
        if not ok:
            problems.append(f"stock of {sku}")
    holds = after["inventory"]["holds"].values()
    open_holds = [h for h in holds if h["order_id"] in failed_ids and not h["released"]]
    click.echo(f"  holds of failed or cancelled orders still open: {len(open_holds)}")
    if open_holds:
        problems.append("open holds of failed orders")

    header("Invariant 2: money - customers pay for completed orders only")
    click.echo(f"  {'customer':<9} {'before':>12} {'charged':>10} {'expected':>12} "
               f"{'after':>12}   check")  # fmt: skip
    bal0, bal1 = before["payments"]["balances"], after["payments"]["balances"]
    for who in sorted({p.order["customer"] for p in plays}):
        charged = sum(p.order["amount"] for p in done if p.order["customer"] == who)
        expected = bal0.get(who, 0) - charged
        ok = bal1.get(who, 0) == expected
        click.echo(f"  {who:<9} {money(bal0.get(who, 0)):>12} {money(charged):>10} "
                   f"{money(expected):>12} {money(bal1.get(who, 0)):>12}   "
                   f"{'ok' if ok else 'WRONG'}")  # fmt: skip
        if not ok:
            problems.append(f"balance of {who}")
    pays = after["payments"]["payments"].values()
    kept = [p for p in pays if p["order_id"] in failed_ids and not p["refunded"]]
    click.echo(f"  payments of failed or cancelled orders not refunded: {len(kept)}")
    if kept:
        problems.append("payments of failed orders not refunded")

    header("Invariant 3: shipments - only completed orders ship")
    ships = after["shipping"]["shipments"].values()
    live = sorted(s["order_id"] for s in ships if not s["cancelled"])
    want = sorted(p.order["order_id"] for p in done)
    click.echo(f"  active shipments: {', '.join(live) or 'none'}")
    click.echo(f"  completed orders: {', '.join(want) or 'none'}")
    click.echo(f"  check: {'ok' if live == want else 'WRONG'}")
    if live != want:
        problems.append("shipments")
    return problems


def report(plays: list[Scenario]) -> list[str]:
    problems = []
    header("The orders and their sagas (from the orchestrator's history: client.describe())")
    click.echo("  Each saga: reserve stock -> charge payment -> schedule shipping -> (wait).")
    click.echo("  When a step fails, the steps already done are undone in reverse order.")
    for n, play in enumerate(plays, start=1):
        got = play.final.get("status", "?")
        ok = got == play.expect
        if not ok:
            problems.append(f"order {play.order_id} ended {got}, expected {play.expect}")
        click.echo("")
        click.echo(click.style(f"Order {n}: {play.title}", bold=True))
        o = play.order
        click.echo(f"  id {play.order_id}   {o['customer']} buys {o['qty']} x {o['sku']} for "
                   f"{money(o['amount'])}   card {o.get('card', 'visa-4242')}")  # fmt: skip
        click.echo(rule())
        for line in timeline(play.final):
            click.echo(line)
        click.echo(rule())
        verdict = (
            click.style("as expected", fg="green") if ok else click.style("UNEXPECTED", fg="red")
        )
        click.echo(f"  final state: {got:<12} expected: {play.expect:<12} {verdict}")
    return problems


def snapshots(procs: Processes) -> dict[str, dict[str, Any]]:
    out = {}
    for service in ("inventory", "payments", "shipping"):
        snap = procs.snapshot(service)
        if snap is None:
            raise RuntimeError(f"{service} wrote no snapshot; see {procs.log_dir}")
        out[service] = snap["state"]
    return out


def wait_quiet(procs: Processes, seconds: float = 1.0, timeout: float = 20.0) -> None:
    """Until no service has changed its state for ``seconds`` (compensations are done)."""
    deadline = time.monotonic() + timeout
    last = json.dumps(snapshots(procs), sort_keys=True)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < seconds:
        time.sleep(0.2)
        now = json.dumps(snapshots(procs), sort_keys=True)
        if now != last:
            last, quiet_since = now, time.monotonic()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.command()
@click.option("--namespace", default="", help="topic prefix (default: demo-<random>)")
@click.option("--partitions", default=3, show_default=True, help="partitions of inbox/history")
@click.option("--keep-running", is_flag=True, help="leave everything running until Ctrl-C")
@click.option("--timeout", default=90.0, show_default=True, help="seconds to wait for the sagas")
def main(namespace: str, partitions: int, keep_running: bool, timeout: float) -> None:
    """Place a handful of orders as sagas across four services and check the invariants."""
    began = time.monotonic()
    run = uuid.uuid4().hex[:6]
    namespace = namespace or f"demo-{run}"
    header("Saga demo: an order = reserve stock -> charge payment -> schedule shipping")
    bootstrap = broker.external_bootstrap()
    if bootstrap:
        click.echo(f"  Kafka: {bootstrap} (from KAFKA_BOOTSTRAP_SERVERS)")
    else:
        bootstrap = broker.start(broker.BrokerLayout.from_env())
        click.echo(f"  Kafka: the development broker at {bootstrap}")
    root = Path(".run/demo") / namespace
    shutil.rmtree(root, ignore_errors=True)
    traces = (root / "traces.jsonl").resolve()
    procs = Processes(
        bootstrap,
        namespace,
        root,
        partitions=partitions,
        extra_env={"SAGA_TRACES_FILE": str(traces)},  # every process appends its spans here
    )
    procs.create_topics()
    click.echo(
        f"  topics: {namespace}.inbox/.history/.results/.dlq and one command topic per service"
    )
    procs.start_all()
    click.echo("  started 5 processes: the orchestrator node and the orders, inventory, payments")
    click.echo(f"  and shipping services; logs in {procs.log_dir}/, state in {procs.state_dir}/")
    problems: list[str] = []
    plays: list[Scenario] = []
    try:
        procs.wait_ready()
        click.echo(f"  orders HTTP API: {procs.base_url}  (POST /orders, GET /orders/<id>)")
        before = snapshots(procs)
        header("Placing orders through the orders API")
        plays = scenarios(run)
        drive(procs, plays, timeout)
        wait_quiet(procs)
        after = snapshots(procs)
        problems += report(plays)
        problems += check(plays, before, after)
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        header("Result")
        for problem in problems:
            click.echo(click.style(f"  FAILED: {problem}", fg="red"))
        if not problems:
            click.echo(click.style("  OK: every order ended as expected and every invariant holds",
                                   fg="green"))  # fmt: skip
        click.echo(f"  took {time.monotonic() - began:.1f}s")
        if keep_running and not procs.dead():
            click.echo(f"\n  still running (Ctrl-C to stop): orders API at {procs.base_url}, e.g.")
            click.echo(f"    curl -s {procs.base_url}/orders/{run}-1")
            click.echo(f"    SAGA_NAMESPACE={namespace} SAGA_STATE_DIR={procs.state_dir} "
                       "python -m services_example.inventory --dump")  # fmt: skip
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                while not procs.dead():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        procs.stop_all()
        click.echo("  stopped the processes the demo started (the broker keeps running).")
        show_trace(traces, plays)
    sys.exit(1 if problems else 0)


def show_trace(traces: Path, plays: list[Scenario]) -> None:
    """One saga's OpenTelemetry trace, across all five processes, as a tree with timings."""
    compensated = [p for p in plays if p.expect == "COMPENSATED" and p.order_id]
    if not traces.exists() or not compensated:
        return
    play = compensated[-1]
    workflow_id = workflow_id_of(play.order_id)
    header(f"The trace of order {play.order_id} ({play.title})")
    click.echo("  one trace: the orders API, the orchestrator's steps and each service's handler")
    for line in tracing.format_trace_tree(tracing.load_spans(traces), workflow_id=workflow_id):
        click.echo(f"  {line}")
    click.echo(f"  every trace: orchestrator trace {traces} [--workflow ID]")


if __name__ == "__main__":
    main()
