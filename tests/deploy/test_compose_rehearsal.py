"""deploy/compose.yaml's processes, run on this host without containers: one trace per order.

No container engine is reachable here, so the compose file cannot be started. What it would run
can: each of its application services' command and environment, as written in the file, with
only what a container network provides replaced (the broker, host ports, the collector's
address, a state dir each) and one replica instead of three (one broker). The topics job and the
place-orders job run, two nodes and the four services serve, and a stand-in for the OpenTelemetry
Collector receives OTLP over HTTP as the real one would: every order must be one trace that runs
through the orders API, a node and the services, and the sagas must end as the file says (four
receipts, one compensated by a declined card).
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from orchestrator import Client, Settings, WorkflowFailedError

ROOT = Path(__file__).parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
APPS = {
    name: s
    for name, s in COMPOSE["services"].items()
    if s.get("image") == "saga-orchestrator:example"
}
RUNNING = ("orchestrator-1", "orchestrator-2", "inventory", "payments", "shipping", "orders")
#: The processes whose health check is their own HTTP port (in the compose file), not /healthz
#: on the metrics port: that port, which the rehearsal moves to a free one.
OWN_PORT = {"orders": "8080", "console": "8081"}
WORKFLOW_ID = "saga.workflow.id"

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    name: str
    attributes: dict[str, str]


class Collector:
    """An OTLP/HTTP receiver at ``endpoint`` that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for resource_spans in request.resource_spans:
                        resource = {
                            a.key: a.value.string_value for a in resource_spans.resource.attributes
                        }
                        for scope in resource_spans.scope_spans:
                            for span in scope.spans:
                                spans.append(
                                    Span(
                                        resource.get("service.name", ""),
                                        span.trace_id.hex(),
                                        span.name,
                                        {a.key: a.value.string_value for a in span.attributes},
                                    )
                                )
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Stack:
    """The compose file's application services as processes of this host."""

    def __init__(self, tmp: Path, bootstrap: str, namespace: str, collector: Collector):
        self.tmp = tmp
        self.bootstrap = bootstrap
        self.namespace = namespace
        self.collector = collector
        self.ports = {name: _free_port() for name in OWN_PORT}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def command(self, name: str) -> list[str]:
        """The service's command, with the container network's names replaced by this host's."""
        joined = "\0".join(APPS[name]["command"])
        joined = joined.replace("http://orders:8080", f"http://127.0.0.1:{self.ports['orders']}")
        if name in OWN_PORT:
            joined = joined.replace(OWN_PORT[name], str(self.ports[name]))
        if name == "topics":  # one broker here: one replica, where the file asks for three
            for old, new in {
                "--replication-factor 3": "--replication-factor 1",
                ", 3, 3)": ", 3, 1)",
            }.items():
                assert old in joined, f"{name}: {old!r} is not in its command any more"
                joined = joined.replace(old, new)
        return joined.split("\0")

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "OTEL_"))}
        env |= {k: str(v) for k, v in APPS[name]["environment"].items()}
        env |= {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "SAGA_NAMESPACE": self.namespace,
            "SAGA_STATE_DIR": str(self.tmp / name),
            "SAGA_METRICS_PORT": str(_free_port()),
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # export soon, not every 5 s
        }
        if "ORDERS_HTTP_PORT" in env:
            env["ORDERS_HTTP_PORT"] = str(self.ports["orders"])
        return env

    def run_job(self, name: str) -> str:
        done = subprocess.run(
            self.command(name),
            cwd=ROOT,  # the image's /app: services_example/ beside
            env=self.env(name),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def start(self, name: str) -> None:
        env = self.env(name)
        with open(self.tmp / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                self.command(name), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if name in OWN_PORT:  # its own health check, from the compose file
            check = APPS[name]["healthcheck"]["test"][1:]
            probe = [a.replace(OWN_PORT[name], str(self.ports[name])) for a in check]
            self._wait(name, lambda: subprocess.run(probe, capture_output=True).returncode == 0)
        else:
            url = f"http://127.0.0.1:{env['SAGA_METRICS_PORT']}/ready"
            self._wait(name, lambda: _answers(url))

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            log = (self.tmp / f"{name}.log").read_text()
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log}"
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"{name} not ready after {timeout} s")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            status: int = answer.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def stack(tmp_path: Path, kafka_bootstrap: str, namespace: str) -> Iterator[Stack]:
    collector = Collector()
    stack = Stack(tmp_path, kafka_bootstrap, namespace, collector)
    try:
        yield stack
    finally:
        stack.stop()
        collector.close()


def test_every_order_is_one_trace_through_the_api_a_node_and_the_services(stack: Stack) -> None:
    stack.run_job("topics")
    for name in (*RUNNING, "console"):
        stack.start(name)
    placed = stack.run_job("place-orders")
    assert placed.count("202 ") == 5, placed

    settings = Settings(bootstrap_servers=stack.bootstrap, namespace=stack.namespace)
    ends: dict[str, str] = {}
    with Client(settings) as client:
        for n in range(1, 6):
            try:
                client.result(f"order-compose-{n}", timeout=120)
                ends[f"order-compose-{n}"] = "COMPLETED"
            except WorkflowFailedError as exc:
                ends[f"order-compose-{n}"] = f"{exc.status} {exc.error_type}"
    assert ends == {
        "order-compose-1": "COMPLETED",
        "order-compose-2": "COMPLETED",
        "order-compose-3": "COMPLETED",
        "order-compose-4": "COMPLETED",
        "order-compose-5": "COMPENSATED CardDeclined",
    }

    node = f"orchestrator-{stack.namespace}"
    wanted = {
        wid: {"orders", node, "inventory", "payments"}
        | ({"shipping"} if end == "COMPLETED" else set())
        for wid, end in ends.items()
    }
    deadline = time.monotonic() + 60
    while True:
        spans = list(stack.collector.spans)
        traces_of: dict[str, set[str]] = defaultdict(set)
        services_in: dict[str, set[str]] = defaultdict(set)
        for span in spans:
            if span.attributes.get(WORKFLOW_ID) in wanted:
                traces_of[span.attributes[WORKFLOW_ID]].add(span.trace_id)
            services_in[span.trace_id].add(span.service)
        seen = {wid: set().union(*(services_in[t] for t in traces_of[wid])) for wid in wanted}
        if seen == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {wid: len(traces_of[wid]) for wid in wanted} == dict.fromkeys(wanted, 1)
    assert seen == wanted
    print(
        f"{len(spans)} spans in {len(services_in)} traces from {sorted({s.service for s in spans})}"
    )
