"""ArrowSource and ParquetSource on their own: what they read, at which offsets, and the
columns they hand over (views of Arrow buffers where possible)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamstate import SourceError
from streamstate.pipeline import ArrowSource, Batch, ParquetSource
from streamstate.pipeline.sources import check_batch


def _table(rows: int = 100, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "user": pa.array([f"u{i}" for i in rng.integers(0, 7, rows)]),
            "shop": pa.array(rng.integers(0, 5, rows), pa.int64()),
            "amount": pa.array(rng.normal(size=rows)),
        }
    )


def _read_all(source: Any, max_rows: int, start: Any) -> list[Batch]:
    batches, offset = [], start
    while (batch := source.read(offset, max_rows)) is not None and len(batch):
        check_batch(batch, source.name, offset, list(batch.columns))
        batches.append(batch)
        offset = batch.next_offset
    return batches


def _concat(batches: list[Batch], column: str) -> list[Any]:
    out: list[Any] = []
    for batch in batches:
        values = batch.columns[column]
        out.extend(values.to_pylist() if isinstance(values, pa.Array) else values.tolist())
    return out


# -- ArrowSource ---------------------------------------------------------------------------


def _reader(table: pa.Table) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=17))


class _CStream:
    """Only the Arrow PyCapsule stream interface, as a third-party library would offer it."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        return self.table.__arrow_c_stream__(requested_schema)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t,
        _reader,
        lambda t: t.to_pandas(),
        lambda t: pl.from_arrow(t),
        _CStream,
        lambda t: (lambda: _reader(t)),
    ],
    ids=["table", "reader", "pandas", "polars", "c_stream", "factory"],
)
def test_arrow_source_reads_every_row_in_order(make: Any) -> None:
    table = _table(100)
    source = ArrowSource(make(table), name="events")
    batches = _read_all(source, 10, 0)
    assert sum(len(b) for b in batches) == 100 and batches[-1].next_offset == 100
    assert all(len(b) <= 10 for b in batches)
    assert _concat(batches, "user") == table["user"].to_pylist()
    assert _concat(batches, "shop") == table["shop"].to_pylist()
    assert _concat(batches, "amount") == table["amount"].to_pylist()
    assert source.read(100, 10) is None


def test_arrow_columns_are_views_of_the_arrow_buffers() -> None:
    table = _table(50)
    batch = ArrowSource(table, name="t").read(5, 20)
    assert batch is not None
    amount = batch.columns["amount"]
    assert isinstance(amount, np.ndarray) and amount.dtype == np.float64
    buffer = table["amount"].chunk(0).buffers()[1]
    assert amount.ctypes.data == buffer.address + 5 * 8  # no copy: the Arrow buffer itself
    assert isinstance(batch.columns["user"], pa.Array)  # the core reads it in place
    assert batch.columns["user"].to_pylist() == table["user"].to_pylist()[5:25]


def test_a_batch_stays_within_one_record_batch() -> None:
    table = pa.concat_tables([_table(30, seed=1), _table(30, seed=2)])
    assert table["amount"].num_chunks == 2
    batch = ArrowSource(table, name="t").read(25, 10)
    assert batch is not None and (batch.offset, batch.next_offset, len(batch)) == (25, 30, 5)


def test_numeric_nulls_become_nan() -> None:
    table = pa.table({"k": [1, 2, 3], "v": pa.array([1, None, 3], pa.int64())})
    batch = ArrowSource(table, name="t").read(0, 10)
    assert batch is not None
    np.testing.assert_array_equal(batch.columns["v"], [1.0, np.nan, 3.0])


def test_a_factory_is_called_again_to_replay() -> None:
    table = _table(40)
    calls = []

    def factory() -> pa.RecordBatchReader:
        calls.append(1)
        return _reader(table)

    source = ArrowSource(factory, name="t")
    first = _read_all(source, 8, 0)
    assert len(calls) == 1
    again = source.read(12, 8)  # back before the current position: a fresh stream
    assert len(calls) == 2 and again is not None
    assert again.columns["user"].to_pylist() == table["user"].to_pylist()[12:17]
    assert _concat(first, "amount") == table["amount"].to_pylist()


def test_arrow_source_refuses_what_it_cannot_read() -> None:
    with pytest.raises(TypeError, match="pyarrow.Table"):
        ArrowSource(42, name="t")
    with pytest.raises(TypeError, match="name"):
        ArrowSource(_table(3), name="")
    with pytest.raises(SourceError, match="row number"):
        ArrowSource(_table(3), name="t").read({"file": "x"}, 3)


# -- ParquetSource -------------------------------------------------------------------------


def _write_parquet(directory: Path, name: str, table: pa.Table, row_group_size: int) -> None:
    pq.write_table(table, directory / name, row_group_size=row_group_size)


def _parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=row_group_size)
    return out.getvalue()


def test_parquet_source_reads_files_in_name_order_in_row_group_batches(tmp_path: Path) -> None:
    parts = [_table(25, seed=i) for i in range(3)]
    for i, part in enumerate(parts):  # written out of order: the name decides
        _write_parquet(tmp_path, f"part-{2 - i:03d}.parquet", part, row_group_size=10)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".part-003.parquet.tmp").write_text("half written")
    source = ParquetSource(tmp_path, name="events")
    assert source.files() == ["part-000.parquet", "part-001.parquet", "part-002.parquet"]
    batches = _read_all(source, 4, source.start_offset)
    expected = pa.concat_tables(reversed(parts))
    assert _concat(batches, "amount") == expected["amount"].to_pylist()
    # every batch lies within one row group of 10 (10, 10, 5 rows) and holds at most 4 rows
    rows = [len(b) for b in batches]
    assert rows == [4, 4, 2, 4, 4, 2, 4, 1] * 3
    assert batches[0].offset == {"file": None, "row": 0}
    assert batches[0].next_offset == {"file": "part-000.parquet", "row": 4}
    assert batches[-1].next_offset == {"file": "part-002.parquet", "row": 25}
    assert all(json.loads(json.dumps(b.next_offset)) == b.next_offset for b in batches)
    assert source.read(batches[-1].next_offset, 4) is None


def test_parquet_source_reads_an_object_store_prefix(s3_store: Any) -> None:
    parts = [_table(30, seed=i) for i in range(2)]
    for i, part in enumerate(parts):
        obstore.put(s3_store, f"in/events/{i:02d}.parquet", _parquet_bytes(part, 8))
    obstore.put(s3_store, "in/other.parquet", _parquet_bytes(_table(5), 8))  # not under it
    source = ParquetSource("in/events", name="events", store=s3_store)
    batches = _read_all(source, 100, source.start_offset)
    assert [len(b) for b in batches] == [8, 8, 8, 6] * 2
    assert _concat(batches, "user") == pa.concat_tables(parts)["user"].to_pylist()


def test_a_following_source_is_idle_at_the_end_and_sees_new_files(tmp_path: Path) -> None:
    source = ParquetSource(tmp_path, name="events", follow=True)
    idle = source.read(source.start_offset, 10)
    assert idle is not None and len(idle) == 0 and idle.next_offset == source.start_offset
    _write_parquet(tmp_path, "a.parquet", _table(5), row_group_size=5)
    first = source.read(source.start_offset, 10)
    assert first is not None and first.next_offset == {"file": "a.parquet", "row": 5}
    idle = source.read(first.next_offset, 10)
    assert idle is not None and len(idle) == 0 and idle.next_offset == first.next_offset
    _write_parquet(tmp_path, "b.parquet", _table(0), row_group_size=5)  # empty: skipped
    _write_parquet(tmp_path, "c.parquet", _table(3), row_group_size=5)
    second = source.read(first.next_offset, 10)
    assert second is not None and second.next_offset == {"file": "c.parquet", "row": 3}


def test_an_offset_naming_a_missing_file_is_a_source_error(tmp_path: Path) -> None:
    _write_parquet(tmp_path, "a.parquet", _table(5), row_group_size=5)
    source = ParquetSource(tmp_path, name="events")
    with pytest.raises(SourceError, match="'gone.parquet' is gone"):
        source.read({"file": "gone.parquet", "row": 3}, 10)
    with pytest.raises(SourceError, match="past the end"):
        source.read({"file": "a.parquet", "row": 6}, 10)
    for offset in (3, {"file": "a.parquet"}, {"file": None, "row": 2}, {"file": 1, "row": 0}):
        with pytest.raises(SourceError, match="not a Parquet directory's"):
            source.read(offset, 10)


def test_a_file_that_is_not_parquet_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="not a Parquet file"):
        ParquetSource(tmp_path, name="events").read({"file": None, "row": 0}, 10)


def test_parquet_source_reads_only_the_columns_asked_for(tmp_path: Path) -> None:
    _write_parquet(tmp_path, "a.parquet", _table(5), row_group_size=5)
    batch = ParquetSource(tmp_path, name="e", columns=["shop"]).read({"file": None, "row": 0}, 9)
    assert batch is not None and list(batch.columns) == ["shop"]


def test_source_reprs_say_what_they_read(tmp_path: Path) -> None:
    assert "follow=True" in repr(ParquetSource(tmp_path, name="e", follow=True))
    assert "'amount'" in repr(ArrowSource(_table(3), name="t"))
    with pytest.raises(TypeError, match="follow"):
        ParquetSource(tmp_path, name="e", follow=1)  # type: ignore[arg-type]


def test_string_view_keys_are_rewritten_for_the_core() -> None:
    table = pa.table({"k": pa.array(["a", "b", "a"], pa.string_view()), "v": [1.0, 2.0, 3.0]})
    batch = ArrowSource(table, name="t").read(0, 3)
    assert batch is not None and batch.columns["k"].type == pa.large_string()
    assert batch.columns["k"].to_pylist() == ["a", "b", "a"]
