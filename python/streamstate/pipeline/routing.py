"""Routing keys to partitions: one stable hash, the same in every process and run."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["route_partitions"]

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
