"""The example services' business rules and their idempotency, without Kafka."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from orchestrator.errors import BusinessError
from orchestrator.service import CommandInfo, Service
from services_example import payments
from services_example.contracts import ChargePayment, PaymentReceipt, PaymentRefunded, RefundPayment
from services_example.runtime import ServiceStore


class Handlers:
    """Stands in for a Service: keeps what ``register`` registers, by activity name."""

    def __init__(self) -> None:
        self.by_name: dict[str, Callable[[Any, CommandInfo], Any]] = {}

    def handler(self, contract: Any) -> Callable[[Any], Any]:
        def register(fn: Callable[[Any, CommandInfo], Any]) -> Callable[[Any, CommandInfo], Any]:
            self.by_name[contract.name] = fn
            return fn

        return register


def info(key: str, attempt: int = 1) -> CommandInfo:
    return CommandInfo(
        workflow_id=key.split("/")[0],
        activity_name="x",
        seq=int(key.split("/")[1]),
        attempt=attempt,
        idempotency_key=key,
        is_compensation=False,
    )


@pytest.fixture
def pay(tmp_path: Path) -> tuple[Handlers, ServiceStore]:
    store = ServiceStore(tmp_path / "payments", "payments", {
        "balances": {"alice": 10_000}, "payments": {}
    })  # fmt: skip
    handlers = Handlers()
    payments.register(cast(Service, handlers), store)
    return handlers, store


def test_a_repeated_charge_is_applied_once_and_answers_the_same(
    pay: tuple[Handlers, ServiceStore],
) -> None:
    handlers, store = pay
    charge = handlers.by_name["payments.charge"]
    arg = ChargePayment(order_id="o1", customer="alice", amount=3_000, card="visa")
    first: PaymentReceipt = charge(arg, info("wf-1/2"))
    again: PaymentReceipt = charge(arg, info("wf-1/2", attempt=2))
    assert first == again
    assert store.state["balances"]["alice"] == 7_000
    assert list(store.state["payments"]) == [first.payment_id]


def test_a_declined_card_changes_nothing_and_stays_declined(
    pay: tuple[Handlers, ServiceStore],
) -> None:
    handlers, store = pay
    charge = handlers.by_name["payments.charge"]
    too_much = ChargePayment(order_id="o2", customer="alice", amount=50_000, card="visa")
    for attempt in (1, 2):
        with pytest.raises(BusinessError) as refused:
            charge(too_much, info("wf-2/2", attempt))
        assert refused.value.error_type == "CardDeclined"
    assert store.state["balances"]["alice"] == 10_000
    assert store.state["payments"] == {}


def test_a_refund_gives_the_money_back_once(pay: tuple[Handlers, ServiceStore]) -> None:
    handlers, store = pay
    receipt: PaymentReceipt = handlers.by_name["payments.charge"](
        ChargePayment(order_id="o3", customer="alice", amount=2_500, card="visa"), info("wf-3/2")
    )
    refund = handlers.by_name["payments.refund"]
    done: PaymentRefunded = refund(RefundPayment(payment_id=receipt.payment_id), info("wf-3/5"))
    repeat: PaymentRefunded = refund(RefundPayment(payment_id=receipt.payment_id), info("wf-3/5"))
    other: PaymentRefunded = refund(RefundPayment(payment_id=receipt.payment_id), info("wf-3/6"))
    assert (done.refunded, repeat.refunded, other.refunded) == (True, True, False)
    assert store.state["balances"]["alice"] == 10_000


def test_the_store_keeps_state_and_answers_across_a_restart(tmp_path: Path) -> None:
    initial = {"balances": {"bob": 1_000}, "payments": {}}
    store = ServiceStore(tmp_path / "p", "payments", initial)
    handlers = Handlers()
    payments.register(cast(Service, handlers), store)
    arg = ChargePayment(order_id="o4", customer="bob", amount=400, card="visa")
    first = handlers.by_name["payments.charge"](arg, info("wf-4/2"))
    store.close()

    reopened = ServiceStore(tmp_path / "p", "payments", {"balances": {}, "payments": {}})
    handlers = Handlers()
    payments.register(cast(Service, handlers), reopened)
    assert handlers.by_name["payments.charge"](arg, info("wf-4/2", attempt=3)) == first
    assert reopened.state["balances"]["bob"] == 600
    reopened.close()
