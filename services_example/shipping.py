"""The shipping service: schedules and cancels shipments.

    python -m services_example.shipping [--undeliverable "north pole,atlantis"]   # serve
    python -m services_example.shipping --dump                                   # print its state

State: ``shipments`` (shipment id -> order, address, cancelled). An address that contains one of
the undeliverable words (case-insensitive) fails with ``AddressNotDeliverable``.
"""

from __future__ import annotations

import uuid

import click

from orchestrator.errors import BusinessError
from orchestrator.service import CommandInfo, Service
from services_example.contracts import (
    ADDRESS_NOT_DELIVERABLE,
    CancelShipment,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    cancel_shipment,
    schedule_shipment,
)
from services_example.runtime import ServiceStore, State, run_service

DEFAULT_UNDELIVERABLE = "north pole,atlantis"


def register(service: Service, store: ServiceStore, undeliverable: list[str]) -> None:
    @service.handler(schedule_shipment)
    def schedule(arg: ScheduleShipment, info: CommandInfo) -> ShipmentScheduled:
        def apply(state: State) -> ShipmentScheduled:
            lowered = arg.address.lower()
            if not arg.address.strip() or any(word in lowered for word in undeliverable):
                raise BusinessError(
                    f"we do not deliver to {arg.address!r}", error_type=ADDRESS_NOT_DELIVERABLE
                )
            shipment_id = "ship-" + uuid.uuid5(uuid.NAMESPACE_URL, info.idempotency_key).hex[:12]
            state["shipments"][shipment_id] = {
                "order_id": arg.order_id,
                "sku": arg.sku,
                "qty": arg.qty,
                "address": arg.address,
                "cancelled": False,
            }
            return ShipmentScheduled(shipment_id=shipment_id, eta_days=2)

        return store.once(info, ShipmentScheduled, apply)

    @service.handler(cancel_shipment)
    def cancel(arg: CancelShipment, info: CommandInfo) -> ShipmentCancelled:
        def apply(state: State) -> ShipmentCancelled:
            shipment = state["shipments"].get(arg.shipment_id)
            if shipment is None or shipment["cancelled"]:
                return ShipmentCancelled(shipment_id=arg.shipment_id, cancelled=False)
            shipment["cancelled"] = True
            return ShipmentCancelled(shipment_id=arg.shipment_id, cancelled=True)

        return store.once(info, ShipmentCancelled, apply)


@click.command()
@click.option(
    "--undeliverable",
    envvar="SHIPPING_UNDELIVERABLE",
    default=DEFAULT_UNDELIVERABLE,
    show_default=True,
    help="comma-separated words that make an address undeliverable [env: SHIPPING_UNDELIVERABLE]",
)
@click.option("--dump", is_flag=True, help="print the service's current state as JSON and exit")
def main(undeliverable: str, dump: bool) -> None:
    """The shipping service of the order saga."""
    words = [w.strip().lower() for w in undeliverable.split(",") if w.strip()]
    run_service(
        "shipping",
        {"shipments": {}},
        lambda service, store: register(service, store, words),
        dump=dump,
    )


if __name__ == "__main__":
    main()
