"""The source protocol: replayable micro-batches of columns, addressed by offset."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import SourceError

__all__ = ["ArraySource", "Batch", "Source", "check_batch", "check_columns"]


@dataclass(frozen=True)
class Batch:
    """One micro-batch read from a source: columns of equal length and the offsets around it."""

    columns: Mapping[str, npt.NDArray[Any]]
    offset: int
    next_offset: int

    def __len__(self) -> int:
        return self.next_offset - self.offset


class Source(Protocol):
    """A replayable source: reading at an offset always returns the same events.

    A batch read at ``offset`` starts there (``batch.offset == offset``) and holds exactly
    ``next_offset - offset`` rows in every column; the next read asks for ``next_offset``.
    An unbounded source with nothing new returns an empty batch (``next_offset == offset``)
    and the pipeline polls again after a short back-off; None means the source has ended.
    A source may also offer ``column_names`` (a sequence of str), which lets a pipeline
    check its columns when it is built rather than at the first batch.
    """

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

    @property
    def column_names(self) -> tuple[str, ...]:
        """The names of the columns, in the order given."""
        return tuple(self._columns)

    def read(self, offset: int, max_rows: int) -> Batch | None:
        """Rows ``[offset, offset + max_rows)`` as views of the columns, or None past the end."""
        if offset >= self._rows:
            return None
        end = min(self._rows, offset + max_rows)
        return Batch({k: v[offset:end] for k, v in self._columns.items()}, offset, end)

    def __repr__(self) -> str:
        return f"ArraySource({self._name!r}, rows={self._rows}, columns={list(self._columns)})"


def check_columns(required: Iterable[str], available: Iterable[str], where: str) -> None:
    """Raise :class:`~streamstate.SourceError` naming the first required column missing
    from ``available`` and listing those there are."""
    have = set(available)
    for name in required:
        if name not in have:
            raise SourceError(f"{where} has no column {name!r}; it has {sorted(have)}")


def _offset(value: object, what: str, source: str) -> int:
    if isinstance(value, bool):
        raise SourceError(f"source {source!r}: {what} must be an int, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise SourceError(
            f"source {source!r}: {what} must be an int, got {type(value).__name__}"
        ) from None


def check_batch(batch: Batch, source: str, offset: int, required: Sequence[str]) -> int:
    """Check one batch against the source contract; return its ``next_offset`` as an int.

    The batch must start at ``offset`` (where the previous one ended), must not end before
    it starts, must hold every ``required`` column, and every such column must have exactly
    ``next_offset - offset`` rows. Anything else raises :class:`~streamstate.SourceError`:
    trusting it would record an offset that disagrees with what was folded.
    """
    start = _offset(batch.offset, "Batch.offset", source)
    end = _offset(batch.next_offset, "Batch.next_offset", source)
    where = f"source {source!r}: the batch at offset {start}"
    if start != offset:
        raise SourceError(
            f"{where}: asked for offset {offset}, but the batch starts at offset {start}"
        )
    if end < start:
        raise SourceError(f"{where} ends before it starts (next_offset {end})")
    check_columns(required, batch.columns, where)
    for name in required:
        rows = len(batch.columns[name])
        if rows != end - start:
            raise SourceError(
                f"{where} holds {end - start} rows by its offsets ({start} to {end}) but "
                f"column {name!r} has {rows} rows"
            )
    return end
