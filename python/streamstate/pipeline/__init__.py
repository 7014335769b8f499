"""A small partition-parallel pipeline: sources, routing, partition threads, checkpoints, recovery.

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
coordinator quiesces the partitions at a barrier and every store captures what changed since
the last checkpoint (a full snapshot every ``full_checkpoint_every`` checkpoints); a
background thread packs the captures into one LCB1 batch and commits it with the source
offset through an :class:`~streamstate.ObjectStoreCheckpointer` (upload, manifest,
``_latest``) while the partitions fold on (see :mod:`streamstate.pipeline.checkpoints`). A
pipeline that
starts over a store holding checkpoints restores the state and replays the source from the
checkpointed offset: events after the last checkpoint are folded again, into state that has
not seen them, so every event counts exactly once.
"""

from __future__ import annotations

from .checkpoints import CheckpointStats
from .core import Pipeline, PipelineRun, Transform
from .fingerprint import JobFingerprint, JobRecord
from .routing import (
    DEFAULT_KEY_GROUPS,
    RoutedSlice,
    key_group_range,
    partition_batch,
    route_partitions,
)
from .sources import ArraySource, ArrowSource, Batch, Offset, ParquetSource, Source
from .workers import PartitionBarrier, PartitionWorker

__all__ = [
    "DEFAULT_KEY_GROUPS",
    "ArraySource",
    "ArrowSource",
    "Batch",
    "CheckpointStats",
    "JobFingerprint",
    "JobRecord",
    "Offset",
    "ParquetSource",
    "PartitionBarrier",
    "PartitionWorker",
    "Pipeline",
    "PipelineRun",
    "RoutedSlice",
    "Source",
    "Transform",
    "key_group_range",
    "partition_batch",
    "route_partitions",
]
