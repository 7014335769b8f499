"""Routing in C++ (issue 12): partition_batch, its stable hash, and native string keys.

Every representation of a string key (list of str, object array, numpy U, numpy S, Arrow
string arrays) routes and folds exactly like the list of its UTF-8 bytes.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamstate as ss
from streamstate.pipeline import route_partitions

pa = pytest.importorskip("pyarrow")

# Keys a numpy S array can hold as themselves: no trailing NUL (that is padding there).
_text_keys = st.lists(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=20,
    ),
    max_size=60,
)


def _representations(keys: list[str]) -> dict[str, Any]:
    encoded = [k.encode() for k in keys]
    width = max((len(b) for b in encoded), default=1) or 1
    return {
        "str-list": list(keys),
        "bytes-list": encoded,
        "object-array": np.array(keys, dtype=object),
        "numpy-U": np.array(keys, dtype=f"U{max((len(k) for k in keys), default=1) or 1}"),
        "numpy-S": np.array(encoded, dtype=f"S{width}"),
        "arrow-string": pa.array(keys, type=pa.string()),
        "arrow-large-string": pa.array(keys, type=pa.large_string()),
        "arrow-binary": pa.array(encoded, type=pa.binary()),
        "arrow-large-binary": pa.array(encoded, type=pa.large_binary()),
        "arrow-string-view": pa.array(keys, type=pa.string_view()),
    }


# ----------------------------------------------------------------------------------------
# The stable hash: pinned values (a change here moves every restored job's keys)


def test_known_answer_partitions() -> None:
    # Computed once from the core's seedless hash (hash.h, kStableSeed) and the routing
    # re-mix (partition_router.h); tests/cpp/test_partition_router.cpp pins the same.
    # With as many key groups as partitions a key's partition is its group, which is what
    # routing gave before key groups existed: the pre-key-group answers still hold.
    byte_keys = [b"", b"a", b"JFK-LAX", b"EWR-ORD", b"a somewhat longer key of 33 bytes"]
    assert route_partitions(byte_keys, 1000, key_groups=1000).tolist() == [59, 594, 39, 181, 943]
    int_keys = np.array([0, 1, 2, -1, 2**62], dtype=np.int64)
    assert route_partitions(int_keys, 1000, key_groups=1000).tolist() == [485, 162, 702, 926, 260]
    # The default 256 groups (partitions == groups gives each key's group), and the owners
    # of those groups for 4 partitions (which divides 256: as before key groups) and 3.
    assert route_partitions(byte_keys, 256).tolist() == [15, 152, 10, 46, 241]
    assert route_partitions(int_keys, 256).tolist() == [124, 41, 179, 237, 66]
    assert route_partitions(byte_keys, 4).tolist() == [0, 2, 0, 0, 3]
    assert route_partitions(int_keys, 4).tolist() == [1, 0, 2, 3, 1]
    assert route_partitions(byte_keys, 3).tolist() == [0, 1, 0, 0, 2]
    assert route_partitions(int_keys, 3).tolist() == [1, 0, 2, 2, 0]


def test_routing_is_stable_and_fair() -> None:
    keys = np.array([f"user-{i}" for i in range(20_000)], dtype="U12")
    parts = route_partitions(keys, 4)
    assert np.bincount(parts, minlength=4).min() > 4_000
    for i in range(0, 20_000, 1999):  # a key routes the same alone or in a batch
        assert route_partitions(keys[i : i + 1], 4)[0] == parts[i]


# ----------------------------------------------------------------------------------------
# partition_batch


@settings(max_examples=60, deadline=None)
@given(keys=_text_keys, partitions=st.integers(1, 9))
def test_every_representation_routes_like_its_bytes(keys: list[str], partitions: int) -> None:
    expected = route_partitions([k.encode() for k in keys], partitions)
    for name, rep in _representations(keys).items():
        got = route_partitions(rep, partitions)
        assert got.tolist() == expected.tolist(), name


@settings(max_examples=60, deadline=None)
@given(keys=_text_keys, partitions=st.integers(1, 9))
def test_every_row_lands_once_with_its_columns(keys: list[str], partitions: int) -> None:
    n = len(keys)
    rows = np.arange(n, dtype=np.int64)
    values = rows.astype(np.float64) * 0.5
    flags = (rows % 3).astype(np.int8)
    encoded = [k.encode() for k in keys]
    expected = route_partitions(encoded, partitions)
    for name, rep in _representations(keys).items():
        routed = ss.partition_batch(rep, partitions, rows, values, flags)
        assert len(routed) == partitions
        seen = []
        for p, (part_keys, part_rows, part_values, part_flags) in enumerate(routed):
            assert part_rows.dtype == np.int64 and part_flags.dtype == np.int8, name
            assert list(part_rows) == sorted(part_rows), name  # stable within a partition
            assert [bytes(k) for k in part_keys] == [encoded[r] for r in part_rows], name
            np.testing.assert_array_equal(part_values, values[part_rows])
            np.testing.assert_array_equal(part_flags, flags[part_rows])
            assert (expected[part_rows] == p).all(), name
            seen.extend(part_rows.tolist())
        assert sorted(seen) == list(range(n)), name


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=80), partitions=st.integers(1, 9))
def test_int_keys_route_by_value(keys: list[int], partitions: int) -> None:
    arr = np.array(keys, dtype=np.int64)
    routed = ss.partition_batch(arr, partitions, arr.astype(np.float64))
    total = 0
    for p, (part_keys, part_values) in enumerate(routed):
        assert part_keys.dtype == np.int64
        np.testing.assert_array_equal(part_values, part_keys.astype(np.float64))
        assert (route_partitions(part_keys, partitions) == p).all()
        total += len(part_keys)
    assert total == len(keys)
    # int32 keys and Python ints route like their int64 values.
    small = arr[(arr > -(2**31)) & (arr < 2**31)]
    assert (route_partitions(small.astype(np.int32), partitions) == route_partitions(small, partitions)).all()
    assert (route_partitions(small.tolist(), partitions) == route_partitions(small, partitions)).all()


def test_arrow_integer_keys_route_as_int64() -> None:
    ints = np.array([5, -3, 2**40, 7], dtype=np.int64)
    assert route_partitions(pa.array(ints), 5).tolist() == route_partitions(ints, 5).tolist()
    with pytest.raises(ValueError, match="keys hold nulls"):
        ss.partition_batch(pa.array([1, None]), 2)


def test_keys_ending_in_nul_come_back_as_bytes() -> None:
    keys = [b"a\x00", b"a", b"b\x00\x00"]
    routed = ss.partition_batch(keys, 1, np.arange(3))
    part_keys, _rows = routed[0]
    assert isinstance(part_keys, list) and part_keys == keys
    assert route_partitions([b"a\x00"], 97)[0] == route_partitions(pa.array([b"a\x00"]), 97)[0]


def test_sliced_arrow_arrays_are_read_from_their_offset() -> None:
    whole = pa.array(["x", "JFK-LAX", "a" * 40, "EWR-ORD", "y"])
    for typ in (pa.string(), pa.large_string(), pa.string_view()):
        sliced = whole.cast(typ).slice(1, 3)
        assert route_partitions(sliced, 13).tolist() == route_partitions(
            ["JFK-LAX", "a" * 40, "EWR-ORD"], 13
        ).tolist()


def test_partition_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"keys\[1\] is null"):
        ss.partition_batch(pa.array(["a", None]), 2)
    with pytest.raises(ValueError, match=r"keys\[1\] is None"):
        ss.partition_batch(["a", None], 2)
    with pytest.raises(TypeError, match="format 'g'"):
        ss.partition_batch(pa.array([1.5, 2.5]), 2)
    with pytest.raises(TypeError, match="int32 or int64"):
        ss.partition_batch(np.array([1.5, 2.5]), 2)
    with pytest.raises(ValueError, match="partitions must be in"):
        ss.partition_batch([b"a"], 0)
    with pytest.raises(TypeError, match="partitions must be an int"):
        ss.partition_batch([b"a"], "2")
    with pytest.raises(ValueError, match=r"columns\[0\] has 1 rows, keys have 2"):
        ss.partition_batch([b"a", b"b"], 2, np.zeros(1))
    with pytest.raises(TypeError, match="not dtype object"):
        ss.partition_batch([b"a"], 2, np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="not valid Unicode"):
        ss.partition_batch(np.array(["\ud800"], dtype="U1"), 2)


# ----------------------------------------------------------------------------------------
# Folding string keys natively


def _sorted_results(store: ss.NumericAggregateStore) -> dict[bytes, tuple[float, ...]]:
    r = store.results()
    return {
        k: (r["count"][i], r["sum"][i], r["min"][i], r["max"][i]) for i, k in enumerate(r["key"])
    }


@settings(max_examples=40, deadline=None)
@given(keys=_text_keys, data=st.data())
def test_fold_of_every_representation_equals_the_bytes_fold(keys: list[str], data: Any) -> None:
    values = np.array(
        data.draw(st.lists(st.floats(-1e6, 1e6), min_size=len(keys), max_size=len(keys))),
        dtype=np.float64,
    )
    reference = ss.NumericAggregateStore(1, key_type="bytes")
    with reference.partition(0) as part:
        part.fold([k.encode() for k in keys], values)
    for name, rep in _representations(keys).items():
        store = ss.NumericAggregateStore(1, key_type="bytes")
        with store.partition(0) as part:
            part.fold(rep, values)
        assert _sorted_results(store) == _sorted_results(reference), name
        spill = ss.SpillingAggregator(key_type="bytes")
        spill.accumulate_batch(rep, values)
        drained = spill.drain()
        assert sorted(drained["key"]) == sorted(_sorted_results(reference)), name


def test_fold_refuses_null_and_foreign_keys_without_folding() -> None:
    store = ss.NumericAggregateStore(1, key_type="bytes")
    part = store.partition(0)
    part.fold([b"kept"], [1.0])
    cases: list[tuple[Any, type[Exception], str]] = [
        (pa.array(["a", None]), ValueError, r"keys\[1\] is null"),
        (pa.array([b"a", None], type=pa.large_binary()), ValueError, r"keys\[1\] is null"),
        (np.array([b"a", None], dtype=object), ValueError, r"keys\[1\] is None"),
        (pa.array([1, 2]), TypeError, "numpy 'S' or 'U' array, a pyarrow string/binary"),
        (np.array([1.5, 2.5]), TypeError, "numpy 'S' or 'U' array"),
        (np.array([["a", "b"]]), ValueError, "one-dimensional"),
    ]
    for keys, error, match in cases:
        with pytest.raises(error, match=match):
            part.fold(keys, [1.0, 2.0])
    assert len(part) == 1 and part.pending == 1


# ----------------------------------------------------------------------------------------
# Interruptible


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
def test_ctrl_c_stops_a_long_fold_between_chunks(key_type: str) -> None:
    n = 24 * 2**20
    ints = np.random.default_rng(1).integers(0, 2**20, n)
    keys: Any = ints if key_type == "int64" else ints.astype("S8")
    values = np.ones(n)
    store = ss.NumericAggregateStore(1, key_type=key_type)
    part = store.partition(0)
    started = threading.Event()

    def interrupt() -> None:
        started.wait()
        threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            started.set()
            part.fold(keys, values)
    finally:
        timer.join()
    part.publish()
    folded = int(store.results()["count"].sum())
    # Stopped part-way, on a chunk boundary: the chunks before the signal stay folded.
    assert 0 < folded < n
    assert folded % 2**19 == 0


# ----------------------------------------------------------------------------------------
# Routed slices: routing's hashes reused by the fold


def _frame_results(store: ss.NumericAggregateStore, column: str | None = None) -> dict[Any, tuple[float, ...]]:
    r = store.results(column) if column is not None else store.results()
    return {
        k: (int(r["count"][i]), r["sum"][i], r["min"][i], r["max"][i], r["var"][i])
        for i, k in enumerate(r["key"])
    }


def _close(a: dict[Any, tuple[float, ...]], b: dict[Any, tuple[float, ...]]) -> bool:
    return a.keys() == b.keys() and all(
        np.allclose(a[k], b[k], rtol=1e-9, atol=1e-9, equal_nan=True) for k in a
    )


@settings(max_examples=50, deadline=None)
@given(keys=_text_keys, partitions=st.integers(1, 5), data=st.data())
def test_slices_hold_what_partition_batch_routes(keys: list[str], partitions: int, data: Any) -> None:
    n = len(keys)
    a = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)), dtype=np.float64)
    b = np.arange(n, dtype=np.int32)  # cast to float64 in the slice's block
    encoded = [k.encode() for k in keys]
    plain = ss.partition_batch(encoded, partitions, a, b)
    for name, rep in _representations(keys).items():
        slices = ss.partition_batch(rep, partitions, a, b, as_slices=True)
        assert len(slices) == partitions, name
        for s, (part_keys, part_a, part_b) in zip(slices, plain, strict=True):
            assert isinstance(s, ss.RoutedSlice) and s.width == 2
            if keys:  # an empty list holds no key to tell its type by: it routes as int64
                assert s.key_type == "bytes", name
            assert len(s) == len(part_a), name
            assert [bytes(k) for k in s.keys] == [bytes(k) for k in part_keys], name
            np.testing.assert_array_equal(s.values, np.column_stack([part_a, part_b]).reshape(-1, 2))
            assert "rows=" in repr(s)


@settings(max_examples=50, deadline=None)
@given(
    keys=st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5), max_size=120),
    partitions=st.integers(1, 4),
    policy=st.sampled_from(["skip", "propagate"]),
    data=st.data(),
)
def test_folding_slices_equals_folding_the_rows(
    keys: list[int], partitions: int, policy: str, data: Any
) -> None:
    import pandas as pd

    n = len(keys)
    values = st.floats(-1e6, 1e6) | st.just(float("nan"))
    block = np.array(
        data.draw(st.lists(st.tuples(values, values), min_size=n, max_size=n)), dtype=np.float64
    ).reshape(n, 2)
    karr = np.array(keys, dtype=np.int64)
    names = ["a", "b"]
    sliced = ss.NumericAggregateStore(partitions, values=names, nan_policy=policy)
    folded = ss.NumericAggregateStore(partitions, values=names, nan_policy=policy)
    slices = ss.partition_batch(karr, partitions, block[:, 0], block[:, 1], as_slices=True)
    plain = ss.partition_batch(karr, partitions, block[:, 0], block[:, 1])
    for p in range(partitions):
        with sliced.partition(p) as part:
            part.fold_slice(slices[p])
        part_keys, col_a, col_b = plain[p]
        with folded.partition(p) as part:
            part.fold(part_keys, np.column_stack([col_a, col_b]).reshape(-1, 2))
    for name in names:
        got, want = _frame_results(sliced, name), _frame_results(folded, name)
        assert _close(got, want), name
    if policy == "skip":  # the one column against a pandas group-by
        frame = pd.DataFrame({"k": karr, "v": block[:, 0]}).dropna()
        expected = frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "var"])
        got = {k: v for k, v in _frame_results(sliced, "a").items() if v[0] > 0}
        want = {k: (int(r["count"]), r["sum"], r["min"], r["max"], r["var"]) for k, r in expected.iterrows()}
        assert _close(got, want)


@settings(max_examples=30, deadline=None)
@given(keys=_text_keys, data=st.data())
def test_folding_byte_slices_equals_folding_the_rows(keys: list[str], data: Any) -> None:
    n = len(keys)
    values = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)), dtype=np.float64)
    sliced = ss.NumericAggregateStore(2, key_type="bytes")
    folded = ss.NumericAggregateStore(2, key_type="bytes")
    for p, s in enumerate(ss.partition_batch(np.array(keys, dtype=object), 2, values, as_slices=True)):
        with sliced.partition(p) as part:
            part.fold_slice(s)
            part.fold_slice(s)  # twice: the second finds every key the first inserted
        with folded.partition(p) as part:
            part.fold(s.keys, s.values[:, 0])
            part.fold(s.keys, s.values[:, 0])
    assert _close(_frame_results(sliced), _frame_results(folded))


def test_fold_slice_rejects_what_it_cannot_fold() -> None:
    store = ss.NumericAggregateStore(1, values=["a", "b"], nan_policy="raise")
    part = store.partition(0)
    (wide,) = ss.partition_batch(np.array([1, 2]), 1, [1.0, 2.0], [3.0, 4.0], as_slices=True)
    (narrow,) = ss.partition_batch(np.array([1, 2]), 1, [1.0, 2.0], as_slices=True)
    (text,) = ss.partition_batch([b"x", b"y"], 1, [1.0, 2.0], [3.0, 4.0], as_slices=True)
    (poisoned,) = ss.partition_batch(np.array([7, 8]), 1, [1.0, np.nan], [3.0, 4.0], as_slices=True)
    with pytest.raises(TypeError, match="must be a RoutedSlice"):
        part.fold_slice((np.array([1]), np.array([[1.0, 2.0]])))
    with pytest.raises(TypeError, match="bytes keys, the store's key_type is 'int64'"):
        part.fold_slice(text)
    with pytest.raises(ValueError, match="carries 1 value columns, the store folds 2"):
        part.fold_slice(narrow)
    with pytest.raises(ValueError, match="NaN"):
        part.fold_slice(poisoned)
    assert part.pending == 0  # nothing from a refused slice was folded
    part.fold_slice(wide)
    assert part.pending == 2
    with pytest.raises(TypeError, match="as_slices must be a bool"):
        ss.partition_batch(np.array([1]), 1, [1.0], as_slices=1)
    with pytest.raises(ValueError, match="at least one value column"):
        ss.partition_batch(np.array([1]), 1, as_slices=True)
    with pytest.raises(TypeError, match="must be numeric"):
        ss.partition_batch(np.array([1]), 1, np.array(["x"]), as_slices=True)
