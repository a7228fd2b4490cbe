"""Converting user values (pydantic models, JSON-able values) to and from ``Payload`` bytes."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError

from contracts.envelopes import Payload

T = TypeVar("T")

JSON = "json/plain"
NULL = "binary/null"


class PayloadError(ValueError):
    """A payload could not be encoded, or its bytes do not fit the expected type."""


@lru_cache(maxsize=1024)
def _cached_adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def _adapter(tp: Any) -> TypeAdapter[Any]:
    return _cached_adapter(tp)


def to_payload(value: object) -> Payload:
    if value is None:
        return Payload(encoding=NULL, data=b"")
    try:
        if isinstance(value, BaseModel):
            data = value.model_dump_json().encode()
        else:
            data = _adapter(type(value)).dump_json(value)
    except Exception as exc:  # pydantic raises several types for unserialisable values
        raise PayloadError(f"cannot encode {type(value).__name__} as JSON: {exc}") from exc
    return Payload(encoding=JSON, data=data)


@overload
def from_payload(payload: Payload, tp: type[T]) -> T: ...
@overload
def from_payload(payload: Payload, tp: Any) -> Any: ...
def from_payload(payload: Payload, tp: Any) -> Any:
    if payload.encoding == NULL:
        if tp is None or tp is type(None):
            return None
        try:
            return _adapter(tp).validate_python(None)
        except ValidationError as exc:
            raise PayloadError(f"expected {_name(tp)}, got no value") from exc
    if payload.encoding != JSON:
        raise PayloadError(f"unknown payload encoding {payload.encoding!r} (expected {JSON!r})")
    try:
        return _adapter(tp).validate_json(payload.data)
    except ValidationError as exc:
        raise PayloadError(f"payload does not fit {_name(tp)}: {exc}") from exc


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))
