"""Avro single-object encoding of the envelopes in :mod:`contracts.envelopes`.

Wire format of one record (the Avro specification's "single object encoding")::

    C3 01 | CRC-64-AVRO fingerprint of the writer schema (8 bytes, little-endian) | Avro binary body

The fingerprint is the Rabin fingerprint of the writer schema's Parsing Canonical Form, so a reader
in any language can find the writer schema. The schemas are the ``.avsc`` files in
``contracts/schemas/`` (current versions, which this module writes) and
``contracts/schemas/legacy/`` (older versions, which it can still read: a record written with an old
version is read with the current schema of the same full name, following Avro's resolution rules,
so fields added since get their defaults).

Public API: :func:`encode`, :func:`decode`, :func:`decode_as`, :func:`fingerprint`,
:func:`known_schemas`, :func:`current_schema`, and the :class:`CodecError` hierarchy.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, get_args

from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import parse_schema, to_parsing_canonical_form
from pydantic import BaseModel, ValidationError

from contracts.envelopes import Envelope, EventBody, HistoryEvent

__all__ = [
    "MAGIC",
    "NAMESPACE",
    "BadMagic",
    "CodecError",
    "MalformedRecord",
    "SchemaInfo",
    "TruncatedRecord",
    "UnencodableEnvelope",
    "UnexpectedEnvelope",
    "UnknownSchema",
    "current_schema",
    "decode",
    "decode_as",
    "encode",
    "fingerprint",
    "known_schemas",
]

MAGIC: Final = b"\xc3\x01"
"""The two marker bytes that start every single-object-encoded record."""
NAMESPACE: Final = "saga.v1"
"""Avro namespace of every envelope schema."""

_HEADER_LEN: Final = 10
_SCHEMA_DIR: Final = Path(__file__).parent / "schemas"
_LEGACY_DIR: Final = _SCHEMA_DIR / "legacy"
_DETAIL_MAX: Final = 300

E = TypeVar("E", bound=BaseModel)


# --------------------------------------------------------------------------- errors


class CodecError(Exception):
    """Base of every error this codec raises; ``str(error)`` is a reason fit for a DLQ record."""


class TruncatedRecord(CodecError):
    """The record ends before its header or its body is complete."""


class BadMagic(CodecError):
    """The record does not start with the single-object marker ``C3 01``."""

    def __init__(self, message: str, got: bytes = b"") -> None:
        super().__init__(message)
        self.got = got


class UnknownSchema(CodecError):
    """The writer schema's fingerprint is not one of the known schemas."""

    def __init__(self, message: str, fingerprint: int = 0) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class MalformedRecord(CodecError):
    """The body does not decode with the writer schema, or does not validate as the envelope."""


class UnexpectedEnvelope(CodecError):
    """:func:`decode_as` found a valid envelope of another type than the one asked for."""

    def __init__(self, message: str, envelope: Envelope | None = None) -> None:
        super().__init__(message)
        self.envelope = envelope


class UnencodableEnvelope(CodecError):
    """:func:`encode` could not write the envelope (e.g. an int that does not fit a 64-bit long)."""


# --------------------------------------------------------------------------- fingerprint

_CRC64_EMPTY: Final = 0xC15D213AA4D7A795


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_TABLE: Final = _crc64_table()


def _crc64_avro(data: bytes) -> int:
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(schema: str | dict[str, Any] | list[Any]) -> int:
    """The CRC-64-AVRO (Rabin) fingerprint of a schema's Parsing Canonical Form, unsigned 64-bit.

    ``schema`` is a schema as fastavro takes it: a type name such as ``"int"``, a dict (raw JSON
    object or the result of ``parse_schema``) or a list (a union). JSON *text* must be
    ``json.loads``-ed first. Written on the wire as 8 little-endian bytes.
    """
    canonical: str = to_parsing_canonical_form(schema)
    return _crc64_avro(canonical.encode("utf-8"))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    """One known schema: a current version (written and read) or a legacy one (read only)."""

    full_name: str
    fingerprint: int
    current: bool
    path: Path
    schema: dict[str, Any]
    """The schema as ``fastavro.parse_schema`` returned it; do not modify it."""


@dataclass(frozen=True, slots=True)
class _Reader:
    info: SchemaInfo
    model: type[BaseModel]
    reader_schema: dict[str, Any] | None  # None: the writer schema is the current one
    from_avro: Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _Writer:
    info: SchemaInfo
    header: bytes
    to_avro: Callable[[BaseModel], dict[str, Any]]


def _load(path: Path, current: bool) -> SchemaInfo:
    raw = json.loads(path.read_text(encoding="utf-8"))
    parsed = parse_schema(raw)  # a fresh set of named types per file: each file stands alone
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise RuntimeError(f"{path}: an envelope schema must be a record")
    return SchemaInfo(
        full_name=parsed["name"],
        fingerprint=fingerprint(parsed),
        current=current,
        path=path,
        schema=parsed,
    )


def _plain_to_avro(model: BaseModel) -> dict[str, Any]:
    return model.model_dump()


def _plain_from_avro(record: dict[str, Any]) -> dict[str, Any]:
    return record


def _event_types() -> dict[str, str]:
    """Avro full name of each history event body record -> the pydantic ``kind`` value."""
    (union, *_) = get_args(EventBody)
    kinds: dict[str, str] = {}
    for body_type in get_args(union):
        kind = body_type.model_fields["kind"].default
        kinds[f"{NAMESPACE}.{body_type.__name__}"] = kind
    return kinds


_KIND_BY_EVENT_NAME: Final = _event_types()
_EVENT_NAME_BY_KIND: Final = {kind: name for name, kind in _KIND_BY_EVENT_NAME.items()}


def _history_to_avro(model: BaseModel) -> dict[str, Any]:
    record = model.model_dump()
    body = record["event"]
    record["event"] = (_EVENT_NAME_BY_KIND[body.pop("kind")], body)
    return record


def _history_from_avro(record: dict[str, Any]) -> dict[str, Any]:
    name, body = record["event"]
    body["kind"] = _KIND_BY_EVENT_NAME[name]
    record["event"] = body
    return record


def _build_registry() -> tuple[
    dict[type[BaseModel], _Writer], dict[bytes, _Reader], tuple[SchemaInfo, ...]
]:
    models: dict[str, type[BaseModel]] = {
        f"{NAMESPACE}.{t.__name__}": t for t in get_args(Envelope)
    }
    current: dict[str, SchemaInfo] = {}
    for path in sorted(_SCHEMA_DIR.glob("*.avsc")):
        info = _load(path, current=True)
        if info.full_name not in models:
            raise RuntimeError(f"{path}: schema {info.full_name} names no envelope model")
        if info.full_name in current:
            raise RuntimeError(f"{path}: a second current schema for {info.full_name}")
        current[info.full_name] = info
    missing = sorted(set(models) - set(current))
    if missing:
        raise RuntimeError(f"no schema in {_SCHEMA_DIR} for {', '.join(missing)}")
    legacy = [_load(path, current=False) for path in sorted(_LEGACY_DIR.glob("*.avsc"))]

    writers: dict[type[BaseModel], _Writer] = {}
    readers: dict[bytes, _Reader] = {}
    for info in [*current.values(), *legacy]:
        if info.full_name not in current:
            raise RuntimeError(f"{info.path}: legacy schema of unknown type {info.full_name}")
        model = models[info.full_name]
        history = model is HistoryEvent
        key = info.fingerprint.to_bytes(8, "little")
        if key in readers:
            if readers[key].info.full_name != info.full_name:
                raise RuntimeError(f"{info.path}: fingerprint clash with {readers[key].info.path}")
            continue  # a legacy file identical to a known version
        readers[key] = _Reader(
            info=info,
            model=model,
            reader_schema=None if info.current else current[info.full_name].schema,
            from_avro=_history_from_avro if history else _plain_from_avro,
        )
        if info.current:
            writers[model] = _Writer(
                info=info,
                header=MAGIC + key,
                to_avro=_history_to_avro if history else _plain_to_avro,
            )
    infos = tuple(sorted([*current.values(), *legacy], key=lambda i: (i.full_name, not i.current)))
    return writers, readers, infos


_WRITERS, _READERS, _INFOS = _build_registry()


def known_schemas() -> tuple[SchemaInfo, ...]:
    """Every schema the codec knows, current and legacy, sorted by full name (current first)."""
    return _INFOS


def current_schema(model_type: type[Envelope]) -> SchemaInfo:
    """The current (written) schema of an envelope type."""
    try:
        return _WRITERS[model_type].info
    except KeyError:
        raise TypeError(f"{model_type!r} is not an envelope type") from None


# --------------------------------------------------------------------------- encode / decode


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def encode(model: Envelope) -> bytes:
    """Frame ``model`` as an Avro single-object record written with its type's current schema."""
    writer = _WRITERS.get(type(model))
    if writer is None:
        raise TypeError(f"{type(model).__name__} is not an envelope type")
    out = io.BytesIO()
    out.write(writer.header)
    try:
        schemaless_writer(out, writer.info.schema, writer.to_avro(model))
    except Exception as exc:  # fastavro raises ValueError, OverflowError, struct.error, ...
        raise UnencodableEnvelope(f"cannot encode {writer.info.full_name}: {_short(exc)}") from exc
    return out.getvalue()


def decode(data: bytes) -> Envelope:
    """Read a single-object record into its envelope model.

    The writer schema is found by fingerprint; a record of a legacy schema is read with the current
    schema of the same name, so it comes back as the current model. Raises only :class:`CodecError`
    subclasses on bad input.
    """
    if data is None:
        raise TruncatedRecord("no record value (a tombstone?): expected a single-object record")
    size = len(data)
    if size < 2:
        raise TruncatedRecord(f"record of {size} byte(s) is shorter than the 10-byte header")
    head = bytes(data[:2])
    if head != MAGIC:
        raise BadMagic(
            f"record starts with 0x{head.hex()}, not the Avro single-object marker 0xc301",
            got=head,
        )
    if size < _HEADER_LEN:
        raise TruncatedRecord(f"record of {size} byte(s) is shorter than the 10-byte header")
    key = bytes(data[2:_HEADER_LEN])
    reader = _READERS.get(key)
    if reader is None:
        fp = int.from_bytes(key, "little")
        raise UnknownSchema(f"unknown writer schema fingerprint 0x{fp:016x}", fingerprint=fp)
    name = reader.info.full_name
    stream = io.BytesIO(data)
    stream.seek(_HEADER_LEN)
    try:
        record = schemaless_reader(
            stream,
            reader.info.schema,
            reader.reader_schema,
            return_record_name=True,
            return_record_name_override=True,
        )
    except Exception as exc:  # fastavro raises EOFError, IndexError, UnicodeDecodeError, ...
        # Out of bytes: EOFError, or IndexError from fastavro's varint reader at the end.
        if isinstance(exc, EOFError) or (isinstance(exc, IndexError) and stream.tell() >= size):
            raise TruncatedRecord(
                f"{name} body of {size - _HEADER_LEN} byte(s) ends before the record is complete"
            ) from exc
        raise MalformedRecord(f"{name} body does not decode: {_short(exc)}") from exc
    if not isinstance(record, dict):  # pragma: no cover - every envelope schema is a record
        raise MalformedRecord(f"{name} body decoded to {type(record).__name__}, not a record")
    if stream.tell() != size:
        raise MalformedRecord(
            f"{name} body has {size - stream.tell()} unread trailing byte(s) "
            f"after {stream.tell() - _HEADER_LEN} decoded"
        )
    try:
        envelope = reader.model.model_validate(reader.from_avro(record))
    except (ValidationError, KeyError, TypeError, ValueError) as exc:
        raise MalformedRecord(f"{name} record does not validate: {_short(exc)}") from exc
    return envelope  # type: ignore[return-value]  # model is one of the Envelope types


def decode_as(data: bytes, model_type: type[E]) -> E:
    """Like :func:`decode`, but raise :class:`UnexpectedEnvelope` unless it is a ``model_type``.

    ``model_type`` is one of the envelope types, e.g. ``decode_as(value, ActivityReply)``.
    """
    envelope = decode(data)
    if not isinstance(envelope, model_type):
        raise UnexpectedEnvelope(
            f"expected a {model_type.__name__} record, got a {type(envelope).__name__}",
            envelope=envelope,
        )
    return envelope
