"""The orders service: a small asyncio HTTP API (aiohttp) in front of the ``place-order`` saga.

    python -m services_example.orders [--port 8080]

| method and path                        | what it does                                           |
|----------------------------------------|--------------------------------------------------------|
| ``POST /orders``                       | place an order (an ``Order`` as JSON; 202 Accepted)    |
| ``GET /orders``                        | the orders placed through this service                 |
| ``GET /orders/{id}``                   | the saga's status, current step and timeline           |
| ``POST /orders/{id}/confirm-delivery`` | the ``confirm-delivery`` signal (``{"by": ...}``)      |
| ``POST /orders/{id}/cancel``           | cancel the saga (its compensations run)                |
| ``GET /health``                        | ``{"ok": true}``                                       |

The workflow id of order ``X`` is ``order-X``. Placing the same order twice (same id and body)
is harmless: the orchestrator ignores a duplicate start.

The handlers are coroutines on one event loop and talk to the orchestrator through
:class:`~orchestrator.AsyncClient`: a start, signal or cancel awaits the broker's acknowledgement
without holding a thread, and ``describe`` runs in a worker thread. The local order book (a
``ServiceStore`` that writes a file) is written in a worker thread too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from orchestrator import AsyncClient
from orchestrator.client import ClientError
from orchestrator.errors import UnknownWorkflow
from services_example.contracts import Order
from services_example.runtime import ServiceStore, State

log = logging.getLogger(__name__)

WORKFLOW_TYPE = "place-order"
_ORDER_ID = "{order_id:[A-Za-z0-9._-]+}"


def workflow_id_of(order_id: str) -> str:
    return f"order-{order_id}"


class Placed(BaseModel):
    order_id: str
    workflow_id: str


class OrdersApi:
    """The request handling, apart from HTTP: easy to call from tests."""

    def __init__(self, client: AsyncClient, store: ServiceStore) -> None:
        self.client = client
        self.store = store

    async def place(self, body: dict[str, Any]) -> Placed:
        body = {"order_id": uuid.uuid4().hex[:12], **body}
        order = Order.model_validate(body)
        workflow_id = workflow_id_of(order.order_id)

        def apply(state: State) -> Placed:
            state["orders"][order.order_id] = order.model_dump(mode="json")
            return Placed(order_id=order.order_id, workflow_id=workflow_id)

        placed = await asyncio.to_thread(
            self.store.once_by_key, f"place/{order.order_id}", "place", Placed, apply
        )
        await self.client.start(WORKFLOW_TYPE, order, workflow_id=workflow_id)
        return placed

    async def status(self, order_id: str) -> dict[str, Any]:
        described = (await self.client.describe(workflow_id_of(order_id))).to_dict()
        described["order_id"] = order_id
        return described

    async def orders(self) -> Any:
        return (await asyncio.to_thread(self.store.read))["orders"]


def _json(status: HTTPStatus, body: Any) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, indent=2, default=str),
        content_type="application/json",
    )


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    body = json.loads(raw or b"{}")  # a JSONDecodeError is a ValueError: 400
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer is JSON, errors included, as a client of this API expects."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return _json(HTTPStatus.NOT_FOUND, {"error": f"no route {request.method} {request.path}"})
    except UnknownWorkflow as exc:
        return _json(HTTPStatus.NOT_FOUND, {"error": str(exc)})
    except ValidationError as exc:
        errors = [{"field": ".".join(map(str, e["loc"])), "error": e["msg"]} for e in exc.errors()]
        return _json(HTTPStatus.BAD_REQUEST, {"error": "invalid order", "details": errors})
    except ValueError as exc:
        return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
    except (ClientError, TimeoutError) as exc:
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})


def make_app(api: OrdersApi) -> web.Application:
    """The aiohttp application of the API (the table in the module docstring)."""

    async def health(request: web.Request) -> web.Response:
        return _json(HTTPStatus.OK, {"ok": True})

    async def list_orders(request: web.Request) -> web.Response:
        return _json(HTTPStatus.OK, await api.orders())

    async def status(request: web.Request) -> web.Response:
        return _json(HTTPStatus.OK, await api.status(request.match_info["order_id"]))

    async def place(request: web.Request) -> web.Response:
        placed = await api.place(await _body(request))
        return _json(
            HTTPStatus.ACCEPTED,
            {**placed.model_dump(), "status_url": f"/orders/{placed.order_id}"},
        )

    async def confirm(request: web.Request) -> web.Response:
        body = await _body(request)
        workflow_id = workflow_id_of(request.match_info["order_id"])
        request_id = await api.client.signal(
            workflow_id, "confirm-delivery", {"by": str(body.get("by", "customer"))}
        )
        return _json(HTTPStatus.ACCEPTED, {"workflow_id": workflow_id, "request": request_id})

    async def cancel(request: web.Request) -> web.Response:
        body = await _body(request)
        workflow_id = workflow_id_of(request.match_info["order_id"])
        reason = str(body.get("reason", "cancelled through the orders API"))
        request_id = await api.client.cancel(workflow_id, reason)
        return _json(HTTPStatus.ACCEPTED, {"workflow_id": workflow_id, "request": request_id})

    app = web.Application(middlewares=[_errors])
    app.router.add_get("/health", health)
    app.router.add_get("/orders", list_orders)
    app.router.add_post("/orders", place)
    app.router.add_get(f"/orders/{_ORDER_ID}", status)
    app.router.add_post(f"/orders/{_ORDER_ID}/confirm-delivery", confirm)
    app.router.add_post(f"/orders/{_ORDER_ID}/cancel", cancel)
    return app


async def serve(api: OrdersApi, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve HTTP on ``host:port`` until ``stop`` is set."""
    runner = web.AppRunner(make_app(api), access_log=log)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("orders API on http://%s:%d", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
