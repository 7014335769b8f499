"""Recovery's pure parts: verifying artifacts, following delta chains, rebuilding state.

The checkpointer (:mod:`streamstate.checkpoint`) does the I/O; this module decides what a
checkpoint's bytes must be and what state they make.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._core import sha256_hex
from ._typing import BytesLike
from .delta import DeltaFunction
from .errors import CheckpointError, CorruptDataError, IntegrityError
from .ids import CheckpointId
from .manifest import CheckpointManifest, PartitionSnapshotEntry

__all__ = [
    "RecoveredCheckpoint",
    "RecoveryPlan",
    "apply_chain",
    "check_artifact",
    "delta_chains",
    "rebuild_state",
    "split_chains",
    "verify_integrity",
]


def verify_integrity(path: str, data: BytesLike, expected_sha256: str) -> None:
    """Raise :class:`~streamstate.IntegrityError` unless ``data`` hashes to ``expected_sha256``."""
    actual = sha256_hex(data)
    if actual != expected_sha256.lower():
        raise IntegrityError(path, expected_sha256, actual)


class _ChosenCheckpoint:
    """What recovery chose: a checkpoint, known by its manifest."""

    manifest: CheckpointManifest

    @property
    def checkpoint_id(self) -> CheckpointId:
        """The chosen checkpoint's id."""
        return self.manifest.checkpoint_id

    @property
    def epoch(self) -> int:
        """The chosen checkpoint's epoch."""
        return self.manifest.epoch


@dataclass(frozen=True)
class RecoveredCheckpoint(_ChosenCheckpoint):
    """A verified checkpoint: its manifest, every partition's state, and source offsets.

    ``state[operator][partition]`` is the partition's bytes with any deltas applied.
    ``fallbacks`` lists ``(checkpoint_id, reason)`` for newer checkpoints that failed
    verification before this one was chosen (newest first; empty when the newest was fine).

    Recovered with ``rebuild=False`` (see :meth:`ObjectStoreCheckpointer.recover`), deltas
    are left for the caller to apply: ``state[operator][partition]`` is then the full
    snapshot at the base of the partition's chain and ``deltas[operator][partition]`` the
    verified deltas to apply to it, oldest first (empty for a full partition). Rebuilt
    (the default), every ``deltas`` tuple is empty.
    """

    manifest: CheckpointManifest
    state: dict[str, dict[int, bytes]]
    source_offsets: dict[str, Any]
    fallbacks: tuple[tuple[str, str], ...] = field(default=())
    deltas: dict[str, dict[int, tuple[bytes, ...]]] = field(default_factory=dict)

    @property
    def delta_count(self) -> int:
        """How many deltas are left to apply, over every partition (0 when rebuilt)."""
        return sum(len(chain) for parts in self.deltas.values() for chain in parts.values())

    def __repr__(self) -> str:
        shape = {op: len(parts) for op, parts in self.state.items()}
        return (
            f"RecoveredCheckpoint(checkpoint_id='{self.checkpoint_id}', epoch={self.epoch}, "
            f"partitions={shape}, bytes={self.manifest.total_size_bytes}, "
            f"deltas={self.delta_count}, fallbacks={len(self.fallbacks)})"
        )


@dataclass(frozen=True)
class RecoveryPlan(_ChosenCheckpoint):
    """Which checkpoint every worker restores from, and each partition's artifacts.

    Chosen once by a coordinator (:meth:`ObjectStoreCheckpointer.recover_entries
    <streamstate.checkpoint.ObjectStoreCheckpointer.recover_entries>`) and handed out, so all
    workers fall back together to the same checkpoint. ``chains[(operator, partition)]`` is
    the partition's full snapshot followed by its deltas, oldest first; a worker restores it
    with :meth:`~streamstate.checkpoint.ObjectStoreCheckpointer.load_partition` (or
    :meth:`~streamstate.checkpoint.ObjectStoreCheckpointer.load_verified` per entry).
    ``fallbacks`` lists ``(checkpoint_id, reason)`` for newer checkpoints passed over. The
    plan pickles.
    """

    manifest: CheckpointManifest
    chains: dict[tuple[str, int], tuple[PartitionSnapshotEntry, ...]]
    fallbacks: tuple[tuple[str, str], ...] = field(default=())

    @property
    def source_offsets(self) -> dict[str, Any]:
        """Where each source resumes."""
        return dict(self.manifest.source_offsets)

    def chain(self, operator: str, partition: int) -> tuple[PartitionSnapshotEntry, ...]:
        """The artifacts one partition restores from; ``KeyError`` if the checkpoint does not
        hold it."""
        try:
            return self.chains[(operator, partition)]
        except KeyError:
            raise KeyError(
                f"checkpoint {self.checkpoint_id} holds no {operator}/partition-{partition}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"RecoveryPlan(checkpoint_id='{self.checkpoint_id}', epoch={self.epoch}, "
            f"partitions={len(self.chains)}, fallbacks={len(self.fallbacks)})"
        )


def delta_chains(
    manifest: CheckpointManifest, load: Callable[[CheckpointId], CheckpointManifest]
) -> dict[tuple[str, int], list[PartitionSnapshotEntry]]:
    """For each ``(operator, partition)`` of ``manifest``, its artifacts from the nearest full
    snapshot up to its own, following ``parent_id`` (``load`` reads a parent's manifest).

    A delta without a parent, or whose parent lacks the partition, raises
    :class:`~streamstate.CorruptDataError`.
    """
    chains: dict[tuple[str, int], list[PartitionSnapshotEntry]] = {}
    for op, op_entry in manifest.operators.items():
        for entry in op_entry.partitions:
            chain = [entry]
            owner = manifest
            while chain[-1].is_delta:
                if owner.parent_id is None:
                    raise CorruptDataError(f"{chain[-1].path}: delta without a parent_id")
                owner = load(owner.parent_id)
                parent_op = owner.operators.get(op)
                base = None if parent_op is None else parent_op.partition(entry.partition_id)
                if base is None:
                    raise CorruptDataError(
                        f"{chain[-1].path}: parent {owner.checkpoint_id} has no "
                        f"{op}/partition-{entry.partition_id}"
                    )
                chain.append(base)
            chains[(op, entry.partition_id)] = chain[::-1]
    return chains


def check_artifact(entry: PartitionSnapshotEntry, data: memoryview) -> None:
    """Raise :class:`~streamstate.CorruptDataError` unless ``data`` has the size and SHA-256
    the manifest ``entry`` records."""
    size = data.nbytes
    if size != entry.size_bytes:
        raise CorruptDataError(f"{entry.path}: {size} bytes, manifest says {entry.size_bytes}")
    verify_integrity(entry.path, data, entry.sha256)


def rebuild_state(
    manifest: CheckpointManifest,
    chains: Mapping[tuple[str, int], Sequence[PartitionSnapshotEntry]],
    blobs: Mapping[str, bytes],
    apply_delta: DeltaFunction,
    max_size: int | None = None,
) -> dict[str, dict[int, bytes]]:
    """``state[operator][partition]``: each chain's full snapshot with its deltas applied in
    order. A failing ``apply_delta`` raises :class:`~streamstate.CorruptDataError`, a state
    growing past ``max_size`` bytes :class:`~streamstate.CheckpointError`."""
    state: dict[str, dict[int, bytes]] = {op: {} for op in manifest.operators}
    for (op, partition), chain in chains.items():
        state[op][partition] = apply_chain(chain, blobs, apply_delta, max_size)
    return state


def apply_chain(
    chain: Sequence[PartitionSnapshotEntry],
    blobs: Mapping[str, bytes],
    apply_delta: DeltaFunction,
    max_size: int | None = None,
) -> bytes:
    """One partition's state: the full snapshot ``chain[0]`` with the deltas after it
    applied in order (``blobs`` maps each entry's path to its verified bytes). A failing
    ``apply_delta`` raises :class:`~streamstate.CorruptDataError`, a state growing past
    ``max_size`` bytes :class:`~streamstate.CheckpointError`."""
    if not chain or chain[0].is_delta:
        raise CorruptDataError("a delta chain must start with a full snapshot")
    data = blobs[chain[0].path]
    for delta in chain[1:]:
        try:
            data = apply_delta(data, blobs[delta.path])
        except Exception as exc:
            raise CorruptDataError(f"{delta.path}: applying the delta failed: {exc}") from exc
        if max_size is not None and len(data) > max_size:
            raise CheckpointError(
                f"{delta.path}: the rebuilt state of {len(data)} bytes exceeds max_size {max_size}"
            )
    return data


def split_chains(
    manifest: CheckpointManifest,
    chains: Mapping[tuple[str, int], Sequence[PartitionSnapshotEntry]],
    blobs: Mapping[str, bytes],
) -> tuple[dict[str, dict[int, bytes]], dict[str, dict[int, tuple[bytes, ...]]]]:
    """Each chain's verified bytes left unapplied: ``state[operator][partition]`` the full
    snapshot at its base, ``deltas[operator][partition]`` its deltas, oldest first. For a
    caller that applies deltas itself (a store applying them in place), so no intermediate
    full state is ever built."""
    state: dict[str, dict[int, bytes]] = {op: {} for op in manifest.operators}
    deltas: dict[str, dict[int, tuple[bytes, ...]]] = {op: {} for op in manifest.operators}
    for (op, partition), chain in chains.items():
        state[op][partition] = blobs[chain[0].path]
        deltas[op][partition] = tuple(blobs[delta.path] for delta in chain[1:])
    return state, deltas
