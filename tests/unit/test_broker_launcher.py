"""The broker launcher's command lines, without starting Java."""

from __future__ import annotations

from pathlib import Path

import pytest

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
