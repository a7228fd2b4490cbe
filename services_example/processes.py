"""Start the order saga's processes (orchestrator node + four services) and stop them again.

Used by the demo (``services_example/demo.py``) and the end-to-end test: every process is a
separate ``python -m ...`` child with its own log file, configured only through the environment
variables of the one Settings model (plus each service's own knobs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestrator.topics import ensure_service_topic, ensure_topics
from services_example.contracts import service_name
from services_example.runtime import SNAPSHOT

SERVICES = ("inventory", "payments", "shipping")
PROCESSES = ("orchestrator", *SERVICES, "orders")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Processes:
    """The processes of one namespace; state under ``root/state``, logs under ``root/logs``."""

    bootstrap: str
    namespace: str
    root: Path
    partitions: int = 3
    http_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Orchestrator nodes: "orchestrator" is node-1, "orchestrator-2" node-2, ...
    nodes: int = 1
    #: Environment of one process only (its credentials, say), over ``extra_env``.
    process_env: dict[str, dict[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def names(self) -> tuple[str, ...]:
        """The processes, in start order."""
        extra_nodes = tuple(f"orchestrator-{n}" for n in range(2, self.nodes + 1))
        return ("orchestrator", *extra_nodes, *SERVICES, "orders")

    def env(self, name: str = "") -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            SAGA_NAMESPACE=self.namespace,
            SAGA_PARTITIONS=str(self.partitions),
            SAGA_STATE_DIR=str(self.state_dir),
            SAGA_NODE_ID="node-1",
            ORDERS_HTTP_PORT=str(self.http_port),
            PYTHONUNBUFFERED="1",
        )
        if name.startswith("orchestrator-"):
            # Another node: its own id (transactional id, group member) and its own state dir
            # (a node locks <state_dir>/<namespace>).
            node = name.removeprefix("orchestrator-")
            env.update(
                SAGA_NODE_ID=f"node-{node}", SAGA_STATE_DIR=str(self.root / f"state-node-{node}")
            )
        env.update(self.extra_env)
        env.update(self.process_env.get(name, {}))
        return env

    def create_topics(self, client_config: dict[str, str] | None = None) -> None:
        """The namespace's and the services' topics; replication: min(3, brokers)."""
        ensure_topics(self.bootstrap, self.namespace, self.partitions, client_config=client_config)
        for service in SERVICES:
            ensure_service_topic(
                self.bootstrap,
                f"{self.namespace}.{service}.commands",
                3,
                client_config=client_config,
            )

    def command(self, name: str) -> list[str]:
        if name.startswith("orchestrator"):
            return [
                sys.executable, "-m", "orchestrator.cli", "run",
                "--workflows", "services_example.orders.saga",
            ]  # fmt: skip
        return [sys.executable, "-m", f"services_example.{name}"]

    def start(self, name: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if name in self._logs:
            self._logs[name].close()
        log = self._logs[name] = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            self.command(name),
            env=self.env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop_all(self) -> None:
        for name in reversed(self.names):
            self.stop(name)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def snapshot(self, service: str) -> dict[str, Any] | None:
        path = self.state_dir / service_name_in(self.namespace, service) / SNAPSHOT
        try:
            result: dict[str, Any] = json.loads(path.read_text())
            return result
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until each service has written its snapshot and the HTTP API answers."""
        deadline = time.monotonic() + timeout
        waiting = set(SERVICES) | {"orders"}
        while waiting:
            if dead := self.dead():
                raise RuntimeError(f"{', '.join(dead)} exited; see {self.log_dir}")
            for service in list(waiting):
                if service == "orders":
                    try:
                        self.http("GET", "/health")
                        waiting.discard(service)
                    except OSError:
                        pass
                else:
                    snap = self.snapshot(service)
                    if snap and snap.get("pid") == self.procs[service].pid:
                        waiting.discard(service)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {sorted(waiting)}")
            time.sleep(0.2)

    def http(self, method: str, path: str, body: Any = None, timeout: float = 15.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())


def service_name_in(namespace: str, service: str) -> str:
    """:func:`services_example.contracts.service_name` for a namespace other than this process's."""
    return f"{namespace}.{service}"


__all__ = ["PROCESSES", "SERVICES", "Processes", "free_port", "service_name", "service_name_in"]
