"""Tests for several value columns in one NumericAggregateStore (issue 12): a store of M
named columns folds (n, M) blocks with one probe per key and must give, column by column,
exactly what M one-column stores fed those columns give."""

from __future__ import annotations

import struct
from dataclasses import astuple
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamstate as ss
from streamstate.codec import decode_records

NAMES = ["a", "b", "c", "d"]

# Values that exercise every branch of the fold: ordinary, NaN, both infinities, huge.
_value = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 0.0]),
)


def _keys(key_type: str, raw: list[int]) -> Any:
    if key_type == "int64":
        return np.asarray(raw, dtype=np.int64)
    return [b"k%d" % k for k in raw]


def _sorted(columns: dict[str, Any]) -> dict[str, Any]:
    keys = columns["key"]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    out: dict[str, Any] = {"key": [keys[i] for i in order]}
    for name, column in columns.items():
        if name != "key":
            out[name] = np.asarray(column)[order]
    return out


def _assert_same_results(a: dict[str, Any], b: dict[str, Any]) -> None:
    a, b = _sorted(a), _sorted(b)
    assert list(a) == list(b)
    assert a["key"] == b["key"]
    for name in a:
        if name != "key":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@st.composite
def _batches(draw: st.DrawFn) -> tuple[int, list[tuple[int, list[int], np.ndarray, bool]]]:
    width = draw(st.integers(1, 4))
    batches = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(0, 40))
        keys = draw(st.lists(st.integers(-5, 12), min_size=n, max_size=n))
        values = draw(st.lists(_value, min_size=n * width, max_size=n * width))
        block = np.asarray(values, dtype=np.float64).reshape(n, width)
        batches.append((draw(st.integers(0, 1)), keys, block, draw(st.booleans())))
    return width, batches


@settings(max_examples=60)
@given(
    data=_batches(),
    key_type=st.sampled_from(["int64", "bytes"]),
    nan_policy=st.sampled_from(["skip", "propagate"]),
)
def test_columns_equal_one_column_stores(
    data: tuple[int, list[tuple[int, list[int], np.ndarray, bool]]], key_type: str, nan_policy: str
) -> None:
    width, batches = data
    names = NAMES[:width]
    wide = ss.NumericAggregateStore(2, key_type=key_type, nan_policy=nan_policy, values=names)
    singles = [ss.NumericAggregateStore(2, key_type=key_type, nan_policy=nan_policy) for _ in names]
    for pid, raw, block, publish in batches:
        wide.partition(pid).fold(_keys(key_type, raw), block)
        for c, single in enumerate(singles):
            single.partition(pid).fold(_keys(key_type, raw), block[:, c].copy())
        if publish:
            wide.partition(pid).publish()
            for single in singles:
                single.partition(pid).publish()
    for name, single in zip(names, singles, strict=True):
        if width == 1:
            _assert_same_results(wide.results(), single.results())
        _assert_same_results(wide.results(name), single.results())
        for key in set(_keys(key_type, [k for _, raw, _, _ in batches for k in raw])):
            expected = single.result(key)
            got = wide.result(key, name)
            assert (got is None) == (expected is None)
            if got is not None and expected is not None:
                np.testing.assert_array_equal(
                    np.array(astuple(got), dtype=float), np.array(astuple(expected), dtype=float)
                )


@settings(max_examples=40)
@given(data=_batches(), key_type=st.sampled_from(["int64", "bytes"]))
def test_snapshot_restore_roundtrip(
    data: tuple[int, list[tuple[int, list[int], np.ndarray, bool]]], key_type: str
) -> None:
    width, batches = data
    names = NAMES[:width]
    store = ss.NumericAggregateStore(2, key_type=key_type, values=names)
    for pid, raw, block, publish in batches:
        store.partition(pid).fold(_keys(key_type, raw), block)
        if publish:
            store.partition(pid).publish()
    snap = store.snapshot()
    copy = ss.NumericAggregateStore(2, key_type=key_type, values=names)
    copy.restore(snap)
    assert copy.snapshot() == snap
    # Local (unpublished) partials came back too: publishing both gives the same results.
    for s in (store, copy):
        s.partition(0).publish()
        s.partition(1).publish()
    for name in names:
        _assert_same_results(copy.results(name), store.results(name))


@settings(max_examples=40)
@given(
    data=_batches(),
    key_type=st.sampled_from(["int64", "bytes"]),
    capture_after=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_full_and_delta_chain_roundtrip(
    data: tuple[int, list[tuple[int, list[int], np.ndarray, bool]]],
    key_type: str,
    capture_after: list[bool],
) -> None:
    width, batches = data
    names = NAMES[:width]
    store = ss.NumericAggregateStore(2, key_type=key_type, values=names)
    replica = ss.NumericAggregateStore(2, key_type=key_type, values=names)
    replica.restore(store.snapshot())
    for (pid, raw, block, publish), capture in zip(batches, capture_after, strict=False):
        store.partition(pid).fold(_keys(key_type, raw), block)
        if publish:
            store.partition(pid).publish()
        if capture:
            replica.apply_delta(store.snapshot_delta())
    replica.apply_delta(store.snapshot_delta())
    assert replica.snapshot() == store.snapshot()
    for name in names:
        _assert_same_results(replica.results(name), store.results(name))


def _folded_store() -> ss.NumericAggregateStore:
    store = ss.NumericAggregateStore(2, values=["dep_delay", "arr_delay"])
    part = store.partition(0)
    part.fold(np.array([1, 2, 1]), np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0]]))
    part.publish()
    store.partition(1).fold(np.array([2]), np.array([[np.nan, 5.0]]))
    return store


def test_each_column_keeps_its_own_count_under_skip() -> None:
    store = _folded_store()
    store.partition(1).publish()
    dep = store.result(2, "dep_delay")
    arr = store.result(2, "arr_delay")
    assert dep is not None and arr is not None
    assert (dep.count, dep.sum) == (1, 2.0)
    assert (arr.count, arr.sum) == (1, 5.0)
    both = store.result(1)
    assert isinstance(both, dict)
    assert both["dep_delay"] is not None and both["dep_delay"].count == 2
    assert both["arr_delay"] is not None and both["arr_delay"].mean == 20.0
    assert store.result(99) is None


def test_all_nan_row_creates_no_key_and_missing_column_is_absent() -> None:
    store = ss.NumericAggregateStore(1, values=["x", "y"])
    part = store.partition(0)
    part.fold(np.array([1, 2]), np.array([[np.nan, np.nan], [np.nan, 4.0]]))
    part.publish()
    assert len(store) == 1
    assert store.result(1) is None
    assert store.result(2, "x") is None
    assert list(store.results("x")["key"]) == []
    assert list(store.results("y")["key"]) == [2]


def test_value_forms_agree() -> None:
    keys = np.array([5, 6, 5, 7])
    block = np.arange(8, dtype=np.float64).reshape(4, 2)
    forms = [
        block,
        np.asfortranarray(block),  # not C-contiguous: converted
        np.arange(8).reshape(4, 2),  # integers: cast to float64
        {"arr_delay": block[:, 1], "dep_delay": block[:, 0]},  # any order of names
    ]
    snaps = []
    for form in forms:
        store = ss.NumericAggregateStore(1, values=["dep_delay", "arr_delay"])
        store.partition(0).fold(keys, form)
        snaps.append(store.snapshot())
    assert all(s == snaps[0] for s in snaps)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.ones((3, 3)), "3 columns"),
        (np.ones(3), "one-dimensional"),
        (np.ones((3, 2, 1)), "dimensions"),
        ({"dep_delay": np.ones(3)}, "missing: 'arr_delay'"),
        ({"dep_delay": np.ones(3), "arr_delay": np.ones(3), "x": np.ones(3)}, "unknown: 'x'"),
        ({"dep_delay": np.ones(3), "arr_delay": np.ones(2)}, "has 2 values"),
        (np.array([[1.0, 2.0], [np.nan, 1.0], [1.0, 1.0]]), "NaN value at row 1, column 0"),
        (np.ones((2, 2)), "differ in length"),
    ],
)
def test_bad_values_raise_and_fold_nothing(values: Any, match: str) -> None:
    store = ss.NumericAggregateStore(1, nan_policy="raise", values=["dep_delay", "arr_delay"])
    part = store.partition(0)
    part.fold(np.array([9]), np.array([[1.0, 2.0]]))
    before = store.snapshot()
    with pytest.raises(ValueError, match=match):
        part.fold(np.array([1, 2, 3]), values)
    assert store.snapshot() == before


def test_mapping_into_unnamed_store_raises() -> None:
    store = ss.NumericAggregateStore(1)
    with pytest.raises(ValueError, match="unnamed"):
        store.partition(0).fold(np.array([1]), {"x": np.ones(1)})
    assert store.partition(0).pending == 0


@pytest.mark.parametrize(
    ("values", "error"),
    [([], ValueError), (["a", "a"], ValueError), (["a", ""], ValueError), ("ab", TypeError), ([1], TypeError)],
)
def test_bad_value_names(values: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        ss.NumericAggregateStore(1, values=values)


def test_results_need_a_column_when_several() -> None:
    store = _folded_store()
    with pytest.raises(ValueError, match="dep_delay"):
        store.results()
    with pytest.raises(ValueError, match="unknown value column 'nope'"):
        store.results("nope")
    with pytest.raises(TypeError, match="column must be a str"):
        store.result(1, 0)  # type: ignore[arg-type]


def test_to_pandas_and_to_arrow_with_several_columns() -> None:
    store = _folded_store()
    store.partition(1).publish()
    frame = store.to_pandas().sort_index()
    assert list(frame.columns.names) == ["value", "stat"]
    assert frame[("dep_delay", "count")].tolist() == [2, 1]
    assert frame[("arr_delay", "sum")].tolist() == [40.0, 5.0]
    expected = pd.DataFrame({"v": [1.0, 3.0]}).groupby(np.array([1, 1]))["v"].var()
    assert frame.loc[1, ("dep_delay", "var")] == pytest.approx(expected.iloc[0])
    one = store.to_pandas("arr_delay")
    assert list(one.columns) == ["count", "sum", "min", "max", "mean", "var", "std"]
    pa = pytest.importorskip("pyarrow")
    table = store.to_arrow()
    assert table.column_names[:3] == ["key", "dep_delay_count", "dep_delay_sum"]
    assert table.column_names[-1] == "arr_delay_std"
    assert table.schema.field("arr_delay_count").type == pa.int64()
    only = store.to_arrow("dep_delay")
    assert only.column_names == ["key", "count", "sum", "min", "max", "mean", "var", "std"]
    assert sorted(only.column("key").to_pylist()) == [1, 2]


def test_to_arrow_column_leaves_out_keys_without_values() -> None:
    pytest.importorskip("pyarrow")
    store = ss.NumericAggregateStore(1, key_type="str", values=["x", "y"])
    store.partition(0).fold(["p", "q"], np.array([[1.0, np.nan], [2.0, 3.0]]))
    store.partition(0).publish()
    assert store.to_arrow("y").column("key").to_pylist() == ["q"]
    assert sorted(store.to_arrow("x").column("key").to_pylist()) == ["p", "q"]
    assert sorted(store.results("x")["key"]) == ["p", "q"]  # type: ignore[type-var]


def _header_version(snapshot: bytes) -> int:
    _, records = decode_records(snapshot)
    return int(struct.unpack_from("<I", records[0][1])[0])


def test_layouts_and_column_mismatches() -> None:
    plain = ss.NumericAggregateStore(2)
    plain.partition(0).fold(np.array([1]), np.array([1.0]))
    # Layout 4 (sectioned by key group) for every store since key groups; the layouts 2
    # (one unnamed column) and 3 (named columns) before it still restore, as
    # tests/test_key_groups.py checks with snapshots built byte by byte.
    assert _header_version(plain.snapshot()) == 4
    named = ss.NumericAggregateStore(2, values=["x"])
    named.partition(0).fold(np.array([1]), np.array([1.0]))
    assert _header_version(named.snapshot()) == 4
    wide = _folded_store()
    wide_snap = wide.snapshot()
    assert _header_version(wide_snap) == 4
    for target in (
        ss.NumericAggregateStore(2),
        ss.NumericAggregateStore(2, values=["arr_delay", "dep_delay"]),
        ss.NumericAggregateStore(2, values=["dep_delay"]),
    ):
        width = len(target.columns)
        target.partition(0).fold(np.array([4]), np.ones((1, width)) if width else np.ones(1))
        before = target.snapshot()
        with pytest.raises(ss.CorruptDataError, match="value columns"):
            target.restore(wide_snap)
        assert target.snapshot() == before
    with pytest.raises(ss.CorruptDataError, match="value columns"):
        wide.restore(plain.snapshot())
    # A delta names its columns too.
    replica = ss.NumericAggregateStore(2, values=["dep_delay", "arr_delay"])
    replica.restore(wide_snap)
    wide.partition(1).publish()
    delta = wide.snapshot_delta()
    other = ss.NumericAggregateStore(2, values=["dep_delay", "other"])
    with pytest.raises(ss.CorruptDataError, match="value columns"):
        other.apply_delta(delta)
    replica.apply_delta(delta)
    assert replica.snapshot() == wide.snapshot()


def test_truncated_wide_snapshot_is_corrupt() -> None:
    snap = _folded_store().snapshot()
    store = ss.NumericAggregateStore(2, values=["dep_delay", "arr_delay"])
    for cut in (len(snap) // 2, len(snap) - 3):
        with pytest.raises(ss.CorruptDataError):
            store.restore(snap[:cut])
    assert len(store) == 0


def test_repr_and_values_property() -> None:
    store = _folded_store()
    assert store.values == ["dep_delay", "arr_delay"]
    assert store.columns == ["dep_delay", "arr_delay"]
    assert "values=['dep_delay', 'arr_delay']" in repr(store)
    plain = ss.NumericAggregateStore(1)
    assert plain.values is None
    assert "values" not in repr(plain)


@pytest.mark.parametrize("nan_policy", ["skip", "propagate"])
def test_big_tables_fold_shard_by_shard_like_one_column_stores(nan_policy: str) -> None:
    # Past ~400K keys a partition folds big batches shard by shard (scattered first).
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 600_000, 1_000_000, dtype=np.int64)
    block = rng.standard_normal((len(keys), 2))
    block[rng.random(block.shape) < 0.05] = np.nan
    block[::97] = np.nan  # whole rows of NaN
    wide = ss.NumericAggregateStore(1, nan_policy=nan_policy, values=["x", "y"])
    singles = [ss.NumericAggregateStore(1, nan_policy=nan_policy) for _ in range(2)]
    wide.partition(0).fold(keys, block)
    for c, single in enumerate(singles):
        single.partition(0).fold(keys, block[:, c].copy())
    assert wide.partition(0).pending > 400_000
    wide.partition(0).fold(keys, block)  # the table is big now: the scattered path
    for c, single in enumerate(singles):
        single.partition(0).fold(keys, block[:, c].copy())
    wide.partition(0).publish()
    for single in singles:
        single.partition(0).publish()
    for name, single in zip(["x", "y"], singles, strict=True):
        _assert_same_results(wide.results(name), single.results())
