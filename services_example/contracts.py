"""The order saga's contracts: what the orders saga and the inventory, payments and shipping
services exchange. The only module those processes share.

Every amount is in cents. Every service has its own command topic
``<namespace>.<service>.commands``: the namespace (``SAGA_NAMESPACE``, the same variable the
orchestrator reads) is part of the service name, so two namespaces on one cluster (a demo and a
test, two developers) never share a command topic or a consumer group.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from contracts.activity import ActivityContract

NAMESPACE_ENV = "SAGA_NAMESPACE"
DEFAULT_NAMESPACE = "saga"  # the default of orchestrator.settings.Settings.namespace


def service_name(service: str) -> str:
    """``<namespace>.<service>``: the consumer group and, with ``.commands``, the topic."""
    return f"{os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE}.{service}"


# --------------------------------------------------------------------------- the order


class Order(BaseModel):
    """The input of the ``place-order`` workflow."""

    order_id: str
    customer: str
    sku: str
    qty: int = Field(ge=1)
    amount: int = Field(ge=0, description="the price in cents")
    card: str = "visa-4242"
    address: str = "1 Main Street, Springfield"
    confirm_delivery: bool = Field(
        default=False, description="wait for a 'confirm-delivery' signal before completing"
    )
    settle_seconds: float = Field(
        default=0.0, ge=0, description="a durable sleep after shipping, before completing"
    )


class DeliveryConfirmation(BaseModel):
    """The payload of the ``confirm-delivery`` signal."""

    by: str = "customer"


class Receipt(BaseModel):
    """The result of a completed ``place-order`` workflow."""

    order_id: str
    hold_id: str
    payment_id: str
    shipment_id: str
    confirmed_by: str = ""


# --------------------------------------------------------------------------- inventory


class ReserveStock(BaseModel):
    order_id: str
    sku: str
    qty: int


class StockHold(BaseModel):
    hold_id: str
    sku: str
    qty: int


class ReleaseStock(BaseModel):
    hold_id: str


class StockReleased(BaseModel):
    hold_id: str
    released: bool  # false when it was released already


# --------------------------------------------------------------------------- payments


class ChargePayment(BaseModel):
    order_id: str
    customer: str
    amount: int
    card: str


class PaymentReceipt(BaseModel):
    payment_id: str
    customer: str
    amount: int


class RefundPayment(BaseModel):
    payment_id: str


class PaymentRefunded(BaseModel):
    payment_id: str
    refunded: bool  # false when it was refunded already


# --------------------------------------------------------------------------- shipping


class ScheduleShipment(BaseModel):
    order_id: str
    sku: str
    qty: int
    address: str


class ShipmentScheduled(BaseModel):
    shipment_id: str
    eta_days: int


class CancelShipment(BaseModel):
    shipment_id: str


class ShipmentCancelled(BaseModel):
    shipment_id: str
    cancelled: bool  # false when it was cancelled already


# --------------------------------------------------------------------------- the contracts

INVENTORY = service_name("inventory")
PAYMENTS = service_name("payments")
SHIPPING = service_name("shipping")

reserve_stock = ActivityContract("inventory.reserve", INVENTORY, ReserveStock, StockHold)
release_stock = ActivityContract("inventory.release", INVENTORY, ReleaseStock, StockReleased)
charge_payment = ActivityContract("payments.charge", PAYMENTS, ChargePayment, PaymentReceipt)
refund_payment = ActivityContract("payments.refund", PAYMENTS, RefundPayment, PaymentRefunded)
schedule_shipment = ActivityContract(
    "shipping.schedule", SHIPPING, ScheduleShipment, ShipmentScheduled
)
cancel_shipment = ActivityContract("shipping.cancel", SHIPPING, CancelShipment, ShipmentCancelled)

#: Business failures (``error_type`` of the ``BusinessError`` each service raises).
OUT_OF_STOCK = "OutOfStock"
CARD_DECLINED = "CardDeclined"
ADDRESS_NOT_DELIVERABLE = "AddressNotDeliverable"
