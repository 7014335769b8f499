"""What the worker processes of test_checkpoint_distributed.py run.

A module of its own so spawned children can import these functions by name (test modules
are imported by path, which a child process cannot repeat).
"""

from __future__ import annotations

import time
from typing import Any

from streamstate.checkpoint import ObjectStoreCheckpointer
from streamstate.manifest import PartitionSnapshotEntry
from streamstate.pending import PendingCheckpoint


def upload(
    pending: PendingCheckpoint, operator: str, partition: int, data: bytes, is_delta: bool
) -> PartitionSnapshotEntry:
    """One worker's upload of its own partition."""
    return pending.upload(operator, partition, data, is_delta=is_delta)


def restore(ckpt: ObjectStoreCheckpointer, chain: tuple[PartitionSnapshotEntry, ...]) -> bytes:
    """One worker's restore of its own partition."""
    return ckpt.load_partition(chain)


def doomed_coordinator(ckpt: ObjectStoreCheckpointer, epoch: int, report: Any) -> None:
    """Begin a checkpoint, upload two partitions, report the pending id, then wait to be
    killed before ever committing."""
    pending = ckpt.begin(epoch)
    for partition in (0, 1):
        pending.upload("agg", partition, f"doomed-{partition}".encode())
    report.put(str(pending.checkpoint_id))
    time.sleep(600)
