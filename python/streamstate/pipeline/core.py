"""The Pipeline: the coordinator that reads, routes, checkpoints and recovers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ..aggregate import NumericAggregateStore
from ..batcher import decode_batch, encode_batch
from ..checkpoint import ObjectStoreCheckpointer
from ..errors import StreamStateError
from ..storage import StoreLike, default_store_path
from .routing import route_partitions
from .sources import Batch, Source
from .workers import PartitionWorker, quiesce

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CheckpointStats", "Pipeline", "PipelineRun"]

# The operator name under which the pipeline's packed state is checkpointed.
_STATE_OPERATOR = "aggregates"


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
        workers: list[PartitionWorker] | None = None
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
                        PartitionWorker(p, {m: s.partition(p) for m, s in stores.items()})
                        for p in range(self.partitions)
                    ]
                self._dispatch(workers, keys, batch)
                self._offset = batch.next_offset
                report.batches += 1
                report.events += len(batch)
                if on_batch is not None:
                    on_batch(batch)
                if report.batches % self.checkpoint_every == 0:
                    quiesce(workers)
                    report.checkpoints.append(self.checkpoint())
            if workers is not None:
                quiesce(workers)
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
        self, workers: Sequence[PartitionWorker], keys: npt.NDArray[Any], batch: Batch
    ) -> None:
        parts = route_partitions(keys, self.partitions)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(self.partitions + 1))
        values = {m: np.asarray(batch.columns[m], dtype=np.float64) for m in self.values}
        for p, worker in enumerate(workers):
            rows = order[bounds[p] : bounds[p + 1]]
            if len(rows):
                worker.fold(keys[rows], {m: v[rows] for m, v in values.items()})

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
