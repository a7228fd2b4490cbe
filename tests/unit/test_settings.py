"""One settings model: field names, environment variables, clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from orchestrator.node import OrchestratorNode
from orchestrator.settings import Settings
from orchestrator.workflow import WorkflowRegistry


def test_field_names_and_environment_names_both_set_the_bootstrap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings(bootstrap_servers="h:1").bootstrap_servers == "h:1"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env-host:2")
    monkeypatch.setenv("SAGA_KAFKA__linger.ms", "7")
    settings = Settings()
    assert settings.bootstrap_servers == "env-host:2"
    assert settings.client_extra() == {"linger.ms": "7"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("namespace", "bad ns", "may hold only letters"),
        ("bootstrap_servers", "no-port", "is not host:port"),
        ("partitions", 0, "greater than or equal to 1"),
    ],
)
def test_a_wrong_setting_names_the_field_and_the_reason(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({field: value})
    assert field in str(info.value) and message in str(info.value)


def test_kafka_keys_in_shell_exportable_form_become_librdkafka_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT")
    monkeypatch.setenv("SAGA_KAFKA__SOCKET_KEEPALIVE_ENABLE", "true")
    monkeypatch.setenv("SAGA_KAFKA__LOG_LEVEL", "3")  # librdkafka's own key has an underscore
    monkeypatch.setenv("SAGA_KAFKA__client.id", "dotted-still-works")
    assert Settings().client_extra() == {
        "security.protocol": "PLAINTEXT",
        "socket.keepalive.enable": "true",
        "log_level": "3",
        "client.id": "dotted-still-works",
    }


@pytest.mark.parametrize(
    "key",
    [
        "SASL_PASSWORD",
        "SSL_KEY_PASSWORD",
        "SSL_KEYSTORE_PASSWORD",
        "SASL_OAUTHBEARER_CLIENT_SECRET",
        "ssl.key.password",
    ],
)
def test_secret_kafka_values_are_masked_wherever_settings_are_shown(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv(f"SAGA_KAFKA__{key}", "hunter2-secret-value")
    monkeypatch.setenv("SAGA_KAFKA__SASL_USERNAME", "bob")
    settings = Settings()
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "hunter2-secret-value" not in shown
        assert "bob" in shown
    # ...but the clients still get the value.
    assert "hunter2-secret-value" in settings.client_extra().values()


def test_an_unknown_librdkafka_key_is_a_settings_error_without_the_secrets_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_KAFKA__SASL_PASSWORD", "hunter2-secret-value")
    monkeypatch.setenv("SAGA_KAFKA__NO_SUCH_KEY", "1")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert 'No such configuration property: "no.such.key"' in str(info.value)
    assert "hunter2-secret-value" not in str(info.value)
    monkeypatch.delenv("SAGA_KAFKA__NO_SUCH_KEY")
    monkeypatch.setenv("SAGA_KAFKA__LINGER_MS", "soon")
    with pytest.raises(
        ValidationError, match=r'Invalid value for configuration property "queue\.buffering'
    ):
        Settings()


@pytest.mark.parametrize(
    ("text", "ms"),
    [("300000", 300_000), ("500ms", 500), ("30s", 30_000), ("1.5s", 1_500), ("5m", 300_000),
     ("5min", 300_000), ("2h", 7_200_000), ("1d", 86_400_000), (" 10 S ", 10_000)],
)  # fmt: skip
def test_the_activity_timeout_takes_milliseconds_or_a_duration(
    monkeypatch: pytest.MonkeyPatch, text: str, ms: int
) -> None:
    monkeypatch.setenv("SAGA_ACTIVITY_TIMEOUT", text)
    assert Settings().activity_timeout_ms == ms


def test_the_activity_timeout_defaults_to_five_minutes_and_refuses_nonsense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().activity_timeout_ms == 300_000
    assert Settings(activity_timeout_ms=1_500).activity_timeout.total_seconds() == 1.5
    monkeypatch.setenv("SAGA_ACTIVITY_TIMEOUT_MS", "2000")
    assert Settings().activity_timeout_ms == 2_000
    for bad in ("soon", "5 weeks", "-1s", "0"):
        monkeypatch.setenv("SAGA_ACTIVITY_TIMEOUT", bad)
        with pytest.raises(ValidationError, match="activity_timeout_ms"):
            Settings()


def test_a_node_gives_its_workflows_the_configured_activity_timeout() -> None:
    registry = WorkflowRegistry()
    node = OrchestratorNode(Settings(activity_timeout_ms=1_500), registry, with_metrics=False)
    assert node.registry.activity_timeout == timedelta(milliseconds=1_500)
    assert registry.activity_timeout == timedelta(minutes=5)  # the caller's copy is untouched
