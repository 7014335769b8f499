"""Where a checkpoint's objects live: the path layout under a base prefix.

A checkpoint is a directory of immutable objects under a base prefix::

    checkpoints/_latest                                     newest committed id (a hint)
    checkpoints/{id}/manifest.json                          the commit record
    checkpoints/{id}/operators/{op}/partition-{p}.snap      a full partition snapshot
    checkpoints/{id}/operators/{op}/partition-{p}.delta     changes since the parent's state
    checkpoints/{id}/offsets/{source}.json                  reserved for exported offsets
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._typing import BytesLike, byte_view
from .ids import CheckpointId

__all__ = [
    "MAX_PARTITION",
    "CheckpointPaths",
    "SnapshotItem",
    "place_snapshots",
    "shape_snapshots",
    "validate_name",
    "validate_partition",
]

#: ``(operator, partition, is_delta, data)``: one partition artifact to upload.
SnapshotItem = tuple[str, int, bool, BytesLike]

_MAX_NAME_BYTES = 255
#: The largest partition id (partition ids are u32).
MAX_PARTITION = 0xFFFF_FFFF


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


def validate_partition(partition: object) -> int:
    """Check that ``partition`` is an int in ``[0, 2**32)``; return it."""
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise TypeError(f"partition must be an int, got {type(partition).__name__}")
    if not 0 <= partition <= MAX_PARTITION:
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

    def parse_artifact(self, path: str) -> tuple[CheckpointId, str, int, bool] | None:
        """``(checkpoint_id, operator, partition, is_delta)`` of the artifact at ``path``, or
        None unless ``path`` is exactly where :meth:`artifact` puts one."""
        cid = self.id_of(path)
        if cid is None:
            return None
        rest = path[len(self.checkpoint_dir(cid)) :]
        head, _, name = rest.rpartition("/")
        section, _, operator = head.partition("/")
        stem, _, ext = name.rpartition(".")
        number = stem.removeprefix("partition-")
        if section != "operators" or ext not in ("snap", "delta") or not number.isdigit():
            return None
        try:
            parsed = (cid, operator, int(number), ext == "delta")
            canonical = self.artifact(*parsed)
        except (TypeError, ValueError):
            return None
        return parsed if canonical == path else None

    def is_manifest(self, path: str) -> bool:
        """Whether ``path`` is some checkpoint's manifest."""
        cid = self.id_of(path)
        return cid is not None and path == self.manifest(cid)

    def _artifact(
        self, checkpoint_id: CheckpointId, operator: str, partition: int, ext: str
    ) -> str:
        validate_name("operator", operator)
        validate_partition(partition)
        return (
            f"{self.checkpoint_dir(checkpoint_id)}operators/{operator}/partition-{partition}.{ext}"
        )


def _as_id(value: object) -> CheckpointId:
    if not isinstance(value, CheckpointId):
        raise TypeError(f"expected a CheckpointId, got {type(value).__name__}")
    return value


def shape_snapshots(items: Sequence[SnapshotItem]) -> list[SnapshotItem]:
    """Check that each item is an ``(operator, partition, is_delta: bool, data)`` tuple."""
    shaped = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 4:
            raise ValueError("each snapshot must be (operator, partition, is_delta, data)")
        operator, partition, is_delta, data = item
        if not isinstance(is_delta, bool):
            raise TypeError(f"is_delta must be a bool, got {type(is_delta).__name__}")
        shaped.append((operator, partition, is_delta, data))
    return shaped


def place_snapshots(
    paths: CheckpointPaths, checkpoint_id: CheckpointId, snapshots: Iterable[SnapshotItem]
) -> list[tuple[str, int, bool, memoryview, str]]:
    """``(operator, partition, is_delta, bytes view, path)`` for each snapshot item of one
    checkpoint, after checking names, types, and that no partition appears twice."""
    _as_id(checkpoint_id)
    items = []
    seen: set[tuple[str, int]] = set()
    for operator, partition, is_delta, data in shape_snapshots(list(snapshots)):
        path = paths.artifact(checkpoint_id, operator, partition, is_delta)
        if (operator, partition) in seen:
            raise ValueError(f"{operator}/partition-{partition} appears twice")
        seen.add((operator, partition))
        try:
            view = byte_view(data).cast("B")
        except TypeError:
            raise TypeError(
                f"{operator}/partition-{partition}: data must be bytes-like, "
                f"got {type(data).__name__}"
            ) from None
        items.append((operator, partition, is_delta, view, path))
    return items
