"""Typed activity contracts: what an activity takes, what it returns, and which service serves it.

A contract is shared by the workflow that calls the activity and the service that implements it,
so a mismatch between them is a type error, not a runtime surprise::

    reserve = ActivityContract("inventory.reserve", "inventory", Reserve, Reservation)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)


@dataclass(frozen=True)
class ActivityContract(Generic[InT, OutT]):
    """An activity named ``name`` served by ``service`` on the topic ``<service>.commands``."""

    name: str
    service: str
    input: type[InT]
    output: type[OutT]

    @property
    def topic(self) -> str:
        return command_topic(self.service)


def command_topic(service: str) -> str:
    return f"{service}.commands"
