"""Which node owns an inbox partition, and the URL of its HTTP server.

First the registrations on ``<ns>.nodes`` (``orchestrator/nodes.py``): each running node writes
its URL (``http://<advertised_host>:<port>``) and the partitions it owns. When no registration
names the partition (a node of a release before the registry), the consumer group
``<ns>.orchestrator`` is described (the broker knows which member owns which inbox partition, and
each member's ``group.instance.id`` is ``<ns>.orchestrator.<node id>``); the node's URL is then
``SAGA_NODE_URLS`` for that node id (``n1=http://10.0.0.5:9100,n2=http://10.0.0.6:9100``) or,
without it, ``http://<the member's host>:<SAGA_METRICS_PORT>``.
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
    registered = _registered_url(settings, partition, timeout)
    if registered is not None:
        return registered
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


def _registered_url(settings: Settings, partition: int, timeout: float) -> str | None:
    """The URL of the node registered as the owner of ``partition`` (the latest record, if a
    rebalance left two), or None."""
    from orchestrator.client import Client, ClientError  # the client imports this module

    try:
        with Client(settings) as client:
            nodes = client.nodes(timeout=timeout, refresh=True)
    except (ClientError, TimeoutError):
        return None
    owners = [n for n in nodes if partition in n.partitions and n.url is not None]
    owners.sort(key=lambda n: n.updated_at_ms, reverse=True)
    return owners[0].url if owners else None


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
