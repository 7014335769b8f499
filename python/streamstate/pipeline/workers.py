"""Partition threads and the barrier that quiesces them.

Each partition has one thread, the single writer of its partition aggregator while a run
lasts: it folds the slices the coordinator routes to it (every value column of a slice in
one call, as one ``(n, M)`` block) and, at a barrier, arrives once it folded everything
queued before. A failure inside a worker is kept and surfaced by the
coordinator at the next barrier.

Workers never publish. A store's capture (``snapshot`` / ``snapshot_delta``) holds every
partition's local partials as well as the published ones, so a checkpoint needs the
partitions stopped, not published; and since a publish moves partials into the shared map
(a change to every key it moves), publishing at each barrier would also cost its keys in
the next delta. The pipeline publishes when results are read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from ..aggregate import PartitionAggregator
from ..errors import StreamStateError
from .routing import RoutedSlice

if TYPE_CHECKING:
    from ..window_store import WindowPartition

__all__ = ["PartitionBarrier", "PartitionWorker", "fold_rows", "quiesce"]


class PartitionBarrier:
    """Sent down every partition queue: each worker arrives when it reaches it.

    Once every worker arrived, none touches its aggregators until the coordinator queues
    more work, so the coordinator may read the stores (capture them) until then.
    """

    def __init__(self, parties: int) -> None:
        self._remaining = parties
        self._done = threading.Condition()

    def arrive(self) -> None:
        """One worker has folded everything queued before the barrier."""
        with self._done:
            self._remaining -= 1
            self._done.notify_all()

    def wait(self) -> None:
        """Block until every worker has arrived."""
        with self._done:
            self._done.wait_for(lambda: self._remaining == 0)

    def __repr__(self) -> str:
        return f"PartitionBarrier(remaining={self._remaining})"


_STOP = object()


def fold_rows(
    aggregator: PartitionAggregator | WindowPartition,
    keys: npt.NDArray[Any],
    values: Sequence[npt.NDArray[Any]],
    times: npt.NDArray[np.int64] | None = None,
    watermark: int = 0,
) -> None:
    """Fold one routed slice into a partition: ``keys`` and each value column's rows (one
    ``(n, M)`` block, one probe per key for every column); in a windowed job also their
    event times (int64 ms, as routed) under ``watermark``, which the coordinator
    split every late event off under, so the store finding one is an error."""
    block = values[0] if len(values) == 1 else np.column_stack(values)
    if times is None:
        cast("PartitionAggregator", aggregator).fold(keys, block)
        return
    late = cast("WindowPartition", aggregator).fold(
        keys, times.astype(np.int64, copy=False), block, watermark=watermark
    )
    if late:
        raise StreamStateError(
            f"the window store found {late} late events in a slice the pipeline judged on "
            f"time under watermark {watermark}"
        )


class PartitionWorker:
    """One thread per partition, the single writer of its partition aggregator (or, in a
    windowed job, of its window store partition)."""

    def __init__(self, partition: int, aggregator: PartitionAggregator | WindowPartition) -> None:
        self.partition = partition
        self._aggregator = aggregator
        # Bounded, so a fast reader cannot queue the whole source in memory.
        self.inbox: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.error: Exception | None = None
        self._thread = threading.Thread(
            target=self._loop, name=f"streamstate-partition-{partition}", daemon=True
        )
        self._thread.start()

    def fold(
        self,
        keys: npt.NDArray[Any],
        values: Sequence[npt.NDArray[Any]],
        times: npt.NDArray[np.int64] | None = None,
        watermark: int = 0,
    ) -> None:
        """Queue one routed slice: ``keys`` and each value column's matching rows, in the
        store's column order; in a windowed job also their event times (routed as
        int64 ms) and the watermark to fold them under."""
        self.inbox.put((keys, values, times, watermark))

    def fold_slice(self, routed: RoutedSlice) -> None:
        """Queue one routed slice of a job without windows, folded as it is (its keys'
        routing hashes reused, its values already one block)."""
        self.inbox.put(routed)

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is _STOP:
                return
            if isinstance(item, PartitionBarrier):
                item.arrive()
                continue
            if self.error is not None:
                continue  # drain without folding after a failure; the run will raise
            if isinstance(item, RoutedSlice):
                try:
                    cast("PartitionAggregator", self._aggregator).fold_slice(item)
                except Exception as exc:  # noqa: BLE001 - surfaced at the barrier
                    self.error = exc
                continue
            keys, values, times, watermark = item
            try:
                # The (n, M) block is stacked here, on the partition's own thread.
                fold_rows(self._aggregator, keys, values, times, watermark)
            except Exception as exc:  # noqa: BLE001 - surfaced by the coordinator at the barrier
                self.error = exc

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self.inbox.put(_STOP)
        self._thread.join()

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "ok"
        return f"PartitionWorker(partition={self.partition}, queued={self.inbox.qsize()}, {state})"


def quiesce(workers: Sequence[PartitionWorker]) -> None:
    """Stop every partition at one barrier, after it folded everything queued before;
    raise the first worker failure."""
    barrier = PartitionBarrier(len(workers))
    for worker in workers:
        worker.inbox.put(barrier)
    barrier.wait()
    for worker in workers:
        if worker.error is not None:
            raise StreamStateError(
                f"partition {worker.partition} failed: {worker.error}"
            ) from worker.error
