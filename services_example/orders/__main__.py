"""``python -m services_example.orders``: the orders HTTP API (see ``api.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import click
from opentelemetry.sdk.trace import TracerProvider

from orchestrator import AsyncClient, tracing
from orchestrator.settings import Settings
from services_example.orders.api import OrdersApi, serve
from services_example.runtime import ServiceStore, load_settings, read_snapshot, service_dir


@click.command()
@click.option(
    "--host", envvar="ORDERS_HTTP_HOST", default="127.0.0.1", show_default=True,
    help="interface of the HTTP API [env: ORDERS_HTTP_HOST]",
)  # fmt: skip
@click.option(
    "--port", envvar="ORDERS_HTTP_PORT", type=click.IntRange(0, 65535), default=8080,
    show_default=True, help="port of the HTTP API [env: ORDERS_HTTP_PORT]",
)  # fmt: skip
@click.option("--dump", is_flag=True, help="print the orders placed so far as JSON and exit")
def main(host: str, port: int, dump: bool) -> None:
    """The orders service: an HTTP API to place orders and follow their sagas."""
    settings = load_settings()
    if dump:
        snap = read_snapshot(Path(settings.state_dir), "orders")
        if snap is None:
            raise click.ClickException("no snapshot yet (has the orders service run?)")
        click.echo(json.dumps(snap, indent=2, sort_keys=True))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orders %(levelname)s %(message)s")
    store = ServiceStore(service_dir(settings, "orders"), "orders", {"orders": {}})
    provider = tracing.setup("orders", span_file=settings.traces_file)
    try:
        asyncio.run(_serve(settings, provider, store, host, port))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    finally:
        store.close()
        provider.shutdown()


async def _serve(
    settings: Settings, provider: TracerProvider, store: ServiceStore, host: str, port: int
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with AsyncClient(settings, tracer_provider=provider) as client:
        await serve(OrdersApi(client, store), host, port, stop)


if __name__ == "__main__":
    main()
