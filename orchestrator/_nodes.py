"""Which node owns an inbox partition, and the URL of its HTTP server: a minimal discovery.

STOPGAP, meant to be replaced by the node registry that wt-vis is adding (a registration of node
HTTP URLs): only :func:`node_url_for` is called from elsewhere (``Client.query``), so swapping
its body is the whole change.

How it finds the node: the consumer group ``<ns>.orchestrator`` is described (the broker knows
which member owns which inbox partition, and each member's ``group.instance.id`` is
``<ns>.orchestrator.<node id>``); the node's URL is then ``SAGA_NODE_URLS`` for that node id
(``n1=http://10.0.0.5:9100,n2=http://10.0.0.6:9100``) or, without it, ``http://<the member's
host>:<SAGA_METRICS_PORT>`` (every node serving on the same port, each on its own host).
"""

from __future__ import annotations

import os

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from orchestrator.errors import QueryFailed
from orchestrator.kafka_config import admin_config
from orchestrator.settings import Settings

__all__ = ["node_url_for"]

NODE_URLS_VAR = "SAGA_NODE_URLS"


def node_url_for(settings: Settings, partition: int, *, timeout: float = 10.0) -> str:
    """The base URL (``http://host:port``) of the node that owns ``partition`` of the inbox.

    Raises :class:`~orchestrator.errors.QueryFailed` (``error_type="NoNode"``) when no node owns
    it or its URL is not known."""
    group = f"{settings.namespace}.orchestrator"
    admin = AdminClient(admin_config(settings.bootstrap_servers, extra=settings.client_extra()))
    try:
        found = admin.describe_consumer_groups([group], request_timeout=timeout)
        description = found[group].result(timeout + 5)
    except KafkaException as exc:
        raise QueryFailed(f"cannot describe group {group}: {exc}", error_type="NoNode") from exc
    for member in description.members:
        owned = member.assignment.topic_partitions if member.assignment else []
        if any(tp.topic == settings.inbox and tp.partition == partition for tp in owned):
            node_id = (member.group_instance_id or "").removeprefix(f"{group}.")
            return _url_of(node_id, member.host.lstrip("/"), settings)
    raise QueryFailed(
        f"no node owns partition {partition} of {settings.inbox} (is a node of namespace "
        f"{settings.namespace!r} running?)",
        error_type="NoNode",
    )


def _url_of(node_id: str, host: str, settings: Settings) -> str:
    listed = os.environ.get(NODE_URLS_VAR, "")
    for item in listed.split(","):
        name, _, url = item.strip().partition("=")
        if name == node_id and url:
            return url.rstrip("/")
    if settings.metrics_port:
        return f"http://{host}:{settings.metrics_port}"
    raise QueryFailed(
        f"node {node_id} owns the workflow's partition, but its URL is not known: list it in "
        f"{NODE_URLS_VAR} (e.g. {node_id}=http://host:9100) or set SAGA_METRICS_PORT",
        error_type="NoNode",
    )
