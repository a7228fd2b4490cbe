"""The order saga end to end: the orchestrator and the four services as separate processes on the
real broker, 50 orders with every kind of outcome, and the payments service killed with SIGKILL
while orders are in flight. Every order must end as its scenario says, and no stock, money or
shipment may be created or lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import Client
from orchestrator.errors import WorkflowFailedError
from orchestrator.settings import Settings
from services_example.contracts import Receipt
from services_example.processes import Processes

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(150)]

CUSTOMERS = [f"c{i}" for i in range(10)]
STOCK = {"book": 1000, "lamp": 1000, "mug": 1000}
BALANCE = 1_000_000


def scenario(n: int) -> tuple[dict[str, Any], str, str]:
    """Order ``n``: its body, its expected final status, and what to do while it waits."""
    sku = ("book", "lamp", "mug")[n % 3]
    order: dict[str, Any] = {
        "order_id": f"o{n}",
        "customer": CUSTOMERS[n % len(CUSTOMERS)],
        "sku": sku,
        "qty": 1 + n % 4,
        "amount": 1000 + 37 * n,
    }
    kind = n % 10
    if kind == 6:
        return {**order, "card": "declined-card"}, "COMPENSATED", ""
    if kind == 7:
        return {**order, "address": "Igloo 3, North Pole"}, "COMPENSATED", ""
    if kind == 8:
        return {**order, "qty": 5000}, "FAILED", ""  # out of stock
    if kind == 9:
        return {**order, "amount": BALANCE + 1}, "COMPENSATED", ""  # insufficient funds
    if kind == 4:
        return {**order, "confirm_delivery": True}, "COMPLETED", "confirm"
    if kind == 5:
        return {**order, "confirm_delivery": True}, "CANCELLED", "cancel"
    if kind == 3:
        return {**order, "settle_seconds": 1}, "COMPLETED", ""
    return order, "COMPLETED", ""


@pytest.fixture
def procs(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(
        kafka_bootstrap,
        namespace,
        tmp_path,
        extra_env={
            "INVENTORY_STOCK": ",".join(f"{k}={v}" for k, v in STOCK.items()),
            "PAYMENTS_BALANCES": ",".join(f"{c}={BALANCE}" for c in CUSTOMERS),
        },
    )
    p.create_topics()
    p.start_all()
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop_all()


def final_status(client: Client, workflow_id: str, timeout: float) -> str:
    try:
        client.result(workflow_id, Receipt, timeout=timeout)
        return "COMPLETED"
    except WorkflowFailedError as exc:
        return exc.status


def wait_quiet(procs: Processes, seconds: float = 1.5, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = [procs.snapshot(s) for s in ("inventory", "payments", "shipping")]
    since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < seconds:
        time.sleep(0.2)
        now = [procs.snapshot(s) for s in ("inventory", "payments", "shipping")]
        if [n and n["state"] for n in now] != [b and b["state"] for b in last]:
            last, since = now, time.monotonic()


def test_fifty_orders_with_payments_killed(
    procs: Processes, kafka_bootstrap: str, namespace: str
) -> None:
    began = time.monotonic()
    plays = [scenario(n) for n in range(50)]
    settings = Settings.model_validate(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "namespace": namespace,
            "partitions": procs.partitions,
        }
    )
    with Client(settings) as client:
        for n, (order, _, then) in enumerate(plays):
            if n == 20:  # a crash while orders are in flight: no clean-up at all
                procs.kill("payments")
                killed_at = time.monotonic()
            if n == 35:
                time.sleep(max(0.0, 3.0 - (time.monotonic() - killed_at)))
                restarted_at = time.time()
                procs.start("payments")
            procs.http("POST", "/orders", order)
            if then == "confirm":  # sent at once: the saga buffers it until it waits for it
                procs.http("POST", f"/orders/{order['order_id']}/confirm-delivery", {"by": "e2e"})

        # Cancel the waiting ones once they wait (their shipment is scheduled).
        to_cancel = {order["order_id"] for order, _, then in plays if then == "cancel"}
        deadline = time.monotonic() + 60
        while to_cancel and time.monotonic() < deadline:
            for order_id in sorted(to_cancel):
                try:
                    described = procs.http("GET", f"/orders/{order_id}")
                except OSError:
                    continue
                if any("shipping.schedule" in e["summary"] and "completed" in e["summary"]
                       for e in described["events"]):  # fmt: skip
                    procs.http("POST", f"/orders/{order_id}/cancel", {"reason": "e2e"})
                    to_cancel.discard(order_id)
            time.sleep(0.3)
        assert not to_cancel, f"never waited for the delivery: {to_cancel}"

        got = {
            order["order_id"]: final_status(client, f"order-{order['order_id']}", timeout=90)
            for order, _, _ in plays
        }
        # The crash was felt: charges of orders placed while payments was down were answered
        # only by the restarted service (after an attempt timeout and a retry, or straight from
        # the topic, depending on how long the restart took).
        charges = {
            n: [e for e in client.describe(f"order-o{n}").events if "payments.charge" in e.summary]
            for n in range(20, 35)
        }
        retried = [
            n for n, es in charges.items() if any(e.kind == "ActivityAttemptFailed" for e in es)
        ]
        after_restart = [
            n
            for n, es in charges.items()
            if any(e.kind == "ActivityCompleted" and e.time.timestamp() >= restarted_at for e in es)
        ]
    want = {order["order_id"]: expect for order, expect, _ in plays}
    assert got == want
    assert after_restart, "no charge waited for the restarted payments: the kill came too late"
    assert not procs.dead(), f"a process died; see {procs.log_dir}"

    wait_quiet(procs)
    inventory = procs.snapshot("inventory")
    payments = procs.snapshot("payments")
    shipping = procs.snapshot("shipping")
    assert inventory and payments and shipping
    done = [order for order, expect, _ in plays if expect == "COMPLETED"]
    failed = {order["order_id"] for order, expect, _ in plays if expect != "COMPLETED"}

    # Stock: exactly the units of the completed orders left the shelf.
    for sku, initial in STOCK.items():
        sold = sum(o["qty"] for o in done if o["sku"] == sku)
        assert inventory["state"]["stock"][sku] == initial - sold, sku
    holds = inventory["state"]["holds"].values()
    assert {h["order_id"] for h in holds if not h["released"]} == {o["order_id"] for o in done}

    # Money: exactly the amounts of the completed orders were charged, each once.
    for customer in CUSTOMERS:
        charged = sum(o["amount"] for o in done if o["customer"] == customer)
        assert payments["state"]["balances"][customer] == BALANCE - charged, customer
    pays = list(payments["state"]["payments"].values())
    assert sorted(p["order_id"] for p in pays if not p["refunded"]) == sorted(
        o["order_id"] for o in done
    )
    assert all(p["refunded"] for p in pays if p["order_id"] in failed)

    # Shipments: one live shipment per completed order, none for the others.
    ships = shipping["state"]["shipments"].values()
    assert sorted(s["order_id"] for s in ships if not s["cancelled"]) == sorted(
        o["order_id"] for o in done
    )
    elapsed = time.monotonic() - began
    print(
        f"50 orders, payments killed for ~3 s ({len(after_restart)} charges completed by the "
        f"restarted service; {len(retried)} orders retried a charge): "
        f"all as expected in {elapsed:.1f}s"
    )
