"""Tests for the cross-partition aggregate stores (issue 3)."""

from __future__ import annotations

import itertools
import math
import struct
import threading
import time
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamstate as ss
from streamstate import _core
from streamstate.codec import RecordKind, decode_records, encode_records
from streamstate.stats import Stats
from streamstate.testing import assert_snapshot_roundtrip, run_operations, store_operations

# ----------------------------------------------------------------------------------------
# Opaque store: the reference design's behaviours


def test_publish_and_get() -> None:
    store = ss.AggregateStore(4)
    store.publish(b"group1", 0, b"partial_0")
    assert store.get_partial(b"group1", 0) == b"partial_0"
    assert store.get_partial(b"group1", 1) is None
    assert store.get_partial(b"group2", 0) is None


def test_overwrite_partial() -> None:
    store = ss.AggregateStore(2)
    store.publish(b"key", 0, b"v1")
    store.publish(b"key", 0, b"v2")
    assert store.get_partial(b"key", 0) == b"v2"
    assert len(store) == 1


def test_collect_partials_with_gaps_in_partition_order() -> None:
    store = ss.AggregateStore(3)
    store.publish(b"g", 2, b"p2")
    store.publish(b"g", 0, b"p0")
    assert store.collect_partials(b"g") == [(0, b"p0"), (2, b"p2")]
    assert store.collect_partials(b"missing") == []


def test_remove_group() -> None:
    store = ss.AggregateStore(2)
    store.publish(b"g1", 0, b"a")
    store.publish(b"g1", 1, b"b")
    store.publish(b"g2", 0, b"c")
    assert len(store) == 3
    assert store.remove_group(b"g1") == 2
    assert store.get_partial(b"g1", 0) is None
    assert store.get_partial(b"g1", 1) is None
    assert store.get_partial(b"g2", 0) == b"c"
    assert store.groups() == [b"g2"]
    assert len(store) == 1
    assert store.remove_group(b"g1") == 0


def test_empty_store() -> None:
    store = ss.AggregateStore(4)
    assert store.is_empty()
    assert len(store) == 0
    assert store.num_partitions == 4
    assert store.groups() == []
    assert repr(store) == "AggregateStore(num_partitions=4, entries=0)"


def test_snapshot_and_restore_into_fresh_store() -> None:
    store = ss.AggregateStore(3)
    store.publish(b"g1", 0, b"p0")
    store.publish(b"g1", 1, b"p1")
    store.publish(b"g2", 2, b"p2")
    fresh = ss.AggregateStore(3)
    fresh.restore(store.snapshot())
    assert len(fresh) == 3
    assert fresh.get_partial(b"g1", 0) == b"p0"
    assert fresh.get_partial(b"g1", 1) == b"p1"
    assert fresh.get_partial(b"g2", 2) == b"p2"
    assert fresh.groups() == [b"g1", b"g2"]
    assert fresh.snapshot() == store.snapshot()


def test_restore_clears_existing() -> None:
    store = ss.AggregateStore(2)
    store.publish(b"old", 0, b"v")
    store.restore(ss.AggregateStore(2).snapshot())
    assert store.is_empty()
    assert store.get_partial(b"old", 0) is None
    assert store.groups() == []


def test_groups_sorted_and_binary_safe() -> None:
    store = ss.AggregateStore(2)
    for key in (b"b", b"\x00", b"a\x00b", b"", b"a"):
        store.publish(key, 1, key + b"!")
    assert store.groups() == sorted([b"b", b"\x00", b"a\x00b", b"", b"a"])
    assert store.get_partial(b"", 1) == b"!"


def test_snapshot_is_deterministic_regardless_of_publish_order() -> None:
    a, b = ss.AggregateStore(3), ss.AggregateStore(3)
    items = [(f"k{i}".encode(), i % 3, f"v{i}".encode()) for i in range(200)]
    for key, pid, value in items:
        a.publish(key, pid, value)
    for key, pid, value in reversed(items):
        b.publish(key, pid, value)
    assert a.snapshot() == b.snapshot()
    kind, records = decode_records(a.snapshot())
    assert kind == RecordKind.AGGREGATE_STORE
    assert len(records) == 201  # a header plus one record per entry


@pytest.mark.parametrize("pid", [-1, 2, 2**40])
def test_partition_id_out_of_range(pid: int) -> None:
    store = ss.AggregateStore(2)
    with pytest.raises(ValueError, match="partition_id"):
        store.publish(b"k", pid, b"v")
    with pytest.raises(ValueError, match="partition_id"):
        store.publish_many(pid, [b"k"], [b"v"])
    with pytest.raises(ValueError, match="partition_id"):
        store.get_partial(b"k", pid)
    assert store.is_empty()


@pytest.mark.parametrize("n", [0, -3, 65537])
def test_num_partitions_must_be_positive(n: int) -> None:
    with pytest.raises(ValueError, match="num_partitions"):
        ss.AggregateStore(n)
    with pytest.raises(ValueError, match="num_partitions"):
        ss.NumericAggregateStore(n)


def test_publish_many() -> None:
    store = ss.AggregateStore(2)
    store.publish_many(1, [b"a", b"b", b"a"], [b"1", bytearray(b"2"), memoryview(b"3")])
    assert store.get_partial(b"a", 1) == b"3"  # last one wins within a call
    assert store.get_partial(b"b", 1) == b"2"
    assert len(store) == 2


def test_publish_many_rejects_bad_input_without_publishing() -> None:
    store = ss.AggregateStore(2)
    with pytest.raises(ValueError, match="2 keys but 1 partials"):
        store.publish_many(0, [b"a", b"b"], [b"1"])
    with pytest.raises(TypeError, match=r"keys\[1\]"):
        store.publish_many(0, [b"a", "b"], [b"1", b"2"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single"):
        store.publish_many(0, b"ab", [b"1", b"2"])
    assert store.is_empty()


def _forge(kind: int, records: list[tuple[bytes, bytes]]) -> bytes:
    return encode_records(kind, records)


def _opaque_header(num_partitions: int) -> tuple[bytes, bytes]:
    return (b"streamstate.aggregate_store", struct.pack("<II", 1, num_partitions))


def _entry(group: bytes, pid: int, partial: bytes) -> tuple[bytes, bytes]:
    return (group + struct.pack("<I", pid), partial)


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda good: good[:-1], id="truncated"),
        pytest.param(lambda good: good[:20] + bytes([good[20] ^ 1]) + good[21:], id="bit-flip"),
        pytest.param(lambda good: b"", id="empty"),
        pytest.param(lambda good: ss.NumericAggregateStore(2).snapshot(), id="wrong-kind"),
        pytest.param(
            lambda good: _forge(1, [_opaque_header(2), _entry(b"g", 5, b"x")]), id="partition"
        ),
        pytest.param(
            lambda good: _forge(
                1, [_opaque_header(2), _entry(b"g", 0, b"x"), _entry(b"g", 0, b"y")]
            ),
            id="duplicate",
        ),
        pytest.param(lambda good: _forge(1, [_entry(b"g", 0, b"x")]), id="no-header"),
        pytest.param(lambda good: _forge(1, [_opaque_header(2), (b"abc", b"x")]), id="short-key"),
        pytest.param(
            lambda good: _forge(1, [(b"streamstate.aggregate_store", struct.pack("<II", 9, 2))]),
            id="version",
        ),
    ],
)
def test_restore_rejects_bad_snapshots_and_keeps_contents(make_bad) -> None:  # type: ignore[no-untyped-def]
    store = ss.AggregateStore(2)
    store.publish(b"keep", 1, b"me")
    good = store.snapshot()
    with pytest.raises(ss.CorruptDataError):
        store.restore(make_bad(good))
    assert store.snapshot() == good
    assert store.get_partial(b"keep", 1) == b"me"
    assert store.groups() == [b"keep"]


def test_restore_snapshot_from_larger_store_with_ids_in_range() -> None:
    big = ss.AggregateStore(8)
    big.publish(b"g", 1, b"x")
    small = ss.AggregateStore(2)
    small.restore(big.snapshot())  # every id fits: accepted
    assert small.collect_partials(b"g") == [(1, b"x")]
    big.publish(b"g", 7, b"y")
    with pytest.raises(ss.CorruptDataError, match="partition id 7"):
        small.restore(big.snapshot())
    assert small.collect_partials(b"g") == [(1, b"x")]


@given(
    st.dictionaries(
        st.tuples(st.binary(max_size=12), st.integers(0, 4)), st.binary(max_size=40), max_size=40
    )
)
def test_snapshot_round_trip_property(entries: dict[tuple[bytes, int], bytes]) -> None:
    store = ss.AggregateStore(5)
    for (group, pid), partial in entries.items():
        store.publish(group, pid, partial)
    restored = ss.AggregateStore(5)
    restored.publish(b"junk", 0, b"gone after restore")
    restored.restore(store.snapshot())
    assert len(restored) == len(entries)
    for (group, pid), partial in entries.items():
        assert restored.get_partial(group, pid) == partial
    assert restored.groups() == sorted({group for group, _ in entries})
    for group in {group for group, _ in entries}:
        expected = sorted((pid, p) for (g, pid), p in entries.items() if g == group)
        assert restored.collect_partials(group) == expected


def _snapshot_until_distinct(
    take,
    workers: list[threading.Thread],
    stop: threading.Event,
    wanted: int,
    budget_s: float = 20.0,
) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Snapshots while the workers run, until `wanted` different snapshots were seen."""
    snapshots: list[bytes] = []
    distinct: set[bytes] = set()
    deadline = time.monotonic() + budget_s
    try:
        while len(distinct) < wanted and time.monotonic() < deadline:
            snap = take()
            snapshots.append(snap)
            distinct.add(snap)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert len(distinct) >= wanted, f"only {len(distinct)} distinct snapshots interleaved"
    return snapshots


def test_threads_publish_many_while_snapshotting() -> None:
    """4 publishers overwrite their keys batch after batch; every snapshot taken meanwhile
    must show each publish_many call entirely or not at all: all of a thread's keys carry
    the same batch number. The final state equals a serial run's."""
    threads, width = 4, 50
    store = ss.AggregateStore(threads)
    stop = threading.Event()
    done = [0] * threads
    errors: list[Exception] = []

    def publisher(pid: int) -> None:
        try:
            keys = [f"t{pid}k{i}".encode() for i in range(width)]
            while not stop.is_set():
                store.publish_many(pid, keys, [str(done[pid]).encode()] * width)
                done[pid] += 1
        except Exception as exc:  # noqa: BLE001 - asserted empty by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=publisher, args=(pid,)) for pid in range(threads)]
    for worker in workers:
        worker.start()
    snapshots = _snapshot_until_distinct(store.snapshot, workers, stop, wanted=20)
    assert not errors
    for snap in snapshots:
        view = ss.AggregateStore(threads)
        view.restore(snap)
        for pid in range(threads):
            versions = {view.get_partial(f"t{pid}k{i}".encode(), pid) for i in range(width)}
            assert len(versions) == 1, (
                f"torn publish_many in a snapshot: {sorted(versions, key=str)}"
            )

    serial = ss.AggregateStore(threads)
    for pid in range(threads):
        keys = [f"t{pid}k{i}".encode() for i in range(width)]
        for batch in range(done[pid]):
            serial.publish_many(pid, keys, [str(batch).encode()] * width)
    assert store.snapshot() == serial.snapshot()


def test_threads_publish_and_remove_group_stay_consistent() -> None:
    store = ss.AggregateStore(4)
    start = threading.Barrier(5)

    def publisher(pid: int) -> None:
        start.wait()
        for round_ in range(200):
            store.publish_many(pid, [b"shared", f"own{pid}".encode()], [b"x", str(round_).encode()])

    def remover() -> None:
        start.wait()
        for _ in range(200):
            store.remove_group(b"shared")

    workers = [threading.Thread(target=publisher, args=(p,)) for p in range(4)]
    workers.append(threading.Thread(target=remover))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    # Whatever the interleaving, groups(), len() and collect_partials() agree.
    partials = store.collect_partials(b"shared")
    assert len(store) == 4 + len(partials)
    assert store.groups() == sorted(
        [b"shared"] * bool(partials) + [f"own{p}".encode() for p in range(4)]
    )
    for pid in range(4):
        assert store.get_partial(f"own{pid}".encode(), pid) == b"199"


# ----------------------------------------------------------------------------------------
# Numeric store


def _groupby(keys: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"k": keys, "v": values})
    return frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "mean", "var", "std"])


def test_fold_publish_result() -> None:
    store = ss.NumericAggregateStore(2)
    p0, p1 = store.partition(0), store.partition(1)
    p0.fold(np.array([1, 2, 1], dtype=np.int64), np.array([1.0, 2.0, 3.0]))
    assert store.result(1) is None  # nothing published yet
    assert p0.pending == 2
    assert p0.publish() == 2
    assert p0.pending == 0
    p1.fold(np.array([1]), [10.0])
    p1.publish()
    stats = store.result(1)
    assert isinstance(stats, Stats)
    values = np.array([1.0, 3.0, 10.0])
    assert stats.count == 3
    assert stats.sum == pytest.approx(14.0)
    assert (stats.min, stats.max) == (1.0, 10.0)
    assert stats.mean == pytest.approx(values.mean())
    assert stats.var == pytest.approx(values.var(ddof=1))
    assert stats.std == pytest.approx(values.std(ddof=1))
    single = store.result(2)
    assert single is not None and single.count == 1 and math.isnan(single.var)
    assert store.result(99) is None
    assert store.result(2**80) is None  # beyond int64: cannot be a key
    assert store.result(-(2**63)) is None
    assert len(store) == 2
    assert len(p0) == 2 and len(p1) == 1
    assert repr(p0) == "PartitionAggregator(partition_id=0, keys=2, pending=0)"


def test_publish_pushes_only_changed_keys() -> None:
    store = ss.NumericAggregateStore(1)
    part = store.partition(0)
    part.fold(np.arange(1000), np.ones(1000))
    assert part.publish() == 1000
    assert part.publish() == 0
    part.fold(np.array([5, 7, 5, 1000]), np.ones(4))
    assert part.pending == 3
    assert part.publish() == 3
    r5, r1000 = store.result(5), store.result(1000)
    assert r5 is not None and r5.count == 3
    assert r1000 is not None and r1000.count == 1


def test_partition_context_manager_publishes_on_clean_exit() -> None:
    store = ss.NumericAggregateStore(1)
    with store.partition(0) as part:
        part.fold([1, 2], [1.0, 2.0])
    assert len(store) == 2
    with pytest.raises(RuntimeError), store.partition(0) as part:
        part.fold([3], [1.0])
        raise RuntimeError("boom")
    assert len(store) == 2  # not published after an exception
    assert store.partition(0).pending == 1


def test_integer_key_dtypes() -> None:
    store = ss.NumericAggregateStore(1)
    part = store.partition(0)
    part.fold(np.array([1, 2], dtype=np.int32), [1.0, 2.0])
    part.fold(np.array([1], dtype=np.uint16), np.array([3], dtype=np.float32))
    part.fold([2**62], [4])  # a list of Python ints, integer values
    part.fold(np.array([], dtype=np.int64), np.array([]))
    part.fold([], [])
    part.publish()
    r1 = store.result(1)
    assert r1 is not None and r1.count == 2 and r1.sum == 4.0
    assert store.result(np.int64(2**62)) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "values", "error", "match"),
    [
        (np.array([1.0, 2.0]), [1.0, 2.0], TypeError, "float"),
        (np.array([True, False]), [1.0, 2.0], TypeError, "int32 or int64"),
        (np.array([1, 2], dtype=np.uint64), [1.0, 2.0], TypeError, "int32 or int64"),
        (["a", "b"], [1.0, 2.0], TypeError, "int32 or int64"),
        (np.array([[1, 2]]), [1.0, 2.0], ValueError, "one-dimensional"),
        (np.array([1, 2]), [1.0], ValueError, "differ in length"),
        (np.array([1, 2]), ["x", "y"], TypeError, "float64"),
        (np.array([1, 2]), np.ones((2, 1)), ValueError, "one-dimensional"),
    ],
)
def test_fold_rejects_bad_input_without_folding(keys, values, error, match) -> None:  # type: ignore[no-untyped-def]
    store = ss.NumericAggregateStore(1)
    part = store.partition(0)
    part.fold([7], [1.0])
    with pytest.raises(error, match=match):
        part.fold(keys, values)
    assert len(part) == 1
    assert part.pending == 1


def test_bytes_keys() -> None:
    store = ss.NumericAggregateStore(2, key_type="bytes")
    store.partition(0).fold(["a", b"b", "a", "é"], [1.0, 2.0, 3.0, 4.0])
    store.partition(1).fold(np.array([b"a", b"c"]), [5.0, 6.0])
    store.partition(0).publish()
    store.partition(1).publish()
    ra = store.result("a")
    assert ra is not None and ra.count == 3 and ra.sum == 9.0
    assert store.result(b"a") == ra
    assert store.result("é".encode()) is not None
    cols = store.results()
    assert sorted(cols["key"]) == [b"a", b"b", b"c", "é".encode()]
    with pytest.raises(TypeError, match=r"keys\[1\]"):
        store.partition(0).fold([b"x", 3], [1.0, 2.0])
    with pytest.raises(TypeError, match="single"):
        store.partition(0).fold("ab", [1.0, 2.0])
    with pytest.raises(TypeError, match="key must be"):
        store.result(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be an int"):
        ss.NumericAggregateStore(1).result(b"a")


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="key_type"):
        ss.NumericAggregateStore(1, key_type="float")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan_policy"):
        ss.NumericAggregateStore(1, nan_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="partition_id"):
        ss.NumericAggregateStore(2).partition(2)


def test_nan_policies() -> None:
    keys = np.array([1, 1, 2, 3])
    values = np.array([1.0, np.nan, 2.0, np.nan])

    skip = ss.NumericAggregateStore(1)
    with skip.partition(0) as part:
        part.fold(keys, values)
    r1 = skip.result(1)
    assert r1 is not None and r1.count == 1 and r1.mean == 1.0
    assert skip.result(3) is None  # only NaN rows: the key is never created

    propagate = ss.NumericAggregateStore(1, nan_policy="propagate")
    with propagate.partition(0) as part:
        part.fold(keys, values)
        part.fold(np.array([1]), np.array([5.0]))  # NaN sticks after later numbers
    p1 = propagate.result(1)
    assert p1 is not None and p1.count == 3
    assert all(math.isnan(x) for x in (p1.sum, p1.mean, p1.min, p1.max, p1.var))
    p2 = propagate.result(2)
    assert p2 is not None and p2.mean == 2.0

    strict = ss.NumericAggregateStore(1, nan_policy="raise")
    part = strict.partition(0)
    with pytest.raises(ValueError, match="NaN value at row 1"):
        part.fold(keys, values)
    assert len(part) == 0  # nothing from the batch was folded
    part.fold(keys[[0, 2]], values[[0, 2]])
    assert len(part) == 2
    assert strict.nan_policy == "raise"


def test_results_columns_and_pandas_match_groupby() -> None:
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 300, 20_000)
    values = rng.normal(5.0, 3.0, 20_000)
    store = ss.NumericAggregateStore(3)
    for pid, (k, v) in enumerate(
        zip(np.array_split(keys, 3), np.array_split(values, 3), strict=True)
    ):
        with store.partition(pid) as part:
            part.fold(k, v)
    cols = store.results()
    assert set(cols) == {"key", "count", "sum", "min", "max", "mean", "var", "std"}
    assert cols["key"].dtype == np.int64 and cols["count"].dtype == np.int64
    frame = store.to_pandas().sort_index()
    expected = _groupby(keys, values)
    assert list(frame.index) == list(expected.index)
    np.testing.assert_array_equal(frame["count"].to_numpy(), expected["count"].to_numpy())
    for column in ("sum", "min", "max", "mean", "var", "std"):
        np.testing.assert_allclose(frame[column], expected[column], rtol=1e-9)


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
def test_big_batches_take_the_shard_scatter_path(key_type: str) -> None:
    """Past ~400K keys a partition folds big batches shard by shard; the results must be
    the same as row by row (checked against pandas), NaN rows skipped on that path too."""
    rng = np.random.default_rng(5)
    n = 1_200_000 if key_type == "int64" else 1_000_000
    keys = rng.integers(0, 500_000, n)
    values = rng.normal(100.0, 10.0, n)
    values[rng.integers(0, n, 1000)] = np.nan
    batch_keys: Any = keys if key_type == "int64" else [f"k{k}" for k in keys.tolist()]
    store = ss.NumericAggregateStore(2, key_type=key_type)  # type: ignore[arg-type]
    first, second = store.partition(0), store.partition(1)
    cut = n * 4 // 5
    first.fold(batch_keys[:cut], values[:cut])  # switches to scattering part way through
    assert len(first) > 393_216  # so the next big batch is scattered from its first row
    first.fold(batch_keys[cut:], values[cut:])
    for lo in range(0, n, 250_000):
        second.fold(batch_keys[lo : lo + 250_000], values[lo : lo + 250_000])
    first.publish()
    second.publish()
    got = store.to_pandas()
    if key_type == "bytes":
        got.index = [int(k[1:]) for k in got.index]
    got = got.sort_index()
    kept = ~np.isnan(values)  # nan_policy="skip": NaN rows never create or touch a key
    doubled = _groupby(np.tile(keys[kept], 2), np.tile(values[kept], 2))
    np.testing.assert_array_equal(got.index.to_numpy(), doubled.index.to_numpy())
    np.testing.assert_array_equal(got["count"].to_numpy(), doubled["count"].to_numpy())
    for column in ("sum", "min", "max", "mean", "var"):
        np.testing.assert_allclose(got[column], doubled[column], rtol=1e-9)


@pytest.mark.parametrize("width", [1, 2])
def test_a_big_partition_grows_a_few_shards_per_call_not_all_at_once(width: int) -> None:
    # Keys spread evenly over a partition's shards, so left alone every shard doubles in
    # the same call (at 2.1M keys the accounted memory doubled in one 100K-row call, and
    # Ctrl-C could not land while it happened). Big shards grow early, each at its own
    # load: no call grows the memory by much, and the results are those of one fold.
    n, step = 3_000_000, 100_000
    keys = np.random.default_rng(3).permutation(n).astype("S8")
    values = np.arange(n * width, dtype=np.float64).reshape(n, width) % 7
    columns = [f"c{c}" for c in range(width)] if width > 1 else None
    store = ss.NumericAggregateStore(1, key_type="bytes", values=columns)
    part = store.partition(0)
    jumps = []
    for start in range(0, n, step):
        before = store.memory_bytes()
        block = values[start : start + step]
        part.fold(keys[start : start + step], block if width > 1 else block[:, 0])
        if len(part) > 1_800_000:  # past where the first shards grow early
            jumps.append(store.memory_bytes() / before)
    assert len(part) == n
    assert max(jumps) < 1.3, jumps
    part.publish()
    for c in range(width):
        got = store.results(columns[c] if columns else None)
        # Every key once, with its one value: nothing lost, moved twice or mixed up.
        assert len(got["key"]) == n and (got["count"] == 1).all()
        assert got["sum"].sum() == values[:, c].sum()
        for i in (0, n // 3, n - 1):
            stats = store.result(bytes(keys[i]), columns[c] if columns else None)
            assert isinstance(stats, Stats) and stats.sum == values[i, c]


def test_micro_batches_into_a_big_table_are_folded_before_any_read() -> None:
    """Past ~400K keys, small int64 batches are staged and folded together later. Every
    read (len, pending, snapshot, delta, publish) must see them, and the partials must be
    exactly those of folding the same rows in one call."""
    rng = np.random.default_rng(11)
    base_keys = np.arange(450_000, dtype=np.int64)
    keys = rng.integers(0, 600_000, 400_000)
    values = rng.normal(0.0, 1.0, keys.size)
    values[rng.integers(0, keys.size, 500)] = np.nan
    live = ss.NumericAggregateStore(1)
    oracle = ss.NumericAggregateStore(1)
    live.partition(0).fold(base_keys, np.ones(base_keys.size))
    oracle.partition(0).fold(base_keys, np.ones(base_keys.size))
    base = live.snapshot()
    half = keys.size // 2
    for lo in range(0, half, 65_536):
        live.partition(0).fold(keys[lo : min(lo + 65_536, half)], values[lo : min(lo + 65_536, half)])
    delta = live.snapshot_delta()  # taken while rows are staged: it must hold them
    for lo in range(half, keys.size, 4_096):
        live.partition(0).fold(keys[lo : lo + 4_096], values[lo : lo + 4_096])
    restored = ss.NumericAggregateStore(1)
    restored.restore(live.snapshot())  # again with rows staged
    oracle.partition(0).fold(keys, values)
    for lo in range(0, 8_192, 4_096):  # staged again, then counted
        live.partition(0).fold(keys[lo : lo + 4_096], values[lo : lo + 4_096])
        oracle.partition(0).fold(keys[lo : lo + 4_096], values[lo : lo + 4_096])
    kept = ~np.isnan(values)
    assert len(live.partition(0)) == len(set(keys[kept].tolist()) | set(base_keys.tolist()))
    assert live.partition(0).pending == oracle.partition(0).pending
    restored.partition(0).fold(keys[:8_192], values[:8_192])
    # The first half arrives through a delta on top of the base, the rest folded again.
    chained = ss.NumericAggregateStore(1)
    chained.restore(base)
    chained.apply_delta(delta)
    chained.partition(0).fold(keys[half:], values[half:])
    chained.partition(0).fold(keys[:8_192], values[:8_192])
    for store in (live, oracle, restored, chained):
        store.partition(0).publish()
    expected = oracle.to_pandas().sort_index()
    for store in (live, restored, chained):
        pd.testing.assert_frame_equal(store.to_pandas().sort_index(), expected)


def test_empty_results() -> None:
    cols = ss.NumericAggregateStore(2).results()
    assert len(cols["key"]) == 0 and cols["key"].dtype == np.int64
    assert len(ss.NumericAggregateStore(2, key_type="bytes").results()["key"]) == 0


def test_variance_of_large_offset_data_matches_two_pass() -> None:
    rng = np.random.default_rng(3)
    values = 1e9 + rng.normal(0.0, 1.0, 100_000)
    store = ss.NumericAggregateStore(4)
    for pid, chunk in enumerate(np.array_split(values, 4)):
        with store.partition(pid) as part:
            for piece in np.array_split(chunk, 7):
                part.fold(np.zeros(len(piece), dtype=np.int64), piece)
    stats = store.result(0)
    assert stats is not None
    two_pass = float(np.mean((values - values.mean()) ** 2) * len(values) / (len(values) - 1))
    assert stats.var == pytest.approx(two_pass, rel=1e-9)
    assert stats.mean == pytest.approx(values.mean(), rel=1e-15)


# -- snapshot / restore ------------------------------------------------------------------


def _filled_store(key_type: str = "int64") -> ss.NumericAggregateStore:
    store = ss.NumericAggregateStore(3, key_type=key_type)  # type: ignore[arg-type]
    rng = np.random.default_rng(11)
    for pid in range(3):
        part = store.partition(pid)
        keys = rng.integers(0, 50, 500)
        batch_keys = keys if key_type == "int64" else [f"k{k}" for k in keys]
        part.fold(batch_keys, rng.normal(size=500))
        if pid != 2:
            part.publish()
        part.fold(batch_keys[:10], np.ones(10))  # local changes left unpublished
    return store


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
def test_snapshot_restore_includes_partition_state(key_type: str) -> None:
    store = _filled_store(key_type)
    snap = store.snapshot()
    restored = ss.NumericAggregateStore(3, key_type=key_type)  # type: ignore[arg-type]
    restored.partition(0).fold(["zzz"] if key_type == "bytes" else [12345], [1.0])
    restored.restore(snap)
    assert restored.snapshot() == snap
    assert len(restored) == len(store)
    for pid in range(3):
        assert len(restored.partition(pid)) == len(store.partition(pid))
    # After recovery every partition publishes and the merged results agree exactly.
    for s in (store, restored):
        for pid in range(3):
            s.partition(pid).publish()
    a = store.to_pandas().sort_index()
    b = restored.to_pandas().sort_index()
    pd.testing.assert_frame_equal(a, b)


def _numeric_header(num_partitions: int, tag: int) -> tuple[bytes, bytes]:
    return (b"streamstate.numeric_aggregate_store", struct.pack("<IIB", 1, num_partitions, tag))


_MOMENTS = struct.pack("<Q6d", 1, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda good: good[:-3], id="truncated"),
        pytest.param(lambda good: good[:40] + bytes([good[40] ^ 0x10]) + good[40:][1:], id="flip"),
        pytest.param(lambda good: ss.AggregateStore(3).snapshot(), id="wrong-kind"),
        pytest.param(lambda good: ss.NumericAggregateStore(3, "bytes").snapshot(), id="key-type"),
        pytest.param(
            lambda good: _forge(
                2,
                [
                    _numeric_header(3, 0),
                    (b"local" + struct.pack("<I", 3), struct.pack("<Iq", 1, 5) + _MOMENTS),
                ],
            ),
            id="local-partition",
        ),
        pytest.param(
            lambda good: _forge(
                2,
                [
                    _numeric_header(3, 0),
                    (
                        b"local" + struct.pack("<I", 0),
                        struct.pack("<Iq", 2, 5) + _MOMENTS + struct.pack("<q", 5) + _MOMENTS,
                    ),
                ],
            ),
            id="local-duplicate",
        ),
        pytest.param(
            lambda good: _forge(
                2, [_numeric_header(3, 0), (b"shared", struct.pack("<IqII", 1, 5, 1, 4) + _MOMENTS)]
            ),
            id="shared-partition",
        ),
        pytest.param(
            lambda good: _forge(
                2,
                [
                    _numeric_header(3, 0),
                    (
                        b"shared",
                        struct.pack("<IqI", 2, 5, 1)
                        + struct.pack("<I", 0)
                        + _MOMENTS
                        + struct.pack("<qII", 5, 1, 0)
                        + _MOMENTS,
                    ),
                ],
            ),
            id="shared-duplicate",
        ),
        pytest.param(
            lambda good: _forge(
                2,
                [
                    _numeric_header(3, 0),
                    (
                        b"shared",
                        struct.pack("<IqII", 1, 5, 2, 1)
                        + _MOMENTS
                        + struct.pack("<I", 1)
                        + _MOMENTS,
                    ),
                ],
            ),
            id="shared-order",
        ),
        pytest.param(
            lambda good: _forge(
                2, [_numeric_header(3, 0), (b"shared", struct.pack("<I", 2**32 - 1))]
            ),
            id="giant-count",
        ),
        pytest.param(
            lambda good: _forge(
                2,
                [
                    _numeric_header(3, 0),
                    (b"local" + struct.pack("<I", 0), struct.pack("<Iq", 1, 5) + _MOMENTS + b"x"),
                ],
            ),
            id="trailing",
        ),
        pytest.param(
            lambda good: _forge(2, [_numeric_header(3, 0), (b"other", b"")]), id="unknown"
        ),
    ],
)
def test_numeric_restore_rejects_bad_snapshots(make_bad) -> None:  # type: ignore[no-untyped-def]
    store = _filled_store()
    good = store.snapshot()
    before = store.to_pandas()
    with pytest.raises(ss.CorruptDataError):
        store.restore(make_bad(good))
    assert store.snapshot() == good
    pd.testing.assert_frame_equal(store.to_pandas(), before)


def test_forged_valid_snapshot_is_accepted() -> None:
    # The same forging helpers build a valid snapshot, so the rejections above are specific.
    data = _forge(
        2,
        [
            _numeric_header(3, 0),
            (b"shared", struct.pack("<IqII", 1, 5, 1, 2) + _MOMENTS),
            (b"local" + struct.pack("<I", 2), struct.pack("<Iq", 1, 5) + _MOMENTS),
        ],
    )
    store = ss.NumericAggregateStore(3)
    store.restore(data)
    assert store.result(5) == Stats(1, 2.0, 2.0, 2.0, 2.0, math.nan, math.nan) or (
        store.result(5) is not None and store.result(5).count == 1  # type: ignore[union-attr]
    )
    assert len(store.partition(2)) == 1


# -- merge laws and fold-by-any-split (hypothesis) ---------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
value_lists = st.lists(finite, min_size=0, max_size=30)


def _stats(partial: bytes) -> tuple[int, float, float, float, float, float, float]:
    return _core._moments_stats(partial)


def _assert_stats_close(a: tuple, b: tuple, rel: float = 1e-9) -> None:  # type: ignore[type-arg]
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y)
        else:
            assert x == pytest.approx(y, rel=rel, abs=1e-6)


@given(value_lists, value_lists)
def test_merge_is_commutative(a: list[float], b: list[float]) -> None:
    pa, pb = _core._moments_of(np.array(a)), _core._moments_of(np.array(b))
    _assert_stats_close(_stats(_core._moments_merge(pa, pb)), _stats(_core._moments_merge(pb, pa)))


@given(value_lists, value_lists, value_lists)
def test_merge_is_associative_and_equals_fold_of_concatenation(
    a: list[float], b: list[float], c: list[float]
) -> None:
    pa, pb, pc = (_core._moments_of(np.array(x)) for x in (a, b, c))
    left = _core._moments_merge(_core._moments_merge(pa, pb), pc)
    right = _core._moments_merge(pa, _core._moments_merge(pb, pc))
    _assert_stats_close(_stats(left), _stats(right))
    _assert_stats_close(_stats(left), _stats(_core._moments_of(np.array(a + b + c))))


@st.composite
def split_datasets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 1e9, -1e9, 1e-3]))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, draw(st.integers(1, 20)), n)
    values = offset + scale * rng.normal(size=n)
    owners = rng.integers(0, 4, n)  # which partition folds each row
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))  # batch boundaries
    return keys, values, owners, cuts


@settings(max_examples=40)
@given(split_datasets())
def test_fold_by_any_split_equals_numpy_groupby(
    data: tuple[np.ndarray, np.ndarray, np.ndarray, list[int]],
) -> None:
    keys, values, owners, cuts = data
    store = ss.NumericAggregateStore(4)
    bounds = [0, *cuts, len(keys)]
    for lo, hi in itertools.pairwise(bounds):
        for pid in range(4):
            rows = np.nonzero(owners[lo:hi] == pid)[0] + lo
            store.partition(pid).fold(keys[rows], values[rows])
    for pid in range(4):
        store.partition(pid).publish()
    got = store.to_pandas().sort_index()
    expected = _groupby(keys, values)
    np.testing.assert_array_equal(got["count"].to_numpy(), expected["count"].to_numpy())
    np.testing.assert_array_equal(got["min"].to_numpy(), expected["min"].to_numpy())
    np.testing.assert_array_equal(got["max"].to_numpy(), expected["max"].to_numpy())
    for column in ("sum", "mean"):
        scale = np.abs(values).max()
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-12, atol=1e-12 * scale)
    # Variance against the exact value (rational arithmetic on the same doubles) to 1e-9
    # relative, and against numpy's two-pass value to 1e-6 where that reference is itself
    # accurate: with 1e9 + 1e-3 * noise the mean cannot be represented closer than half an
    # ulp (6e-8), which alone moves a two-pass variance of a few values by ~1e-6.
    for key, row in got.iterrows():
        group = values[keys == key]
        if len(group) < 2:
            assert math.isnan(row["var"])
            continue
        exact = [Fraction(float(x)) for x in group]
        mean = sum(exact) / len(exact)
        exact_var = float(sum((x - mean) ** 2 for x in exact) / (len(exact) - 1))
        assert row["var"] == pytest.approx(exact_var, rel=1e-9, abs=1e-300)
        two_pass = float(np.sum((group - group.mean()) ** 2) / (len(group) - 1))
        if two_pass == pytest.approx(exact_var, rel=1e-9, abs=1e-300):
            assert row["var"] == pytest.approx(two_pass, rel=1e-6, abs=1e-300)


# -- threads -----------------------------------------------------------------------------


def _numeric_worker_batches(pid: int, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(pid)
    # Each partition owns a key range, and every batch touches all of its keys once, so
    # in any consistent snapshot all of a partition's keys have the same count.
    keys = np.arange(pid * 1000, pid * 1000 + 1000)
    return [(rng.permutation(keys), 1e9 + rng.normal(size=1000)) for _ in range(batches)]


def test_threads_fold_and_publish_while_snapshotting() -> None:
    """4 partitions fold and publish on their own threads while the main thread snapshots.
    Each snapshot must restore, hold whole publishes only, and the final results must equal
    a serial run of the same batches."""
    threads = 4
    work = {pid: _numeric_worker_batches(pid, 50) for pid in range(threads)}
    store = ss.NumericAggregateStore(threads)
    stop = threading.Event()
    done = [0] * threads
    errors: list[Exception] = []

    def worker(pid: int) -> None:
        try:
            part = store.partition(pid)
            while not stop.is_set():  # cycles through its batches until told to stop
                keys, values = work[pid][done[pid] % len(work[pid])]
                part.fold(keys, values)
                part.publish()
                done[pid] += 1
        except Exception as exc:  # noqa: BLE001 - asserted empty by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(pid,)) for pid in range(threads)]
    for w in workers:
        w.start()
    snapshots = _snapshot_until_distinct(store.snapshot, workers, stop, wanted=8)
    assert not errors

    for snap in snapshots[:: max(1, len(snapshots) // 25)]:
        view = ss.NumericAggregateStore(threads)
        view.restore(snap)
        if len(view) == 0:
            continue
        cols = view.results()
        for pid in range(threads):
            mine = (cols["key"] >= pid * 1000) & (cols["key"] < pid * 1000 + 1000)
            counts = set(cols["count"][mine].tolist())
            assert len(counts) <= 1, f"torn publish of partition {pid}: counts {counts}"
            assert not counts or mine.sum() == 1000

    serial = ss.NumericAggregateStore(threads)
    for pid in range(threads):
        for batch in range(done[pid]):
            serial.partition(pid).fold(*work[pid][batch % len(work[pid])])
        serial.partition(pid).publish()
    a = store.to_pandas().sort_index()
    b = serial.to_pandas().sort_index()
    pd.testing.assert_frame_equal(a, b)  # same per-partition order: bitwise-equal results


def test_concurrent_folds_on_one_partition_are_serialised() -> None:
    store = ss.NumericAggregateStore(1)
    part = store.partition(0)
    keys = np.arange(20_000) % 1000
    values = np.ones(20_000)

    def fold_many() -> None:
        for _ in range(10):
            part.fold(keys, values)

    workers = [threading.Thread(target=fold_many) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    part.publish()
    cols = store.results()
    assert len(cols["key"]) == 1000
    assert set(cols["count"].tolist()) == {3 * 10 * 20}


def test_memory_bytes_grows_with_keys() -> None:
    store = ss.NumericAggregateStore(2)
    empty = store.memory_bytes()
    with store.partition(0) as part:
        part.fold(np.arange(10_000), np.ones(10_000))
    assert store.memory_bytes() > empty + 10_000 * 64
    assert store.partition(0).memory_bytes() >= 10_000 * 64
    opaque = ss.AggregateStore(2)
    before = opaque.memory_bytes()
    opaque.publish_many(0, [str(i).encode() for i in range(1000)], [b"x" * 100] * 1000)
    assert opaque.memory_bytes() > before + 1000 * 100


# ----------------------------------------------------------------------------------------
# Byte-string keys are byte strings (issue 14): integers are refused, never reinterpreted


@pytest.mark.parametrize(
    "keys",
    [np.array([1, 2]), [np.int64(1), np.int64(2)], np.array([1.5, 2.5]), [1, 2]],
    ids=["int64-array", "numpy-ints", "float-array", "python-ints"],
)
def test_bytes_store_refuses_numeric_keys(keys: Any) -> None:
    store = ss.NumericAggregateStore(1, key_type="bytes")
    part = store.partition(0)
    part.fold([b"a"], [1.0])
    with pytest.raises(TypeError, match=r"keys\[0\].*bytes or str"):
        part.fold(keys, [1.0, 2.0])
    part.publish()
    assert store.results()["key"] == [b"a"]  # nothing of the refused batch was folded
    with pytest.raises(TypeError, match="key must be bytes or str"):
        store.result(1)  # type: ignore[arg-type]


def test_bytes_store_takes_buffers_of_single_bytes_as_keys() -> None:
    store = ss.NumericAggregateStore(1, key_type="bytes")
    store.partition(0).fold(
        [bytearray(b"a"), memoryview(b"a"), np.frombuffer(b"a", dtype=np.uint8)], [1.0, 2.0, 3.0]
    )
    store.partition(0).publish()
    got = store.result(b"a")
    assert got is not None and got.count == 3


def test_opaque_store_refuses_numeric_keys_but_takes_any_buffer_as_partial() -> None:
    store = ss.AggregateStore(1)
    with pytest.raises(TypeError, match=r"keys\[0\]"):
        store.publish_many(0, np.array([1, 2]), [b"x", b"y"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group_key"):
        store.publish(np.int64(1), 0, b"x")  # type: ignore[arg-type]
    assert store.is_empty()
    store.publish_many(0, [b"k"], [np.array([1.5])])  # type: ignore[list-item]
    assert store.get_partial(b"k", 0) == np.array([1.5]).tobytes()


@given(st.data())
def test_any_operation_sequence_leaves_a_store_that_round_trips(data: st.DataObject) -> None:
    store = ss.NumericAggregateStore(3, data.draw(st.sampled_from(["int64", "bytes"])))
    run_operations(store, data.draw(store_operations(store, extreme=True)))
    assert_snapshot_roundtrip(store)
