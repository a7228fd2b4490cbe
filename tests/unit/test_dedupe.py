"""The local dedupe store: final replies by idempotency key, on RocksDB and in memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from contracts.envelopes import ActivityReply, ErrorInfo, Payload, ReplyOutcome, TraceContext
from orchestrator._dedupe import DedupeStore, MemoryDedupeStore, ReplyStore


def _reply(
    outcome: ReplyOutcome = ReplyOutcome.SUCCESS, data: bytes = b'{"id":"h-1"}'
) -> ActivityReply:
    failed = outcome is not ReplyOutcome.SUCCESS
    return ActivityReply(
        workflow_id="wf-1",
        seq=3,
        attempt=1,
        idempotency_key="wf-1/3",
        outcome=outcome,
        sent_at_ms=1_700_000_000_000,
        result=None if failed else Payload(data=data),
        error=ErrorInfo(type="OutOfStock", message="none left") if failed else None,
        service="inventory",
        trace=TraceContext(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
    )


@pytest.fixture(params=["rocksdb", "memory"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], ReplyStore]:
    if request.param == "memory":
        return MemoryDedupeStore
    return lambda: DedupeStore(tmp_path / "svc" / "dedupe")


def test_unknown_key_is_none(make_store: Callable[[], ReplyStore]) -> None:
    store = make_store()
    assert store.get("wf-1/3") is None
    store.close()


def test_put_then_get_returns_the_reply(make_store: Callable[[], ReplyStore]) -> None:
    store = make_store()
    success, failure = _reply(), _reply(ReplyOutcome.BUSINESS_FAILURE)
    store.put("wf-1/3", success)
    store.put("wf-1/4", failure)
    assert store.get("wf-1/3") == success
    assert store.get("wf-1/4") == failure
    store.close()


def test_put_overwrites(make_store: Callable[[], ReplyStore]) -> None:
    store = make_store()
    store.put("wf-1/3", _reply(data=b'{"id":"old"}'))
    store.put("wf-1/3", _reply(data=b'{"id":"new"}'))
    got = store.get("wf-1/3")
    assert got is not None and got.result == Payload(data=b'{"id":"new"}')
    store.close()


def test_retryable_failures_are_refused(make_store: Callable[[], ReplyStore]) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="RETRYABLE_FAILURE"):
        store.put("wf-1/3", _reply(ReplyOutcome.RETRYABLE_FAILURE))
    assert store.get("wf-1/3") is None
    store.close()


def test_rocksdb_store_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "svc" / "dedupe"
    store = DedupeStore(path)
    store.put("wf-1/3", _reply())
    store.put("wf-ü/1", _reply(ReplyOutcome.BUSINESS_FAILURE))
    store.close()

    reopened = DedupeStore(path)
    assert reopened.get("wf-1/3") == _reply()
    assert reopened.get("wf-ü/1") == _reply(ReplyOutcome.BUSINESS_FAILURE)
    assert reopened.get("wf-1/4") is None
    reopened.close()


def test_an_unreadable_entry_reads_as_unknown(tmp_path: Path) -> None:
    from orchestrator._local_db import open_local_db

    path = tmp_path / "dedupe"
    DedupeStore(path).close()
    raw = open_local_db(path)
    raw[b"wf-1/3"] = b"not an avro record"
    raw.close()

    store = DedupeStore(path)
    assert store.get("wf-1/3") is None
    store.close()


def test_a_reply_framed_already_is_stored_as_framed(tmp_path: Path) -> None:
    """The service hands over the bytes of the reply record it committed: stored as they are,
    read back as the reply (no second encoding per command)."""
    from contracts import codec

    store = DedupeStore(tmp_path / "dedupe")
    reply = _reply()
    store.put("wf-1/3", reply, codec.encode(reply))
    assert store.get("wf-1/3") == reply
    store.close()
