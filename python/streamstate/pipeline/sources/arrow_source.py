"""A source over Arrow data: tables, record batch readers, pandas and polars DataFrames.

Columns reach the pipeline without copies where Arrow allows it: a numeric (or temporal)
column without nulls becomes a numpy view of its Arrow buffer; a string or binary column
stays an Arrow array, which the core's key reader takes directly (``__arrow_c_array__``).
Only a numeric column holding nulls is copied (to float64, nulls as NaN, which the
pipeline's ``nan_policy`` then decides about), as is a dictionary column (decoded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import SourceError
from .contract import Batch

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["ArrowSource", "arrow_columns"]


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - pyarrow is a test dependency
        raise ImportError("ArrowSource and ParquetSource need pyarrow") from exc
    return pyarrow


def _column(array: Any) -> Any:
    """One Arrow array as the pipeline takes it: a numpy view where possible."""
    pa = _pyarrow()
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    if pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):
        # The core reads offset-based layouts; a view array (polars' native strings) is
        # rewritten as one (a copy).
        large = pa.large_string() if pa.types.is_string_view(kind) else pa.large_binary()
        array, kind = array.cast(large), large
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return array  # read by the core through __arrow_c_array__, no copy
    if array.null_count == 0:
        try:
            return array.to_numpy(zero_copy_only=True)
        except pa.ArrowInvalid:  # booleans (bit-packed) and the like: a small copy
            return array.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return array.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls become NaN
    return array.to_numpy(zero_copy_only=False)


def arrow_columns(data: Any) -> dict[str, Any]:
    """The columns of a ``pyarrow.RecordBatch`` or ``Table`` as the pipeline takes them
    (see the module docstring); a table column of several chunks is joined (a copy)."""
    pa = _pyarrow()
    columns = {}
    for name, column in zip(data.schema.names, data.columns, strict=True):
        if isinstance(column, pa.ChunkedArray):
            column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        columns[name] = _column(column)
    return columns


def _replayable(data: Any) -> tuple[Callable[[], Iterator[pa.RecordBatch]], tuple[str, ...] | None]:
    """A way to iterate ``data``'s record batches from the start, every time, and the column
    names when known up front: a table's batches directly; a one-shot stream (reader,
    ``__arrow_c_stream__``) read into a table once; a callable called afresh each time."""
    if callable(data):
        factory = data
        return lambda: _stream(factory()), None
    table = _table(data)
    batches = table.to_batches()  # zero copy: slices at the union of chunk boundaries
    return lambda: iter(batches), tuple(table.schema.names)


def _stream(made: Any) -> Iterator[pa.RecordBatch]:
    """The record batches of what a factory returned, streamed when it is a stream."""
    pa = _pyarrow()
    if isinstance(made, pa.RecordBatchReader):
        return iter(made)
    if isinstance(made, pa.Table):
        return iter(made.to_batches())
    if hasattr(made, "__arrow_c_stream__") and _library(made) not in ("pandas", "polars"):
        return iter(pa.RecordBatchReader.from_stream(made))
    return iter(_table(made).to_batches())


def _library(data: object) -> str:
    return type(data).__module__.split(".")[0]


def _table(data: Any) -> pa.Table:
    pa = _pyarrow()
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if _library(data) == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    to_arrow = getattr(data, "to_arrow", None)  # polars: its own zero-copy export
    if callable(to_arrow) and _library(data) == "polars":
        return _table(to_arrow())
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data).read_all()
    raise TypeError(
        "ArrowSource data must be a pyarrow.Table, RecordBatch or RecordBatchReader, a pandas "
        "or polars DataFrame, an object with __arrow_c_stream__, or a callable returning one; "
        f"got {type(data).__name__}"
    )


class ArrowSource:
    """A source over Arrow data; the offset is the row number.

    ``data`` is a ``pyarrow.Table`` (read in place), a ``pyarrow.RecordBatchReader`` or any
    object exposing ``__arrow_c_stream__`` (a one-shot stream: read into a table once, at
    construction, so it can be replayed), a pandas or polars DataFrame (converted to Arrow
    once, without copies where Arrow allows), or a callable returning any of these. The
    callable is how a stream too big to hold in memory is made replayable: it is called for
    a fresh stream whenever a read goes back before the current position (a resumed job
    reads forward from its checkpoint), and must return the same rows every time.

    Batches never span two of the data's record batches, so columns stay views of the
    Arrow buffers (see :func:`arrow_columns` for which columns are copied).
    """

    #: A job with no checkpoint starts at row 0.
    start_offset = 0

    def __init__(self, data: Any, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        self._name = name
        self._open, self._schema_names = _replayable(data)
        self._stream: Iterator[pa.RecordBatch] = self._open()
        self._current: pa.RecordBatch | None = None
        self._current_start = 0  # the row number of the current record batch's first row
        self._passed = 0  # rows in the record batches before the current one

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    @property
    def column_names(self) -> tuple[str, ...] | None:
        """The names of the columns (None for a callable's stream, until it is read)."""
        return self._schema_names

    def _advance_to(self, offset: int) -> pa.RecordBatch | None:
        """The record batch holding row ``offset`` (restarting the stream when the offset
        lies before the current one), or None past the end."""
        if offset < self._current_start:
            self._stream = self._open()
            self._current, self._current_start, self._passed = None, 0, 0
        while self._current is None or offset >= self._current_start + self._current.num_rows:
            if self._current is not None:
                self._passed += self._current.num_rows
            self._current = next(self._stream, None)
            if self._current is None:
                self._current_start = self._passed
                return None
            self._current_start = self._passed
            if self._schema_names is None:
                self._schema_names = tuple(self._current.schema.names)
        return self._current

    def read(self, offset: int, max_rows: int) -> Batch | None:
        """Up to ``max_rows`` rows from row ``offset``, within one record batch of the data;
        None past the end."""
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
            raise SourceError(f"source {self._name!r}: offset must be a row number, got {offset!r}")
        offset = int(offset)
        current = self._advance_to(offset)
        if current is None:
            return None
        start = offset - self._current_start
        rows = min(max_rows, current.num_rows - start)
        columns = arrow_columns(current.slice(start, rows))
        return Batch(columns, offset, offset + rows, rows)

    def __repr__(self) -> str:
        columns = list(self._schema_names) if self._schema_names is not None else "?"
        return f"ArrowSource(name={self._name!r}, columns={columns})"

