"""The client's shared results subscription (orchestrator/_results.py) and a broker that stops
and starts again: the subscription is not rebuilt nor failed, a waiter registered before the
outage gets its result written after it, and a waiter that times out during the outage is told
what the reader last saw."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
from confluent_kafka import Producer

from contracts.codec import encode
from contracts.envelopes import WorkflowResult, WorkflowStatus
from orchestrator.client import Client
from orchestrator.kafka_config import producer_config
from orchestrator.payloads import to_payload
from orchestrator.settings import Settings
from orchestrator.topics import ensure_topics

from .conftest import PrivateBroker

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]


def _put(producer: Producer, settings: Settings, workflow_id: str, value: int) -> None:
    result = WorkflowResult(
        workflow_id=workflow_id,
        status=WorkflowStatus.COMPLETED,
        finished_at_ms=int(time.time() * 1000),
        result=to_payload(value),
    )
    producer.produce(settings.results, key=workflow_id.encode(), value=encode(result))
    assert producer.flush(60) == 0


def test_the_results_subscription_rides_out_a_broker_outage(
    private_broker: PrivateBroker, namespace: str
) -> None:
    bootstrap = private_broker.bootstrap
    ensure_topics(bootstrap, namespace, 3)
    settings = Settings(  # type: ignore[call-arg]  # bootstrap_servers is set by its alias
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, namespace=namespace, partitions=3
    )
    producer = Producer(producer_config(bootstrap))
    with Client(settings) as client:
        _put(producer, settings, "before", 1)
        assert client.result("before", int, timeout=30) == 1
        sub = client._results
        assert sub is not None

        got: dict[str, Any] = {}

        def wait_during() -> None:
            try:
                got["during"] = client.result("during", int, timeout=200)
            except Exception as exc:
                got["during"] = exc

        waiter = threading.Thread(target=wait_during)
        waiter.start()
        deadline = time.monotonic() + 10
        while sub.waiting() < 1:
            assert time.monotonic() < deadline, "the waiter did not register"
            time.sleep(0.05)

        private_broker.stop()
        with pytest.raises(TimeoutError) as timed_out:
            client.result("nobody", timeout=8)
        message = str(timed_out.value)
        print(message)
        assert re.search(
            r"the results reader last reported .*(_TRANSPORT|_ALL_BROKERS_DOWN)", message
        )
        private_broker.start()

        _put(producer, settings, "during", 2)
        waiter.join(200)
        assert got["during"] == 2
        assert client._results is sub and sub.failure is None
        _put(producer, settings, "after", 3)
        assert client.result("after", int, timeout=30) == 3
