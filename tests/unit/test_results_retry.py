"""Opening the results subscription outlasts a partition whose leader is being elected."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException

from orchestrator._results import _retrying_while_retriable


def _failing(codes: list[int]) -> Callable[[], str]:
    def call() -> str:
        if codes:
            raise KafkaException(KafkaError(codes.pop(0)))
        return "offsets"

    return call


def test_not_leader_is_asked_again_until_it_answers() -> None:
    codes = [KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE]
    assert _retrying_while_retriable(_failing(codes), 5) == "offsets"
    assert codes == []


def test_another_error_goes_up_at_once() -> None:
    codes = [KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.NOT_LEADER_FOR_PARTITION]
    with pytest.raises(KafkaException) as info:
        _retrying_while_retriable(_failing(codes), 5)
    assert info.value.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART


def test_past_the_deadline_the_last_error_goes_up() -> None:
    codes = [KafkaError.NOT_LEADER_FOR_PARTITION] * 100
    started = time.monotonic()
    with pytest.raises(KafkaException):
        _retrying_while_retriable(_failing(codes), 0.3)
    assert time.monotonic() - started < 2
