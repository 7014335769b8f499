"""A pipeline's checkpoints: captured at the barrier, committed in the background.

At a barrier the partitions stop only while every store *captures* its state, a C++ call
returning bytes: ``snapshot_delta()`` (the entries changed since the previous capture) or,
every ``full_checkpoint_every`` checkpoints, ``snapshot()``. Packing and compressing those
bytes, hashing them and uploading the checkpoint then run on a background thread
(:class:`CommitInFlight`) while the partitions fold on. At most one commit is in flight:
the next barrier first waits for the previous one to land, so a delta's parent is always a
committed checkpoint and a failed commit is seen before anything builds on it.

:class:`DeltaChain` decides full or delta. A full snapshot starts a new chain when the chain
holds ``full_checkpoint_every - 1`` deltas already, or when its deltas' bytes have grown
past the full's own size (a recovery would then read more than a full costs), so recovery
always reads a bounded chain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .._typing import BytesLike, byte_view
from ..checkpoint import ObjectStoreCheckpointer
from ..ids import CheckpointId
from .contents import pack_state
from .sources import Offset

__all__ = [
    "Capture",
    "CheckpointStats",
    "CommitInFlight",
    "CommitResult",
    "DeltaChain",
    "commit_capture",
    "summarize_checkpoints",
]

T = TypeVar("T")


class EpochStaging(Protocol):
    """What a checkpoint stages for its epoch before its manifest is written (a windowed
    job's emitted rows, see :class:`~streamstate.pipeline.windowing.EpochOutput`)."""

    def stage(self, epoch: int) -> dict[str, Any]:
        """Stage the epoch's rows; return the manifest metadata recording them."""
        ...


@dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint cost.

    ``epoch`` and ``offset``: what it committed; ``bytes``: uploaded (state and job
    record); ``is_delta``: it holds the changes since its parent rather than a full
    snapshot; ``stall_seconds``: how long the partitions stood still for it (the barrier and
    the capture); ``upload_seconds``: the background work (packing, compression, SHA-256,
    upload, manifest) while the partitions folded on; ``seconds``: from the barrier until the
    commit landed and old checkpoints were pruned.
    """

    epoch: int
    offset: Offset
    bytes: int
    seconds: float
    is_delta: bool = False
    stall_seconds: float = 0.0
    upload_seconds: float = 0.0


@dataclass(frozen=True)
class Capture:
    """The state captured at one barrier, ready to commit: every value column's store
    snapshot (or delta on ``parent``), the job record, and what the checkpoint covers."""

    epoch: int
    offset: Offset
    source: str
    partitions: int
    is_delta: bool
    parent: CheckpointId | None
    snapshots: list[tuple[str, BytesLike]]
    record: bytes
    started: float  # perf_counter() at the barrier
    stall_seconds: float
    #: Where to pack the state: a buffer reused across checkpoints (None: a new one).
    packed: bytearray | None = None
    #: Whether this commit prunes (the pipeline prunes every few commits, see its
    #: ``keep_checkpoints``): pruning reads a dozen manifests and costs more than a small
    #: commit itself.
    prune: bool = True
    #: A windowed job's rows to stage before the manifest (None: nothing to stage).
    output: EpochStaging | None = None


#: What a background commit returns: its stats and the id it committed under.
CommitResult = tuple[CheckpointStats, CheckpointId]


def commit_capture(
    checkpointer: ObjectStoreCheckpointer, capture: Capture, keep_checkpoints: int
) -> CommitResult:
    """Pack, upload and commit ``capture``, then (if ``capture.prune``) prune to
    ``keep_checkpoints`` (0 keeps all);
    return its stats and the committed id. The background half of a checkpoint: it touches
    only the captured bytes, never the stores."""
    begun = time.perf_counter()
    try:
        items = pack_state(capture.snapshots, capture.record, capture.is_delta, capture.packed)
    except BufferError:  # something still holds a view of the reused buffer: use a new one
        items = pack_state(capture.snapshots, capture.record, capture.is_delta)
    metadata: dict[str, Any] = {"partitions": capture.partitions}
    if capture.output is not None:  # staged before the manifest: it records the staging
        metadata.update(capture.output.stage(capture.epoch))
    manifest = checkpointer.commit(
        capture.epoch,
        items,
        source_offsets={capture.source: capture.offset},
        parent=capture.parent if capture.is_delta else None,
        # The stores' own delta format, applied by the stores on recovery (recover() with
        # rebuild=False), never by the record-delta overlay that validator checks for.
        validate_delta=None,
        metadata=metadata,
    )
    landed = time.perf_counter()
    if keep_checkpoints > 0 and capture.prune:
        checkpointer.prune(keep_last=keep_checkpoints)
    stats = CheckpointStats(
        epoch=capture.epoch,
        offset=capture.offset,
        bytes=sum(byte_view(data).nbytes for *_, data in items),
        seconds=time.perf_counter() - capture.started,
        is_delta=capture.is_delta,
        stall_seconds=capture.stall_seconds,
        upload_seconds=landed - begun,
    )
    return stats, manifest.checkpoint_id


def summarize_checkpoints(checkpoints: Sequence[CheckpointStats]) -> str:
    """One line about ``checkpoints``: how many (and how many deltas), their bytes, and the
    time the partitions stalled for them against the time spent uploading in the background."""
    if not checkpoints:
        return "no checkpoints"
    deltas = sum(c.is_delta for c in checkpoints)
    size = sum(c.bytes for c in checkpoints)
    stall = sum(c.stall_seconds for c in checkpoints)
    upload = sum(c.upload_seconds for c in checkpoints)
    return (
        f"{len(checkpoints)} checkpoints ({deltas} delta, {len(checkpoints) - deltas} full), "
        f"{size:,} bytes; partitions stalled {stall * 1000:.1f} ms, background upload "
        f"{upload * 1000:.1f} ms"
    )


class DeltaChain:
    """The chain of deltas since the last full checkpoint, and the rule that ends it.

    ``full_every``: every this many checkpoints one is full (1: all of them). A chain also
    ends when its deltas together outgrow its full snapshot.
    """

    def __init__(self, full_every: int) -> None:
        self.full_every = full_every
        self.reset()

    def reset(self) -> None:
        """Forget the chain: the next checkpoint is full (after a failure or a restore)."""
        self.parent: CheckpointId | None = None
        self.full_bytes = 0
        self.delta_bytes = 0
        self.length = 0

    def next_is_delta(self) -> bool:
        """Whether the next checkpoint may be a delta on :attr:`parent`."""
        return (
            self.parent is not None
            and self.length + 1 < self.full_every
            and self.delta_bytes <= self.full_bytes
        )

    def resume(
        self, checkpoint_id: CheckpointId, full_bytes: int, delta_bytes: int, length: int
    ) -> None:
        """Continue the chain of a restored checkpoint: its full snapshot's size, its
        ``length`` deltas' total size. Valid because a store restored and brought forward
        by ``apply_delta`` takes the identity of the last delta, which the next
        ``snapshot_delta`` names as its parent."""
        self.parent = checkpoint_id
        self.full_bytes = full_bytes
        self.delta_bytes = delta_bytes
        self.length = length

    def committed(self, checkpoint_id: CheckpointId, is_delta: bool, size: int) -> None:
        """A checkpoint of ``size`` bytes landed: it is the next one's parent."""
        if is_delta:
            self.length += 1
            self.delta_bytes += size
        else:
            self.length = 0
            self.delta_bytes = 0
            self.full_bytes = size
        self.parent = checkpoint_id

    def __repr__(self) -> str:
        return (
            f"DeltaChain(parent={str(self.parent) if self.parent else None!r}, "
            f"length={self.length}, full_every={self.full_every}, "
            f"delta_bytes={self.delta_bytes}, full_bytes={self.full_bytes})"
        )


class CommitInFlight(Generic[T]):
    """One background commit: ``job`` runs on a thread of its own from construction.

    :meth:`result` waits for it and returns its result or raises its exception. A thread
    per commit rather than a pool: commits are seconds apart, and a pipeline then leaves
    no thread behind when a run ends.
    """

    def __init__(self, job: Callable[[], T], name: str = "streamstate-commit") -> None:
        self._future: Future[T] = Future()
        self._thread = threading.Thread(target=self._work, args=(job,), name=name, daemon=True)
        self._thread.start()

    def _work(self, job: Callable[[], T]) -> None:
        try:
            self._future.set_result(job())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            self._future.set_exception(exc)

    def done(self) -> bool:
        """Whether the commit has finished (landed or failed)."""
        return self._future.done()

    def result(self) -> T:
        """Wait for the commit; return what it returned, or raise what it raised."""
        self._thread.join()
        return self._future.result()

    def __repr__(self) -> str:
        if not self._future.done():
            return "CommitInFlight(running)"
        failed = self._future.exception() is not None
        return f"CommitInFlight({'failed' if failed else 'landed'})"
