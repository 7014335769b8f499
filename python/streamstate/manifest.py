"""The commit record of a checkpoint: its manifest, and the validators that read one.

The manifest is canonical JSON carrying its own SHA-256 (``manifest_sha256``) over every
other field, so any change to what it says is detected, and each artifact's SHA-256 and
size. Ids live in :mod:`streamstate.ids`, the path layout in :mod:`streamstate.layout`
(both re-exported here, where they used to live).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._core import sha256_hex
from .errors import CorruptDataError
from .ids import CheckpointId
from .layout import MAX_PARTITION, CheckpointPaths, validate_name

__all__ = [
    "MANIFEST_VERSION",
    "CheckpointId",
    "CheckpointManifest",
    "CheckpointPaths",
    "OperatorSnapshotEntry",
    "PartitionSnapshotEntry",
    "validate_name",
]

#: The manifest format this module writes and reads.
MANIFEST_VERSION = 2


@dataclass(frozen=True)
class PartitionSnapshotEntry:
    """One uploaded artifact: a partition's snapshot or delta, its size and SHA-256."""

    partition_id: int
    is_delta: bool
    path: str
    size_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form."""
        return {
            "partition_id": self.partition_id,
            "is_delta": self.is_delta,
            "path": self.path,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, obj: object, where: str) -> PartitionSnapshotEntry:
        """Validate and build from the JSON object form (unknown fields ignored)."""
        o = _object(obj, where)
        entry = cls(
            partition_id=_int(o, "partition_id", where, maximum=MAX_PARTITION),
            is_delta=_field(o, "is_delta", bool, where),
            path=_field(o, "path", str, where),
            size_bytes=_int(o, "size_bytes", where),
            sha256=_field(o, "sha256", str, where),
        )
        if not _is_sha256_hex(entry.sha256):
            raise CorruptDataError(f"manifest: {where}.sha256 is not 64 lowercase hex digits")
        return entry

    def check(self) -> PartitionSnapshotEntry:
        """Raise ``TypeError``/``ValueError`` unless every field has the type and range a
        manifest can hold (an entry built in code, not read from JSON); return it."""
        for name, kind in (("partition_id", int), ("is_delta", bool), ("size_bytes", int)):
            value = getattr(self, name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(f"{self.path!r}: {name} must be {kind.__name__}")
        if not isinstance(self.path, str):
            raise TypeError(f"entry path must be a str, got {type(self.path).__name__}")
        if not 0 <= self.partition_id <= MAX_PARTITION:
            raise ValueError(f"{self.path}: partition_id {self.partition_id} is out of range")
        if self.size_bytes < 0:
            raise ValueError(f"{self.path}: size_bytes {self.size_bytes} is negative")
        if not isinstance(self.sha256, str) or not _is_sha256_hex(self.sha256):
            raise ValueError(f"{self.path}: sha256 is not 64 lowercase hex digits")
        return self


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and not text.strip("0123456789abcdef")


@dataclass(frozen=True)
class OperatorSnapshotEntry:
    """Every partition artifact of one operator in one checkpoint."""

    partitions: tuple[PartitionSnapshotEntry, ...]
    total_bytes: int

    @classmethod
    def of(cls, partitions: Iterable[PartitionSnapshotEntry]) -> OperatorSnapshotEntry:
        """Build from entries, computing ``total_bytes``."""
        parts = tuple(sorted(partitions, key=lambda e: e.partition_id))
        return cls(parts, sum(p.size_bytes for p in parts))

    def partition(self, partition_id: int) -> PartitionSnapshotEntry | None:
        """The entry of one partition, or None."""
        return next((p for p in self.partitions if p.partition_id == partition_id), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form."""
        return {
            "partitions": [p.to_dict() for p in self.partitions],
            "total_bytes": self.total_bytes,
        }

    @classmethod
    def from_dict(cls, obj: object, where: str) -> OperatorSnapshotEntry:
        """Validate and build from the JSON object form (unknown fields ignored)."""
        o = _object(obj, where)
        raw = _field(o, "partitions", list, where)
        parts = tuple(
            PartitionSnapshotEntry.from_dict(p, f"{where}.partitions[{i}]")
            for i, p in enumerate(raw)
        )
        ids = [p.partition_id for p in parts]
        if len(set(ids)) != len(ids):
            raise CorruptDataError(f"manifest: {where} lists a partition twice")
        entry = cls(parts, _int(o, "total_bytes", where))
        if entry.total_bytes != sum(p.size_bytes for p in parts):
            raise CorruptDataError(f"manifest: {where}.total_bytes disagrees with its partitions")
        return entry


@dataclass(frozen=True)
class CheckpointManifest:
    """The commit record of one checkpoint (JSON, version 2).

    ``source_offsets`` maps source names to any JSON value; ``extra`` keeps fields written
    by a newer streamstate that this version does not know (tolerated, preserved).
    ``metadata`` is what the writer says about the job (a JSON object, e.g.
    ``{"partitions": 4}``); it is written only when not empty, so older readers keep it in
    their ``extra``.
    """

    checkpoint_id: CheckpointId
    epoch: int
    timestamp_ms: int
    operators: Mapping[str, OperatorSnapshotEntry]
    source_offsets: Mapping[str, Any] = field(default_factory=dict)
    parent_id: CheckpointId | None = None
    watermark: int | None = None
    total_size_bytes: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        checkpoint_id: CheckpointId,
        epoch: int,
        entries: Iterable[tuple[str, PartitionSnapshotEntry]],
        *,
        source_offsets: Mapping[str, Any] | None = None,
        parent_id: CheckpointId | None = None,
        watermark: int | None = None,
        timestamp_ms: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointManifest:
        """Assemble a manifest from uploaded ``(operator, entry)`` pairs, computing totals."""
        grouped: dict[str, list[PartitionSnapshotEntry]] = {}
        for operator, entry in entries:
            grouped.setdefault(validate_name("operator", operator), []).append(entry)
        operators = {op: OperatorSnapshotEntry.of(parts) for op, parts in sorted(grouped.items())}
        manifest = cls(
            checkpoint_id=checkpoint_id,
            epoch=epoch,
            timestamp_ms=time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms,
            operators=operators,
            source_offsets={k: plain_json(v) for k, v in (source_offsets or {}).items()},
            parent_id=parent_id,
            watermark=watermark,
            total_size_bytes=sum(op.total_bytes for op in operators.values()),
            metadata=plain_json(dict(metadata or {})),
        )
        manifest.to_json()  # validates offsets are JSON and every field is in range
        return manifest

    @property
    def partition_count(self) -> int:
        """Number of partition artifacts across all operators."""
        return sum(len(op.partitions) for op in self.operators.values())

    @property
    def partition_ids(self) -> frozenset[int]:
        """The distinct partition ids across all operators."""
        return frozenset(p.partition_id for op in self.operators.values() for p in op.partitions)

    def check_paths(self, paths: CheckpointPaths) -> None:
        """Raise ``ValueError`` unless every artifact sits where ``paths`` puts it."""
        for op, entry in self.operators.items():
            for part in entry.partitions:
                expected = paths.artifact(self.checkpoint_id, op, part.partition_id, part.is_delta)
                if part.path != expected:
                    raise ValueError(f"artifact path {part.path!r} should be {expected!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form, without the integrity field."""
        for source in self.source_offsets:
            validate_name("source", source)
        body: dict[str, Any] = dict(self.extra)
        body.update(
            version=MANIFEST_VERSION,
            checkpoint_id=str(self.checkpoint_id),
            epoch=self.epoch,
            timestamp_ms=self.timestamp_ms,
            operators={op: e.to_dict() for op, e in self.operators.items()},
            source_offsets=dict(self.source_offsets),
            parent_id=None if self.parent_id is None else str(self.parent_id),
            watermark=self.watermark,
            total_size_bytes=self.total_size_bytes,
        )
        if self.metadata:
            if not isinstance(self.metadata, Mapping) or not all(
                isinstance(key, str) for key in self.metadata
            ):
                raise ValueError("metadata must be a mapping with str keys")
            body["metadata"] = dict(self.metadata)
        return body

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace, ASCII) with ``manifest_sha256``."""
        body = self.to_dict()
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {self.epoch!r}")
        if self.watermark is not None and (
            isinstance(self.watermark, bool) or not isinstance(self.watermark, int)
        ):
            raise ValueError(f"watermark must be an int or None, got {self.watermark!r}")
        try:
            digest = sha256_hex(_canonical(body).encode("ascii"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest is not JSON-serialisable: {exc}") from exc
        body["manifest_sha256"] = digest
        return _canonical(body)

    @classmethod
    def from_json(cls, text: str | bytes | bytearray | memoryview) -> CheckpointManifest:
        """Parse and validate; raise :class:`CorruptDataError` naming what is wrong.

        Unknown fields are tolerated (kept in ``extra``); missing or mistyped required
        fields, an unsupported version, inconsistent totals, and any change to the content
        covered by ``manifest_sha256`` are rejected. Every defect is a
        :class:`CorruptDataError`, never another exception.
        """
        try:
            raw = bytes(text) if not isinstance(text, str) else text.encode("utf-8")
            obj = json.loads(
                raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptDataError(f"manifest is not valid JSON: {exc}") from None
        try:
            return cls._from_object(obj)
        except CorruptDataError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            # A defect no validator names (and so a gap in them): still corrupt, not a crash.
            raise CorruptDataError(f"manifest: {exc}") from None

    @classmethod
    def _from_object(cls, obj: object) -> CheckpointManifest:
        o = _object(obj, "manifest")
        version = _int(o, "version", "manifest")
        if version != MANIFEST_VERSION:
            raise CorruptDataError(f"manifest version {version} is not supported (expected 2)")
        stored = _field(o, "manifest_sha256", str, "manifest")
        body = {k: v for k, v in o.items() if k != "manifest_sha256"}
        actual = sha256_hex(_canonical(body).encode("ascii"))
        if actual != stored:
            raise CorruptDataError(
                f"manifest content does not match its manifest_sha256 ({stored} != {actual})"
            )
        operators_raw = _object(_field(o, "operators", dict, "manifest"), "operators")
        operators = {}
        for op, entry in operators_raw.items():
            _checked_name("operator", op)
            operators[op] = OperatorSnapshotEntry.from_dict(entry, f"operators[{op!r}]")
        offsets = _field(o, "source_offsets", dict, "manifest")
        for source in offsets:
            _checked_name("source", source)
        parent_raw = _optional(o, "parent_id", str, "manifest")
        watermark = _optional(o, "watermark", int, "manifest")
        metadata = _optional(o, "metadata", dict, "manifest")
        manifest = cls(
            checkpoint_id=_checked_id(_field(o, "checkpoint_id", str, "manifest"), "checkpoint_id"),
            epoch=_int(o, "epoch", "manifest"),
            timestamp_ms=_int(o, "timestamp_ms", "manifest"),
            operators=operators,
            source_offsets=offsets,
            parent_id=None if parent_raw is None else _checked_id(parent_raw, "parent_id"),
            watermark=watermark,
            total_size_bytes=_int(o, "total_size_bytes", "manifest"),
            extra={k: v for k, v in body.items() if k not in _KNOWN_FIELDS},
            metadata=metadata or {},
        )
        if manifest.total_size_bytes != sum(e.total_bytes for e in operators.values()):
            raise CorruptDataError("manifest: total_size_bytes disagrees with its operators")
        if manifest.parent_id is not None and not manifest.parent_id < manifest.checkpoint_id:
            raise CorruptDataError("manifest: parent_id is not older than checkpoint_id")
        return manifest

    def __repr__(self) -> str:
        return (
            f"CheckpointManifest(checkpoint_id={self.checkpoint_id!r}, epoch={self.epoch}, "
            f"operators={sorted(self.operators)}, partitions={self.partition_count}, "
            f"total_size_bytes={self.total_size_bytes}, parent_id={self.parent_id!r})"
        )


_KNOWN_FIELDS = frozenset(
    {
        "version",
        "checkpoint_id",
        "epoch",
        "timestamp_ms",
        "operators",
        "source_offsets",
        "parent_id",
        "watermark",
        "total_size_bytes",
        "metadata",
    }
)


def _canonical(obj: object) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which canonical JSON cannot hold
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def plain_json(value: Any) -> Any:
    """``value`` with numpy scalars (``np.int64(5)``) turned into Python ones, recursively
    through dicts, lists and tuples, so offsets taken from numpy arrays serialise."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_json(v) for v in value)
    return value


def _object(obj: object, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CorruptDataError(f"manifest: {where} is not a JSON object")
    return obj


def _field(o: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in o:
        raise CorruptDataError(f"manifest: {where} is missing required field {key!r}")
    value = o[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptDataError(f"manifest: {where}.{key} must be {kind.__name__}")
    return value


def _optional(o: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if o.get(key) is None:
        return None
    return _field(o, key, kind, where)


def _int(o: Mapping[str, Any], key: str, where: str, maximum: int = (1 << 63) - 1) -> int:
    value: int = _field(o, key, int, where)
    if not 0 <= value <= maximum:
        raise CorruptDataError(f"manifest: {where}.{key} = {value} is out of range")
    return value


def _checked_name(kind: str, name: str) -> None:
    try:
        validate_name(kind, name)
    except ValueError as exc:
        raise CorruptDataError(f"manifest: {exc}") from None


def _checked_id(text: str, key: str) -> CheckpointId:
    try:
        return CheckpointId.parse(text)
    except ValueError as exc:
        raise CorruptDataError(f"manifest: {key}: {exc}") from None
