"""Heartbeats of long activities: a handler's ``info.heartbeat(details)`` becomes a small
``ActivityHeartbeat`` record on the workflow's inbox.

Heartbeats are not part of the service's transaction (a handler calls them while it runs, long
before its reply): they go through a plain idempotent producer of their own. Losing one is
harmless, the next one counts; so they are throttled per command: at most one record per
``interval`` (a third of the workflow's ``heartbeat_timeout``, at least 0.2 s), and a call in
between is dropped (the next call that is due sends its own, newer details). The last details sent
reach the next attempt if this one fails (``info.heartbeat_details``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaException, Producer

from contracts import codec
from contracts.envelopes import ActivityCommand, ActivityHeartbeat
from orchestrator.kafka_config import producer_config
from orchestrator.payloads import PayloadError, to_payload
from orchestrator.settings import Settings

log = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.2
_DEFAULT_INTERVAL_S = 1.0  # the command names no heartbeat timeout: nobody waits for them
_DETAILS_MAX = 16_384  # details are a resume point, not data: refuse more


class Heartbeats:
    """One producer for the heartbeats of one running service (created at the first beat)."""

    def __init__(self, settings: Settings, reply_limit: int) -> None:
        self._settings = settings
        self._limit = min(reply_limit, _DETAILS_MAX)
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._last: dict[tuple[str, int, int], float] = {}
        self._closed = False

    def beat(self, cmd: ActivityCommand, service: str, details: Any) -> None:
        """Send a heartbeat for ``cmd`` unless one was sent less than an interval ago."""
        try:
            payload = to_payload(details)
        except PayloadError as exc:
            raise ValueError(f"heartbeat details must be JSON values: {exc}") from exc
        if len(payload.data) > self._limit:
            raise ValueError(
                f"heartbeat details of {len(payload.data)} bytes exceed {self._limit}: "
                "send where to resume, not the data"
            )
        timeout_ms = cmd.heartbeat_timeout_ms
        interval = max(_MIN_INTERVAL_S, timeout_ms / 3000) if timeout_ms else _DEFAULT_INTERVAL_S
        key = (cmd.workflow_id, cmd.seq, cmd.attempt)
        now = time.monotonic()
        with self._lock:
            if self._closed or now - self._last.get(key, float("-inf")) < interval:
                return  # closed: a handler left running after the service stopped
            self._last[key] = now
            if len(self._last) > 10_000:  # forget the oldest: they belong to finished commands
                for old in sorted(self._last, key=self._last.__getitem__)[:5_000]:
                    del self._last[old]
            producer = self._producer_locked()
        beat = ActivityHeartbeat(
            workflow_id=cmd.workflow_id,
            seq=cmd.seq,
            attempt=cmd.attempt,
            idempotency_key=cmd.idempotency_key,
            sent_at_ms=time.time_ns() // 1_000_000,
            details=payload,
            service=service,
        )
        try:
            producer.produce(
                cmd.reply_topic, key=cmd.workflow_id.encode(), value=codec.encode(beat)
            )
            producer.poll(0)
        except (KafkaException, BufferError) as exc:  # the next beat tries again
            log.warning("heartbeat of %s not sent: %s", cmd.idempotency_key, exc)

    def _producer_locked(self) -> Producer:
        if self._producer is None:
            conf = producer_config(
                self._settings.bootstrap_servers, extra=self._settings.client_extra()
            )
            self._producer = Producer(conf)
        return self._producer

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
            self._closed = True
        if producer is not None:
            producer.flush(1.0)


def details_of(cmd: ActivityCommand) -> Any:
    """The heartbeat details the command carries from an earlier attempt, as JSON values."""
    payload = cmd.heartbeat_details
    if payload is None or not payload.data:
        return None
    try:
        return json.loads(payload.data)
    except ValueError:
        log.warning("%s: unreadable heartbeat details", cmd.idempotency_key)
        return None
