"""The ``place-order`` saga: reserve stock, charge the customer, schedule the shipment.

Each step registers its compensation as soon as it has succeeded; when a later step fails for a
business reason (``CardDeclined``, ``AddressNotDeliverable``), or the order is cancelled while
it waits for the delivery confirmation, the registered compensations run in reverse order.

Run it on an orchestrator node with::

    python -m orchestrator.cli run --workflows services_example.orders.saga
"""

from __future__ import annotations

from datetime import timedelta

from contracts.envelopes import RetryPolicy
from orchestrator import workflow
from orchestrator.workflow import WorkflowContext
from services_example.contracts import (
    CancelShipment,
    ChargePayment,
    DeliveryConfirmation,
    Order,
    Receipt,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    cancel_shipment,
    charge_payment,
    refund_payment,
    release_stock,
    reserve_stock,
    schedule_shipment,
)

#: Transient failures (a service down, a lost reply) are retried for up to two minutes; a
#: business failure is never retried.
RETRY = RetryPolicy(max_attempts=0, initial_interval_ms=200, max_interval_ms=2_000)
ATTEMPT_TIMEOUT = timedelta(seconds=5)
OVERALL_TIMEOUT = timedelta(minutes=2)


@workflow.defn(name="place-order")
class PlaceOrder:
    @workflow.run
    async def run(self, ctx: WorkflowContext, order: Order) -> Receipt:
        async with ctx.saga() as saga:
            hold = await ctx.call(
                reserve_stock,
                ReserveStock(order_id=order.order_id, sku=order.sku, qty=order.qty),
                retry=RETRY,
                timeout=ATTEMPT_TIMEOUT,
                overall_timeout=OVERALL_TIMEOUT,
            )
            saga.on_failure(release_stock, ReleaseStock(hold_id=hold.hold_id))

            payment = await ctx.call(
                charge_payment,
                ChargePayment(
                    order_id=order.order_id,
                    customer=order.customer,
                    amount=order.amount,
                    card=order.card,
                ),
                retry=RETRY,
                timeout=ATTEMPT_TIMEOUT,
                overall_timeout=OVERALL_TIMEOUT,
            )
            saga.on_failure(refund_payment, RefundPayment(payment_id=payment.payment_id))

            shipment = await ctx.call(
                schedule_shipment,
                ScheduleShipment(
                    order_id=order.order_id, sku=order.sku, qty=order.qty, address=order.address
                ),
                retry=RETRY,
                timeout=ATTEMPT_TIMEOUT,
                overall_timeout=OVERALL_TIMEOUT,
            )
            saga.on_failure(cancel_shipment, CancelShipment(shipment_id=shipment.shipment_id))

            confirmed_by = ""
            if order.confirm_delivery:  # durable: may wait for days, survives restarts
                confirmation = await ctx.wait_signal("confirm-delivery", DeliveryConfirmation)
                confirmed_by = confirmation.by
            elif order.settle_seconds:
                await ctx.sleep(timedelta(seconds=order.settle_seconds))

        return Receipt(
            order_id=order.order_id,
            hold_id=hold.hold_id,
            payment_id=payment.payment_id,
            shipment_id=shipment.shipment_id,
            confirmed_by=confirmed_by,
        )
