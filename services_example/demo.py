"""The demo: a real broker, the namespace's topics, and records through a Kafka transaction.

    make demo

Grows into the full order-saga demo (services_example/); for now it shows the foundation the
engine stands on: topics created and verified, a transaction committed and one aborted, and
what a read_committed reader sees.
"""

from __future__ import annotations

import sys
import time
import uuid

import click
from confluent_kafka import Consumer, Producer

from contracts import codec
from contracts.envelopes import StartWorkflow
from deploy.kafka import broker
from orchestrator.kafka_config import consumer_config, producer_config
from orchestrator.partitioner import partition_for
from orchestrator.payloads import to_payload
from orchestrator.topics import ensure_topics


@click.command()
@click.option("--namespace", default="demo", show_default=True)
@click.option("--partitions", default=3, show_default=True)
def main(namespace: str, partitions: int) -> None:
    began = time.monotonic()
    bootstrap = broker.external_bootstrap() or broker.start(broker.BrokerLayout.from_env())
    report = ensure_topics(bootstrap, namespace, partitions)
    click.echo(f"topics: created {report.created or 'none'}, verified {report.verified}")

    inbox = f"{namespace}.inbox"
    producer = Producer(producer_config(bootstrap, transactional_id=f"{namespace}.demo"))
    producer.init_transactions(30)
    run = uuid.uuid4().hex[:8]
    for outcome in ("abort", "commit"):
        workflow_id = f"demo-{run}-{outcome}"
        start = StartWorkflow(
            workflow_id=workflow_id,
            workflow_type="demo",
            request_id=uuid.uuid4().hex,
            input=to_payload({"outcome": outcome}),
            sent_at_ms=int(time.time() * 1000),
        )
        producer.begin_transaction()
        producer.produce(inbox, key=workflow_id.encode(), value=codec.encode(start))
        if outcome == "commit":
            producer.commit_transaction(30)
        else:
            producer.flush(30)
            producer.abort_transaction(30)
        done = "committed" if outcome == "commit" else "aborted"
        click.echo(
            f"{done} a transaction with StartWorkflow {workflow_id} "
            f"(partition {partition_for(workflow_id, partitions)} by murmur2)"
        )

    reader = Consumer(consumer_config(bootstrap, f"{namespace}.demo-reader.{run}"))
    reader.subscribe([inbox])
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("-commit " in s for s in seen):
        for msg in reader.consume(num_messages=100, timeout=0.5):
            if msg.error() is None and msg.value():
                wf = codec.decode_as(msg.value() or b"", StartWorkflow).workflow_id
                if wf.startswith(f"demo-{run}"):
                    seen.append(f"{wf} (partition {msg.partition()})")
    reader.close()
    click.echo("a read_committed reader sees: " + (", ".join(seen) or "nothing"))
    ok = len(seen) == 1 and seen[0].startswith(f"demo-{run}-commit")
    click.echo(f"{'OK' if ok else 'UNEXPECTED'} in {time.monotonic() - began:.1f}s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
