"""Incremental captures of the stores (issue 13): snapshot_delta() / apply_delta().

The law every test leans on: restoring the last full snapshot and applying the deltas
taken after it, in order, gives a store whose full snapshot equals the live store's.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamstate as ss
from streamstate.codec import RecordKind, decode_records
from streamstate.testing import assert_corruption_detected

PARTITIONS = 3


def _replay(key_type: str, base: bytes | None, deltas: list[bytes]) -> ss.NumericAggregateStore:
    replica = ss.NumericAggregateStore(PARTITIONS, key_type=key_type)  # type: ignore[arg-type]
    if base is not None:
        replica.restore(base)
    for delta in deltas:
        replica.apply_delta(delta)
    return replica


def _keys(key_type: str, raw: list[int]) -> Any:
    if key_type == "int64":
        return np.array(raw, dtype=np.int64)
    return [f"k{k}".encode() for k in raw]


_fold = st.tuples(
    st.just("fold"),
    st.integers(0, PARTITIONS - 1),
    st.lists(st.tuples(st.integers(0, 40), st.floats(-1e6, 1e6)), max_size=30),
)
_publish = st.tuples(st.just("publish"), st.integers(0, PARTITIONS - 1), st.just([]))
_capture = st.tuples(st.sampled_from(["snapshot", "delta"]), st.just(0), st.just([]))
_operations = st.lists(st.one_of(_fold, _fold, _publish, _capture), max_size=40)


@settings(max_examples=60, deadline=None)
@given(key_type=st.sampled_from(["int64", "bytes"]), operations=_operations)
def test_restore_then_deltas_equals_the_live_store(key_type: str, operations: list[Any]) -> None:
    live = ss.NumericAggregateStore(PARTITIONS, key_type=key_type)  # type: ignore[arg-type]
    base: bytes | None = None
    deltas: list[bytes] = []
    for op, pid, rows in operations:
        if op == "fold":
            live.partition(pid).fold(_keys(key_type, [k for k, _ in rows]), [v for _, v in rows])
        elif op == "publish":
            live.partition(pid).publish()
        elif op == "snapshot":
            base, deltas = live.snapshot(), []
        else:
            deltas.append(live.snapshot_delta())
    deltas.append(live.snapshot_delta())
    replica = _replay(key_type, base, deltas)
    assert replica.snapshot() == live.snapshot()
    for pid in range(PARTITIONS):
        assert replica.partition(pid).pending == live.partition(pid).pending
        assert len(replica.partition(pid)) == len(live.partition(pid))


def _loaded(n: int = 1000) -> ss.NumericAggregateStore:
    store = ss.NumericAggregateStore(PARTITIONS)
    for pid in range(PARTITIONS):
        keys = np.arange(pid, n, PARTITIONS)
        store.partition(pid).fold(keys, keys.astype(np.float64))
        store.partition(pid).publish()
    store.partition(0).fold(np.array([0, n + 1]), [1.0, 2.0])  # left unpublished
    return store


def test_a_delta_is_its_own_record_kind_and_a_delta_of_nothing_is_small() -> None:
    store = _loaded()
    store.snapshot()
    empty = store.snapshot_delta()
    kind, _ = decode_records(empty)
    assert kind == RecordKind.NUMERIC_AGGREGATE_STORE_DELTA
    assert len(empty) <= 100


def test_delta_size_follows_the_changes_not_the_state() -> None:
    store = _loaded(100_000)
    full = store.snapshot()
    store.partition(1).fold(np.arange(1, 301, PARTITIONS), np.ones(100))
    store.partition(1).publish()
    delta = store.snapshot_delta()
    assert len(delta) < 100 * 80 + 200
    assert len(delta) * 100 < len(full)


def test_full_snapshot_after_publish_stores_each_partial_once() -> None:
    store = ss.NumericAggregateStore(2)
    for pid in range(2):
        keys = np.arange(pid, 20_000, 2)
        store.partition(pid).fold(np.repeat(keys, 3), np.ones(keys.size * 3))
        store.partition(pid).publish()
        assert store.partition(pid).pending == 0
    assert len(store.snapshot()) / 20_000 <= 80


def test_a_delta_of_another_parent_is_refused_and_changes_nothing() -> None:
    store = _loaded()
    base = store.snapshot()
    store.partition(2).fold(np.array([5]), [1.0])
    first = store.snapshot_delta()
    store.partition(2).publish()
    second = store.snapshot_delta()
    replica = _replay("int64", base, [])
    with pytest.raises(ss.CorruptDataError, match="does not follow"):
        replica.apply_delta(second)
    replica.apply_delta(first)  # still at the base: the right delta applies
    replica.apply_delta(second)
    assert replica.snapshot() == store.snapshot()
    other = ss.NumericAggregateStore(PARTITIONS, key_type="bytes")
    with pytest.raises(ss.CorruptDataError):
        other.apply_delta(first)
    with pytest.raises(ss.CorruptDataError):
        replica.restore(first)  # a delta is not a full snapshot
    with pytest.raises(ss.CorruptDataError):
        replica.apply_delta(base)  # nor the other way round


def test_every_damaged_delta_is_refused_and_the_store_left_as_it_was() -> None:
    store = _loaded(30)
    base = store.snapshot()
    store.partition(0).publish()
    store.partition(1).fold(np.array([1, 4, 100]), [1.0, 2.0, 3.0])
    delta = store.snapshot_delta()
    replica = _replay("int64", base, [])

    def apply(data: bytes) -> None:
        try:
            replica.apply_delta(data)
        except ss.CorruptDataError:
            assert replica.snapshot() == base  # unchanged, and its identity is the base's again
            raise
        replica.restore(base)  # the intact delta applied: back to the base for the next try

    assert_corruption_detected(apply, delta)


def test_deltas_stay_consistent_while_partitions_publish() -> None:
    width, batches = 64, 150
    store = ss.NumericAggregateStore(PARTITIONS)
    base = store.snapshot()
    deltas: list[bytes] = []
    errors: list[BaseException] = []

    def work(pid: int) -> None:
        try:
            part = store.partition(pid)
            keys = np.arange(width) * PARTITIONS + pid
            for _ in range(batches):
                part.fold(keys, np.ones(width))
                part.publish()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(pid,)) for pid in range(PARTITIONS)]
    for w in workers:
        w.start()
    replica = _replay("int64", base, [])
    while not deltas or any(w.is_alive() for w in workers):
        deltas.append(store.snapshot_delta())
        replica.apply_delta(deltas[-1])
        counts = replica.results()
        by_partition: dict[int, set[int]] = {}
        for key, count in zip(counts["key"].tolist(), counts["count"].tolist(), strict=True):
            by_partition.setdefault(key % PARTITIONS, set()).add(count)
        # A publish is in a delta entirely or not at all: every key of a partition agrees.
        assert all(len(seen) == 1 for seen in by_partition.values()), by_partition
    for w in workers:
        w.join()
    assert not errors
    replica.apply_delta(store.snapshot_delta())
    assert set(replica.results()["count"].tolist()) == {batches}
    assert replica.snapshot() == store.snapshot()


# -- AggregateStore ----------------------------------------------------------------------

_group = st.binary(max_size=4)
_opaque_operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), _group, st.integers(0, PARTITIONS - 1), st.binary(max_size=6)),
        st.tuples(st.just("remove"), _group, st.just(0), st.just(b"")),
        st.tuples(st.sampled_from(["snapshot", "delta"]), st.just(b""), st.just(0), st.just(b"")),
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(operations=_opaque_operations)
def test_opaque_restore_then_deltas_equals_the_live_store(operations: list[Any]) -> None:
    live = ss.AggregateStore(PARTITIONS)
    base: bytes | None = None
    deltas: list[bytes] = []
    for op, group, pid, partial in operations:
        if op == "publish":
            live.publish(group, pid, partial)
        elif op == "remove":
            live.remove_group(group)
        elif op == "snapshot":
            base, deltas = live.snapshot(), []
        else:
            deltas.append(live.snapshot_delta())
    deltas.append(live.snapshot_delta())
    replica = ss.AggregateStore(PARTITIONS)
    if base is not None:
        replica.restore(base)
    for delta in deltas:
        replica.apply_delta(delta)
    assert replica.snapshot() == live.snapshot()


def test_opaque_delta_carries_removals_refuses_other_parents_and_damage() -> None:
    store = ss.AggregateStore(2)
    store.publish_many(0, [f"g{i}".encode() for i in range(100)], [b"x"] * 100)
    store.snapshot()
    assert len(store.snapshot_delta()) <= 100  # a delta of nothing
    base = store.snapshot()
    store.remove_group(b"g7")
    store.publish(b"g8", 1, b"y")
    delta = store.snapshot_delta()
    kind, records = decode_records(delta)
    assert kind == RecordKind.AGGREGATE_STORE_DELTA and len(records) == 3  # header + 2 changes
    later = (store.publish(b"g9", 0, b"z"), store.snapshot_delta())[1]
    replica = ss.AggregateStore(2)
    replica.restore(base)
    with pytest.raises(ss.CorruptDataError, match="does not follow"):
        replica.apply_delta(later)

    def apply(data: bytes) -> None:
        try:
            replica.apply_delta(data)
        except ss.CorruptDataError:
            assert replica.snapshot() == base
            raise
        replica.restore(base)

    assert_corruption_detected(apply, delta)
    replica.apply_delta(delta)
    replica.apply_delta(later)
    assert replica.get_partial(b"g7", 0) is None and replica.get_partial(b"g8", 1) == b"y"
    assert replica.snapshot() == store.snapshot()


def test_opaque_deltas_stay_consistent_while_threads_publish() -> None:
    width, batches = 50, 200
    store = ss.AggregateStore(PARTITIONS)
    replica = ss.AggregateStore(PARTITIONS)
    replica.restore(store.snapshot())

    def work(pid: int) -> None:
        keys = [f"t{pid}k{i}".encode() for i in range(width)]
        for b in range(batches):
            store.publish_many(pid, keys, [str(b).encode()] * width)
            if b % 50 == 49:
                store.remove_group(keys[0])

    workers = [threading.Thread(target=work, args=(pid,)) for pid in range(PARTITIONS)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        replica.apply_delta(store.snapshot_delta())
        for pid in range(PARTITIONS):
            seen = {replica.get_partial(f"t{pid}k{i}".encode(), pid) for i in range(1, width)}
            assert len(seen) == 1, f"torn publish_many in a delta: {seen}"
    for w in workers:
        w.join()
    replica.apply_delta(store.snapshot_delta())
    assert replica.snapshot() == store.snapshot()


def _fold_random(
    store: ss.NumericAggregateStore, seed: int, keys: int = 5_000, rows: int = 20_000
) -> None:
    rng = np.random.default_rng(seed)
    for p in range(store.num_partitions):
        store.partition(p).fold(rng.integers(0, keys, rows), rng.normal(0, 1, rows))


def test_snapshot_into_reuses_one_buffer_for_the_same_captures() -> None:
    def fold(store: ss.NumericAggregateStore, seed: int) -> None:
        _fold_random(store, seed)

    live, twin = ss.NumericAggregateStore(2), ss.NumericAggregateStore(2)
    buffer = bytearray(b"left over from before" * 50_000)  # larger than a capture: it shrinks
    fold(live, 1)
    fold(twin, 1)
    live.snapshot_into(buffer)
    full = bytes(buffer)
    assert full == twin.snapshot()
    deltas = []
    for seed in (2, 3):  # the buffer grows and shrinks with what each capture holds
        fold(live, seed)
        fold(twin, seed)
        live.snapshot_into(buffer, delta=True)
        deltas.append(bytes(buffer))
        assert deltas[-1] == twin.snapshot_delta()
    replayed = ss.NumericAggregateStore(2)
    replayed.restore(full)
    for delta in deltas:
        replayed.apply_delta(delta)
    assert replayed.snapshot() == live.snapshot() == twin.snapshot()  # all three in step

    with pytest.raises(TypeError, match="bytearray"):
        live.snapshot_into(b"immutable")  # type: ignore[arg-type]
    # A buffer someone holds a view of is refused before anything is captured.
    fold(live, 4)
    fold(twin, 4)
    view = memoryview(buffer)
    with pytest.raises(BufferError):
        live.snapshot_into(buffer, delta=True)
    view.release()
    live.snapshot_into(buffer, delta=True)
    assert bytes(buffer) == twin.snapshot_delta()  # the refused call left the tracking alone


def test_capture_hands_over_the_capture_itself_and_never_reuses_a_held_one() -> None:
    def fold(store: ss.NumericAggregateStore, seed: int) -> None:
        _fold_random(store, seed, keys=60_000, rows=80_000)

    live, twin = ss.NumericAggregateStore(2), ss.NumericAggregateStore(2)
    fold(live, 1)
    fold(twin, 1)
    full = live.capture()
    assert repr(full) == f"RecordBuffer({len(full)} bytes)"
    held = memoryview(full)
    assert held.readonly and held.nbytes == len(full) > 1 << 20  # large: its memory recycles
    full_bytes = bytes(held)
    assert full_bytes == twin.snapshot()
    with pytest.raises(TypeError):
        held[0] = 0  # read-only: what was captured is what gets committed
    deltas = []
    for seed in (2, 3):  # each delta dropped before the next capture, which reuses its memory
        fold(live, seed)
        fold(twin, seed)
        deltas.append(bytes(live.capture(delta=True)))
        assert deltas[-1] == twin.snapshot_delta()
    assert bytes(held) == full_bytes  # the held capture was never written over
    replayed = ss.NumericAggregateStore(2)
    replayed.restore(full)  # every consumer takes the buffer as it is
    for delta in deltas:
        replayed.apply_delta(delta)
    assert replayed.snapshot() == live.snapshot() == twin.snapshot()
    with pytest.raises(TypeError, match="delta must be a bool"):
        live.capture(delta=1)  # type: ignore[arg-type]
