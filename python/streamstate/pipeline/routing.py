"""Routing keys to partitions: one stable hash, the same in every process and run.

Both names here run in C++ (:func:`partition_batch`, the core's routing): a key's partition
is a pure function of its bytes (or int64 value) through the core's seedless hash, so it is
the same in every process, run, version and machine, and for every representation of the
key (str, bytes, numpy ``U``/``S``, Arrow string/binary arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core

__all__ = ["partition_batch", "route_partitions"]

partition_batch = _core.partition_batch


def route_partitions(keys: Any, partitions: int) -> npt.NDArray[np.intp]:
    """The partition of every key, the one :func:`partition_batch` sends it to.

    ``keys`` is anything :func:`partition_batch` takes (integer arrays, str/bytes
    sequences, numpy ``U``/``S`` arrays, Arrow string/binary arrays). Raises ValueError
    unless ``partitions`` is between 1 and 65536.
    """
    if not isinstance(partitions, int | np.integer) or isinstance(partitions, bool):
        raise TypeError(f"partitions must be an int, not {type(partitions).__name__}")
    if not 1 <= partitions <= 65536:
        raise ValueError(f"partitions must be in [1, 65536], got {partitions}")
    n = len(keys)
    rows = np.arange(n, dtype=np.intp)
    out = np.empty(n, dtype=np.intp)
    for p, (_, part_rows) in enumerate(partition_batch(keys, partitions, rows)):
        out[part_rows] = p
    return out
