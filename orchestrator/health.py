"""Liveness and readiness of a node or a service, served over HTTP beside its metrics.

    health = Health(stale_after_s=60)
    with serve_http(health, metrics.registry, port=9100) as server:   # server.port: the real one
        while running:
            ...
            health.beat()                 # every turn of the loop

``GET /metrics`` is the Prometheus exposition of the registry; ``GET /healthz`` is 200 while the
loop turned within ``stale_after_s`` (and nothing called :meth:`Health.fail`), else 503;
``GET /ready`` is 200 once the owner said so with :meth:`Health.set_ready`, else 503. A 503 body
is one line that says why. The owner may serve more paths with ``routes`` (the node's queries,
``orchestrator/_queries.py``). Any other path is 404.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeAlias

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["DEFAULT_STALE_AFTER_S", "Health", "HealthServer", "serve_http"]

log = logging.getLogger(__name__)

#: More paths: ``routes(method, target, body)`` returns ``(status, JSON body)``, or None when
#: the target is not one of its paths. Called on the HTTP server's threads.
Routes: TypeAlias = Callable[[str, str, bytes | None], tuple[int, bytes] | None]

#: Twice the 30 s timeout of the Kafka calls one turn of a loop may wait on (commit, abort,
#: init_transactions, committed offsets): a turn slowed by one such call is not read as a
#: wedged loop, and a wedged one is reported within a minute.
DEFAULT_STALE_AFTER_S = 60.0


class Health:
    """What ``/healthz`` and ``/ready`` answer. The loop writes it, the HTTP threads read it."""

    def __init__(
        self,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        not_ready_reason: str = "starting",
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, not {stale_after_s}")
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        # Counted from creation, so start-up (topic checks, init_transactions) has the same
        # allowance as one turn of the loop.
        self._last_beat = clock()
        self._ready = False
        self._not_ready_reason = not_ready_reason
        self._failed: str | None = None

    def beat(self) -> None:
        """The loop turned. One float assignment (atomic under the GIL): no lock on the loop."""
        self._last_beat = self._clock()

    def set_ready(self, ready: bool, reason: str = "not ready") -> None:
        """``reason`` is what ``/ready`` answers while not ready."""
        with self._lock:
            self._ready = ready
            self._not_ready_reason = reason

    def fail(self, reason: str) -> None:
        """Unhealthy and not ready for good (e.g. fenced): only a new process may serve."""
        with self._lock:
            if self._failed is None:
                self._failed = reason
                log.error("unhealthy for good: %s", reason)

    @property
    def failed(self) -> str | None:
        return self._failed

    def liveness(self) -> tuple[bool, str]:
        """(alive, one line saying why)."""
        with self._lock:
            failed = self._failed
        if failed is not None:
            return False, f"failed: {failed}"
        idle = self._clock() - self._last_beat
        if idle > self.stale_after_s:
            return False, f"loop has not turned for {idle:.1f} s (limit {self.stale_after_s:g} s)"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            if self._failed is not None:
                return False, f"failed: {self._failed}"
            if not self._ready:
                return False, self._not_ready_reason
        return True, "ready"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        health = self.server.health
        if path == "/healthz":
            self._answer(*health.liveness())
        elif path == "/ready":
            self._answer(*health.readiness())
        elif path == "/metrics" and self.server.registry is not None:
            self._metrics(self.server.registry)
        elif not self._route("GET", None):
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20)) if length > 0 else b""
        if not self._route("POST", body):
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _route(self, method: str, body: bytes | None) -> bool:
        routes = self.server.routes
        answer = routes(method, self.path, body) if routes is not None else None
        if answer is None:
            return False
        self._send(answer[0], answer[1], "application/json")
        return True

    def _answer(self, ok: bool, reason: str) -> None:
        self._send(200 if ok else 503, reason.encode() + b"\n", "text/plain; charset=utf-8")

    def _metrics(self, registry: CollectorRegistry) -> None:
        # The same negotiation as prometheus_client's own server: OpenMetrics when asked, gzip
        # when accepted.
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(registry)
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        self._send(200, gzip.compress(body) if gzipped else body, content_type, gzipped)

    def _send(self, status: int, body: bytes, content_type: str, gzipped: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # A probe every few seconds would fill stderr; keep it for debugging only.
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        health: Health,
        registry: CollectorRegistry | None,
        routes: Routes | None = None,
    ) -> None:
        self.health = health
        self.registry = registry
        self.routes = routes
        super().__init__(address, _Handler)


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/ready`` in a daemon thread. Port 0: the OS picks one,
    read it from :attr:`port`."""

    def __init__(
        self,
        health: Health,
        registry: CollectorRegistry | None,
        port: int,
        addr: str = "0.0.0.0",
        routes: Routes | None = None,
    ) -> None:
        self._server = _Server((addr, port), health, registry, routes)
        self.addr = addr
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"http-{self.port}", daemon=True
        )
        self._thread.start()
        log.info("health and metrics on http://%s:%d/", addr, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextlib.contextmanager
def serve_http(
    health: Health,
    registry: CollectorRegistry | None,
    port: int | None,
    addr: str = "0.0.0.0",
    routes: Routes | None = None,
) -> Iterator[HealthServer | None]:
    """Serve while the block runs; ``port`` None: serve nothing (yields None)."""
    if port is None:
        yield None
        return
    server = HealthServer(health, registry, port, addr, routes)
    try:
        yield server
    finally:
        server.close()
