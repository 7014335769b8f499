"""Arrow and Polars output: to_arrow() / to_polars() on every result producer, equal to
results() / to_pandas(), built from the core's buffers without per-row Python objects."""

from __future__ import annotations

import math
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamstate import CorruptDataError, NumericAggregateStore
from streamstate.pipeline import ArraySource, Pipeline
from streamstate.spill import SpillingAggregator
from streamstate.stats import STAT_COLUMNS

KEY_TYPES = ("int64", "bytes", "str")
ARROW_KEY_TYPES = {"int64": pa.int64(), "bytes": pa.binary(), "str": pa.string()}
SCHEMA_TAIL = [("count", pa.int64())] + [(name, pa.float64()) for name in STAT_COLUMNS[2:]]


def _keys(key_type: str, n: int, distinct: int, seed: int = 0) -> Any:
    ids = np.random.default_rng(seed).integers(0, distinct, n)
    if key_type == "int64":
        return ids.astype(np.int64) * 7919 - 10**12
    # Lengths vary (so offsets matter) and the text is not all ASCII.
    return [f"ключ-{i}-{'x' * (i % 5)}" if key_type == "str" else f"k{i}".encode() for i in ids]


def _values(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, n).astype(np.float64)


def _rows(columns: Any) -> dict[Any, tuple[Any, ...]]:
    """key -> (count, sum, min, max, mean, var, std) from results()-shaped columns or a
    pyarrow Table, NaN made comparable."""
    if isinstance(columns, pa.Table):
        columns = columns.to_pydict()
    keys = columns["key"]
    keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
    stats = [list(np.asarray(columns[name]).tolist()) for name in STAT_COLUMNS[1:]]
    rows = {
        key: tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row)
        for key, *row in zip(keys, *stats, strict=True)
    }
    assert len(rows) == len(keys), "a key appears twice"
    return rows


def _assert_schema(table: pa.Table, key_type: str) -> None:
    assert table.schema == pa.schema([("key", ARROW_KEY_TYPES[key_type]), *SCHEMA_TAIL])


def _store(key_type: str, n: int = 5_000, distinct: int = 700) -> NumericAggregateStore:
    store = NumericAggregateStore(3, key_type=key_type)  # type: ignore[arg-type]
    keys, values = _keys(key_type, n, distinct), _values(n)
    for pid in range(3):
        rows = slice(pid, None, 3)
        part = store.partition(pid)
        part.fold(keys[rows], values[rows])
        part.publish()
    return store


def _spilling(tmp_path: Path, key_type: str, *, spill: bool) -> SpillingAggregator:
    n, distinct = (60_000, 20_000) if spill else (5_000, 700)
    agg = SpillingAggregator(
        64 * 1024 if spill else None,
        spill_dir=tmp_path,
        key_type=key_type,  # type: ignore[arg-type]
        threads=2,
    )
    keys, values = _keys(key_type, n, distinct), _values(n)
    for lo in range(0, n, 10_000):
        agg.accumulate_batch(keys[lo : lo + 10_000], values[lo : lo + 10_000])
    assert (agg.spill_count > 0) == spill
    return agg


# -- the store ----------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_store_to_arrow_equals_results_and_to_pandas(key_type: str) -> None:
    store = _store(key_type)
    table = store.to_arrow()
    _assert_schema(table, key_type)
    results = store.results()
    assert table.num_rows == len(results["key"]) == len(store) > 0
    assert _rows(table) == _rows(results)
    frame = store.to_pandas()
    assert _rows(table) == _rows({"key": list(frame.index), **{c: frame[c] for c in frame}})
    if key_type == "str":
        assert all(isinstance(k, str) for k in results["key"])
    if key_type == "bytes":
        assert all(isinstance(k, bytes) for k in results["key"])


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_count_is_int64_everywhere(key_type: str, tmp_path: Path) -> None:
    store = _store(key_type, n=100, distinct=10)
    assert store.results()["count"].dtype == np.int64
    assert store.to_pandas()["count"].dtype == np.int64
    assert store.to_arrow().schema.field("count").type == pa.int64()
    assert store.to_polars().schema["count"] == pl.Int64
    for drain in ("drain", "to_pandas", "to_arrow"):
        agg = _spilling(tmp_path, key_type, spill=False)
        out = getattr(agg, drain)()
        count = out.schema.field("count").type if drain == "to_arrow" else out["count"].dtype
        assert count in (np.int64, pa.int64()), (drain, count)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_empty_results(key_type: str, tmp_path: Path) -> None:
    store = NumericAggregateStore(2, key_type=key_type)  # type: ignore[arg-type]
    table = store.to_arrow()
    _assert_schema(table, key_type)
    assert table.num_rows == 0
    assert store.to_polars().shape == (0, len(STAT_COLUMNS))
    with SpillingAggregator(None, spill_dir=tmp_path, key_type=key_type) as agg:  # type: ignore[arg-type]
        table = agg.to_arrow()
    _assert_schema(table, key_type)
    assert table.num_rows == 0


def test_str_keys_round_trip_through_a_snapshot() -> None:
    store = _store("str")
    assert store.key_type == "str" and "key_type='str'" in repr(store)
    fresh = NumericAggregateStore(3, key_type="str")
    fresh.restore(store.snapshot())
    assert _rows(fresh.to_arrow()) == _rows(store.to_arrow())
    # The same bytes read by a key_type="bytes" store come back as binary.
    as_bytes = NumericAggregateStore(3, key_type="bytes")
    as_bytes.restore(store.snapshot())
    assert as_bytes.to_arrow().schema.field("key").type == pa.binary()
    assert sorted(k.decode() for k in as_bytes.results()["key"]) == sorted(store.results()["key"])


def test_a_str_store_holding_a_non_utf8_key_raises_corrupt_data_error() -> None:
    store = NumericAggregateStore(1, key_type="str")
    with store.partition(0) as part:
        part.fold(["fine", b"\xff\xfe"], [1.0, 2.0])
    for read in (store.results, store.to_arrow, store.to_pandas):
        with pytest.raises(CorruptDataError, match="not UTF-8"):
            read()
    assert len(store) == 2  # nothing changed


def test_arrow_columns_share_the_core_buffers() -> None:
    # Every column of the table wraps memory the core filled: pyarrow allocates none of it.
    store = _store("bytes", n=20_000, distinct=5_000)
    before = pa.total_allocated_bytes()
    table = store.to_arrow()
    assert pa.total_allocated_bytes() == before
    assert table.num_rows == len(store) > 4_000
    keys = table.column("key").chunk(0)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32)[: len(keys) + 1]
    assert offsets[0] == 0 and (np.diff(offsets) > 0).all()
    assert offsets[-1] == sum(len(k) for k in store.results()["key"])


@pytest.mark.parametrize("producer", ["store", "spilling"])
def test_keys_are_built_without_a_python_object_per_key(producer: str, tmp_path: Path) -> None:
    # 100k keys as Python bytes would cost > 3 MB of traced allocations; the Arrow path makes
    # a few objects whatever the key count. The list-of-bytes path is the control: it shows
    # the measurement sees per-key objects.
    distinct = 100_000

    def make() -> Any:
        if producer == "store":
            return _store("bytes", n=2 * distinct, distinct=distinct)
        agg = SpillingAggregator(None, spill_dir=tmp_path, key_type="bytes", threads=2)
        agg.accumulate_batch(_keys("bytes", 2 * distinct, distinct), _values(2 * distinct))
        return agg

    def traced_peak(call: Any) -> tuple[int, Any]:
        tracemalloc.start()
        try:
            out = call()
            return tracemalloc.get_traced_memory()[1], out
        finally:
            tracemalloc.stop()

    arrow_source, list_source = make(), make()
    arrow_peak, table = traced_peak(arrow_source.to_arrow)
    list_peak, columns = traced_peak(
        list_source.results if producer == "store" else list_source.drain
    )
    assert table.num_rows == len(columns["key"]) > distinct // 2
    assert list_peak > 30 * len(columns["key"])  # the control: one object per key
    assert arrow_peak < 256 * 1024
    assert _rows(table) == _rows(columns)


def test_to_arrow_without_pyarrow_names_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = _store("int64", n=100, distinct=10)
    agg = _spilling(tmp_path, "int64", spill=False)
    groups = agg.in_memory_groups
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    for call in (store.to_arrow, store.to_polars, agg.to_arrow, agg.to_polars):
        with pytest.raises(ImportError, match="pip install pyarrow"):
            call()
    # The terminal drain did not run: nothing was lost.
    assert not agg.closed
    monkeypatch.undo()
    assert agg.to_arrow().num_rows == groups > 0


@settings(max_examples=60, deadline=None)
@given(
    keys=st.one_of(
        st.lists(st.binary(max_size=12), max_size=40),
        st.lists(st.text(max_size=6), max_size=40),
    ),
    partitions=st.integers(1, 3),
)
def test_arrow_keys_equal_the_listed_keys_for_any_keys(
    keys: list[bytes] | list[str], partitions: int
) -> None:
    # Empty keys, non-ASCII text and repeats: offsets and data hold exactly the keys.
    key_type = "str" if keys and isinstance(keys[0], str) else "bytes"
    store = NumericAggregateStore(partitions, key_type=key_type)  # type: ignore[arg-type]
    values = np.arange(len(keys), dtype=np.float64)
    for pid in range(partitions):
        with store.partition(pid) as part:
            part.fold(keys[pid::partitions], values[pid::partitions])
    table = store.to_arrow()
    assert table.column("key").to_pylist() == store.results()["key"]
    assert sorted(table.column("key").to_pylist()) == sorted(set(keys))


# -- the spilling aggregator --------------------------------------------------------------


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_spilling_to_arrow_equals_drain(key_type: str, spill: bool, tmp_path: Path) -> None:
    with _spilling(tmp_path, key_type, spill=spill) as agg:
        table = agg.to_arrow()
        assert agg.closed
    _assert_schema(table, key_type)
    with _spilling(tmp_path, key_type, spill=spill) as agg:
        drained = agg.drain()
    assert table.num_rows == len(drained["key"])
    assert _rows(table) == _rows(drained)
    with _spilling(tmp_path, key_type, spill=spill) as agg:
        frame = agg.to_polars()
    assert _rows(frame.to_arrow()) == _rows(drained)
    if key_type == "str":
        assert all(isinstance(k, str) for k in drained["key"])


# -- the pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
def test_pipeline_to_arrow_equals_results(key_type: str, tmp_path: Path) -> None:
    n = 6_000
    keys = _keys(key_type, n, 300)
    keys = keys if key_type == "int64" else np.array(keys)
    source = ArraySource("events", {"k": keys, "a": _values(n), "b": _values(n, seed=2)})
    with Pipeline(
        source, key="k", values=["a", "b"], partitions=2, store=f"file://{tmp_path}"
    ) as pipe:
        pipe.run()
        for value in ("a", "b"):
            table = pipe.to_arrow(value)
            _assert_schema(table, key_type)
            assert _rows(table) == _rows(pipe.results(value))
            assert _rows(pipe.to_polars(value).to_arrow()) == _rows(table)
        with pytest.raises(ValueError, match="name one of"):
            pipe.to_arrow()
        with pytest.raises(KeyError):
            pipe.to_arrow("c")


def test_pipeline_with_one_value_needs_no_name(tmp_path: Path) -> None:
    source = ArraySource("events", {"k": np.arange(100) % 7, "v": _values(100)})
    with Pipeline(source, key="k", values="v", partitions=2, store=f"file://{tmp_path}") as pipe:
        assert pipe.to_arrow().num_rows == 0  # nothing folded yet
        pipe.run()
        assert _rows(pipe.to_arrow()) == _rows(pipe.results("v"))
        assert pipe.to_polars().height == 7


# -- polars -------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_polars_round_trip(key_type: str) -> None:
    store = _store(key_type)
    frame = store.to_polars()
    assert frame.columns == list(STAT_COLUMNS)
    expected = {"int64": pl.Int64, "bytes": pl.Binary, "str": pl.String}[key_type]
    assert frame.schema["key"] == expected
    assert _rows(frame.to_arrow()) == _rows(store.to_arrow())
    pandas_keys = pd.Index(frame["key"].to_list())
    assert sorted(pandas_keys) == sorted(store.to_pandas().index)
