"""What the example services share: a small durable store, idempotent effects, and a runner.

Each service keeps its state (stock, balances, shipments, ...) as one JSON document in its own
RocksDB database, next to the result of every operation it has done, keyed by the command's
idempotency key. An operation writes both in one atomic batch, so after any crash an operation
has either happened with its result stored, or not happened at all; a repeat of the same key gets
the stored result (or the stored business failure) without applying the effect again.

After every change the service also writes ``snapshot.json`` (atomically, by rename) next to its
database: what the demo and the end-to-end test read to check the invariants, and what
``python -m services_example.<service> --dump`` prints.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError
from rocksdict import WriteBatch

from orchestrator import tracing
from orchestrator.errors import BusinessError
from orchestrator.local_db import open_local_db
from orchestrator.service import CommandInfo, Service, ServiceError
from orchestrator.settings import Settings
from orchestrator.topics import TopicAdminError, ensure_service_topic, ensure_topics
from services_example.contracts import service_name

O = TypeVar("O", bound=BaseModel)  # noqa: E741

State = dict[str, Any]

log = logging.getLogger(__name__)

_STATE_KEY = b"state"
_RESULT_PREFIX = "result/"
SNAPSHOT = "snapshot.json"


class ServiceStore:
    """A service's state document and its operations' results, in RocksDB at ``directory``."""

    def __init__(self, directory: Path, service: str, initial: State) -> None:
        self.directory = directory
        self.service = service
        self._db = open_local_db(directory / "data")
        self._lock = threading.Lock()
        raw = self._db.get(_STATE_KEY)
        if isinstance(raw, bytes):
            self.state: State = json.loads(raw)
        else:  # first start: the initial state
            self.state = copy.deepcopy(initial)
            self._db[_STATE_KEY] = json.dumps(self.state).encode()
        self.operations = sum(1 for _ in self._db.keys(from_key=_RESULT_PREFIX.encode()))
        self._write_snapshot()

    def once(self, info: CommandInfo, out: type[O], apply: Callable[[State], O]) -> O:
        """Run ``apply`` on a copy of the state once per idempotency key, and store the outcome.

        ``apply`` returns the result, or raises ``BusinessError`` (then the state is unchanged and
        the failure is stored: a repeat fails the same way even if the state has changed since).
        """
        return self.once_by_key(info.idempotency_key, info.activity_name, out, apply)

    def once_by_key(
        self, idempotency_key: str, what: str, out: type[O], apply: Callable[[State], O]
    ) -> O:
        """:meth:`once` for a key that does not come from a command."""
        key = (_RESULT_PREFIX + idempotency_key).encode()
        with self._lock:
            raw = self._db.get(key)
            if isinstance(raw, bytes):
                done = json.loads(raw)
                log.info("%s %s: repeat of %s", self.service, what, idempotency_key)
                if "error" in done:
                    raise BusinessError(done["message"], error_type=done["error"])
                return out.model_validate(done["ok"])
            state = copy.deepcopy(self.state)
            batch = WriteBatch(raw_mode=True)
            try:
                result = apply(state)
            except BusinessError as exc:
                failure = {"error": exc.error_type, "message": str(exc)}
                batch.put(key, json.dumps(failure).encode())
                self._db.write(batch)
                self.operations += 1
                self._write_snapshot()
                raise
            record: dict[str, Any] = {"ok": result.model_dump(mode="json")}
            batch.put(key, json.dumps(record).encode())
            batch.put(_STATE_KEY, json.dumps(state).encode())
            self._db.write(batch)
            self.state = state
            self.operations += 1
            self._write_snapshot()
            return result

    def read(self) -> State:
        """A copy of the current state."""
        with self._lock:
            return copy.deepcopy(self.state)

    def snapshot(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "pid": os.getpid(),
            "operations": self.operations,
            "written_at": time.time(),
            "state": self.state,
        }

    def _write_snapshot(self) -> None:
        path = self.directory / SNAPSHOT
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=2, sort_keys=True))
        os.replace(tmp, path)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def service_dir(settings: Settings, service: str) -> Path:
    """Where ``service`` keeps its stores: ``$SAGA_STATE_DIR/<namespace>.<service>``."""
    return Path(settings.state_dir) / service_name(service)


def read_snapshot(state_dir: Path, service: str) -> dict[str, Any] | None:
    """The last snapshot ``service`` wrote under ``state_dir`` (None before its first start)."""
    path = state_dir / service_name(service) / SNAPSHOT
    try:
        result: dict[str, Any] = json.loads(path.read_text())
        return result
    except (OSError, ValueError):
        return None


def load_settings() -> Settings:
    """The one Settings model, from the environment; a clear message and exit 2 when wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = ["wrong setting(s):"]
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"]) or "?"
            env = field if field.isupper() else "SAGA_" + field.upper().replace(".", "__")
            lines.append(f"  {env}: {error['msg']} (got {error.get('input')!r})")
        lines.append("see the settings table in services_example/README.md")
        click.echo("\n".join(lines), err=True)
        sys.exit(2)


def parse_mapping(text: str, what: str) -> dict[str, int]:
    """``"book=10,lamp=2"`` -> ``{"book": 10, "lamp": 2}``; a clear error when malformed."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise click.BadParameter(f"{part!r} is not NAME=INTEGER (in {what} {text!r})")
        out[name.strip()] = int(value)
    return out


def _ensure_topics(settings: Settings, command_topics: list[str]) -> None:
    """Create the topics the service needs if missing (convenient for the demo). A principal
    that may not create or describe them (a cluster with ACLs, where an administrator creates
    topics) goes on without: producing and consuming will tell if they are missing."""
    replicas: dict[str, Any] = {
        "replication_factor": settings.replication_factor,
        "min_insync_replicas": settings.min_insync_replicas,
        "client_config": settings.client_extra(),
    }
    try:
        ensure_topics(
            settings.bootstrap_servers, settings.namespace, settings.partitions, **replicas
        )
        for topic in command_topics:
            ensure_service_topic(settings.bootstrap_servers, topic, 3, **replicas)
    except TopicAdminError as exc:
        if not exc.not_authorized:
            raise
        log.warning("not allowed to check the topics, going on without: %s", exc)


def run_service(
    base: str,
    initial: State,
    register: Callable[[Service, ServiceStore], None],
    *,
    dump: bool,
) -> None:
    """Start the service ``base`` (e.g. "inventory") until SIGTERM / Ctrl-C, or dump its state."""
    settings = load_settings()
    directory = service_dir(settings, base)
    if dump:
        snap = read_snapshot(Path(settings.state_dir), base)
        if snap is None:
            raise click.ClickException(f"no snapshot in {directory} (has the service run?)")
        click.echo(json.dumps(snap, indent=2, sort_keys=True))
        return
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {base} %(levelname)s %(name)s: %(message)s"
    )
    store = ServiceStore(directory, base, initial)
    provider = tracing.setup(base, span_file=settings.traces_file)
    service = Service(
        service_name(base), settings, state_dir=Path(settings.state_dir), tracer_provider=provider
    )
    register(service, store)
    _ensure_topics(settings, service.topics)
    log.info("%s: state %s", base, json.dumps(store.state, sort_keys=True))
    try:
        service.run()
    except ServiceError as exc:  # fenced, or a fatal Kafka error: one line, and a non-zero exit
        log.error("%s stopped: %s", base, exc)
        raise SystemExit(1) from None
    finally:
        service.close()
        store.close()
        provider.shutdown()
