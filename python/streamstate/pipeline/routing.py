"""Routing keys to partitions: one stable hash, the same in every process and run.

Everything here runs in C++ (:func:`partition_batch`, the core's routing): a key's partition
is a pure function of its bytes (or int64 value) through the core's seedless hash, so it is
the same in every process, run, version and machine, and for every representation of the
key (str, bytes, numpy ``U``/``S``, Arrow string/binary arrays).

Key groups (Flink's scheme): the hash picks one of ``key_groups`` groups (default
:data:`DEFAULT_KEY_GROUPS`, fixed for the life of a job), and partition ``p`` of ``P`` owns
the contiguous groups :func:`key_group_range` gives it, so a rescale moves whole groups
and a snapshot sectioned by group is read range by range. Group ``g`` belongs to partition
``g * P // key_groups``; when ``P`` divides ``key_groups`` (every power of two up to 256 by
default) a key's partition is the one routing gave before key groups existed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core

__all__ = [
    "DEFAULT_KEY_GROUPS",
    "RoutedSlice",
    "key_group_range",
    "partition_batch",
    "route_partitions",
]

#: The key groups of a store or pipeline that names none (Flink's default maximum
#: parallelism is 128; 256 leaves room for rescaling to more partitions).
DEFAULT_KEY_GROUPS = 256

partition_batch = _core.partition_batch
#: One partition's rows of a batch, routed (``partition_batch(..., as_slices=True)``) and
#: folded by ``PartitionAggregator.fold_slice`` with the routing's hashes reused.
RoutedSlice = _core.RoutedSlice
key_group_range = _core.key_group_range


def route_partitions(
    keys: Any, partitions: int, key_groups: int = DEFAULT_KEY_GROUPS
) -> npt.NDArray[np.intp]:
    """The partition of every key, the one :func:`partition_batch` sends it to.

    ``keys`` is anything :func:`partition_batch` takes (integer arrays, str/bytes
    sequences, numpy ``U``/``S`` arrays, Arrow string/binary arrays). With ``partitions ==
    key_groups`` this is every key's key group. Raises ValueError unless ``1 <=
    partitions <= key_groups <= 65536``.
    """
    for name, value in (("partitions", partitions), ("key_groups", key_groups)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= partitions <= 65536:
        raise ValueError(f"partitions must be in [1, 65536], got {partitions}")
    n = len(keys)
    rows = np.arange(n, dtype=np.intp)
    out = np.empty(n, dtype=np.intp)
    routed = partition_batch(keys, partitions, rows, key_groups=key_groups)
    for p, (_, part_rows) in enumerate(routed):
        out[part_rows] = p
    return out
