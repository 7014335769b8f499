"""The source protocol: replayable micro-batches of columns, addressed by offset."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["ArraySource", "Batch", "Source"]


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
        """The name given at construction."""
        return self._name

    def __len__(self) -> int:
        return self._rows

    def read(self, offset: int, max_rows: int) -> Batch | None:
        """Rows ``[offset, offset + max_rows)`` as views of the columns, or None past the end."""
        if offset >= self._rows:
            return None
        end = min(self._rows, offset + max_rows)
        return Batch({k: v[offset:end] for k, v in self._columns.items()}, offset, end)

    def __repr__(self) -> str:
        return f"ArraySource({self._name!r}, rows={self._rows}, columns={list(self._columns)})"
