"""The inventory service: reserves and releases stock.

    python -m services_example.inventory [--stock book=100,lamp=10]     # serve
    python -m services_example.inventory --dump                         # print its state

State: ``stock`` (units available per SKU) and ``holds`` (hold id -> sku, qty, released). A
reservation of more than is available fails with ``OutOfStock``.
"""

from __future__ import annotations

import uuid

import click

from orchestrator.errors import BusinessError
from orchestrator.service import CommandInfo, Service
from services_example.contracts import (
    OUT_OF_STOCK,
    ReleaseStock,
    ReserveStock,
    StockHold,
    StockReleased,
    release_stock,
    reserve_stock,
)
from services_example.runtime import ServiceStore, State, parse_mapping, run_service

DEFAULT_STOCK = "book=100,lamp=40,mug=60,poster=5"


def register(service: Service, store: ServiceStore) -> None:
    @service.handler(reserve_stock)
    def reserve(arg: ReserveStock, info: CommandInfo) -> StockHold:
        def apply(state: State) -> StockHold:
            available = state["stock"].get(arg.sku, 0)
            if available < arg.qty:
                raise BusinessError(
                    f"only {available} x {arg.sku} in stock, {arg.qty} wanted",
                    error_type=OUT_OF_STOCK,
                )
            hold_id = "hold-" + uuid.uuid5(uuid.NAMESPACE_URL, info.idempotency_key).hex[:12]
            state["stock"][arg.sku] = available - arg.qty
            state["holds"][hold_id] = {
                "order_id": arg.order_id, "sku": arg.sku, "qty": arg.qty, "released": False
            }  # fmt: skip
            return StockHold(hold_id=hold_id, sku=arg.sku, qty=arg.qty)

        return store.once(info, StockHold, apply)

    @service.handler(release_stock)
    def release(arg: ReleaseStock, info: CommandInfo) -> StockReleased:
        def apply(state: State) -> StockReleased:
            hold = state["holds"].get(arg.hold_id)
            if hold is None or hold["released"]:
                return StockReleased(hold_id=arg.hold_id, released=False)
            hold["released"] = True
            state["stock"][hold["sku"]] = state["stock"].get(hold["sku"], 0) + hold["qty"]
            return StockReleased(hold_id=arg.hold_id, released=True)

        return store.once(info, StockReleased, apply)


@click.command()
@click.option(
    "--stock",
    envvar="INVENTORY_STOCK",
    default=DEFAULT_STOCK,
    show_default=True,
    help="initial units per SKU, used on the first start only [env: INVENTORY_STOCK]",
)
@click.option("--dump", is_flag=True, help="print the service's current state as JSON and exit")
def main(stock: str, dump: bool) -> None:
    """The inventory service of the order saga."""
    initial = {"stock": parse_mapping(stock, "--stock"), "holds": {}}
    run_service("inventory", initial, register, dump=dump)


if __name__ == "__main__":
    main()
