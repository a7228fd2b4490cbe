"""The closed-loop phase's services: the order saga's three services on the Services SDK.

    python -m bench._sdk_services inventory|payments|shipping

One process per service, as the example's services run (``services_example/``), configured by
the same environment (``SAGA_NAMESPACE``, ``KAFKA_BOOTSTRAP_SERVERS``, ``SAGA_STATE_DIR``, ...).
The handlers follow the example's rules (a charge with the card ``declined-card`` fails with
``CardDeclined``, so the saga compensates) but keep their state in memory: the example services
write a RocksDB record and a JSON snapshot per operation, which would measure their storage, not
the orchestrator. Everything else (a ``read_committed`` consumer, one Kafka transaction per batch
with the consumed offsets, the dedupe store) is the SDK as it ships.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from orchestrator.errors import BusinessError
from orchestrator.service import CommandInfo, Service
from orchestrator.settings import Settings
from services_example.contracts import (
    CARD_DECLINED,
    CancelShipment,
    ChargePayment,
    PaymentReceipt,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    StockHold,
    StockReleased,
    cancel_shipment,
    charge_payment,
    refund_payment,
    release_stock,
    reserve_stock,
    schedule_shipment,
    service_name,
)

DECLINED_CARD = "declined-card"
SERVICES = ("inventory", "payments", "shipping")


def register(service: Service, base: str) -> None:
    """The handlers of service ``base``, with in-memory state."""
    done: dict[str, bool] = {}  # what was undone already: an undo is answered once as True

    if base == "inventory":

        @service.handler(reserve_stock)
        def reserve(arg: ReserveStock, info: CommandInfo) -> StockHold:
            return StockHold(hold_id=f"hold-{arg.order_id}", sku=arg.sku, qty=arg.qty)

        @service.handler(release_stock)
        def release(arg: ReleaseStock, info: CommandInfo) -> StockReleased:
            first = arg.hold_id not in done
            done[arg.hold_id] = True
            return StockReleased(hold_id=arg.hold_id, released=first)

    elif base == "payments":

        @service.handler(charge_payment)
        def charge(arg: ChargePayment, info: CommandInfo) -> PaymentReceipt:
            if arg.card == DECLINED_CARD:
                raise BusinessError(f"card {arg.card} was declined", error_type=CARD_DECLINED)
            return PaymentReceipt(
                payment_id=f"pay-{arg.order_id}", customer=arg.customer, amount=arg.amount
            )

        @service.handler(refund_payment)
        def refund(arg: RefundPayment, info: CommandInfo) -> PaymentRefunded:
            first = arg.payment_id not in done
            done[arg.payment_id] = True
            return PaymentRefunded(payment_id=arg.payment_id, refunded=first)

    elif base == "shipping":

        @service.handler(schedule_shipment)
        def schedule(arg: ScheduleShipment, info: CommandInfo) -> ShipmentScheduled:
            return ShipmentScheduled(shipment_id=f"ship-{arg.order_id}", eta_days=2)

        @service.handler(cancel_shipment)
        def cancel(arg: CancelShipment, info: CommandInfo) -> ShipmentCancelled:
            first = arg.shipment_id not in done
            done[arg.shipment_id] = True
            return ShipmentCancelled(shipment_id=arg.shipment_id, cancelled=first)

    else:
        raise SystemExit(f"unknown service {base!r}: one of {', '.join(SERVICES)}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m bench._sdk_services {'|'.join(SERVICES)}", file=sys.stderr)
        return 2
    base = argv[0]
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {base} %(name)s: %(message)s")
    if os.environ.get("BENCH_LIBRDKAFKA_LOG"):  # with SAGA_KAFKA__DEBUG=eos,...: to the log file
        logging.getLogger("orchestrator.librdkafka").setLevel(logging.DEBUG)
    settings = Settings()
    # BENCH_SERVICES_TRANSACTIONAL=0: the SDK's at-least-once mode (reply flushed, then offsets
    # committed), one of the lower-latency options measured in docs/performance.md.
    transactional = os.environ.get("BENCH_SERVICES_TRANSACTIONAL", "1") != "0"
    service = Service(
        service_name(base),
        settings,
        state_dir=Path(settings.state_dir),
        transactional=transactional,
    )
    register(service, base)
    try:
        service.run()  # until SIGTERM
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
