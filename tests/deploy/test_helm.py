"""The Helm chart (deploy/helm/saga-orchestrator) lints, and renders what a node needs.

``helm lint --strict`` and ``helm template`` with the default values and with SASL/TLS, a
ServiceMonitor and no persistence; the rendered objects are checked: the StatefulSet's node id is
the pod name, its RocksDB state is on a PersistentVolumeClaim, its probes are ``/ready`` and
``/healthz`` on the metrics port, the topics Job runs before the nodes, and the Kafka environment
the chart writes is one the orchestrator's ``Settings`` reads as meant.

helm comes from ``make helm`` (built from the Go module proxy into .run/tools/); ``HELM`` or a
helm on PATH also do. Without one the tests skip, quoting why it could not be built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.settings import Settings

ROOT = Path(__file__).parents[2]
CHART = ROOT / "deploy" / "helm" / "saga-orchestrator"
TOOLS = ROOT / ".run" / "tools"

Object = dict[str, Any]


def _helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm")
    if found:
        return found
    if (TOOLS / "helm").exists():
        return str(TOOLS / "helm")
    why = TOOLS / "helm.unavailable"
    reason = why.read_text().strip() if why.exists() else "helm not built: run `make helm`"
    pytest.skip(reason)


def _run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_helm(), *args], capture_output=True, text=True, check=False)


def _render(*sets: str) -> list[Object]:
    args = ["template", "rel", str(CHART)]
    for item in sets:
        args += ["--set", item]
    done = _run_helm(*args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(objects: list[Object], kind: str) -> Object:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _env(container: Object) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


SECURE = (
    "kafka.securityProtocol=SASL_SSL",
    "kafka.sasl.existingSecret=kafka-user",
    "kafka.tls.existingSecret=kafka-tls",
    "kafka.tls.certKey=tls.crt",
    "kafka.tls.keyKey=tls.key",
    "serviceMonitor.enabled=true",
    "tracing.otlpEndpoint=http://otel-collector:4318",
)


def test_the_chart_lints_strictly() -> None:
    for sets in ((), SECURE):
        args = ["lint", "--strict", str(CHART)]
        for item in sets:
            args += ["--set", item]
        done = _run_helm(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 chart(s) failed" in done.stdout


def test_the_statefulset_runs_nodes_with_their_own_state_and_probes() -> None:
    objects = _render()
    assert sorted(o["kind"] for o in objects) == [
        "Job",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    sts = _one(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    env = _env(node)

    assert env["SAGA_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == env["SAGA_STATE_DIR"]

    (port,) = node["ports"]
    assert str(port["containerPort"]) == env["SAGA_METRICS_PORT"]
    assert node["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert node["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert node["startupProbe"]["httpGet"]["path"] == "/healthz"

    assert node["args"][:4] == [
        "orchestrator",
        "run",
        "--workflows",
        "services_example.orders.saga",
    ]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert node["securityContext"]["readOnlyRootFilesystem"] is True
    assert mounts["tmp"] == "/tmp"
    headless = next(o for o in objects if o["metadata"]["name"] == sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_the_topics_job_runs_before_the_nodes_with_their_kafka_settings() -> None:
    objects = _render()
    job = _one(objects, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:5] == [
        "orchestrator",
        "topics",
        "create",
        "--replication-factor",
        "3",
    ]
    (node,) = _one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    kafka_env = {k: v for k, v in _env(node).items() if k.startswith(("KAFKA_", "SAGA_KAFKA"))}
    kafka_env |= {"SAGA_NAMESPACE": "saga", "SAGA_PARTITIONS": "6"}
    assert {k: v for k, v in _env(container).items() if k in kafka_env} == kafka_env


def test_sasl_tls_come_from_secrets_and_a_servicemonitor_scrapes_the_metrics_service() -> None:
    objects = _render(*SECURE)
    sts = _one(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    env = _env(node)
    assert env["SAGA_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["SAGA_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["SAGA_KAFKA__SASL_USERNAME"] == {
        "secretKeyRef": {"name": "kafka-user", "key": "username"}
    }
    assert env["SAGA_KAFKA__SASL_PASSWORD"] == {
        "secretKeyRef": {"name": "kafka-user", "key": "password"}
    }
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    tls = next(name for name, v in volumes.items() if v.get("secret"))
    assert volumes[tls]["secret"]["secretName"] == "kafka-tls"
    assert env["SAGA_KAFKA__SSL_CA_LOCATION"] == f"{mounts[tls]}/ca.crt"
    assert env["SAGA_KAFKA__SSL_CERTIFICATE_LOCATION"] == f"{mounts[tls]}/tls.crt"
    assert env["SAGA_KAFKA__SSL_KEY_LOCATION"] == f"{mounts[tls]}/tls.key"

    monitor = _one(objects, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    (scraped,) = [
        o
        for o in objects
        if o["kind"] == "Service" and wanted.items() <= o["metadata"]["labels"].items()
    ]
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in scraped["spec"]["ports"]}


def test_the_rendered_kafka_environment_is_what_settings_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The TLS files do not exist here (librdkafka checks them), so SASL only.
    objects = _render(
        "kafka.securityProtocol=SASL_PLAINTEXT",
        "kafka.sasl.existingSecret=kafka-user",
        "kafka.sasl.mechanism=SCRAM-SHA-256",
        "kafka.bootstrapServers=kafka-0.kafka:9092\\,kafka-1.kafka:9092",
        "kafka.config.client\\.id=orders-saga",
    )
    (node,) = _one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    secrets = {"username": "saga", "password": "s3cret"}
    for name in [n for n in os.environ if n.startswith(("SAGA_", "KAFKA_"))]:
        monkeypatch.delenv(name)
    for name, value in _env(node).items():
        if isinstance(value, dict) and "secretKeyRef" in value:
            value = secrets[value["secretKeyRef"]["key"]]
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.bootstrap_servers == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert settings.namespace == "saga" and settings.partitions == 6
    assert str(settings.state_dir) == "/var/lib/saga" and settings.metrics_port == 9464
    assert settings.client_extra() == {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "saga",
        "sasl.password": "s3cret",
        "client.id": "orders-saga",
    }


def test_sasl_without_a_secret_is_refused_with_one_line() -> None:
    done = _run_helm("template", "rel", str(CHART), "--set", "kafka.securityProtocol=SASL_SSL")
    assert done.returncode != 0
    assert "set kafka.sasl.existingSecret" in done.stderr


def test_without_persistence_the_state_is_an_emptydir() -> None:
    sts = _one(_render("persistence.enabled=false"), "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
