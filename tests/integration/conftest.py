"""Fixtures of the engine tests against the broker: ``stack`` is a running node and services
for the kit's saga; parametrise ``stack_settings`` (indirect) for other settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.settings import Settings

from .kit import build, settings_for
from .stack import Stack, running_stack


@pytest.fixture
def stack_settings(
    kafka_bootstrap: str, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Settings:
    extra = getattr(request, "param", {})
    return settings_for(kafka_bootstrap, namespace, tmp_path / "state", **extra)


@pytest.fixture
def stack(stack_settings: Settings, namespace: str) -> Iterator[Stack]:
    with running_stack(build(namespace), stack_settings) as running:
        yield running
