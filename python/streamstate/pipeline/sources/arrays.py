"""A source over in-memory columns: the offset is the row number."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .contract import Batch

__all__ = ["ArraySource"]


class ArraySource:
    """A source over in-memory columns (numpy arrays, or anything ``np.asarray`` accepts);
    the offset is the row number."""

    #: A job with no checkpoint starts at row 0.
    start_offset = 0

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

    @property
    def column_names(self) -> tuple[str, ...]:
        """The names of the columns, in the order given."""
        return tuple(self._columns)

    def read(self, offset: int, max_rows: int) -> Batch | None:
        """Rows ``[offset, offset + max_rows)`` as views of the columns, or None past the end."""
        if offset >= self._rows:
            return None
        end = min(self._rows, offset + max_rows)
        return Batch({k: v[offset:end] for k, v in self._columns.items()}, offset, end, end - offset)

    def __repr__(self) -> str:
        return f"ArraySource({self._name!r}, rows={self._rows}, columns={list(self._columns)})"
