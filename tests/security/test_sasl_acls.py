"""The order stack on a broker that requires SASL (SCRAM-SHA-512) and enforces ACLs, as a managed
Kafka does: every process is configured only through exported environment variables
(``SAGA_KAFKA__SECURITY_PROTOCOL``, ``SAGA_KAFKA__SASL_MECHANISM``, ``SAGA_KAFKA__SASL_USERNAME``,
``SAGA_SASL_PASSWORD``), the orchestrator is a super user, and each service principal may only
read its command topic (with its consumer group and transactional id) and write the inbox and the
dead-letter topic. A saga completes and one is compensated; a service principal that reads another
topic or writes the history is refused; a wrong password is one clear line from the CLI.

The broker is the test's own (``broker.sasl_scram_layout``: separate ports and data dir).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from contracts.envelopes import WorkflowStatus
from deploy.kafka import broker
from orchestrator.client import Client
from orchestrator.settings import Settings
from services_example.contracts import Order
from services_example.processes import SERVICES, Processes
from tests.faults.conftest import free_port_pair
from tests.integration.procs import ResultWatcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PASSWORDS = {
    "admin": "admin-secret",
    "orchestrator": "orchestrator-secret",
    **{f"svc-{service}": f"{service}-secret" for service in SERVICES},
}


def sasl_env(user: str) -> dict[str, str]:
    """What an operator exports for a process that logs in as ``user``."""
    return {
        "SAGA_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SAGA_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "SAGA_KAFKA__SASL_USERNAME": user,
        "SAGA_SASL_PASSWORD": PASSWORDS[user],
    }


def client_conf(user: str, bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": user,
        "sasl.password": PASSWORDS[user],
        "log_level": "0",
    }


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerLayout]:
    if broker.external_bootstrap():
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS is set: broker.start would use that cluster")
    layout = broker.sasl_scram_layout(
        free_port_pair(),
        tmp_path_factory.mktemp("kafka-sasl"),
        PASSWORDS,
        super_users=("admin", "orchestrator"),
    )
    broker.start(layout)
    try:
        yield layout
    finally:
        broker.stop(layout)


def service_acls(namespace: str, service: str) -> list[AclBinding]:
    """The least a service needs: read its commands (as its group), commit them in its own
    transactions, write replies to the inbox and dead letters to the DLQ."""
    principal = f"User:svc-{service}"
    name = f"{namespace}.{service}"  # the service's group; "<name>.<node id>" its transactions

    def allow(
        kind: ResourceType, resource: str, op: AclOperation, pattern: ResourcePatternType
    ) -> AclBinding:
        return AclBinding(kind, resource, pattern, principal, "*", op, AclPermissionType.ALLOW)

    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    return [
        allow(ResourceType.TOPIC, f"{name}.commands", AclOperation.READ, literal),
        allow(ResourceType.GROUP, name, AclOperation.READ, literal),
        allow(ResourceType.TRANSACTIONAL_ID, f"{name}.", AclOperation.WRITE, prefixed),
        allow(ResourceType.TOPIC, f"{namespace}.inbox", AclOperation.WRITE, literal),
        allow(ResourceType.TOPIC, f"{namespace}.dlq", AclOperation.WRITE, literal),
    ]


def test_the_stack_on_sasl_scram_with_acls(
    sasl_broker: broker.BrokerLayout, namespace: str, tmp_path: Path
) -> None:
    began = time.monotonic()
    bootstrap = sasl_broker.bootstrap
    admin_conf = client_conf("admin", bootstrap)
    procs = Processes(
        bootstrap,
        namespace,
        tmp_path,
        extra_env=sasl_env("orchestrator"),  # the node and the orders API
        process_env={service: sasl_env(f"svc-{service}") for service in SERVICES},
    )
    procs.create_topics(
        client_config={k: v for k, v in admin_conf.items() if k != "bootstrap.servers"}
    )
    admin = AdminClient(admin_conf)
    acls = [acl for service in SERVICES for acl in service_acls(namespace, service)]
    for future in admin.create_acls(acls).values():
        future.result(timeout=30)

    procs.start_all()
    try:
        procs.wait_ready(timeout=90)
        settings = Settings.model_validate(
            {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "namespace": namespace,
                "partitions": procs.partitions,
                "kafka": {
                    "security.protocol": "SASL_PLAINTEXT",
                    "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": "orchestrator",
                },
                "sasl_password": PASSWORDS["orchestrator"],
            }
        )
        watcher = ResultWatcher(settings)
        watcher.start()
        plays = {
            "order-s1": (Order(order_id="s1", customer="alice", sku="book", qty=1, amount=500),
                         WorkflowStatus.COMPLETED),
            "order-s2": (Order(order_id="s2", customer="bob", sku="mug", qty=1, amount=700,
                               card="declined-card"), WorkflowStatus.COMPENSATED),
        }  # fmt: skip
        with Client(settings) as client:
            for workflow_id, (order, _) in plays.items():
                client.start("place-order", order, workflow_id=workflow_id)
            watcher.wait_for(len(plays), timeout=90)
        watcher.close()
        got = {wf: result.status for wf, result in watcher.found.items()}
        assert got == {wf: status for wf, (_, status) in plays.items()}, procs.log_dir
        assert not procs.dead(), f"a process died; see {procs.log_dir}"
        paid = procs.snapshot("payments")
        assert paid is not None
        assert [p["order_id"] for p in paid["state"]["payments"].values() if not p["refunded"]] == [
            "s1"
        ]
    finally:
        procs.stop_all()

    # -- what the ACLs refuse a service principal ---------------------------------------------
    payments = client_conf("svc-payments", bootstrap)
    other = f"{namespace}.inventory.commands"
    assert _read_error(payments, f"{namespace}.payments", other) == (
        KafkaError.TOPIC_AUTHORIZATION_FAILED
    )
    assert _read_error(payments, f"{namespace}.payments", f"{namespace}.history") == (
        KafkaError.TOPIC_AUTHORIZATION_FAILED
    )
    assert _write_error(payments, f"{namespace}.history") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # ...and what they allow it: its own commands (the control for the refusals above).
    assert _read_error(payments, f"{namespace}.payments", f"{namespace}.payments.commands") is None

    # -- a wrong password: one line, exit 1 ----------------------------------------------------
    env = {**sasl_env("orchestrator"), "SAGA_SASL_PASSWORD": "not-the-password"}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--bootstrap", bootstrap,
         "--namespace", namespace, "topics", "verify", "--timeout", "20"],
        env={**_base_env(), **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: authentication failed"), done.stderr
    print(
        f"\nSASL/SCRAM + ACLs: 2 sagas as expected, 3 refusals, wrong password -> {lines[0][:90]}"
        f"...; {time.monotonic() - began:.1f}s"
    )


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}


def _read_error(conf: dict[str, Any], group: str, topic: str) -> int | None:
    """The error code a consumer gets reading ``topic`` (None: it reads, to the end)."""
    consumer = Consumer(
        {**conf, "group.id": group, "enable.auto.commit": False, "enable.partition.eof": True}
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                continue
            return None if err.code() == KafkaError._PARTITION_EOF else int(err.code())
        raise AssertionError(f"no answer reading {topic} within 30 s")
    finally:
        consumer.close()


def _write_error(conf: dict[str, Any], topic: str) -> int | None:
    """The delivery error of one record produced to ``topic`` (None: delivered)."""
    outcome: list[KafkaError | None] = []
    producer = Producer({**conf, "message.timeout.ms": 20_000})
    producer.produce(
        topic, key=b"forged/1", value=b"x", on_delivery=lambda e, _m: outcome.append(e)
    )
    producer.flush(30)
    assert outcome, f"no delivery report for {topic}"
    err = outcome[0]
    return None if err is None else int(err.code())
