"""streamstate.testing: its strategies generate what they promise, its assertions pass on
streamstate's own state and catch broken code, and its state machine finds a crash bug."""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test

import streamstate as ss
from streamstate import _core
from streamstate.codec import decode_records, encode_records
from streamstate.testing import (
    Fold,
    NumericBatch,
    OperatorMachine,
    Publish,
    Restore,
    Snapshot,
    SnapshotDelta,
    StoreOperation,
    assert_corruption_detected,
    assert_merge_laws,
    assert_snapshot_roundtrip,
    keys,
    lcb1_batches,
    numeric_batches,
    numeric_partials_close,
    partials,
    record_snapshots,
    run_operations,
    store_operations,
)

EMPTY_PARTIAL = _core._moments_of(np.array([], dtype=np.float64))

# -- strategies ----------------------------------------------------------------------------


@given(keys("int64"))
def test_int64_keys_fit_int64(key: int) -> None:
    assert -(2**63) <= key < 2**63
    assert int(np.array([key], dtype=np.int64)[0]) == key


@given(keys("bytes", max_size=5))
def test_bytes_keys_are_short_bytes(key: bytes) -> None:
    assert isinstance(key, bytes) and len(key) <= 5


def test_unknown_key_type_is_refused() -> None:
    with pytest.raises(ValueError, match="key_type"):
        keys("float64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="columns"):
        numeric_batches(columns=0)
    with pytest.raises(ValueError, match="min_rows"):
        numeric_batches(min_rows=5, max_rows=2)


@given(numeric_batches("bytes", columns=3, max_rows=10, min_rows=1, distinct_keys=2))
def test_numeric_batches_have_the_requested_shape(batch: NumericBatch) -> None:
    assert 1 <= len(batch) <= 10 and len(set(batch.keys)) <= 2
    assert isinstance(batch.keys, list) and all(isinstance(k, bytes) for k in batch.keys)
    assert len(batch.columns) == 3
    for column in batch.columns:
        assert column.dtype == np.float64 and column.shape == (len(batch),)
        assert np.isfinite(column).all() and (np.abs(column) <= 1e6).all()
    with pytest.raises(ValueError, match="one-column"):
        batch.values  # noqa: B018  (the property raises)


@given(numeric_batches("int64", extreme=True))
def test_extreme_batches_fold_into_a_store(batch: NumericBatch) -> None:
    assert batch.keys.dtype == np.int64  # type: ignore[union-attr]
    store = ss.NumericAggregateStore(1, nan_policy="propagate")
    with store.partition(0) as part:
        part.fold(batch.keys, batch.values)
    assert len(store) == len(set(batch.keys.tolist()))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "wanted",
    [
        lambda v: bool(np.isnan(v).any()),
        lambda v: bool(np.isposinf(v).any()),
        lambda v: bool(np.isneginf(v).any()),
        lambda v: bool((np.abs(v[np.isfinite(v)]) > 1e300).any()),
    ],
    ids=["nan", "+inf", "-inf", "huge"],
)
def test_extreme_batches_reach_the_awkward_values(wanted) -> None:  # type: ignore[no-untyped-def]
    found = find(
        numeric_batches(extreme=True),
        lambda b: wanted(b.values),
        settings=settings(phases=[Phase.generate], database=None),  # the first is enough
    )
    assert wanted(found.values)


@given(record_snapshots(kind=3))
def test_record_snapshots_are_valid_containers(blob: bytes) -> None:
    kind, records = decode_records(blob)
    assert kind == 3 and encode_records(kind, records) == blob


@given(lcb1_batches())
def test_lcb1_batches_are_valid_batches(blob: bytes) -> None:
    entries = ss.decode_batch(blob)
    assert blob[:4] == b"LCB1" and ss.encode_batch(entries) == blob


def _expected_published(
    operations: list[StoreOperation], partitions: int
) -> dict[object, list[float]]:
    """A plain-Python reading of an operation sequence: the values each key has published."""
    local: list[dict[object, list[float]]] = [{} for _ in range(partitions)]
    published: list[dict[object, list[float]]] = [{} for _ in range(partitions)]
    State = tuple[list[dict[object, list[float]]], list[dict[object, list[float]]]]
    snapshots: list[State] = []
    deltas: list[State] = []  # a delta brings back the whole state at its capture
    for op in operations:
        if isinstance(op, Fold):
            keys_ = op.batch.keys
            plain_keys = keys_.tolist() if isinstance(keys_, np.ndarray) else keys_
            for key, value in zip(plain_keys, op.batch.values.tolist(), strict=True):
                local[op.partition].setdefault(key, []).append(value)
        elif isinstance(op, Publish):
            published[op.partition] = {k: list(v) for k, v in local[op.partition].items()}
        elif isinstance(op, Snapshot):
            snapshots.append(copy.deepcopy((local, published)))
        elif isinstance(op, SnapshotDelta):
            deltas.append(copy.deepcopy((local, published)))
        else:  # deep copies: a later fold appends to the lists of the state it restored
            saved = deltas[op.deltas[-1]] if op.deltas else snapshots[op.snapshot]
            local, published = copy.deepcopy(saved)
    merged: dict[object, list[float]] = {}
    for part in published:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return merged


@settings(max_examples=40)
@given(st.data())
def test_store_operations_replay_like_a_plain_model(data: st.DataObject) -> None:
    key_type = data.draw(st.sampled_from(["int64", "bytes"]))
    store = ss.NumericAggregateStore(3, key_type)
    operations = data.draw(store_operations(store, max_operations=12))
    snapshots = run_operations(store, operations)
    assert len(snapshots) == sum(isinstance(op, Snapshot) for op in operations)
    taken = 0
    for op in operations:  # a Restore names only a snapshot taken before it
        taken += isinstance(op, Snapshot)
        assert not isinstance(op, Restore) or op.snapshot < taken
    expected = _expected_published(operations, 3)
    results = store.results()
    got_keys = results["key"].tolist() if key_type == "int64" else list(results["key"])
    assert sorted(got_keys, key=repr) == sorted(expected, key=repr)
    for i, key in enumerate(got_keys):
        assert int(results["count"][i]) == len(expected[key])
        assert math.isclose(results["sum"][i], math.fsum(expected[key]), rel_tol=1e-9, abs_tol=1e-6)


def _delta_chains_are_valid(operations: list[StoreOperation]) -> bool:
    """Each Restore's deltas were taken, in that order, on top of its snapshot: replay
    which capture or restore each delta followed."""
    follows: dict[int, tuple[int, tuple[int, ...]] | None] = {}
    position: tuple[int, tuple[int, ...]] | None = None
    snapshots = deltas = 0
    for op in operations:
        if isinstance(op, Snapshot):
            position, snapshots = (snapshots, ()), snapshots + 1
        elif isinstance(op, SnapshotDelta):
            follows[deltas] = position
            position = None if position is None else (position[0], (*position[1], deltas))
            deltas += 1
        elif isinstance(op, Restore):
            for i, number in enumerate(op.deltas):
                if follows.get(number) != (op.snapshot, op.deltas[:i]):
                    return False
            position = (op.snapshot, op.deltas)
    return True


@settings(max_examples=60)
@given(st.data())
def test_store_operations_restore_full_snapshots_then_their_deltas(data: st.DataObject) -> None:
    key_type = data.draw(st.sampled_from(["int64", "bytes", "str"]))
    store = ss.NumericAggregateStore(2, key_type)
    operations = data.draw(store_operations(store, max_operations=16))
    assert _delta_chains_are_valid(operations)
    run_operations(store, operations)  # checks every delta chain against the live store
    expected = _expected_published(operations, 2)
    results = store.results()
    got_keys = results["key"].tolist() if key_type == "int64" else list(results["key"])
    assert sorted(got_keys, key=repr) == sorted(expected, key=repr)
    assert results["count"].tolist() == [len(expected[k]) for k in got_keys]


def test_store_operations_reach_restores_of_long_delta_chains() -> None:
    store = ss.NumericAggregateStore(2)
    found = find(
        store_operations(store),
        lambda ops: any(isinstance(op, Restore) and len(op.deltas) >= 2 for op in ops),
        settings=settings(phases=[Phase.generate], database=None, max_examples=2000),
    )
    assert any(isinstance(op, Restore) and len(op.deltas) >= 2 for op in found)


class _DeltaDroppingStore(ss.NumericAggregateStore):
    """A store whose apply_delta forgets what the delta held (the bug run_operations catches)."""

    def apply_delta(self, data: bytes) -> None:  # type: ignore[override]
        empty = ss.NumericAggregateStore(self.num_partitions)
        empty.restore(self.snapshot())
        super().apply_delta(empty.snapshot_delta())  # right parent, nothing in it


def test_run_operations_catches_a_delta_chain_that_restores_wrong() -> None:
    batch = NumericBatch(np.array([1, 2], dtype=np.int64), (np.array([1.0, 2.0]),))
    operations: list[StoreOperation] = [
        Snapshot(), Fold(0, batch), Publish(0), SnapshotDelta(), Restore(0, (0,))
    ]
    run_operations(ss.NumericAggregateStore(1), operations)  # the real store passes
    with pytest.raises(AssertionError, match=r"snapshot 0 with deltas \[0\] restores"):
        run_operations(_DeltaDroppingStore(1), operations)
    unchecked = _DeltaDroppingStore(1)
    run_operations(unchecked, operations[:4], check_deltas=False)
    assert unchecked.results()["count"].tolist() == [1, 1]


def test_store_operations_need_a_numeric_store() -> None:
    with pytest.raises(TypeError, match="NumericAggregateStore"):
        store_operations(ss.AggregateStore(2))  # type: ignore[arg-type]


# -- assert_snapshot_roundtrip -------------------------------------------------------------


@given(st.sampled_from(["int64", "bytes"]), st.lists(numeric_batches(extreme=True), max_size=3))
def test_numeric_store_round_trips(key_type: str, batches: list[NumericBatch]) -> None:
    store = ss.NumericAggregateStore(2, "int64", nan_policy="propagate")
    if key_type == "bytes":
        store = ss.NumericAggregateStore(2, "bytes", nan_policy="propagate")
        batches = [NumericBatch([str(k).encode() for k in b.keys], b.columns) for b in batches]
    for i, batch in enumerate(batches):
        part = store.partition(i % 2)
        part.fold(batch.keys, batch.values)
        if i % 3 != 2:  # leave some folds unpublished: local state is in the snapshot too
            part.publish()
    restored = assert_snapshot_roundtrip(store)
    assert isinstance(restored, ss.NumericAggregateStore) and len(restored) == len(store)


def test_aggregate_store_and_backend_round_trip() -> None:
    opaque = ss.AggregateStore(3)
    opaque.publish_many(1, [b"x", b"y"], [b"1", b"2"])
    opaque.publish(b"x", 2, b"3")
    assert assert_snapshot_roundtrip(opaque).collect_partials(b"x") == [(1, b"1"), (2, b"3")]
    backend = ss.InMemoryStateBackend()
    backend.put(b"a", b"1")
    backend.put(b"b", b"2", expires_at=1e12)
    backend.put(b"gone", b"3", expires_at=1.0)  # already expired: in neither state nor snapshot
    assert assert_snapshot_roundtrip(backend).range_scan(b"") == [(b"a", b"1"), (b"b", b"2")]


_SALTS = itertools.count()


@dataclass
class _Counter:
    """A user's own snapshot-able operator; the flags plant the bugs the assertions catch."""

    counts: dict[bytes, int] = field(default_factory=dict)
    drop_smallest_on_restore: bool = False
    unstable_snapshot: bool = False

    def add(self, key: bytes, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def snapshot(self) -> bytes:
        records = [(k, str(v).encode()) for k, v in sorted(self.counts.items())]
        if self.unstable_snapshot:  # a nondeterministic snapshot: differs every time
            records.append((b"~salt", str(next(_SALTS)).encode()))
        return encode_records(0, records)

    def restore(self, data: bytes) -> None:
        _, records = decode_records(data)  # validates everything before touching state
        counts = {k: int(v) for k, v in records if k != b"~salt"}
        if self.drop_smallest_on_restore and counts:
            del counts[min(counts)]
        self.counts = counts


def test_round_trip_of_a_user_class() -> None:
    counter = _Counter()
    counter.add(b"a", 3)
    counter.add(b"b")
    restored = assert_snapshot_roundtrip(counter, fresh=_Counter, state=lambda c: c.counts)
    assert restored.counts == {b"a": 3, b"b": 1}


def test_round_trip_catches_lossy_restore_and_unstable_snapshots() -> None:
    lossy = _Counter(drop_smallest_on_restore=True)
    lossy.add(b"a")
    with pytest.raises(AssertionError, match="restored state differs"):
        assert_snapshot_roundtrip(
            lossy, fresh=lambda: _Counter(drop_smallest_on_restore=True), state=lambda c: c.counts
        )
    unstable = _Counter(unstable_snapshot=True)
    with pytest.raises(AssertionError, match="re-snapshot"):
        assert_snapshot_roundtrip(
            unstable, fresh=lambda: _Counter(unstable_snapshot=True), state=lambda c: c.counts
        )


def test_round_trip_of_an_unknown_class_needs_fresh_and_state() -> None:
    class Opaque:
        def snapshot(self) -> bytes:
            return b""

        def restore(self, data: bytes) -> None:
            pass

    with pytest.raises(TypeError, match="fresh="):
        assert_snapshot_roundtrip(Opaque())
    with pytest.raises(TypeError, match="state="):
        assert_snapshot_roundtrip(Opaque(), fresh=Opaque)


# -- assert_merge_laws ---------------------------------------------------------------------


# Finite values only: with values near +/-1.8e308 the merged mean overflows to +inf or -inf
# depending on merge order (found by partials(extreme=True); left to the numeric core).
@given(st.lists(partials(), min_size=1, max_size=4))
def test_numeric_partials_obey_the_merge_laws(parts: list[bytes]) -> None:
    assert_merge_laws(
        _core._moments_merge, parts, identity=EMPTY_PARTIAL, equal=numeric_partials_close
    )


def test_merge_laws_catch_broken_merges() -> None:
    with pytest.raises(AssertionError, match="not commutative"):
        assert_merge_laws(lambda a, b: a + b, [b"x", b"y"])  # concatenation
    with pytest.raises(AssertionError, match="not associative"):
        assert_merge_laws(lambda a, b: (a + b) / 2, [0.0, 1.0, 4.0])  # pairwise mean
    with pytest.raises(AssertionError, match="identity"):
        assert_merge_laws(max, [1, 2], identity=5)
    assert_merge_laws(max, [1, 2, 3], identity=0)  # and a lawful one passes


def test_numeric_partials_close_compares_statistics() -> None:
    a = _core._moments_of(np.array([1.0, 2.0]))
    b = _core._moments_of(np.array([2.0, 1.0]))
    assert numeric_partials_close(a, b)
    assert not numeric_partials_close(a, _core._moments_of(np.array([1.0, 2.0, 2.0])))
    assert not numeric_partials_close(a, _core._moments_of(np.array([1.0, 2.5])))
    nan = _core._moments_of(np.array([math.nan]))
    assert numeric_partials_close(nan, nan) and not numeric_partials_close(nan, a)


# -- assert_corruption_detected ------------------------------------------------------------


@settings(max_examples=25)
@given(lcb1_batches(max_entries=3, max_size=32))
def test_lcb1_batches_detect_all_damage(batch: bytes) -> None:
    # (record-codec containers: tests/test_codec.py)
    assert_corruption_detected(ss.decode_batch, batch)


def test_corruption_check_catches_a_lenient_decoder() -> None:
    blob = encode_records(0, [(b"k", b"v")])

    def ignores_the_checksum(data: bytes) -> object:
        if len(data) < 12 or data[:4] != b"SSRC":
            raise ss.CorruptDataError("bad header")
        return data[12:-4]

    with pytest.raises(AssertionError, match="decoded without an error"):
        assert_corruption_detected(ignores_the_checksum, blob)

    def wrong_error(data: bytes) -> object:
        if data != blob:
            raise KeyError("not CorruptDataError")
        return data

    with pytest.raises(AssertionError, match="raised KeyError"):
        assert_corruption_detected(wrong_error, blob)
    with pytest.raises(ss.CorruptDataError):  # the intact input itself must decode
        assert_corruption_detected(decode_records, blob[:-1])
    with pytest.raises(ValueError, match="masks"):
        assert_corruption_detected(decode_records, blob, masks=(0,))


# -- OperatorMachine -----------------------------------------------------------------------


@dataclass
class _StoreModel:
    """What a NumericAggregateStore with two partitions should hold, in plain Python."""

    local: list[dict[int, list[float]]] = field(default_factory=lambda: [{}, {}])
    published: list[dict[int, list[float]]] = field(default_factory=lambda: [{}, {}])


class NumericStoreMachine(OperatorMachine[ss.NumericAggregateStore, _StoreModel]):
    """The numeric store against its model, through checkpoints, crashes and restores."""

    def make_operator(self) -> ss.NumericAggregateStore:
        return ss.NumericAggregateStore(2)

    def make_model(self) -> _StoreModel:
        return _StoreModel()

    @rule(partition=st.integers(0, 1), batch=numeric_batches(max_rows=8, distinct_keys=4))
    def fold(self, partition: int, batch: NumericBatch) -> None:
        self.operator.partition(partition).fold(batch.keys, batch.values)
        int_keys = batch.keys.tolist()  # type: ignore[union-attr]
        for key, value in zip(int_keys, batch.values.tolist(), strict=True):
            self.model.local[partition].setdefault(key, []).append(value)

    @rule(partition=st.integers(0, 1))
    def publish(self, partition: int) -> None:
        self.operator.partition(partition).publish()
        self.model.published[partition] = {
            k: list(v) for k, v in self.model.local[partition].items()
        }

    def check(self, operator: ss.NumericAggregateStore, model: _StoreModel) -> None:
        for partition in (0, 1):
            assert len(operator.partition(partition)) == len(model.local[partition])
        merged: dict[int, list[float]] = {}
        for part in model.published:
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        assert len(operator) == len(merged)
        for key, values in merged.items():
            stats = operator.result(key)
            assert stats is not None and stats.count == len(values)
            assert (stats.min, stats.max) == (min(values), max(values))
            assert math.isclose(stats.sum, math.fsum(values), rel_tol=1e-9, abs_tol=1e-6)


TestNumericStoreMachine = NumericStoreMachine.TestCase
TestNumericStoreMachine.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)


class _CounterMachine(OperatorMachine[_Counter, Counter[bytes]]):
    """A user's operator (the _Counter above) against a collections.Counter model."""

    bug = False

    def make_operator(self) -> _Counter:
        return _Counter(drop_smallest_on_restore=self.bug)

    def make_model(self) -> Counter[bytes]:
        return Counter()

    @rule(key=st.sampled_from([b"a", b"b", b"c"]))
    def add(self, key: bytes) -> None:
        self.operator.add(key)
        self.model[key] += 1

    def check(self, operator: _Counter, model: Counter[bytes]) -> None:
        assert operator.counts == dict(model)


class _BuggyCounterMachine(_CounterMachine):
    bug = True


def test_machine_passes_a_correct_operator() -> None:
    run_state_machine_as_test(
        _CounterMachine, settings=settings(max_examples=30, stateful_step_count=12, deadline=None)
    )


def test_machine_missing_a_hook_is_refused_by_name() -> None:
    class _NoCheck(OperatorMachine[_Counter, Counter[bytes]]):
        def make_operator(self) -> _Counter:
            return _Counter()

        def make_model(self) -> Counter[bytes]:
            return Counter()

    with pytest.raises(TypeError, match=r"_NoCheck must implement check"):
        _NoCheck()  # type: ignore[abstract]


def test_machine_finds_a_bug_only_a_restore_shows() -> None:
    # The buggy counter is right until it is restored: only the built-in checkpoint and
    # crash/rollback steps can expose it.
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            _BuggyCounterMachine,
            settings=settings(max_examples=100, stateful_step_count=12, deadline=None,
                              report_multiple_bugs=False, database=None),
        )


# -- the optional dependency ---------------------------------------------------------------


def test_import_without_hypothesis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # makes `import hypothesis` fail
    monkeypatch.delitem(sys.modules, "streamstate.testing")
    with pytest.raises(ImportError, match=r"pip install streamstate\[test\]"):
        importlib.import_module("streamstate.testing")
