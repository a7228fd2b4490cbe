"""The payments service: charges and refunds customers' accounts.

    python -m services_example.payments [--balances alice=50000,bob=20000]   # serve
    python -m services_example.payments --dump                               # print its state

State: ``balances`` (cents per customer) and ``payments`` (payment id -> customer, amount,
refunded). A charge fails with ``CardDeclined`` when the balance is too low, the customer is
unknown, or the card is ``declined-card``.
"""

from __future__ import annotations

import uuid

import click

from orchestrator.errors import BusinessError
from orchestrator.service import CommandInfo, Service
from services_example.contracts import (
    CARD_DECLINED,
    ChargePayment,
    PaymentReceipt,
    PaymentRefunded,
    RefundPayment,
    charge_payment,
    refund_payment,
)
from services_example.runtime import ServiceStore, State, parse_mapping, run_service

DEFAULT_BALANCES = "alice=100000,bob=100000,carol=100000,dave=100000,erin=100000,frank=1000"
DECLINED_CARD = "declined-card"


def register(service: Service, store: ServiceStore) -> None:
    @service.handler(charge_payment)
    def charge(arg: ChargePayment, info: CommandInfo) -> PaymentReceipt:
        def apply(state: State) -> PaymentReceipt:
            balance = state["balances"].get(arg.customer)
            if arg.card == DECLINED_CARD:
                raise BusinessError(f"card {arg.card} was declined", error_type=CARD_DECLINED)
            if balance is None:
                raise BusinessError(f"no account for {arg.customer}", error_type=CARD_DECLINED)
            if balance < arg.amount:
                raise BusinessError(
                    f"insufficient funds: balance {balance}, charge {arg.amount}",
                    error_type=CARD_DECLINED,
                )
            payment_id = "pay-" + uuid.uuid5(uuid.NAMESPACE_URL, info.idempotency_key).hex[:12]
            state["balances"][arg.customer] = balance - arg.amount
            state["payments"][payment_id] = {
                "order_id": arg.order_id,
                "customer": arg.customer,
                "amount": arg.amount,
                "refunded": False,
            }
            return PaymentReceipt(payment_id=payment_id, customer=arg.customer, amount=arg.amount)

        return store.once(info, PaymentReceipt, apply)

    @service.handler(refund_payment)
    def refund(arg: RefundPayment, info: CommandInfo) -> PaymentRefunded:
        def apply(state: State) -> PaymentRefunded:
            payment = state["payments"].get(arg.payment_id)
            if payment is None or payment["refunded"]:
                return PaymentRefunded(payment_id=arg.payment_id, refunded=False)
            payment["refunded"] = True
            customer = payment["customer"]
            state["balances"][customer] = state["balances"].get(customer, 0) + payment["amount"]
            return PaymentRefunded(payment_id=arg.payment_id, refunded=True)

        return store.once(info, PaymentRefunded, apply)


@click.command()
@click.option(
    "--balances",
    envvar="PAYMENTS_BALANCES",
    default=DEFAULT_BALANCES,
    show_default=True,
    help="initial balance in cents per customer, used on the first start only "
    "[env: PAYMENTS_BALANCES]",
)
@click.option("--dump", is_flag=True, help="print the service's current state as JSON and exit")
def main(balances: str, dump: bool) -> None:
    """The payments service of the order saga."""
    initial = {"balances": parse_mapping(balances, "--balances"), "payments": {}}
    run_service("payments", initial, register, dump=dump)


if __name__ == "__main__":
    main()
