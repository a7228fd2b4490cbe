"""One settings model for every process: environment variables, flags, defaults, in one table.

| setting                | environment variable        | default                  |
|------------------------|-----------------------------|--------------------------|
| bootstrap_servers      | KAFKA_BOOTSTRAP_SERVERS     | 127.0.0.1:39092          |
| namespace              | SAGA_NAMESPACE              | saga                     |
| partitions             | SAGA_PARTITIONS             | 6                        |
| replication_factor     | SAGA_REPLICATION_FACTOR     | min(3, brokers)          |
| min_insync_replicas    | SAGA_MIN_INSYNC_REPLICAS    | min(2, replication)      |
| state_dir              | SAGA_STATE_DIR              | .run/state               |
| node_id                | SAGA_NODE_ID                | the host name            |
| commit_interval_ms     | SAGA_COMMIT_INTERVAL_MS     | 0                        |
| max_batch              | SAGA_MAX_BATCH              | 1000                     |
| max_concurrency        | SAGA_MAX_CONCURRENCY        | 16 (handlers at once)    |
| retention_ms           | SAGA_RETENTION_MS           | 7 days                   |
| kafka (extra config)   | SAGA_KAFKA__<KEY>           | none                     |
| metrics_port           | SAGA_METRICS_PORT           | none (no HTTP endpoint)  |
| advertised_host        | SAGA_ADVERTISED_HOST        | 127.0.0.1                |
| health_stale_ms        | SAGA_HEALTH_STALE_MS        | 60000                    |
| traces_file            | SAGA_TRACES_FILE            | none (JSON-lines spans)  |
| reply_topics           | SAGA_REPLY_TOPICS           | none (any ``*.inbox``)   |
| activity_timeout_ms    | SAGA_ACTIVITY_TIMEOUT       | 5 minutes                |

``docs/configuration.md`` explains each one.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from orchestrator._kafka_config import check_client_settings, is_secret_key, librdkafka_key
from orchestrator.topics import NamespaceTopics, namespace_topics
from orchestrator.workflow import DEFAULT_ACTIVITY_TIMEOUT

_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SAGA_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        # A validation error would otherwise quote the input, passwords included.
        hide_input_in_errors=True,
    )

    bootstrap_servers: str = Field(
        default="127.0.0.1:39092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "SAGA_BOOTSTRAP_SERVERS"),
        description="Kafka bootstrap servers, host:port[,host:port]",
    )
    namespace: str = Field(default="saga", description="prefix of the orchestrator's topics")
    partitions: int = Field(default=6, ge=1, le=10_000, description="partitions of inbox/history")
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        le=32,
        description="replicas of each topic created; none = min(3, brokers in the cluster)",
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        le=32,
        description="min.insync.replicas of each topic created; none = min(2, replication)",
    )
    state_dir: Path = Field(default=Path(".run/state"), description="local RocksDB state")
    node_id: str = Field(
        default_factory=socket.gethostname,
        description="stable per instance: names its transactional id, so a restart fences "
        "its previous incarnation at once",
    )
    commit_interval_ms: int = Field(
        # 0: a transaction takes what has arrived and waits for nothing more. Under load, input
        # piles up while the previous transaction commits, so batches still form; at low load
        # any wait here is added to every step. 5 drains an all-at-once burst ~15 % faster
        # (docs/performance.md, "Closed loop").
        default=0,
        ge=0,
        le=60_000,
        description="how long to gather input for one transaction once a record arrived",
    )
    max_batch: int = Field(default=1000, ge=1, le=100_000)
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="how many handlers a service runs at once (Service(max_concurrency=...))",
    )
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=0)
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="HTTP port of /metrics, /healthz and /ready; none = no endpoint, 0 = a port "
        "the OS picks (tests)",
    )
    advertised_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="the host name or address clients reach this node's HTTP server at (its "
        "query API): registered on <ns>.nodes with the bound metrics_port",
    )
    health_stale_ms: int = Field(
        default=60_000,
        ge=1,
        description="/healthz answers 503 when the loop has not turned for this long",
    )
    traces_file: Path | None = Field(
        default=None, description="also write spans to this JSON-lines file (see tracing.setup)"
    )
    # NoDecode: the variable is a comma-separated list, not JSON.
    reply_topics: Annotated[tuple[str, ...], NoDecode] | None = Field(
        default=None,
        description="the only topics a service replies to; unset: any topic ending in .inbox",
    )
    activity_timeout_ms: int = Field(
        default=int(DEFAULT_ACTIVITY_TIMEOUT.total_seconds() * 1000),
        ge=1,
        validation_alias=AliasChoices(
            "activity_timeout_ms", "SAGA_ACTIVITY_TIMEOUT", "SAGA_ACTIVITY_TIMEOUT_MS"
        ),
        description="how long each attempt of an activity (or compensation) waits for a reply "
        "unless the workflow code passes timeout=; milliseconds, or a duration: 30s, 5m, 1h",
    )
    sasl_password: SecretStr | None = Field(default=None, description="for SASL clusters")
    kafka: Mapping[str, str | SecretStr] = Field(
        default_factory=dict,
        description="extra librdkafka settings for every client; SAGA_KAFKA__SECURITY_PROTOCOL "
        "sets security.protocol; secret values (passwords, ...) are never printed",
    )

    @field_validator("kafka", mode="before")
    @classmethod
    def _librdkafka_keys(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {librdkafka_key(str(key)): item for key, item in value.items()}

    @field_validator("kafka")
    @classmethod
    def _known_to_librdkafka(
        cls, value: Mapping[str, str | SecretStr], info: ValidationInfo
    ) -> Mapping[str, str | SecretStr]:
        plain = {key: _reveal(item) for key, item in value.items()}
        # SAGA_SASL_PASSWORD (validated before this field) completes sasl.username: without it
        # librdkafka would refuse a SASL configuration as incomplete.
        password = info.data.get("sasl_password")
        checked = {"sasl.password": _reveal(password), **plain} if password else plain
        check_client_settings(checked)  # a ConfigurationError is a ValueError: names the setting
        return {key: SecretStr(item) if is_secret_key(key) else item for key, item in plain.items()}

    @model_validator(mode="after")
    def _isr_within_replicas(self) -> Settings:
        rf, isr = self.replication_factor, self.min_insync_replicas
        if rf is not None and isr is not None and isr > rf:
            raise ValueError(
                f"min_insync_replicas ({isr}) may not exceed replication_factor ({rf}): "
                "every write would fail"
            )
        return self

    @field_validator("namespace", "node_id")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} may hold only letters, digits, '.', '_' and '-'")
        return value

    @field_validator("reply_topics", mode="before")
    @classmethod
    def _topic_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("activity_timeout_ms", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration_ms(value) if isinstance(value, str) else value

    @field_validator("bootstrap_servers")
    @classmethod
    def _hosts(cls, value: str) -> str:
        for part in value.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{part!r} is not host:port")
        return value

    def client_extra(self) -> dict[str, Any]:
        """The librdkafka settings every client adds to its own (secrets revealed)."""
        extra: dict[str, Any] = {key: _reveal(item) for key, item in self.kafka.items()}
        if self.sasl_password is not None:
            extra["sasl.password"] = self.sasl_password.get_secret_value()
        return extra

    @property
    def activity_timeout(self) -> timedelta:
        return timedelta(milliseconds=self.activity_timeout_ms)

    @property
    def topics(self) -> NamespaceTopics:
        return namespace_topics(self.namespace)

    @property
    def inbox(self) -> str:
        return self.topics.inbox

    @property
    def history(self) -> str:
        return self.topics.history

    @property
    def results(self) -> str:
        return self.topics.results

    @property
    def dlq(self) -> str:
        return self.topics.dlq


def parse_duration_ms(text: str) -> int:
    """``300000``, ``500ms``, ``30s``, ``5m`` / ``5min``, ``1h``, ``2d`` as milliseconds; a bare
    number is milliseconds, like every other ``*_ms`` setting."""
    found = _DURATION.match(text.lower())
    if found is None:
        raise ValueError(
            f"{text!r} is not a duration: give milliseconds (300000) or a number with a unit "
            "(500ms, 30s, 5m, 1h, 2d)"
        )
    number, unit = found.groups()
    return round(float(number) * _UNIT_MS[unit or "ms"])


def _reveal(value: str | SecretStr) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value
