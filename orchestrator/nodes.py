"""Node registration on ``<ns>.nodes``: how clients find the nodes' query APIs.

A node writes one record keyed by its node id (a :class:`~orchestrator.visibility.NodeRecord`,
JSON) when it starts and whenever the set of partitions it owns changes, and a tombstone when it
stops cleanly; the topic is compacted, so it holds the latest record of each node id. A client
reads the whole topic (one partition, a record per node) and asks every registered node.

Why a topic and not the consumer group's member list: a member's metadata carries its client id
and host, not the port of its HTTP server, and the group cannot be read with an ordinary
consumer. The partitions in a record are what the node owned when it wrote it; a node that died
without a tombstone leaves its record behind, so clients treat the records as hints: each node's
answer says which partitions it owns *now*, and an unreachable node is reported, not fatal.
"""

from __future__ import annotations

import json
import logging
import time

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import ValidationError

from orchestrator.kafka_config import producer_config
from orchestrator.settings import Settings
from orchestrator.visibility import NodeRecord

__all__ = ["NodeRegistrar", "parse_node_record"]

log = logging.getLogger(__name__)


def parse_node_record(value: bytes) -> NodeRecord | None:
    """The registration in a record of ``<ns>.nodes``; None for one that is not (logged)."""
    try:
        return NodeRecord.model_validate(json.loads(value))
    except (ValueError, ValidationError) as exc:
        log.warning("skipping a record of the nodes topic that is no registration: %s", exc)
        return None


class NodeRegistrar:
    """Writes this node's registration. Sending is asynchronous (a write that fails is logged
    and made again by the next change); :meth:`close` waits for what is queued."""

    def __init__(self, settings: Settings, url: str | None) -> None:
        self.settings = settings
        self.url = url
        self.topic = settings.topics.nodes
        self._started_ms = int(time.time() * 1000)
        self._producer = Producer(
            {
                **producer_config(settings.bootstrap_servers, extra=settings.client_extra()),
                "allow.auto.create.topics": False,
            }
        )

    def update(self, partitions: list[int]) -> None:
        record = NodeRecord(
            node_id=self.settings.node_id,
            namespace=self.settings.namespace,
            url=self.url,
            partitions=sorted(partitions),
            started_at_ms=self._started_ms,
            updated_at_ms=int(time.time() * 1000),
        )
        self._send(record.model_dump_json().encode())

    def close(self, *, tombstone: bool) -> None:
        """``tombstone``: the node stops for good (a clean stop). Not after being fenced: the
        record then belongs to the process that fenced this one."""
        if tombstone:
            self._send(None)
        left = self._producer.flush(5)
        if left:
            log.warning("%d registration record(s) for %s not sent", left, self.topic)

    def _send(self, value: bytes | None) -> None:
        try:
            self._producer.produce(
                self.topic,
                key=self.settings.node_id.encode(),
                value=value,
                on_delivery=self._delivered,
            )
        except (KafkaException, BufferError) as exc:
            log.warning("could not register on %s: %s", self.topic, exc)
        self._producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.warning("registration on %s failed: %s", self.topic, err.str())
