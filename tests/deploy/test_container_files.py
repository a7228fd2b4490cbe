"""deploy/docker/Dockerfile and deploy/compose.yaml agree with the code and with each other.

No container engine is reachable where these tests run, so neither file is built or started
here (docs/deploy.md says so). What can be checked without one is checked: the modules the
commands name exist, the environment is what ``Settings`` reads, the brokers form one quorum,
the ports and paths line up between the image, the compose file and the collector's config.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.settings import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = (DEPLOY / "docker" / "Dockerfile").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
APPS = {name: s for name, s in SERVICES.items() if s.get("image") == "saga-orchestrator:example"}


def _dockerfile_env() -> dict[str, str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env |= dict(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def test_the_image_runs_as_a_user_with_the_state_dir_as_a_volume_and_a_health_check() -> None:
    env = _dockerfile_env()
    runtime = DOCKERFILE.split("AS runtime")[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert f'VOLUME ["{env["SAGA_STATE_DIR"]}"]' in runtime
    healthcheck = runtime.split("HEALTHCHECK")[1].split("\n\n")[0]
    assert "/healthz" in healthcheck and "SAGA_METRICS_PORT" in healthcheck
    assert f"EXPOSE {env['SAGA_METRICS_PORT']}" in runtime
    assert 'ENTRYPOINT ["tini", "--"]' in runtime


def test_what_the_image_copies_exists_and_the_dockerignore_lets_it_through() -> None:
    sources = [
        part
        for line in DOCKERFILE.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for part in line.split()[1:-1]
        if not part.startswith("--")
    ]
    assert "orchestrator" in sources and "services_example" in sources
    allowed = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source in allowed, f"{source} is not in the build context"


def test_three_brokers_form_one_kraft_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    brokers = {name: s for name, s in SERVICES.items() if s.get("image", "").startswith("apache")}
    assert len(brokers) == 3
    envs = [b["environment"] for b in brokers.values()]
    assert len({e["CLUSTER_ID"] for e in envs}) == 1
    assert {str(e["KAFKA_NODE_ID"]) for e in envs} == {"1", "2", "3"}
    voters = envs[0]["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert sorted(voters) == sorted(
        f"{b['environment']['KAFKA_NODE_ID']}@{n}:9093" for n, b in brokers.items()
    )
    bootstrap = _settings(APPS["orchestrator-1"]["environment"], monkeypatch).bootstrap_servers
    assert sorted(h.split(":")[0] for h in bootstrap.split(",")) == sorted(brokers)


def _settings(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process started with exactly this environment reads."""
    for name in [n for n in os.environ if n.startswith(("SAGA_", "KAFKA_", "OTEL_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def _module_of(command: list[str]) -> str | None:
    if command[:2] == ["python", "-m"]:
        return command[2]
    if command[:2] == ["orchestrator", "run"]:
        return command[command.index("--workflows") + 1]
    return None


@pytest.mark.parametrize("name", sorted(APPS))
def test_each_process_of_the_example_is_configured_as_the_code_expects(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = APPS[name]
    command = app["command"]
    module = _module_of(command)
    if module is not None:
        assert importlib.util.find_spec(module) is not None, module
    settings = _settings(app["environment"], monkeypatch)
    assert settings.namespace == "shop"
    if name in {"topics", "place-orders"}:
        assert app["restart"] in {"no", "on-failure"}  # one-shot jobs
        return
    assert app["depends_on"]["topics"] == {"condition": "service_completed_successfully"}
    # Each long-running process: its own node id (transactional id) and its own state volume.
    assert settings.node_id == name
    if name == "console":  # keeps no state
        assert "volumes" not in app
        return
    (volume,) = app["volumes"]
    assert volume == f"{name}:{_dockerfile_env()['SAGA_STATE_DIR']}"


def test_node_ids_and_volumes_are_not_shared() -> None:
    running = [a for n, a in APPS.items() if n not in {"topics", "place-orders"}]
    assert len(running) == 7  # two nodes, four services, the console
    assert len({a["environment"]["SAGA_NODE_ID"] for a in running}) == len(running)
    stateful = [a for a in running if "volumes" in a]
    assert len(stateful) == 6
    assert len({a["volumes"][0] for a in stateful}) == len(stateful)


def test_traces_go_from_every_process_through_the_collector_to_jaeger() -> None:
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    receiver = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for app in APPS.values():
        assert app["environment"]["OTEL_TRACES_EXPORTER"] == "otlp"
        endpoint = app["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == f"http://otel-collector:{receiver.rsplit(':', 1)[1]}"
    exporter = collector["service"]["pipelines"]["traces"]["exporters"][0]
    assert collector["exporters"][exporter]["endpoint"].split(":")[0] in SERVICES
