"""A small partition-parallel pipeline: routing, partition threads, checkpoints, recovery.

A user's pipeline is a few lines::

    from streamstate.pipeline import ArraySource, Pipeline

    source = ArraySource("events", {"user": users, "amount": amounts})
    with Pipeline(source, key="user", values=["amount"], partitions=2,
                  store="file:///var/lib/myjob", checkpoint_every=20) as pipe:
        pipe.run()                      # resumes from the last checkpoint, if any
        totals = pipe.results("amount")  # columnar numpy arrays per key

Each micro-batch is routed by a hash of its keys to one thread per partition; the threads fold
into :class:`~streamstate.NumericAggregateStore` partition aggregators in C++ with the GIL
released, so partitions really run in parallel. Every ``checkpoint_every`` batches the
coordinator quiesces the partitions at a barrier, snapshots every store, packs the snapshots
into one LCB1 batch and commits it with the source offset through an
:class:`~streamstate.ObjectStoreCheckpointer` (upload, manifest, ``_latest``). A pipeline that
starts over a store holding checkpoints restores the state and replays the source from the
checkpointed offset: events after the last checkpoint are folded again, into state that has
not seen them, so every event counts exactly once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from .aggregate import NumericAggregateStore, PartitionAggregator
from .batcher import decode_batch, encode_batch
from .checkpoint import ObjectStoreCheckpointer
from .errors import StreamStateError
from .storage import StoreLike, default_store_path

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ArraySource",
    "Batch",
    "CheckpointStats",
    "Pipeline",
    "PipelineRun",
    "Source",
    "route_partitions",
]

# The operator name under which the pipeline's packed state is checkpointed.
_STATE_OPERATOR = "aggregates"


@dataclass(frozen=True)
class Batch:
    """One micro-batch read from a source: columns of equal length and the offsets around it."""

    columns: Mapping[str, npt.NDArray[Any]]
    offset: int
    next_offset: int

    def __len__(self) -> int:
        return self.next_offset - self.offset


class Source(Protocol):
    """A replayable source: reading at an offset always returns the same events."""

    @property
    def name(self) -> str:
        """Stable name; the checkpoint records this source's offset under it."""
        ...

    def read(self, offset: int, max_rows: int) -> Batch | None:
        """Up to ``max_rows`` events starting at ``offset``, or None at the end."""
        ...


class ArraySource:
    """A source over in-memory columns (numpy arrays, or anything ``np.asarray`` accepts);
    the offset is the row number."""

    def __init__(self, name: str, columns: Mapping[str, Any]) -> None:
        self._name = name
        self._columns = {k: np.asarray(v) for k, v in columns.items()}
        lengths = {len(v) for v in self._columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        self._rows = lengths.pop() if lengths else 0

    @property
    def name(self) -> str:
        return self._name

    def __len__(self) -> int:
        return self._rows

    def read(self, offset: int, max_rows: int) -> Batch | None:
        if offset >= self._rows:
            return None
        end = min(self._rows, offset + max_rows)
        return Batch({k: v[offset:end] for k, v in self._columns.items()}, offset, end)

    def __repr__(self) -> str:
        return f"ArraySource({self._name!r}, rows={self._rows}, columns={list(self._columns)})"


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    # splitmix64's finaliser: every input bit affects every output bit.
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def route_partitions(keys: npt.ArrayLike, partitions: int) -> npt.NDArray[np.intp]:
    """The partition of every key: a stable hash, the same in every process and run.

    Integer keys are mixed with splitmix64; strings and bytes are hashed with FNV-1a over
    their UTF-8 bytes. Vectorised in numpy, so routing a batch costs no Python loop.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    arr = np.asarray(keys)
    if arr.dtype.kind in "iu":
        hashed = _mix64(arr.astype(np.int64).view(np.uint64))
    else:
        if arr.dtype.kind == "O" or arr.dtype.kind == "U":
            arr = np.char.encode(arr.astype(str), "utf-8")
        if arr.dtype.kind != "S":
            raise TypeError(f"cannot route keys of dtype {arr.dtype}")
        width = arr.dtype.itemsize
        matrix = np.ascontiguousarray(arr).view(np.uint8).reshape(len(arr), width)
        hashed = np.full(len(arr), _FNV_OFFSET, dtype=np.uint64)
        # Trailing NUL padding from the fixed-width dtype is hashed too; it is the same for
        # equal keys in any batch only if widths match, so stop at each key's own length.
        lengths = np.char.str_len(arr)
        for col in range(width):
            live = lengths > col
            hashed = np.where(live, (hashed ^ matrix[:, col]) * _FNV_PRIME, hashed)
        hashed = _mix64(hashed)
    return (hashed % np.uint64(partitions)).astype(np.intp)


@dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint cost."""

    epoch: int
    offset: int
    bytes: int
    seconds: float


@dataclass
class PipelineRun:
    """What one call of :meth:`Pipeline.run` did."""

    events: int = 0
    batches: int = 0
    start_offset: int = 0
    end_offset: int = 0
    seconds: float = 0.0
    finished: bool = False
    recovered_epoch: int | None = None
    recovery_seconds: float = 0.0
    checkpoints: list[CheckpointStats] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def checkpoint_bytes(self) -> int:
        return sum(c.bytes for c in self.checkpoints)


class _Barrier:
    """Sent down every partition queue: each worker publishes, then arrives."""

    def __init__(self, parties: int) -> None:
        self._remaining = parties
        self._done = threading.Condition()

    def arrive(self) -> None:
        with self._done:
            self._remaining -= 1
            self._done.notify_all()

    def wait(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self._remaining == 0)


_STOP = object()


class _PartitionWorker:
    """One thread per partition, the single writer of its partition aggregators."""

    def __init__(self, partition: int, aggregators: Mapping[str, PartitionAggregator]) -> None:
        self.partition = partition
        self._aggregators = aggregators
        # Bounded, so a fast reader cannot queue the whole source in memory.
        self.inbox: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.error: Exception | None = None
        self._thread = threading.Thread(
            target=self._loop, name=f"streamstate-partition-{partition}", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is _STOP:
                return
            if isinstance(item, _Barrier):
                try:
                    if self.error is None:
                        for aggregator in self._aggregators.values():
                            aggregator.publish()
                except Exception as exc:  # noqa: BLE001  (surfaced by the coordinator)
                    self.error = exc
                item.arrive()
                continue
            if self.error is not None:
                continue  # drain without folding after a failure; the run will raise
            keys, values = item
            try:
                for metric, aggregator in self._aggregators.items():
                    aggregator.fold(keys, values[metric])
            except Exception as exc:  # noqa: BLE001  (surfaced by the coordinator at the next barrier)
                self.error = exc

    def stop(self) -> None:
        self.inbox.put(_STOP)
        self._thread.join()


class Pipeline:
    """Folds a keyed source into per-key statistics across ``partitions`` threads, with
    periodic exactly-once checkpoints to an object store.

    Args:
        source: where events come from (replayable: see :class:`Source`).
        key: the column to group by (int64 or strings/bytes).
        values: the float columns to aggregate; each gets count/sum/min/max/mean/var/std.
        partitions: number of partition threads.
        store: an obstore store or URL for checkpoints (default: a local directory).
        checkpoint_every: commit a checkpoint after this many batches.
        batch_size: rows per micro-batch.
        keep_checkpoints: older checkpoints are pruned beyond this many.
        nan_policy: what folding does with NaN values ("skip", "propagate", "raise").
    """

    def __init__(
        self,
        source: Source,
        *,
        key: str,
        values: Sequence[str],
        partitions: int = 2,
        store: StoreLike | None = None,
        checkpoint_every: int = 10,
        batch_size: int = 16_384,
        keep_checkpoints: int = 3,
        key_type: Literal["int64", "bytes"] | None = None,
        nan_policy: Literal["skip", "propagate", "raise"] = "skip",
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not values:
            raise ValueError("values must name at least one column to aggregate")
        self.source = source
        self.key = key
        self.values = list(values)
        self.partitions = partitions
        self.checkpoint_every = checkpoint_every
        self.batch_size = batch_size
        self.keep_checkpoints = keep_checkpoints
        self._key_type = key_type
        self._nan_policy = nan_policy
        self.checkpointer = ObjectStoreCheckpointer(
            store if store is not None else default_store_path() / "pipeline"
        )
        self._stores: dict[str, NumericAggregateStore] | None = None
        self._offset = 0
        self._epoch = 0
        self._recovered = False
        self._recovered_epoch: int | None = None
        self._recovery_seconds = 0.0

    # -- state ---------------------------------------------------------------------------

    def _ensure_stores(self, sample_keys: npt.NDArray[Any] | None) -> dict[str, NumericAggregateStore]:
        if self._stores is None:
            key_type = self._key_type
            if key_type is None:
                kind = sample_keys.dtype.kind if sample_keys is not None else "i"
                key_type = "int64" if kind in "iu" else "bytes"
                self._key_type = key_type
            self._stores = {
                metric: NumericAggregateStore(self.partitions, key_type=key_type)
                for metric in self.values
            }
        return self._stores

    def recover(self) -> int:
        """Restore the newest valid checkpoint (once); return the offset to resume from."""
        if self._recovered:
            return self._offset
        start = time.perf_counter()
        recovered = self.checkpointer.recover()
        if recovered is not None:
            packed = recovered.state[_STATE_OPERATOR][0]
            blobs = dict(decode_batch(packed))
            missing = set(self.values) - set(blobs)
            if missing:
                raise StreamStateError(
                    f"checkpoint {recovered.manifest.checkpoint_id} has no state for "
                    f"{sorted(missing)}; it was written by a pipeline with other values"
                )
            # The key type comes from the source's first event, as on a fresh start.
            first = self.source.read(0, 1)
            self._stores = None
            stores = self._ensure_stores(
                np.asarray(first.columns[self.key]) if first is not None else None
            )
            for metric in self.values:
                stores[metric].restore(blobs[metric])
            self._offset = int(recovered.source_offsets[self.source.name])
            self._epoch = recovered.manifest.epoch
            self._recovered_epoch = recovered.manifest.epoch
        self._recovered = True
        self._recovery_seconds = time.perf_counter() - start
        return self._offset

    def checkpoint(self) -> CheckpointStats:
        """Commit the current state and source offset now (the partitions must be idle)."""
        stores = self._ensure_stores(None)
        start = time.perf_counter()
        packed = encode_batch([(metric, stores[metric].snapshot()) for metric in self.values])
        # The epoch advances only once the commit has landed, so a failed commit can be
        # retried under the same epoch.
        self.checkpointer.commit(
            self._epoch + 1,
            [(_STATE_OPERATOR, 0, False, packed)],
            source_offsets={self.source.name: self._offset},
        )
        self._epoch += 1
        if self.keep_checkpoints > 0:
            self.checkpointer.prune(keep_last=self.keep_checkpoints)
        return CheckpointStats(self._epoch, self._offset, len(packed), time.perf_counter() - start)

    # -- running -------------------------------------------------------------------------

    def run(
        self,
        max_batches: int | None = None,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> PipelineRun:
        """Process the source from the recovered offset to its end (or ``max_batches``).

        A run that reaches the end commits a final checkpoint. A run cut short by
        ``max_batches`` does not, which is how the demo simulates a crash: whatever was
        folded after the last checkpoint is lost with the process and replayed by the next.
        """
        self.recover()
        report = PipelineRun(
            start_offset=self._offset,
            recovered_epoch=self._recovered_epoch,
            recovery_seconds=self._recovery_seconds,
        )
        started = time.perf_counter()
        workers: list[_PartitionWorker] | None = None
        try:
            while max_batches is None or report.batches < max_batches:
                batch = self.source.read(self._offset, self.batch_size)
                if batch is None:
                    report.finished = True
                    break
                keys = np.asarray(batch.columns[self.key])
                stores = self._ensure_stores(keys)
                if workers is None:
                    workers = [
                        _PartitionWorker(p, {m: s.partition(p) for m, s in stores.items()})
                        for p in range(self.partitions)
                    ]
                self._dispatch(workers, keys, batch)
                self._offset = batch.next_offset
                report.batches += 1
                report.events += len(batch)
                if on_batch is not None:
                    on_batch(batch)
                if report.batches % self.checkpoint_every == 0:
                    self._quiesce(workers)
                    report.checkpoints.append(self.checkpoint())
            if workers is not None:
                self._quiesce(workers)
                if report.finished and report.batches % self.checkpoint_every != 0:
                    report.checkpoints.append(self.checkpoint())
        finally:
            if workers is not None:
                for worker in workers:
                    worker.stop()
        report.end_offset = self._offset
        report.seconds = time.perf_counter() - started
        return report

    def _dispatch(
        self, workers: Sequence[_PartitionWorker], keys: npt.NDArray[Any], batch: Batch
    ) -> None:
        parts = route_partitions(keys, self.partitions)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(self.partitions + 1))
        values = {m: np.asarray(batch.columns[m], dtype=np.float64) for m in self.values}
        for p, worker in enumerate(workers):
            rows = order[bounds[p] : bounds[p + 1]]
            if len(rows):
                worker.inbox.put((keys[rows], {m: v[rows] for m, v in values.items()}))

    @staticmethod
    def _quiesce(workers: Sequence[_PartitionWorker]) -> None:
        barrier = _Barrier(len(workers))
        for worker in workers:
            worker.inbox.put(barrier)
        barrier.wait()
        for worker in workers:
            if worker.error is not None:
                raise StreamStateError(
                    f"partition {worker.partition} failed: {worker.error}"
                ) from worker.error

    # -- results -------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """The source offset everything before which is folded (and after a run, published)."""
        return self._offset

    @property
    def epoch(self) -> int:
        """The epoch of the last checkpoint committed or recovered."""
        return self._epoch

    def results(self, metric: str) -> dict[str, npt.NDArray[Any]]:
        """Per-key statistics of ``metric`` merged across partitions (columnar)."""
        stores = self._ensure_stores(None)
        if metric not in stores:
            raise KeyError(f"{metric!r} is not one of the aggregated values {self.values}")
        return stores[metric].results()

    def to_pandas(self, metric: str) -> Any:
        """``results(metric)`` as a pandas DataFrame indexed by key."""
        return self._ensure_stores(None)[metric].to_pandas()

    def close(self) -> None:
        """Drop the in-memory state (checkpoints stay in the store)."""
        self._stores = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Pipeline(source={self.source.name!r}, key={self.key!r}, values={self.values}, "
            f"partitions={self.partitions}, offset={self._offset}, epoch={self._epoch})"
        )
