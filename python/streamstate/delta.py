"""Incremental checkpoints: the delta format, beside the record codec it is written in.

A delta is a record container (:mod:`streamstate.codec`) of kind
:attr:`~streamstate.codec.RecordKind.DELTA` holding ordered changes: each value carries a
one-byte tag, ``0x01`` + value for a put, a lone ``0x00`` for a delete.
:func:`apply_record_delta` overlays one onto any ``(key, value)`` container;
:func:`validate_record_delta` checks one before it is committed, so a checkpoint can never
hold a delta that recovery cannot apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._typing import BytesLike
from .codec import RecordKind, decode_records, encode_records
from .errors import CorruptDataError, StreamStateError

__all__ = [
    "DELTA_KIND",
    "DeltaFunction",
    "DeltaValidator",
    "apply_record_delta",
    "encode_delta",
    "require_delta",
    "validate_record_delta",
]

#: Record-container ``kind`` of a delta written by :func:`encode_delta`.
DELTA_KIND = RecordKind.DELTA
_PUT = b"\x01"
_DELETE = b"\x00"

#: ``apply_delta(parent_state, delta) -> state``.
DeltaFunction = Callable[[bytes, bytes], bytes]
#: ``validate_delta(delta)``: raises unless ``delta`` is one its ``apply_delta`` can apply.
DeltaValidator = Callable[[BytesLike], None]


def encode_delta(changes: Iterable[tuple[BytesLike, BytesLike | None]]) -> bytes:
    """Encode ordered changes ``(key, value)`` (``value=None`` deletes ``key``) as a delta.

    The result is a record container of kind :data:`DELTA_KIND` whose values carry a one-byte
    tag: ``0x01`` + value for a put, a lone ``0x00`` for a delete. Changes apply in order.
    """
    records = [(key, _DELETE if value is None else _PUT + bytes(value)) for key, value in changes]
    return encode_records(DELTA_KIND, records)


def _changes(delta: BytesLike, where: str) -> list[tuple[bytes, bytes]]:
    """The tagged changes of a delta, after checking its kind and every tag."""
    kind, changes = decode_records(delta)
    if kind != DELTA_KIND:
        raise CorruptDataError(f"{where}: delta has kind {kind}, not {int(DELTA_KIND)}")
    for key, tagged in changes:
        if tagged[:1] != _PUT and tagged != _DELETE:
            raise CorruptDataError(f"{where}: bad change tag for key {key!r}")
    return changes


def validate_record_delta(delta: BytesLike) -> None:
    """Raise :class:`~streamstate.CorruptDataError` unless ``delta`` is a well-formed
    :func:`encode_delta` delta (the default ``apply_delta`` can apply it)."""
    _changes(delta, "validate_record_delta")


def require_delta(where: str, data: BytesLike, validate: DeltaValidator) -> None:
    """Run ``validate(data)`` for the delta artifact ``where`` (e.g. ``"agg/partition-0"``);
    any failure becomes a :class:`~streamstate.CorruptDataError` saying how to fix it."""
    try:
        validate(data)
    except (StreamStateError, ValueError, TypeError) as exc:
        raise CorruptDataError(
            f"{where}: is_delta data is not a delta recovery can apply ({exc}); write it "
            "with encode_delta, or pass validate_delta for another format"
        ) from exc


def apply_record_delta(base: bytes, delta: bytes) -> bytes:
    """The default ``apply_delta``: overlay an :func:`encode_delta` delta onto a container.

    ``base`` is a record container of any kind except :data:`DELTA_KIND`, read as a key/value
    map. Puts replace a key's value in place or append new keys in delta order; deletes
    remove keys (deleting an absent key is a no-op). The result keeps ``base``'s kind.
    Malformed input raises :class:`~streamstate.CorruptDataError`.
    """
    kind, records = decode_records(base)
    if kind == DELTA_KIND:
        raise CorruptDataError("apply_record_delta: the base state is itself a delta")
    state = dict(records)
    for key, tagged in _changes(delta, "apply_record_delta"):
        if tagged == _DELETE:
            state.pop(key, None)
        else:
            state[key] = tagged[1:]
    return encode_records(kind, state.items())
