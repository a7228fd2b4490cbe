"""One settings model: field names, environment variables, clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.settings import Settings


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
