"""The orders service: a small HTTP API in front of the ``place-order`` saga.

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
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.client import Client, ClientError
from orchestrator.errors import UnknownWorkflow
from services_example.contracts import Order
from services_example.runtime import ServiceStore, State

log = logging.getLogger(__name__)

WORKFLOW_TYPE = "place-order"
_ORDER_PATH = re.compile(r"^/orders/([A-Za-z0-9._-]+)(/confirm-delivery|/cancel)?$")


def workflow_id_of(order_id: str) -> str:
    return f"order-{order_id}"


class Placed(BaseModel):
    order_id: str
    workflow_id: str


class OrdersApi:
    """The request handling, apart from HTTP: easy to call from tests."""

    def __init__(self, client: Client, store: ServiceStore) -> None:
        self.client = client
        self.store = store

    def place(self, body: dict[str, Any]) -> Placed:
        body = {"order_id": uuid.uuid4().hex[:12], **body}
        order = Order.model_validate(body)
        workflow_id = workflow_id_of(order.order_id)

        def apply(state: State) -> Placed:
            state["orders"][order.order_id] = order.model_dump(mode="json")
            return Placed(order_id=order.order_id, workflow_id=workflow_id)

        placed = self.store.once_by_key(f"place/{order.order_id}", "place", Placed, apply)
        self.client.start(WORKFLOW_TYPE, order, workflow_id=workflow_id)
        return placed

    def status(self, order_id: str) -> dict[str, Any]:
        described = self.client.describe(workflow_id_of(order_id)).to_dict()
        described["order_id"] = order_id
        return described


class _Handler(BaseHTTPRequestHandler):
    api: OrdersApi  # set on the subclass made by serve()

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body, indent=2, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        body = json.loads(raw or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    def do_GET(self) -> None:
        try:
            if self.path == "/health":
                self._send(HTTPStatus.OK, {"ok": True})
            elif self.path == "/orders":
                self._send(HTTPStatus.OK, self.api.store.read()["orders"])
            elif (m := _ORDER_PATH.match(self.path)) and not m.group(2):
                self._send(HTTPStatus.OK, self.api.status(m.group(1)))
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}"})
        except UnknownWorkflow as exc:
            self._send(HTTPStatus.NOT_FOUND, {"error": str(exc)})
        except (ClientError, TimeoutError) as exc:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self.path == "/orders":
                placed = self.api.place(body)
                self._send(
                    HTTPStatus.ACCEPTED,
                    {**placed.model_dump(), "status_url": f"/orders/{placed.order_id}"},
                )
            elif (m := _ORDER_PATH.match(self.path)) and m.group(2):
                workflow_id = workflow_id_of(m.group(1))
                if m.group(2) == "/cancel":
                    reason = str(body.get("reason", "cancelled through the orders API"))
                    request_id = self.api.client.cancel(workflow_id, reason)
                else:
                    request_id = self.api.client.signal(
                        workflow_id, "confirm-delivery", {"by": str(body.get("by", "customer"))}
                    )
                self._send(HTTPStatus.ACCEPTED, {"workflow_id": workflow_id, "request": request_id})
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}"})
        except ValidationError as exc:
            errors = [
                {"field": ".".join(map(str, e["loc"])), "error": e["msg"]} for e in exc.errors()
            ]
            self._send(HTTPStatus.BAD_REQUEST, {"error": "invalid order", "details": errors})
        except ValueError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except (ClientError, TimeoutError) as exc:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})


def serve(api: OrdersApi, host: str, port: int, stop: threading.Event) -> None:
    """Serve HTTP on ``host:port`` until ``stop`` is set."""
    handler = type("OrdersHandler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="orders-http", daemon=True)
    thread.start()
    log.info("orders API on http://%s:%d", host, server.server_address[1])
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
