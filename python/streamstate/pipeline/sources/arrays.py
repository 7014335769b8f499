"""A source over in-memory columns: the offset is the row number.

It splits into shards of contiguous rows (``[i * n // count, (i + 1) * n // count)``), each
a source over its rows whose offset is still the row number in the whole source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import IncompatibleCheckpointError, SourceError
from .contract import Batch, Offset, check_shard_count, read_from_shards, shard_positions

__all__ = ["ArraySource"]


def _shard_rows(rows: int, count: int) -> list[range]:
    """The rows of each of ``count`` shards of ``rows`` rows: contiguous, in order."""
    return [range(i * rows // count, (i + 1) * rows // count) for i in range(count)]


class ArraySource:
    """A source over in-memory columns (numpy arrays, or anything ``np.asarray`` accepts);
    the offset is the row number. A shard (:meth:`shards`) reads only its own rows."""

    def __init__(self, name: str, columns: Mapping[str, Any]) -> None:
        self._name = name
        self._columns = {k: np.asarray(v) for k, v in columns.items()}
        lengths = {len(v) for v in self._columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        count = lengths.pop() if lengths else 0
        self._rows = range(count)  # the rows this source reads: all, or one shard's
        self._total = count  # the rows of the whole source, which its offsets number

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    @property
    def start_offset(self) -> int:
        """Where a job with no checkpoint starts: row 0 (a shard's first row)."""
        return self._rows.start

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def column_names(self) -> tuple[str, ...]:
        """The names of the columns, in the order given."""
        return tuple(self._columns)

    def read(self, offset: Offset, max_rows: int) -> Batch | None:
        """Rows ``[offset, offset + max_rows)`` as views of the columns, or None past the end.

        A whole source also reads from the offset of its shards (:meth:`shards`) when the
        rows they read are a prefix of the source: the batch starts at that offset."""
        if shard_positions(offset) is not None:
            return read_from_shards(self, offset, max_rows)
        first, end = self._rows.start, self._rows.stop
        if offset >= end:
            return None
        stop = min(end, offset + max_rows)
        columns = {k: v[offset - first : stop - first] for k, v in self._columns.items()}
        return Batch(columns, offset, stop, stop - offset)

    def shards(self, count: int) -> list[ArraySource]:
        """The source in ``count`` shards of contiguous rows (views of its columns: pickled,
        a shard carries only its rows)."""
        check_shard_count(count)
        if self._total != len(self._rows):
            raise SourceError(f"{self!r} is a shard already")
        shards = []
        for rows in _shard_rows(self._total, count):
            shard = ArraySource.__new__(ArraySource)
            shard._name = self._name
            shard._columns = {k: v[rows.start : rows.stop] for k, v in self._columns.items()}
            shard._rows, shard._total = rows, self._total
            shards.append(shard)
        return shards

    def shard_offsets(self, offset: Offset, count: int) -> list[int]:
        """Each of ``count`` shards' row when the source is at ``offset``: a row number
        (every row before it read) or the rows of each of several shards (see
        :class:`~streamstate.pipeline.sources.ShardableSource`)."""
        check_shard_count(count)
        positions = shard_positions(offset)
        old = [offset] if positions is None else positions
        read = []  # the row ranges read, in order
        for rows, row in zip(_shard_rows(self._total, len(old)), old, strict=True):
            if isinstance(row, bool) or not isinstance(row, int) or not rows.start <= row <= rows.stop:
                raise SourceError(
                    f"source {self._name!r}: offset {offset!r} is not one of {len(old)} "
                    f"shard(s) of {self._total} rows (a row in [{rows.start}, {rows.stop}] "
                    f"for each)"
                )
            if row > rows.start:
                read.append(range(rows.start, row))
        result = []
        for rows in _shard_rows(self._total, count):
            inside = [r for r in read if r.start < rows.stop and r.stop > rows.start]
            row = rows.start
            for part in inside:
                if part.start > row:
                    raise IncompatibleCheckpointError(
                        f"source {self._name!r}: at offset {offset!r} rows [{part.start}, "
                        f"{part.stop}) are read but [{row}, {part.start}) are not, so shard "
                        f"rows [{rows.start}, {rows.stop}) of {count} cannot continue from one "
                        "row; resume with the shard count that wrote it"
                    )
                row = min(part.stop, rows.stop)
            result.append(row)
        return result

    def __repr__(self) -> str:
        shard = "" if len(self._rows) == self._total else f", shard={self._rows.start}..{self._rows.stop}"
        return (
            f"ArraySource({self._name!r}, rows={len(self._rows)}{shard}, "
            f"columns={list(self._columns)})"
        )
