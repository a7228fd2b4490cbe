"""The Kafka topics of a namespace: what they must look like, creating them, and checking them.

A namespace ``ns`` owns five topics (see ``docs/topics.md`` for the keys and the reasons behind
every setting):

* ``<ns>.inbox``   - all input to workflows, keyed by workflow id; N partitions.
* ``<ns>.history`` - the compacted event history, key ``<workflow id>/<seq>``; the same N
  partitions as the inbox (an event goes to the partition that owns its workflow).
* ``<ns>.results`` - workflow results for waiting clients, keyed by workflow id.
* ``<ns>.dlq``     - records nobody could process, with the reason.
* ``<ns>.nodes``   - compacted: one registration record per running node (its query API's URL and
  the partitions it owns), so clients find the nodes to list workflows from.

``ensure_topics`` is idempotent: it creates what is missing, waits until every partition has a
leader, and checks that what exists matches; anything that would break the orchestrator (a history
topic that is not compacted, an inbox and a history that are not co-partitioned, ...) is reported,
all problems at once, as a ``TopicMismatch``. Differences that only affect tuning (say, another
``segment.ms``) are returned as warnings: operators may tune a topic on purpose.

confluent-kafka stays inside this module: callers pass a bootstrap string (plus, optionally, extra
librdkafka settings such as security options) or a ``TopicAdmin`` they want to reuse.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NoReturn

from confluent_kafka import KafkaError, KafkaException

# confluent_kafka.admin re-exports these without an __all__, which mypy's strict
# no-implicit-reexport cannot see; the names are the documented public ones.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ClusterMetadata,
    ConfigResource,
    NewTopic,
    ResourceType,
    TopicMetadata,
)

from orchestrator._kafka_config import LIBRDKAFKA_LOGGER, unreachable
from orchestrator.errors import UNREACHABLE_HINT, KafkaUnavailable, OrchestratorError

__all__ = [
    "BrokerUnreachable",
    "ClientConfig",
    "NamespaceTopics",
    "ObservedTopic",
    "TopicAdmin",
    "TopicAdminError",
    "TopicError",
    "TopicMismatch",
    "TopicReport",
    "TopicSpec",
    "TopicsNotReady",
    "compare_topics",
    "default_min_insync_replicas",
    "default_replication_factor",
    "delete_topics",
    "ensure_service_topic",
    "ensure_specs",
    "ensure_topics",
    "namespace_topic_specs",
    "service_topic_spec",
    "topic_names",
    "verify_specs",
    "verify_topics",
]

log = logging.getLogger(__name__)

ClientConfig = Mapping[str, str | int | float | bool]
"""Extra librdkafka settings for the admin client (security, client.id, ...)."""

_HOUR_MS = 60 * 60 * 1000
_DAY_MS = 24 * _HOUR_MS
#: How long a tombstone of the history topic stays readable (its ``delete.retention.ms``).
HISTORY_DELETE_RETENTION_MS = 7 * _DAY_MS

DEFAULT_TIMEOUT_S = 30.0
INBOX_RETENTION_MS = 7 * _DAY_MS
RESULTS_RETENTION_MS = 1 * _DAY_MS
DLQ_RETENTION_MS = 30 * _DAY_MS
# Compaction settings of <ns>.nodes: a record per node id, the latest wins; a node that stops
# cleanly writes a tombstone. Few small records: roll segments hourly so the cleaner keeps it
# short, and keep a tombstone a day so a client reading slowly still sees the node go.
NODES_CONFIG: Mapping[str, str] = {
    "cleanup.policy": "compact",
    "segment.ms": str(_HOUR_MS),
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": str(_DAY_MS),
}
COMMANDS_RETENTION_MS = 7 * _DAY_MS

# Compaction settings of <ns>.history. Each event has its own key <workflow id>/<seq>, and the
# orchestrator writes tombstones for all keys of a finished workflow once its retention is over.
HISTORY_CONFIG: Mapping[str, str] = {
    # Keep the latest record per key. Since no two events share a key, nothing a workflow wrote
    # is ever superseded until its tombstone comes: compaction removes only the events of finished
    # workflows (and records of aborted transactions). Never "compact,delete": time-based deletion
    # would drop the first events of a workflow that runs longer than retention.ms.
    "cleanup.policy": "compact",
    # No extra grace on the broker. The orchestrator's history retention already decides when a
    # finished workflow's events may go (it writes the tombstones only then), and an event of a
    # live workflow has no later record with its key, so it cannot be compacted away at any age.
    "min.compaction.lag.ms": "0",
    # The active segment is never compacted. Roll hourly instead of the 7-day default, so a
    # tombstoned event becomes removable within the hour, even in a quiet partition...
    "segment.ms": str(_HOUR_MS),
    # ...and after 128 MiB instead of 1 GiB on a busy one. The cleaner merges small segments when
    # it rewrites them, so short segments do not pile up into many files.
    "segment.bytes": str(128 * 1024 * 1024),
    # A cleaning pass rewrites the whole log, and most of a history is live events that survive
    # it. The default 0.5 (stated here on purpose) cleans once the log has doubled since the last
    # pass, bounding it at about twice its live size without rewriting it on every few writes.
    "min.cleanable.dirty.ratio": "0.5",
    # ...but a partition that gets few writes may never reach the ratio. A segment whose oldest
    # record is older than one day is cleaned regardless, so the events of a tombstoned workflow
    # (its payloads may hold personal data) are gone at most about a day after the tombstones.
    "max.compaction.lag.ms": str(_DAY_MS),
    # How long a tombstone itself stays readable after the cleaner has reached it (default one
    # day). A restore from a RocksDB checkpoint must see the tombstones of the workflows it holds,
    # so a checkpoint older than this must be treated as stale (rebuild the partition from the
    # beginning). Seven days lets a node be down over a long weekend and still catch up cheaply.
    "delete.retention.ms": str(HISTORY_DELETE_RETENTION_MS),
}

_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]+")
_MAX_TOPIC_LENGTH = 249


class TopicError(OrchestratorError):
    """Base class of the errors of this module."""


class TopicMismatch(TopicError):
    """Existing topics do not match what the orchestrator needs. ``problems`` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) with existing Kafka topics:\n{lines}\n"
            "Fix the topics (partition counts can only grow, and growing them moves workflows to "
            "other partitions) or use another namespace."
        )


class TopicsNotReady(TopicError):
    """Topics did not show up in the metadata with a leader for every partition in time."""


class TopicAdminError(TopicError):
    """An admin request failed (broker unreachable, not authorized, invalid request, ...)."""

    def __init__(
        self, message: str, *, retriable: bool = False, not_authorized: bool = False
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        #: The cluster's ACLs refused the request (the principal may not do this).
        self.not_authorized = not_authorized


class BrokerUnreachable(TopicAdminError, KafkaUnavailable):
    """No broker answered at the bootstrap servers."""


@dataclass(frozen=True)
class NamespaceTopics:
    """The topic names of a namespace (each formatted once: the node reads them for every
    record it produces)."""

    namespace: str

    @cached_property
    def inbox(self) -> str:
        return f"{self.namespace}.inbox"

    @cached_property
    def history(self) -> str:
        return f"{self.namespace}.history"

    @cached_property
    def results(self) -> str:
        return f"{self.namespace}.results"

    @cached_property
    def dlq(self) -> str:
        return f"{self.namespace}.dlq"

    @cached_property
    def nodes(self) -> str:
        return f"{self.namespace}.nodes"

    @property
    def all(self) -> tuple[str, ...]:
        return (self.inbox, self.history, self.results, self.dlq, self.nodes)

    @property
    def co_partitioned(self) -> tuple[str, str]:
        """Topics that must have the same partition count (a workflow lives in one partition)."""
        return (self.inbox, self.history)


@functools.lru_cache(maxsize=256)
def namespace_topics(namespace: str) -> NamespaceTopics:
    """The one :class:`NamespaceTopics` of ``namespace`` (no check of the names)."""
    return NamespaceTopics(namespace)


def topic_names(namespace: str) -> NamespaceTopics:
    """The names of the topics of ``namespace``, after checking it makes legal topic names."""
    names = NamespaceTopics(namespace)
    if not namespace:
        raise ValueError("namespace must not be empty")
    for name in names.all:
        _check_topic_name(name)
    return names


@dataclass(frozen=True)
class TopicSpec:
    """What a topic must look like.

    ``config`` is applied on creation. Of an existing topic, the keys in ``enforced`` must match
    (others that differ are warnings), and with ``exact_partitions`` so must the partition count.
    """

    name: str
    partitions: int
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)
    enforced: frozenset[str] = frozenset({"cleanup.policy"})
    exact_partitions: bool = True

    def __post_init__(self) -> None:
        _check_topic_name(self.name)
        if self.partitions < 1:
            raise ValueError(f"{self.name}: partitions must be at least 1, got {self.partitions}")
        if self.replication_factor < 1:
            raise ValueError(
                f"{self.name}: replication factor must be at least 1, got {self.replication_factor}"
            )


def default_replication_factor(brokers: int) -> int:
    """Three replicas where the cluster has three brokers, else as many as there are brokers."""
    return max(1, min(3, brokers))


def default_min_insync_replicas(replication_factor: int) -> int:
    """Two in-sync replicas where there are two or more: with acks=all (which transactions
    imply) an acknowledged write is then on two brokers, and with three replicas the topic stays
    writable while one broker is down. A single replica can only ask for itself."""
    return min(2, replication_factor)


def _replica_config(replication_factor: int, min_insync_replicas: int | None) -> dict[str, str]:
    min_isr = (
        default_min_insync_replicas(replication_factor)
        if min_insync_replicas is None
        else min_insync_replicas
    )
    if not 1 <= min_isr <= replication_factor:
        # More than the replicas would make every acks=all write fail with NOT_ENOUGH_REPLICAS.
        raise ValueError(
            f"min.insync.replicas must be between 1 and the replication factor "
            f"{replication_factor}, got {min_isr}"
        )
    return {"min.insync.replicas": str(min_isr)}


def namespace_topic_specs(
    namespace: str,
    partitions: int,
    replication_factor: int = 1,
    *,
    min_insync_replicas: int | None = None,
    inbox_retention_ms: int = INBOX_RETENTION_MS,
    results_retention_ms: int = RESULTS_RETENTION_MS,
    dlq_retention_ms: int = DLQ_RETENTION_MS,
    dlq_partitions: int = 1,
) -> tuple[TopicSpec, ...]:
    """The specs of the five topics of ``namespace`` with ``partitions`` workflow partitions.

    ``min_insync_replicas`` defaults to ``default_min_insync_replicas(replication_factor)``.
    """
    names = topic_names(namespace)
    replicas = _replica_config(replication_factor, min_insync_replicas)
    return (
        # Input not yet reflected in the history: it must outlive the longest time the
        # orchestrator may be down or behind. Deletion, never compaction (a key is a workflow id).
        TopicSpec(
            names.inbox,
            partitions,
            replication_factor,
            {"cleanup.policy": "delete", "retention.ms": str(inbox_retention_ms), **replicas},
        ),
        TopicSpec(names.history, partitions, replication_factor, {**HISTORY_CONFIG, **replicas}),
        # Clients read a result soon after it is written; the history keeps it for good anyway.
        # Nothing is co-partitioned with it, so another partition count is only a warning.
        TopicSpec(
            names.results,
            partitions,
            replication_factor,
            {"cleanup.policy": "delete", "retention.ms": str(results_retention_ms), **replicas},
            exact_partitions=False,
        ),
        # Few records, read by operators: one partition is plenty; keep them long enough to be
        # noticed after a holiday. Compaction would merge dead letters that share a key.
        TopicSpec(
            names.dlq,
            dlq_partitions,
            replication_factor,
            {"cleanup.policy": "delete", "retention.ms": str(dlq_retention_ms), **replicas},
            exact_partitions=False,
        ),
        # Node registrations (orchestrator/_registration.py): read whole by every client that lists
        # workflows, so one partition; compacted, so it holds one record per live node id.
        TopicSpec(
            names.nodes, 1, replication_factor, {**NODES_CONFIG, **replicas}, exact_partitions=False
        ),
    )


def service_topic_spec(
    topic: str,
    partitions: int,
    replication_factor: int = 1,
    *,
    min_insync_replicas: int | None = None,
    retention_ms: int = COMMANDS_RETENTION_MS,
) -> TopicSpec:
    """The spec of a service's ``<service>.commands`` topic (owned by the service team).

    Deletion policy is enforced: compaction would drop commands that share a workflow id. The
    partition count is the team's choice, so a different one is only a warning.
    """
    return TopicSpec(
        topic,
        partitions,
        replication_factor,
        {
            "cleanup.policy": "delete",
            "retention.ms": str(retention_ms),
            **_replica_config(replication_factor, min_insync_replicas),
        },
        exact_partitions=False,
    )


@dataclass(frozen=True)
class ObservedTopic:
    """A topic as the cluster shows it."""

    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]
    leaderless: tuple[int, ...] = ()
    #: Partitions whose in-sync replicas are fewer than their replicas: ``(partition, in sync,
    #: replicas)``. A broker is down or behind; acks=all writes wait on (or fail without) it.
    under_replicated: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class TopicReport:
    """What ``ensure_*``/``verify_*`` did: topics created, topics checked, and tuning warnings."""

    created: tuple[str, ...] = ()
    verified: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: What the topics were checked against (resolved from the cluster when not given).
    replication_factor: int | None = None
    min_insync_replicas: int | None = None

    @property
    def changed(self) -> bool:
        return bool(self.created)


def _policy(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def compare_topics(
    specs: Sequence[TopicSpec],
    observed: Mapping[str, ObservedTopic],
    co_partitioned: Sequence[str] = (),
    *,
    under_replicated_is_problem: bool = False,
) -> tuple[list[str], list[str]]:
    """Compare topics with their specs: ``(problems, warnings)``. A missing topic is a problem.

    Under-replicated partitions are warnings unless ``under_replicated_is_problem`` (``verify``:
    an operator's check; creating topics or starting a process must not fail because a broker
    is restarting).
    """
    problems: list[str] = []
    warnings: list[str] = []
    for spec in specs:
        topic = observed.get(spec.name)
        if topic is None:
            problems.append(f"{spec.name} does not exist")
            continue
        if topic.partitions != spec.partitions:
            msg = f"{spec.name} has {topic.partitions} partitions, expected {spec.partitions}"
            (problems if spec.exact_partitions else warnings).append(msg)
        if topic.replication_factor < spec.replication_factor:
            problems.append(
                f"{spec.name} has replication factor {topic.replication_factor}, "
                f"expected at least {spec.replication_factor}"
            )
        for key, expected in spec.config.items():
            actual = topic.config.get(key)
            same = (
                actual is not None and _policy(actual) == _policy(expected)
                if key == "cleanup.policy"
                else actual == expected
            )
            if not same:
                msg = f"{spec.name}: {key} is {actual!r}, expected {expected!r}"
                (
                    problems if key in spec.enforced or _weaker(key, actual, expected) else warnings
                ).append(msg)
        if topic.leaderless:
            ids = ", ".join(str(p) for p in topic.leaderless)
            warnings.append(f"{spec.name}: partition(s) {ids} have no leader")
        if topic.under_replicated:
            parts = ", ".join(f"{p} ({isr} of {n} in sync)" for p, isr, n in topic.under_replicated)
            msg = f"{spec.name} is under-replicated: partition(s) {parts}"
            (problems if under_replicated_is_problem else warnings).append(msg)

    present = [observed[name] for name in co_partitioned if name in observed]
    for first, other in itertools.pairwise(present):
        if first.partitions != other.partitions:
            problems.append(
                f"{first.name} has {first.partitions} partitions but {other.name} has "
                f"{other.partitions}: they must be co-partitioned"
            )
    return problems, warnings


def _weaker(key: str, actual: str | None, expected: str) -> bool:
    """Whether ``actual`` promises less durability than asked for (a problem, not tuning)."""
    if key != "min.insync.replicas":
        return False
    try:
        return actual is None or int(actual) < int(expected)
    except ValueError:
        return True


class TopicAdmin:
    """A connection to a cluster for topic administration; reuse it for several calls."""

    def __init__(self, bootstrap: str, client_config: ClientConfig | None = None) -> None:
        self.bootstrap = bootstrap
        self._auth_error: str | None = None  # a refused login, as librdkafka reported it
        conf: dict[str, Any] = {
            "logger": LIBRDKAFKA_LOGGER,
            "error_cb": self._on_error,
            **(client_config or {}),
        }
        self._admin = AdminClient({**conf, "bootstrap.servers": bootstrap})

    # -- the operations --------------------------------------------------------------------

    def ensure(
        self,
        specs: Sequence[TopicSpec],
        *,
        co_partitioned: Sequence[str] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TopicReport:
        """Create the missing topics of ``specs`` and check all of them (see ``ensure_specs``)."""
        deadline = time.monotonic() + timeout_s
        metadata = self._metadata(deadline)
        existing = [s for s in specs if s.name in metadata]
        missing = [s for s in specs if s.name not in metadata]

        # Check what exists before creating anything, so a mismatch leaves the cluster unchanged.
        if existing:
            observed = self._observe([s.name for s in existing], metadata, deadline)
            problems, _ = compare_topics(existing, observed, co_partitioned)
            if problems:
                raise TopicMismatch(problems)
        if not missing:
            return self._verify(specs, co_partitioned, metadata, deadline)

        created = self._create(missing, deadline)
        metadata = self._wait_ready([s.name for s in missing], deadline)
        report = self._verify(specs, co_partitioned, metadata, deadline)
        return TopicReport(created, report.verified, report.warnings)

    def verify(
        self,
        specs: Sequence[TopicSpec],
        *,
        co_partitioned: Sequence[str] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        under_replicated_is_problem: bool = True,
    ) -> TopicReport:
        """Check topics against ``specs``; raise ``TopicMismatch`` listing every problem."""
        deadline = time.monotonic() + timeout_s
        metadata = self._metadata(deadline)
        return self._verify(
            specs, co_partitioned, metadata, deadline, strict=under_replicated_is_problem
        )

    def broker_count(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
        """How many brokers the cluster's metadata lists (fenced ones are left out)."""
        return len(self._cluster(time.monotonic() + timeout_s).brokers)

    def delete(self, topics: Iterable[str], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
        """Delete ``topics`` that exist and wait until the metadata no longer shows them."""
        deadline = time.monotonic() + timeout_s
        wanted = list(topics)
        present = [t for t in wanted if t in self._metadata(deadline)]
        if not present:
            return []
        remaining = _remaining(deadline)
        futures = self._admin.delete_topics(
            present, operation_timeout=remaining, request_timeout=remaining
        )
        deleted: list[str] = []
        failures: list[str] = []
        for name, future in futures.items():
            err = _result(future, deadline)
            if err is None:
                deleted.append(name)
            elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                failures.append(f"could not delete {name}: {_describe_error(err)}")
        if failures:
            raise TopicAdminError("; ".join(failures))
        while any(t in self._metadata(deadline) for t in deleted):
            if time.monotonic() >= deadline:
                raise TopicsNotReady(f"topics still listed after deletion: {', '.join(deleted)}")
            time.sleep(0.1)
        log.info("deleted topics %s", ", ".join(deleted))
        return deleted

    # -- steps -----------------------------------------------------------------------------

    def _verify(
        self,
        specs: Sequence[TopicSpec],
        co_partitioned: Sequence[str],
        metadata: Mapping[str, TopicMetadata],
        deadline: float,
        *,
        strict: bool = False,
    ) -> TopicReport:
        names = [s.name for s in specs if s.name in metadata]
        observed = self._observe(names, metadata, deadline)
        problems, warnings = compare_topics(
            specs, observed, co_partitioned, under_replicated_is_problem=strict
        )
        if problems:
            raise TopicMismatch(problems)
        for warning in warnings:
            log.warning("topic check: %s", warning)
        return TopicReport(verified=tuple(s.name for s in specs), warnings=tuple(warnings))

    def _create(self, specs: Sequence[TopicSpec], deadline: float) -> tuple[str, ...]:
        new = [
            NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.config))
            for s in specs
        ]
        remaining = _remaining(deadline)
        futures = self._admin.create_topics(
            new, operation_timeout=remaining, request_timeout=remaining
        )
        created: list[str] = []
        failures: list[str] = []
        denied = False
        for name, future in futures.items():
            err = _result(future, deadline)
            if err is None:
                created.append(name)
            elif err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                # Another process created it between our metadata read and our request: fine,
                # it is checked like any existing topic.
                log.info("topic %s was created concurrently", name)
            else:
                denied = denied or _denied(err)
                failures.append(f"could not create {name}: {_describe_error(err)}")
        if failures:
            raise TopicAdminError("; ".join(failures), not_authorized=denied)
        if created:
            log.info("created topics %s", ", ".join(created))
        return tuple(created)

    def _wait_ready(self, names: Sequence[str], deadline: float) -> dict[str, TopicMetadata]:
        """Wait until every topic in ``names`` is in the metadata with a leader per partition."""
        while True:
            metadata = self._metadata(deadline)
            pending = {name: _not_ready(metadata.get(name)) for name in names}
            pending = {name: why for name, why in pending.items() if why}
            if not pending:
                return metadata
            if time.monotonic() >= deadline:
                details = "; ".join(f"{name}: {why}" for name, why in pending.items())
                raise TopicsNotReady(f"topics not ready in time on {self.bootstrap}: {details}")
            time.sleep(0.1)

    def _metadata(self, deadline: float) -> dict[str, TopicMetadata]:
        cluster = self._cluster(deadline)
        return {
            name: topic
            for name, topic in cluster.topics.items()
            if topic.error is None or topic.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART
        }

    def _cluster(self, deadline: float) -> ClusterMetadata:
        while True:
            try:
                # In short tries: a refused login shows only through error_cb, between tries.
                cluster = self._admin.list_topics(timeout=min(_remaining(deadline), 2.0))
                break
            except KafkaException as exc:
                self._admin.poll(0)  # librdkafka's log lines to LIBRDKAFKA_LOGGER, error_cb
                if self._auth_error is not None:
                    raise TopicAdminError(
                        f"authentication failed at {self.bootstrap}: {self._auth_error}; check "
                        "the credentials (SAGA_KAFKA__SASL_USERNAME, SAGA_SASL_PASSWORD, "
                        "SAGA_KAFKA__SASL_MECHANISM, certificates)",
                        not_authorized=True,
                    ) from exc
                if time.monotonic() + 0.1 < deadline:
                    continue
                self._metadata_failed(exc)
        self._admin.poll(0)
        return cluster

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION:
            self._auth_error = err.str()

    def _metadata_failed(self, exc: KafkaException) -> NoReturn:
        err = _error_of(exc)
        if err is not None and unreachable(err):
            raise BrokerUnreachable(
                f"could not read metadata from {self.bootstrap}: {err.str()}; " + UNREACHABLE_HINT,
                retriable=True,
            ) from exc
        raise TopicAdminError(
            f"could not read metadata from {self.bootstrap}: "
            f"{_describe_error(err) if err else exc}",
            retriable=True,
        ) from exc

    def _observe(
        self, names: Sequence[str], metadata: Mapping[str, TopicMetadata], deadline: float
    ) -> dict[str, ObservedTopic]:
        configs = self._configs(names, deadline)
        observed: dict[str, ObservedTopic] = {}
        for name in names:
            partitions = metadata[name].partitions.values()
            observed[name] = ObservedTopic(
                name=name,
                partitions=len(partitions),
                replication_factor=min((len(p.replicas) for p in partitions), default=0),
                config=configs[name],
                leaderless=tuple(sorted(p.id for p in partitions if p.leader < 0)),
                under_replicated=tuple(
                    sorted(
                        (p.id, len(p.isrs), len(p.replicas))
                        for p in partitions
                        if len(p.isrs) < len(p.replicas)
                    )
                ),
            )
        return observed

    def _configs(self, names: Sequence[str], deadline: float) -> dict[str, dict[str, str]]:
        """The effective configs of ``names``, retrying while a new topic is not yet known."""
        configs: dict[str, dict[str, str]] = {}
        todo = list(names)
        while todo:
            resources = [ConfigResource(ResourceType.TOPIC, name) for name in todo]
            futures = self._admin.describe_configs(resources, request_timeout=_remaining(deadline))
            retry: list[str] = []
            for resource, future in futures.items():
                name = resource.name
                try:
                    entries = future.result(timeout=_remaining(deadline) + 1.0)
                except KafkaException as exc:
                    err = _error_of(exc)
                    if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        retry.append(name)
                        continue
                    raise TopicAdminError(
                        f"could not describe the config of {name}: "
                        f"{_describe_error(err) if err else exc}",
                        not_authorized=_denied(err),
                    ) from exc
                except concurrent.futures.TimeoutError as exc:
                    raise TopicAdminError(f"describing the config of {name} timed out") from exc
                configs[name] = {
                    key: entry.value for key, entry in entries.items() if entry.value is not None
                }
            if retry and time.monotonic() >= deadline:
                raise TopicsNotReady(f"configs unknown to the broker: {', '.join(retry)}")
            if retry:
                time.sleep(0.1)
            todo = retry
        return configs


def _check_topic_name(name: str) -> None:
    if not _LEGAL_TOPIC.fullmatch(name) or len(name) > _MAX_TOPIC_LENGTH or name in (".", ".."):
        raise ValueError(
            f"illegal topic name {name!r}: use at most {_MAX_TOPIC_LENGTH} of [A-Za-z0-9._-]"
        )


def _remaining(deadline: float) -> float:
    # librdkafka rejects a zero timeout for requests; keep a small floor so the last call can run.
    return max(deadline - time.monotonic(), 0.5)


def _error_of(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


_DENIED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)


def _denied(err: KafkaError | None) -> bool:
    return err is not None and err.code() in _DENIED


def _describe_error(err: KafkaError) -> str:
    return f"{err.str()} ({err.name()})"


def _result(future: concurrent.futures.Future[None], deadline: float) -> KafkaError | None:
    """Wait for an admin future: ``None`` on success, else the error (raised if it is unknown)."""
    try:
        future.result(timeout=_remaining(deadline) + 1.0)
    except KafkaException as exc:
        err = _error_of(exc)
        if err is None:
            raise TopicAdminError(f"admin request failed: {exc}") from exc
        return err
    except concurrent.futures.TimeoutError as exc:
        raise TopicAdminError("admin request timed out", retriable=True) from exc
    return None


def _not_ready(topic: TopicMetadata | None) -> str:
    """Why ``topic`` is not usable yet, or ``""`` when every partition has a leader."""
    if topic is None:
        return "not in the metadata yet"
    if topic.error is not None:
        return _describe_error(topic.error)
    if not topic.partitions:
        return "no partitions in the metadata yet"
    waiting = sorted(p.id for p in topic.partitions.values() if p.leader < 0 or p.error)
    if waiting:
        return f"partition(s) {', '.join(map(str, waiting))} have no leader"
    return ""


def _admin(target: str | TopicAdmin, client_config: ClientConfig | None) -> TopicAdmin:
    return target if isinstance(target, TopicAdmin) else TopicAdmin(target, client_config)


def ensure_specs(
    target: str | TopicAdmin,
    specs: Sequence[TopicSpec],
    *,
    co_partitioned: Sequence[str] = (),
    client_config: ClientConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TopicReport:
    """Create the missing topics of ``specs``, wait for their leaders, and check all of them.

    Idempotent: a second call creates nothing. Raises ``TopicMismatch`` (before creating anything
    when existing topics are wrong), ``TopicsNotReady`` on timeout, ``TopicAdminError`` when the
    cluster refuses or cannot be reached.
    """
    admin = _admin(target, client_config)
    return admin.ensure(specs, co_partitioned=co_partitioned, timeout_s=timeout_s)


def verify_specs(
    target: str | TopicAdmin,
    specs: Sequence[TopicSpec],
    *,
    co_partitioned: Sequence[str] = (),
    client_config: ClientConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TopicReport:
    """Check topics against ``specs`` without creating anything."""
    admin = _admin(target, client_config)
    return admin.verify(specs, co_partitioned=co_partitioned, timeout_s=timeout_s)


def ensure_topics(
    target: str | TopicAdmin,
    namespace: str,
    partitions: int,
    replication_factor: int | None = None,
    *,
    min_insync_replicas: int | None = None,
    client_config: ClientConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TopicReport:
    """Create the missing topics of ``namespace`` and check that all five are as required.

    ``target`` is a bootstrap servers string or a ``TopicAdmin``. ``replication_factor``
    defaults to ``min(3, brokers)`` of the cluster, ``min_insync_replicas`` to ``min(2, RF)``.
    """
    admin = _admin(target, client_config)
    rf, min_isr = _replication(admin, replication_factor, min_insync_replicas, timeout_s)
    specs = namespace_topic_specs(namespace, partitions, rf, min_insync_replicas=min_isr)
    report = admin.ensure(
        specs, co_partitioned=topic_names(namespace).co_partitioned, timeout_s=timeout_s
    )
    return replace(report, replication_factor=rf, min_insync_replicas=min_isr)


def verify_topics(
    target: str | TopicAdmin,
    namespace: str,
    partitions: int,
    replication_factor: int | None = None,
    *,
    min_insync_replicas: int | None = None,
    client_config: ClientConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    under_replicated_is_problem: bool = True,
) -> TopicReport:
    """Check the five topics of ``namespace``; raise ``TopicMismatch`` listing every problem,
    under-replicated partitions included unless told otherwise (a process that starts while a
    broker restarts); defaults as in ``ensure_topics``."""
    admin = _admin(target, client_config)
    rf, min_isr = _replication(admin, replication_factor, min_insync_replicas, timeout_s)
    specs = namespace_topic_specs(namespace, partitions, rf, min_insync_replicas=min_isr)
    report = admin.verify(
        specs,
        co_partitioned=topic_names(namespace).co_partitioned,
        timeout_s=timeout_s,
        under_replicated_is_problem=under_replicated_is_problem,
    )
    return replace(report, replication_factor=rf, min_insync_replicas=min_isr)


def _replication(
    admin: TopicAdmin,
    replication_factor: int | None,
    min_insync_replicas: int | None,
    timeout_s: float,
) -> tuple[int, int]:
    """The replication factor and min.insync.replicas to use, the defaults resolved."""
    rf = (
        replication_factor
        if replication_factor is not None
        else default_replication_factor(admin.broker_count(timeout_s=timeout_s))
    )
    min_isr = (
        min_insync_replicas if min_insync_replicas is not None else default_min_insync_replicas(rf)
    )
    _replica_config(rf, min_isr)  # checks min_isr <= rf
    return rf, min_isr


def delete_topics(
    target: str | TopicAdmin,
    namespace: str,
    *,
    client_config: ClientConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[str]:
    """Delete the topics of ``namespace`` that exist (for tests and teardown); their names."""
    admin = _admin(target, client_config)
    return admin.delete(topic_names(namespace).all, timeout_s=timeout_s)


def ensure_service_topic(
    target: str | TopicAdmin,
    topic: str,
    partitions: int,
    replication_factor: int | None = None,
    *,
    min_insync_replicas: int | None = None,
    retention_ms: int = COMMANDS_RETENTION_MS,
    client_config: ClientConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TopicReport:
    """Create a service's ``<service>.commands`` topic if missing, and check its cleanup policy
    (replication defaults as in ``ensure_topics``)."""
    admin = _admin(target, client_config)
    rf, min_isr = _replication(admin, replication_factor, min_insync_replicas, timeout_s)
    spec = service_topic_spec(
        topic, partitions, rf, min_insync_replicas=min_isr, retention_ms=retention_ms
    )
    report = admin.ensure([spec], timeout_s=timeout_s)
    return replace(report, replication_factor=rf, min_insync_replicas=min_isr)
