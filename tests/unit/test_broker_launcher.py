"""The broker launcher's command lines, without starting Java."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy.kafka import broker


def test_a_cluster_id_starting_with_a_dash_is_passed_as_one_argument(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    layout = broker.BrokerLayout(port=1, controller_port=2, heap="256m", run_dir=tmp_path)
    seen: list[list[str]] = []

    class Done:
        returncode = 0
        stdout = ""
        stderr = ""

    def fake_run(cmd: list[str], **kwargs: object) -> Done:
        seen.append(cmd)
        return Done()

    monkeypatch.setattr("subprocess.run", fake_run)
    monkeypatch.setattr("base64.urlsafe_b64encode", lambda raw: b"-starts-with-a-dash")
    broker._format_storage(layout)
    (cmd,) = seen
    assert "--cluster-id=-starts-with-a-dash" in cmd
    assert cmd[cmd.index("kafka.tools.StorageTool") + 1] == "format"


# -- where the broker runs when its port is taken ---------------------------------------------


def _listener() -> socket.socket:
    """A plain TCP listener (not Kafka) on a port whose next port is free too."""
    for _ in range(50):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        if broker._port_free(port + 1):
            sock.listen()
            return sock
        sock.close()
    raise RuntimeError("no port pair")


@pytest.fixture
def squatter() -> Iterator[socket.socket]:
    sock = _listener()
    try:
        yield sock
    finally:
        sock.close()


def _layout_on(sock: socket.socket, run_dir: Path) -> broker.BrokerLayout:
    port = int(sock.getsockname()[1])
    return broker.BrokerLayout(port, port + 1, "256m", run_dir)


def test_free_ports_are_used_as_configured(tmp_path: Path) -> None:
    sock = _listener()
    layout = _layout_on(sock, tmp_path)
    sock.close()
    plan = broker.plan_start(layout)
    assert (plan.action, plan.layout, plan.note) == ("start", layout, "")


def test_a_port_taken_by_a_listener_that_is_not_kafka_moves_the_broker(
    squatter: socket.socket, tmp_path: Path
) -> None:
    layout = _layout_on(squatter, tmp_path)
    plan = broker.plan_start(layout)  # the real probes: the listener does not speak Kafka
    assert plan.action == "start"
    assert plan.layout.port != layout.port
    assert plan.layout.controller_port == plan.layout.port + 1
    assert broker._port_free(plan.layout.port) and broker._port_free(plan.layout.controller_port)
    assert plan.note == (
        f"port {layout.port} is taken by another process that is not a Kafka broker: "
        f"starting the broker at 127.0.0.1:{plan.layout.port} instead"
    )


def test_a_moved_broker_keeps_the_port_an_earlier_start_recorded(
    squatter: socket.socket, tmp_path: Path
) -> None:
    layout = _layout_on(squatter, tmp_path)
    other = _listener()
    recorded_port = int(other.getsockname()[1])
    other.close()
    tmp_path.mkdir(exist_ok=True)
    layout.bootstrap_file.write_text(f"127.0.0.1:{recorded_port}\n")
    plan = broker.plan_start(layout, kafka_answers=lambda bootstrap: False)
    assert plan.layout.port == recorded_port


def test_a_kafka_broker_answering_on_the_port_is_reused(
    squatter: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _layout_on(squatter, tmp_path)
    asked: list[str] = []

    def answers(bootstrap: str, timeout: float = 2.0) -> bool:
        asked.append(bootstrap)
        return True

    monkeypatch.setattr(broker, "is_ready", answers)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    plan = broker.plan_start(layout)
    assert (plan.action, plan.bootstrap) == ("reuse", layout.bootstrap)
    assert asked == [layout.bootstrap]

    # start() starts nothing, says so in one line and records the bootstrap for later steps.
    monkeypatch.setattr(broker, "ensure_jars", lambda: pytest.fail("nothing to start"))
    assert broker.start(layout) == layout.bootstrap
    assert broker.recorded_bootstrap(layout) == layout.bootstrap
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path.parent / "elsewhere"))
    monkeypatch.setenv("SAGA_KAFKA_PORT", str(layout.port + 40))
    run_dir = tmp_path.parent / "elsewhere" / "kafka"
    run_dir.mkdir(parents=True)
    (run_dir / "bootstrap").write_text(layout.bootstrap + "\n")
    out = CliRunner().invoke(broker.cli, ["bootstrap"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == layout.bootstrap


def test_saga_kafka_properties_are_appended_and_override_the_generated_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "SAGA_KAFKA_PROPERTIES",
        "transaction.partition.verification.enable=false; num.partitions=3\nlog.cleaner.threads=2",
    )
    text = broker.BrokerLayout.from_env().server_properties()
    lines = text.splitlines()
    assert "transaction.partition.verification.enable=false" in lines
    assert "log.cleaner.threads=2" in lines
    # java.util.Properties keeps the last of a repeated key: the appended one.
    assert lines.index("num.partitions=3") > lines.index("num.partitions=1")


def test_a_saga_kafka_property_without_a_value_is_refused_before_the_broker_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_KAFKA_PROPERTIES", "num.partitions=3;verification-off")
    with pytest.raises(broker.BrokerError, match="'verification-off' is not key=value"):
        broker.BrokerLayout.from_env()


def test_the_command_line_reports_a_bad_setting_in_one_line() -> None:
    result = CliRunner().invoke(
        broker.cli, ["status"], env={"SAGA_KAFKA_PROPERTIES": "verification-off"}
    )
    assert result.exit_code == 1
    assert "Error: SAGA_KAFKA_PROPERTIES: 'verification-off' is not key=value" in result.output
    assert not isinstance(result.exception, broker.BrokerError), "no traceback"
