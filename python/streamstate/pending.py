"""A checkpoint being written: the handle that lets other processes upload its artifacts.

:meth:`ObjectStoreCheckpointer.begin <streamstate.checkpoint.ObjectStoreCheckpointer.begin>`
mints the checkpoint id and returns a :class:`PendingCheckpoint`. The handle pickles (it
carries the store's configuration, the path layout and the retry policy, never a
connection), so a coordinator can hand it to worker processes; each worker calls
:meth:`PendingCheckpoint.upload` for the partitions it owns and sends the returned
:class:`~streamstate.PartitionSnapshotEntry` back. The coordinator then commits them all in
one manifest with :meth:`~streamstate.checkpoint.ObjectStoreCheckpointer.commit_entries`.
Nothing is visible to recovery until that manifest exists.

A ``MemoryStore`` lives in one process: its handle works from threads of that process but
refuses to pickle (:class:`~streamstate.StoreConfigurationError`).

This module also holds the one upload path every artifact takes
(:func:`upload_artifacts`): placement under the layout's paths, SHA-256 in C++ (GIL
released), the write through :class:`~streamstate.storage.RetryingStorage`, and clean-up of
what a failed batch wrote.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from obstore.store import MemoryStore

from ._core import sha256_hex
from ._typing import BytesLike
from .delta import DeltaValidator, require_delta, validate_record_delta
from .errors import CheckpointError, StoreConfigurationError
from .ids import CheckpointId
from .layout import CheckpointPaths, SnapshotItem, place_snapshots
from .manifest import PartitionSnapshotEntry
from .retry import RetryPolicy
from .storage import CheckpointStorage, RetryingStorage, parallel_map

__all__ = [
    "PendingCheckpoint",
    "PlacedArtifact",
    "create_or_fail",
    "require_parent",
    "require_portable",
    "upload_artifacts",
]

#: A pair of artifacts this large each is uploaded on a pool even on a local store.
_PARALLEL_UPLOAD_MIN = 1 << 20

#: ``(operator, partition, is_delta, bytes view, path)``: an artifact checked and placed.
PlacedArtifact = tuple[str, int, bool, memoryview, str]


def require_portable(storage: CheckpointStorage, what: str) -> None:
    """Raise :class:`~streamstate.StoreConfigurationError` if ``storage`` cannot be used
    from another process (a ``MemoryStore`` exists only in the process that made it)."""
    if isinstance(storage.store, MemoryStore):
        raise StoreConfigurationError(
            f"{what} cannot be sent to another process: its store is a MemoryStore, which "
            "lives in one process only (use a LocalStore path or an s3://, gs://, az:// URL "
            "for a checkpoint written by several processes)"
        )


def require_parent(
    parent_id: CheckpointId | None,
    parent_partitions: frozenset[tuple[str, int]] | None,
    operator: str,
    partition: int,
) -> None:
    """Raise ``ValueError`` unless a delta for ``operator``/``partition`` has a parent that
    holds the partition (``parent_partitions``: the parent's ``(operator, partition)``
    pairs)."""
    if parent_id is None or parent_partitions is None:
        raise ValueError("delta snapshots need a parent checkpoint")
    if (operator, partition) not in parent_partitions:
        raise ValueError(
            f"parent {parent_id} has no {operator}/partition-{partition} to apply a delta to"
        )


def create_or_fail(io: RetryingStorage, path: str, data: BytesLike) -> None:
    """Create ``path`` holding ``data``; :class:`~streamstate.CheckpointError` if it holds
    other bytes already (checkpoint objects are never overwritten)."""
    if not io.create(path, data):
        raise CheckpointError(
            f"{path}: already exists with different content; committed objects are "
            "never overwritten"
        )


def upload_artifacts(
    io: RetryingStorage,
    placed: list[PlacedArtifact],
    max_workers: int,
    *,
    fresh: bool,
) -> list[tuple[str, PartitionSnapshotEntry]]:
    """Hash and write each placed artifact on up to ``max_workers`` threads (on this one
    for two on a local store, unless both are 1 MiB or more); return ``(operator, entry)``
    per artifact, in input order.

    ``fresh``: the caller minted the checkpoint id and is its only writer, so nothing can
    exist under it and a plain put is as safe as a conditional create. It is also faster:
    obstore writes a conditional put in one piece from a private copy, a plain one in
    parallel chunks. Otherwise each artifact is a conditional create that never overwrites
    different bytes. If any write fails, what this call wrote is deleted (best effort) and
    the error raised.
    """
    written: list[str] = []

    def upload(item: PlacedArtifact) -> tuple[str, PartitionSnapshotEntry]:
        operator, partition, is_delta, view, path = item
        digest = sha256_hex(view)
        if fresh:
            io.put(path, view)
        else:
            create_or_fail(io, path, view)
        written.append(path)  # list.append is atomic; read only after the pool drains
        return operator, PartitionSnapshotEntry(partition, is_delta, path, view.nbytes, digest)

    # A pool pays a thread start per worker and a hand-off (~1-2 ms on a busy machine, as
    # much as writing a small checkpoint to a local disk): for a pair of artifacts on a
    # local store (a pipeline's state and job record) it runs only when both are large
    # enough for their hashing and writing to overlap usefully. Remote puts wait on the
    # network, so there every pair still overlaps.
    large = sum(1 for *_, view, _ in placed if view.nbytes >= _PARALLEL_UPLOAD_MIN)
    inline = len(placed) <= 2 and large < 2 and io.storage.is_local
    try:
        return parallel_map(upload, placed, 1 if inline else max_workers)
    except BaseException:
        io.delete_quietly(written)
        raise


class PendingCheckpoint:
    """A begun, not yet committed checkpoint: its id, epoch and parent, and what it takes
    to upload its artifacts from any thread or process (see the module notes).

    Built by :meth:`ObjectStoreCheckpointer.begin
    <streamstate.checkpoint.ObjectStoreCheckpointer.begin>`, not directly.
    ``parent_partitions`` lists the ``(operator, partition)`` pairs the parent holds, the
    only ones a delta may be uploaded for.
    """

    def __init__(
        self,
        checkpoint_id: CheckpointId,
        epoch: int,
        parent_id: CheckpointId | None,
        parent_partitions: frozenset[tuple[str, int]],
        *,
        storage: CheckpointStorage,
        paths: CheckpointPaths,
        retry: RetryPolicy,
    ) -> None:
        self.checkpoint_id = checkpoint_id
        self.epoch = epoch
        self.parent_id = parent_id
        self.parent_partitions = parent_partitions
        self.paths = paths
        self.retry = retry
        self._storage = storage

    def __repr__(self) -> str:
        return (
            f"PendingCheckpoint(checkpoint_id='{self.checkpoint_id}', epoch={self.epoch}, "
            f"parent_id={None if self.parent_id is None else str(self.parent_id)!r}, "
            f"store={self._storage!r}, base_prefix={self.paths.base_prefix!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        require_portable(self._storage, repr(self))
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def storage(self) -> CheckpointStorage:
        """The storage adapter the artifacts are written through."""
        return self._storage

    def place(
        self,
        snapshots: Iterable[SnapshotItem],
        validate_delta: DeltaValidator | None = validate_record_delta,
    ) -> list[PlacedArtifact]:
        """Check ``(operator, partition, is_delta, data)`` items and give each its path:
        names, types, no partition twice, and for deltas a parent holding the partition and
        data that passes ``validate_delta`` (``None`` accepts any bytes). Writes nothing."""
        placed = place_snapshots(self.paths, self.checkpoint_id, snapshots)
        for operator, partition, is_delta, view, _ in placed:
            if not is_delta:
                continue
            require_parent(self.parent_id, self.parent_partitions, operator, partition)
            if validate_delta is not None:
                require_delta(f"{operator}/partition-{partition}", view, validate_delta)
        return placed

    def upload(
        self,
        operator: str,
        partition: int,
        data: BytesLike,
        *,
        is_delta: bool = False,
        validate_delta: DeltaValidator | None = validate_record_delta,
    ) -> PartitionSnapshotEntry:
        """Upload one partition's snapshot (or, with ``is_delta``, its delta against the
        parent) and return its entry for the coordinator's
        :meth:`~streamstate.checkpoint.ObjectStoreCheckpointer.commit_entries`.

        Callable from any thread or process holding this handle. The artifact goes where
        :meth:`~streamstate.checkpoint.ObjectStoreCheckpointer.commit` would put it, with a
        conditional create: uploading the same bytes twice (a retried worker) is harmless,
        different bytes for the same partition raise :class:`~streamstate.CheckpointError`.
        Deltas are checked as ``commit`` checks them (``validate_delta``).
        """
        [(_, entry)] = upload_artifacts(
            self._io,
            self.place([(operator, partition, is_delta, data)], validate_delta),
            1,
            fresh=False,
        )
        return entry

    @property
    def _io(self) -> RetryingStorage:
        return RetryingStorage(self._storage, self.retry)
