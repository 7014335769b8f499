"""What a checkpoint is made of: its id, where its objects live, and its manifest.

A checkpoint is a directory of immutable objects under a base prefix::

    checkpoints/_latest                                     newest committed id (a hint)
    checkpoints/{id}/manifest.json                          the commit record
    checkpoints/{id}/operators/{op}/partition-{p}.snap      a full partition snapshot
    checkpoints/{id}/operators/{op}/partition-{p}.delta     changes since the parent's state
    checkpoints/{id}/offsets/{source}.json                  reserved for exported offsets

Ids are UUID v7 (time-ordered), so sorting ids sorts checkpoints by creation time. The
manifest is canonical JSON carrying its own SHA-256 (``manifest_sha256``) over every other
field, so any change to what it says is detected, and each artifact's SHA-256 and size.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import total_ordering
from typing import Any
from uuid import UUID

from ._core import sha256_hex
from .errors import CorruptDataError

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

_MAX_NAME_BYTES = 255
_MAX_PARTITION = 0xFFFF_FFFF

# -- ids ---------------------------------------------------------------------------------

# UUID v7 layout (RFC 9562): 48-bit Unix ms | 4-bit version | 12 bits | 2-bit variant | 62 bits.
# The 74 bits after the timestamp hold a per-process monotonic sequence seeded at random on
# every new millisecond, so ids minted in one millisecond still order by creation.
_SEQ_BITS = 74
_SEQ_MAX = (1 << _SEQ_BITS) - 1
_id_lock = threading.Lock()
_id_last = 0  # the last id minted by this process, as a 128-bit int


def _split(value: int) -> tuple[int, int]:
    ms = value >> 80
    seq = (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))
    return ms, seq


def _compose(ms: int, seq: int) -> int:
    return (ms << 80) | (0x7 << 76) | ((seq >> 62) << 64) | (0b10 << 62) | (seq & ((1 << 62) - 1))


def _fresh_seq() -> int:
    # Top bit clear: leaves 2**73 increments before the millisecond has to be borrowed.
    return secrets.randbits(_SEQ_BITS - 1)


@total_ordering
class CheckpointId:
    """A checkpoint's identity: a UUID v7, ordered by creation time.

    ``str(id)`` is the hyphenated lowercase form used in object paths; comparison and
    hashing follow the 128-bit value (millisecond timestamp first).
    """

    __slots__ = ("_uuid",)

    def __init__(self, value: UUID) -> None:
        if not isinstance(value, UUID):
            raise TypeError(f"CheckpointId needs a uuid.UUID, got {type(value).__name__}")
        if value.version != 7 or value.variant != uuid.RFC_4122:
            raise ValueError(f"checkpoint ids are RFC 9562 UUID v7, got {value}")
        self._uuid = value

    @classmethod
    def now(cls, after: CheckpointId | None = None) -> CheckpointId:
        """Mint a new id, greater than every id this process minted before and than
        ``after`` (so a clock that stepped backwards cannot produce an older id)."""
        global _id_last
        now_ms = time.time_ns() // 1_000_000
        with _id_lock:
            floor = max(_id_last, after._uuid.int if after is not None else 0)
            floor_ms, floor_seq = _split(floor)
            if now_ms > floor_ms:
                ms, seq = now_ms, _fresh_seq()
            elif floor_seq < _SEQ_MAX:
                ms, seq = floor_ms, floor_seq + 1
            else:
                ms, seq = floor_ms + 1, _fresh_seq()
            _id_last = _compose(ms, seq)
            return cls(uuid.UUID(int=_id_last))

    @classmethod
    def from_uuid(cls, value: UUID) -> CheckpointId:
        """Wrap an existing UUID v7."""
        return cls(value)

    @classmethod
    def parse(cls, text: str) -> CheckpointId:
        """Parse the hyphenated form; anything else raises ``ValueError``."""
        if not isinstance(text, str) or len(text) != 36:
            raise ValueError(f"not a checkpoint id: {text!r}")
        try:
            value = uuid.UUID(text)
        except ValueError:
            raise ValueError(f"not a checkpoint id: {text!r}") from None
        if str(value) != text:  # only the canonical lowercase spelling names an object
            raise ValueError(f"not a canonical checkpoint id: {text!r}")
        return cls(value)

    @property
    def uuid(self) -> UUID:
        """The underlying UUID."""
        return self._uuid

    @property
    def timestamp_ms(self) -> int:
        """Creation time in Unix milliseconds."""
        return self._uuid.int >> 80

    def __str__(self) -> str:
        return str(self._uuid)

    def __repr__(self) -> str:
        return f"CheckpointId('{self._uuid}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckpointId):
            return NotImplemented
        return self._uuid == other._uuid

    def __lt__(self, other: CheckpointId) -> bool:
        if not isinstance(other, CheckpointId):
            return NotImplemented
        return self._uuid.int < other._uuid.int

    def __hash__(self) -> int:
        return hash(self._uuid)

    def __reduce__(self) -> tuple[type[CheckpointId], tuple[UUID]]:
        return (type(self), (self._uuid,))


# -- paths -------------------------------------------------------------------------------


def validate_name(kind: str, name: object) -> str:
    """Check that an operator or source name is one safe path segment.

    Raises ``ValueError`` for anything that could leave its directory or confuse a store:
    non-strings, empty names, ``.`` and ``..``, ``/`` or ``\\``, control characters, and
    names over 255 UTF-8 bytes.
    """
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str, got {type(name).__name__}")
    if name in ("", ".", ".."):
        raise ValueError(f"{kind} name {name!r} is not a valid path segment")
    bad = [c for c in name if c in "/\\" or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0]
    if bad:
        raise ValueError(f"{kind} name {name!r} contains {bad[0]!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{kind} name {name!r} is not valid Unicode") from None
    if len(encoded) > _MAX_NAME_BYTES:
        raise ValueError(f"{kind} name is longer than {_MAX_NAME_BYTES} bytes")
    return name


def _validate_partition(partition: object) -> int:
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise TypeError(f"partition must be an int, got {type(partition).__name__}")
    if not 0 <= partition <= _MAX_PARTITION:
        raise ValueError(f"partition must be in [0, 2**32), got {partition}")
    return partition


@dataclass(frozen=True)
class CheckpointPaths:
    """Where each object of a checkpoint lives, relative to the store root.

    ``base_prefix`` is normalised to end with ``/`` (or be empty for the store root); every
    path has a ``/`` between the checkpoint id and what is inside it, so a checkpoint's
    directory prefix covers exactly its own objects.
    """

    base_prefix: str = "checkpoints/"

    def __post_init__(self) -> None:
        prefix = self.base_prefix
        if not isinstance(prefix, str):
            raise TypeError("base_prefix must be a str")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for segment in prefix.split("/")[:-1]:
            validate_name("base_prefix segment", segment)
        object.__setattr__(self, "base_prefix", prefix)

    def latest_pointer(self) -> str:
        """The ``_latest`` pointer object."""
        return f"{self.base_prefix}_latest"

    def checkpoint_dir(self, checkpoint_id: CheckpointId) -> str:
        """The directory prefix holding every object of one checkpoint (ends with ``/``)."""
        return f"{self.base_prefix}{_as_id(checkpoint_id)}/"

    def manifest(self, checkpoint_id: CheckpointId) -> str:
        """The manifest object of one checkpoint."""
        return f"{self.checkpoint_dir(checkpoint_id)}manifest.json"

    def snapshot(self, checkpoint_id: CheckpointId, operator: str, partition: int) -> str:
        """A full partition snapshot."""
        return self._artifact(checkpoint_id, operator, partition, "snap")

    def delta(self, checkpoint_id: CheckpointId, operator: str, partition: int) -> str:
        """A partition delta (changes since the parent checkpoint's state)."""
        return self._artifact(checkpoint_id, operator, partition, "delta")

    def artifact(
        self, checkpoint_id: CheckpointId, operator: str, partition: int, is_delta: bool
    ) -> str:
        """:meth:`delta` or :meth:`snapshot`, by ``is_delta``."""
        return self._artifact(checkpoint_id, operator, partition, "delta" if is_delta else "snap")

    def offsets(self, checkpoint_id: CheckpointId, source: str) -> str:
        """The slot for one source's offsets exported as JSON (the manifest holds them too)."""
        validate_name("source", source)
        return f"{self.checkpoint_dir(checkpoint_id)}offsets/{source}.json"

    def id_of(self, path: str) -> CheckpointId | None:
        """The checkpoint id whose directory contains ``path``, or None for other objects."""
        if not path.startswith(self.base_prefix):
            return None
        head, sep, _ = path[len(self.base_prefix) :].partition("/")
        if not sep:
            return None
        try:
            return CheckpointId.parse(head)
        except ValueError:
            return None

    def is_manifest(self, path: str) -> bool:
        """Whether ``path`` is some checkpoint's manifest."""
        cid = self.id_of(path)
        return cid is not None and path == self.manifest(cid)

    def _artifact(
        self, checkpoint_id: CheckpointId, operator: str, partition: int, ext: str
    ) -> str:
        validate_name("operator", operator)
        _validate_partition(partition)
        return (
            f"{self.checkpoint_dir(checkpoint_id)}operators/{operator}/partition-{partition}.{ext}"
        )


def _as_id(value: object) -> CheckpointId:
    if not isinstance(value, CheckpointId):
        raise TypeError(f"expected a CheckpointId, got {type(value).__name__}")
    return value


# -- manifest ----------------------------------------------------------------------------


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
            partition_id=_int(o, "partition_id", where, maximum=_MAX_PARTITION),
            is_delta=_field(o, "is_delta", bool, where),
            path=_field(o, "path", str, where),
            size_bytes=_int(o, "size_bytes", where),
            sha256=_field(o, "sha256", str, where),
        )
        if len(entry.sha256) != 64 or entry.sha256.strip("0123456789abcdef"):
            raise CorruptDataError(f"manifest: {where}.sha256 is not 64 lowercase hex digits")
        return entry


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
            source_offsets=dict(source_offsets or {}),
            parent_id=parent_id,
            watermark=watermark,
            total_size_bytes=sum(op.total_bytes for op in operators.values()),
        )
        manifest.to_json()  # validates offsets are JSON and every field is in range
        return manifest

    @property
    def partition_count(self) -> int:
        """Number of partition artifacts across all operators."""
        return sum(len(op.partitions) for op in self.operators.values())

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
        covered by ``manifest_sha256`` are rejected.
        """
        try:
            raw = bytes(text) if not isinstance(text, str) else text.encode("utf-8")
            obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptDataError(f"manifest is not valid JSON: {exc}") from None
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
    }
)


def _canonical(obj: object) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


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


# Fork safety: a child process must not continue the parent's sequence verbatim.
if hasattr(os, "register_at_fork"):

    def _reset_after_fork() -> None:
        global _id_last, _id_lock
        _id_last = 0
        _id_lock = threading.Lock()  # another thread may have held it at fork time

    os.register_at_fork(after_in_child=_reset_after_fork)
