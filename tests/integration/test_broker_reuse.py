"""A second checkout's broker launcher finds the first one's broker on its port and uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.kafka import broker


def test_a_second_checkout_uses_the_broker_that_answers_on_its_port(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, _, port = kafka_bootstrap.partition(",")[0].rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        pytest.skip("the launcher only runs brokers on 127.0.0.1")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    # A fresh run dir: nothing of this "checkout" runs, but its port is the session broker's.
    layout = broker.BrokerLayout(int(port), int(port) + 1, "256m", tmp_path / "kafka")
    monkeypatch.setattr(broker, "ensure_jars", lambda: pytest.fail("must start nothing"))
    assert broker.start(layout, timeout=10) == f"127.0.0.1:{port}"
    assert broker.recorded_bootstrap(layout) == f"127.0.0.1:{port}"
    assert not layout.pid_file.exists()
