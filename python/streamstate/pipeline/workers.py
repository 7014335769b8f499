"""Partition threads and the barrier that quiesces them before a checkpoint.

Each partition has one thread, the single writer of its partition aggregators: it folds the
slices the coordinator routes to it, and at a barrier publishes what it folded and arrives.
A failure inside a worker is kept and surfaced by the coordinator at the next barrier.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt

from ..aggregate import PartitionAggregator
from ..errors import StreamStateError

__all__ = ["PartitionBarrier", "PartitionWorker", "quiesce"]


class PartitionBarrier:
    """Sent down every partition queue: each worker publishes, then arrives."""

    def __init__(self, parties: int) -> None:
        self._remaining = parties
        self._done = threading.Condition()

    def arrive(self) -> None:
        """One worker has published everything it folded before the barrier."""
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


class PartitionWorker:
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

    def fold(self, keys: npt.NDArray[Any], values: Mapping[str, npt.NDArray[Any]]) -> None:
        """Queue one routed slice: ``keys`` and each value column's matching rows."""
        self.inbox.put((keys, values))

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is _STOP:
                return
            if isinstance(item, PartitionBarrier):
                try:
                    if self.error is None:
                        for aggregator in self._aggregators.values():
                            aggregator.publish()
                except Exception as exc:  # noqa: BLE001 - surfaced by the coordinator
                    self.error = exc
                item.arrive()
                continue
            if self.error is not None:
                continue  # drain without folding after a failure; the run will raise
            keys, values = item
            try:
                for metric, aggregator in self._aggregators.items():
                    aggregator.fold(keys, values[metric])
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
    """Publish every partition's folds at one barrier; raise the first worker failure."""
    barrier = PartitionBarrier(len(workers))
    for worker in workers:
        worker.inbox.put(barrier)
    barrier.wait()
    for worker in workers:
        if worker.error is not None:
            raise StreamStateError(
                f"partition {worker.partition} failed: {worker.error}"
            ) from worker.error
